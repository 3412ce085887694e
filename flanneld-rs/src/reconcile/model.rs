//! The incremental reconcile: a model of what we programmed in one family,
//! the peers by subnet with the lease each came from and its entries.
//!
//! With it a lease event that changes a few leases costs work for those
//! leases only: their entries are derived ([`super::desired::derive`]),
//! planned against the model's entries at the same keys (route destination,
//! neighbour address, FDB MAC) with the same [`plan`](super::plan::plan)
//! the full reconcile uses, applied, and the model updated. Anything that
//! involves other leases (a subnet, VTEP address or MAC another lease has, a
//! rejected lease, a lease not programmed before) is left to the full
//! reconcile, and so is every error: the caller drops the model and the next
//! trigger runs in full. A kernel notification that agrees with the model
//! (the echo of our own op) asks for nothing ([`Model::agrees`]); one that
//! does not (a hand edit, a deletion) still asks for a full reconcile.
//!
//! The model keeps no copy of the kernel's entries: it exists only after
//! runs whose ops all succeeded, and such a run leaves on our device (and,
//! with direct routing, on the underlay) exactly the desired entries (the
//! plan deletes every observed one not desired), so the kernel holds
//! exactly the programmed peers' entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use flannel_net::netlink::{Change, Fdb, Neigh, NeighEntry, Route, VxlanLink};
use flannel_net::MacAddr;
use ipnet::IpNet;

use super::desired::{derive, Derived, Full};
use super::plan::{self, Desired, Observed, Op, PeerEntries};
use crate::backend::Backend;
use crate::config::NetworkConfig;
use crate::lease::{FamilyLease, LeaseChange};

/// What we programmed in one family, and for which leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Our device as last observed (`None` for backends without one).
    device: Option<VxlanLink>,
    /// The programmed peers: subnet (their route's destination) -> (lease
    /// source, entries).
    peers: BTreeMap<IpNet, (String, PeerEntries)>,
    /// Which peer's subnet each neighbour address and FDB MAC belongs to.
    neigh_owner: BTreeMap<IpAddr, IpNet>,
    fdb_owner: BTreeMap<MacAddr, IpNet>,
}

/// An incremental plan: its ops, and the peers it removes and adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incremental {
    /// The ops, in the plan's order.
    pub ops: Vec<Op>,
    removed: Vec<IpNet>,
    added: Vec<(IpNet, String, PeerEntries)>,
}

impl Model {
    /// The model after a full reconcile of `full` that observed `observed`
    /// and applied `ops` without an error. `None` when it cannot serve
    /// incremental runs: the device was (re)created (its index is new), two
    /// leases asked for one subnet, two peers share a VTEP address or MAC,
    /// the kernel held two routes to one destination (the plan replaces only
    /// one), or the backend has routes of its own (a data path's). The
    /// peers' entries and sources are moved out of `full`, not copied.
    pub fn after_full(full: Full, observed: Observed, ops: &[Op]) -> Option<Model> {
        if full.duplicates
            || !full.desired.routes.is_empty()
            || ops.iter().any(|op| matches!(op, Op::CreateDevice | Op::RecreateDevice(_)))
        {
            return None;
        }
        let mut dsts = BTreeSet::new();
        if !observed.routes.iter().all(|r| dsts.insert(r.dst)) {
            return None;
        }
        let mut m = Model { device: observed.device, ..Model::default() };
        let Full { desired, mut sources, .. } = full;
        for (subnet, entries) in desired.peers {
            let source = sources.remove(&subnet)?;
            if !m.own(subnet, &entries) {
                return None;
            }
            m.peers.insert(subnet, (source, entries));
        }
        Some(m)
    }

    /// How many peers are programmed.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Records `subnet` as the owner of its entries' keys; false if another
    /// peer has one of them.
    fn own(&mut self, subnet: IpNet, e: &PeerEntries) -> bool {
        if let Some(n) = e.neigh {
            if *self.neigh_owner.entry(n.ip).or_insert(subnet) != subnet {
                return false;
            }
        }
        if let Some(f) = e.fdb {
            if *self.fdb_owner.entry(f.mac).or_insert(subnet) != subnet {
                return false;
            }
        }
        true
    }

    /// The route to `dst` in the kernel, as the kernel reports it (a route
    /// through our device with its index).
    fn route(&self, dst: IpNet) -> Option<Route> {
        let index = self.device.as_ref().map(|d| d.index);
        self.peers.get(&dst).map(|(_, e)| Route { oif: e.route.oif.or(index), ..e.route.clone() })
    }

    /// The permanent neighbour for `ip` on our device.
    fn neigh(&self, ip: IpAddr) -> Option<Neigh> {
        self.neigh_owner.get(&ip).and_then(|s| self.peers[s].1.neigh)
    }

    /// The permanent FDB entry for `mac` on our device.
    fn fdb(&self, mac: MacAddr) -> Option<Fdb> {
        self.fdb_owner.get(&mac).and_then(|s| self.peers[s].1.fdb)
    }

    /// Whether `subnet` overlaps a programmed peer's subnet other than `except`.
    fn overlaps(&self, subnet: IpNet, except: Option<IpNet>) -> bool {
        let other = |k: &IpNet| Some(*k) != except;
        // Those containing it (the same subnet included)...
        let wider = (0..=subnet.prefix_len()).any(|len| {
            IpNet::new(subnet.addr(), len).map(|n| n.trunc()).is_ok_and(|n| other(&n) && self.peers.contains_key(&n))
        });
        // ... and those inside it (they sort right after it).
        wider || self.peers.range(subnet..).take_while(|(k, _)| subnet.contains(&k.network())).any(|(k, _)| other(k))
    }

    /// Plans `changes` (for this family: `own` is our lease's part of it)
    /// against the model. `None` when they need the full reconcile.
    pub fn plan(
        &self,
        cfg: &NetworkConfig,
        own: &FamilyLease,
        backend: &Backend,
        segment: IpNet,
        changes: &[LeaseChange],
    ) -> Option<Incremental> {
        let family = own.family;
        let mut inc = Incremental::default();
        let mut desired = Desired::default();
        let mut observed = Observed::default();
        // Keys touched by the batch: two changes touching one key (a subnet
        // moving from one lease to another) go to the full reconcile.
        let mut subnets = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for (source, old, new) in changes {
            let (mut keys_subnet, mut keys_ip, mut keys_mac) = (Vec::new(), Vec::new(), Vec::new());
            let mut old_subnet = None;
            if let Some(o) = old.and_then(|o| o.family(family)) {
                // Only a lease that was programmed, from this source.
                let (src, e) = self.peers.get(&o.subnet)?;
                if src != source {
                    return None;
                }
                old_subnet = Some(o.subnet);
                keys_subnet.push(o.subnet);
                keys_ip.extend(e.neigh.map(|n| n.ip));
                keys_mac.extend(e.fdb.map(|f| f.mac));
                inc.removed.push(o.subnet);
            }
            if let Some(n) = new {
                match derive(cfg, own, backend, segment, n) {
                    Derived::Nothing if n.family(family).is_none() => {}
                    Derived::Kernel(subnet, e) => {
                        if self.overlaps(subnet, old_subnet) {
                            return None;
                        }
                        let owned_by_other = |owner: Option<&IpNet>| owner.is_some_and(|o| Some(*o) != old_subnet);
                        if e.neigh.is_some_and(|n| owned_by_other(self.neigh_owner.get(&n.ip)))
                            || e.fdb.is_some_and(|f| owned_by_other(self.fdb_owner.get(&f.mac)))
                        {
                            return None;
                        }
                        keys_subnet.push(subnet);
                        keys_ip.extend(e.neigh.map(|n| n.ip));
                        keys_mac.extend(e.fdb.map(|f| f.mac));
                        desired.peers.insert(subnet, e.clone());
                        inc.added.push((subnet, source.to_string(), e));
                    }
                    // Our own subnet, a rejected lease, a data path's peer.
                    _ => return None,
                }
            }
            keys_subnet.dedup();
            keys_ip.dedup();
            keys_mac.dedup();
            for s in keys_subnet {
                if !subnets.insert(s) {
                    return None;
                }
                observed.routes.extend(self.route(s));
            }
            for ip in keys_ip {
                if !ips.insert(ip) {
                    return None;
                }
                observed.neighs.extend(self.neigh(ip));
            }
            for mac in keys_mac {
                if !macs.insert(mac) {
                    return None;
                }
                observed.fdbs.extend(self.fdb(mac));
            }
        }
        // Without a device in the slice, the plan is only the peers' entries.
        inc.ops = plan::plan(&desired, &observed);
        Some(inc)
    }

    /// Records an incremental plan whose ops were all applied: the kernel
    /// now holds the added peers' entries at the keys it touched.
    pub fn commit(&mut self, inc: Incremental) {
        for subnet in &inc.removed {
            if let Some((_, e)) = self.peers.remove(subnet) {
                if let Some(n) = e.neigh {
                    self.neigh_owner.remove(&n.ip);
                }
                if let Some(f) = e.fdb {
                    self.fdb_owner.remove(&f.mac);
                }
            }
        }
        for (subnet, source, e) in inc.added {
            let owned = self.own(subnet, &e);
            debug_assert!(owned, "planned only when no other peer has the keys");
            self.peers.insert(subnet, (source, e));
        }
    }

    /// The ops' device (for applying them) as a desired and an observed
    /// state with nothing else in them.
    pub fn device_only(&self, backend: &Backend) -> (Desired, Observed) {
        (
            Desired { device: backend.device(), ..Desired::default() },
            Observed { device: self.device.clone(), ..Observed::default() },
        )
    }

    /// Whether a kernel notification about our device (or the routes we
    /// own through the underlay) agrees with the model: an entry there as
    /// the model has it, or gone where the model has none. Such a
    /// notification is the echo of our own op (or a change to what we
    /// already have) and asks for no reconcile. Anything else (a deletion
    /// of an entry the model has, a different next hop or MAC, a link or
    /// address change, an overrun, a message we cannot read) does not agree.
    pub fn agrees(&self, change: &Change) -> bool {
        match change {
            Change::Route { oif, route: Some(r), deleted: false } => {
                self.route(r.dst).is_some_and(|m| m.gateway == r.gateway && m.oif == *oif)
            }
            Change::Route { route: Some(r), deleted: true, .. } => self.route(r.dst).is_none(),
            Change::Neigh { index, entry: Some(entry), deleted } => {
                if self.device.as_ref().map(|d| d.index) != Some(*index) {
                    return false;
                }
                match (entry, deleted) {
                    (NeighEntry::Neigh(n, true), false) => self.neigh(n.ip) == Some(*n),
                    // A non-permanent entry is not ours (the full reconcile
                    // reads only permanent ones) unless it took the place of one.
                    (NeighEntry::Neigh(n, _), _) => self.neigh(n.ip).is_none(),
                    (NeighEntry::Fdb(f, true), false) => self.fdb(f.mac) == Some(*f),
                    (NeighEntry::Fdb(f, _), _) => self.fdb(f.mac) != Some(*f),
                }
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{BackendType, Family, Lease, Lease4, VxlanData};
    use crate::reconcile::desired::desired;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, "test").unwrap()
    }

    fn lease(source: &str, subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            ipv4: Some(Lease4 {
                subnet: subnet.parse().unwrap(),
                public_ip: ip.parse().unwrap(),
                vxlan: Some(VxlanData { vni: 1, vtep_mac: mac.parse().unwrap() }),
                wireguard: None,
            }),
            backend: BackendType::Vxlan,
            source: source.to_string(),
            ipv6: None,
        }
    }

    fn backend() -> Backend {
        Backend::Vxlan { vtep: crate::reconcile::test_vtep_spec(), direct_routing: false }
    }

    fn segment() -> IpNet {
        "192.0.2.0/24".parse().unwrap()
    }

    fn own() -> Lease {
        lease("n1", "10.244.1.0/24", "192.0.2.10", "02:00:00:00:00:10")
    }

    /// Our VTEP as the kernel has it after the plan's ops (checksum
    /// offload already off).
    fn device() -> VxlanLink {
        let s = crate::reconcile::test_vtep_spec();
        VxlanLink { tx_checksum: s.tx_checksum, ..plan::Device::Vxlan(s).created(7) }
    }

    fn full(leases: &[Lease]) -> Full {
        desired(&cfg(), Family::V4, &own(), &backend(), segment(), leases)
    }

    /// The model after a full reconcile of `leases` on an existing device,
    /// and that reconcile's kernel state.
    fn programmed(leases: &[Lease]) -> (Model, Observed) {
        let f = full(leases);
        let mut o = Observed { device: Some(device()), ..Observed::default() };
        let ops = plan::plan(&f.desired, &o);
        plan::simulate(&f.desired, &mut o, &ops);
        // The kernel reports routes through the device with its index.
        for r in &mut o.routes {
            r.oif = r.oif.or(Some(7));
        }
        let m = Model::after_full(f, Observed { device: Some(device()), ..Observed::default() }, &ops).unwrap();
        (m, o)
    }

    fn peers(n: u8) -> Vec<Lease> {
        (2..2 + n)
            .map(|i| {
                lease(
                    &format!("n{i}"),
                    &format!("10.244.{i}.0/24"),
                    &format!("192.0.2.{i}"),
                    &format!("02:00:00:00:00:{i:02x}"),
                )
            })
            .collect()
    }

    /// Plans `changes` incrementally and checks the result against a full
    /// plan of the new lease set from the model's kernel state: the same
    /// kernel state after either, and nothing left for the full plan.
    fn check_same_as_full(m: &mut Model, kernel: &mut Observed, new: &[Lease], changes: &[LeaseChange]) -> Vec<Op> {
        let own = own();
        let inc =
            m.plan(&cfg(), &own.family(Family::V4).unwrap(), &backend(), segment(), changes).expect("incremental");
        let ops = inc.ops.clone();
        let f = full(new);
        plan::simulate(&f.desired, kernel, &ops);
        m.commit(inc);
        let left = plan::plan(&f.desired, kernel);
        assert!(left.is_empty(), "the full plan after the incremental one still has {left:?}");
        ops
    }

    #[test]
    fn a_new_lease_is_planned_alone_in_the_plans_order() {
        let mut leases = peers(3);
        let (mut m, mut kernel) = programmed(&leases);
        let new = lease("n9", "10.244.9.0/24", "192.0.2.9", "02:00:00:00:00:09");
        leases.push(new.clone());
        let ops = check_same_as_full(&mut m, &mut kernel, &leases, &[("n9", None, Some(&new))]);
        let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
        assert_eq!(kinds, ["SetNeigh", "SetFdb", "SetRoute"]);
        assert_eq!(m.peers(), 4);
    }

    #[test]
    fn a_changed_lease_replaces_its_entries_and_drops_the_old_fdb_entry() {
        let mut leases = peers(3);
        let (mut m, mut kernel) = programmed(&leases);
        let old = leases[1].clone();
        let new = lease("n3", "10.244.3.0/24", "192.0.2.33", "02:00:00:00:00:33");
        leases[1] = new.clone();
        let ops = check_same_as_full(&mut m, &mut kernel, &leases, &[("n3", Some(&old), Some(&new))]);
        let old_fdb = old.family(Family::V4).unwrap();
        assert!(
            ops.contains(&Op::DelFdb(Fdb { mac: old_fdb.vxlan.unwrap().vtep_mac, dst: old_fdb.public_ip.unwrap() }))
        );
        assert!(!ops.iter().any(|op| matches!(op, Op::DelRoute(_) | Op::DelNeigh(_))), "{ops:?}");
        assert_eq!(m.peers(), 3);
    }

    #[test]
    fn a_removed_lease_takes_its_route_neighbour_and_fdb_entry_with_it() {
        let mut leases = peers(3);
        let (mut m, mut kernel) = programmed(&leases);
        let gone = leases.remove(0);
        let ops = check_same_as_full(&mut m, &mut kernel, &leases, &[("n2", Some(&gone), None)]);
        let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
        assert_eq!(kinds, ["DelRoute", "DelNeigh", "DelFdb"]);
        assert_eq!(m.peers(), 2);
        // Adding it back restores all three.
        leases.push(gone.clone());
        let ops = check_same_as_full(&mut m, &mut kernel, &leases, &[("n2", None, Some(&gone))]);
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn conflicts_and_leases_not_programmed_before_go_to_the_full_reconcile() {
        let leases = peers(3);
        let (m, _) = programmed(&leases);
        let own = own();
        let own4 = own.family(Family::V4).unwrap();
        let plan = |changes: &[LeaseChange]| m.plan(&cfg(), &own4, &backend(), segment(), changes);
        // Another lease's subnet, a subnet inside or around one.
        for subnet in ["10.244.3.0/24", "10.244.3.128/25", "10.244.0.0/22"] {
            let dup = lease("n9", subnet, "192.0.2.9", "02:00:00:00:00:09");
            assert_eq!(plan(&[("n9", None, Some(&dup))]), None, "{subnet}");
        }
        // Another peer's VTEP MAC.
        let same_mac = lease("n9", "10.244.9.0/24", "192.0.2.9", "02:00:00:00:00:03");
        assert_eq!(plan(&[("n9", None, Some(&same_mac))]), None);
        // Our own subnet (claimed by another node), a rejected lease.
        let ours = lease("n9", "10.244.1.0/24", "192.0.2.9", "02:00:00:00:00:09");
        assert_eq!(plan(&[("n9", None, Some(&ours))]), None);
        let bad = lease("n9", "10.244.9.0/24", "127.0.0.1", "02:00:00:00:00:09");
        assert_eq!(plan(&[("n9", None, Some(&bad))]), None);
        // A removed lease that was not programmed (rejected before), or not from this source.
        assert_eq!(plan(&[("n9", Some(&bad), None)]), None);
        let stolen = lease("n9", "10.244.2.0/24", "192.0.2.2", "02:00:00:00:00:02");
        assert_eq!(plan(&[("n9", Some(&stolen), None)]), None);
        // A subnet moving between two leases in one batch.
        let (a, b) = (&leases[0], lease("n9", "10.244.2.0/24", "192.0.2.9", "02:00:00:00:00:09"));
        assert_eq!(plan(&[("n2", Some(a), None), ("n9", None, Some(&b))]), None);
        // And a plain new lease is fine.
        let fine = lease("n9", "10.244.9.0/24", "192.0.2.9", "02:00:00:00:00:09");
        assert!(plan(&[("n9", None, Some(&fine))]).is_some());
    }

    #[test]
    fn duplicate_subnets_leave_no_model() {
        let mut leases = peers(2);
        leases.push(lease("n9", "10.244.2.0/24", "192.0.2.9", "02:00:00:00:00:09"));
        let f = full(&leases);
        assert!(f.duplicates);
        assert_eq!(Model::after_full(f, Observed { device: Some(device()), ..Observed::default() }, &[]), None);
        // A created device has a new index: no model either.
        let f = full(&peers(2));
        assert_eq!(Model::after_full(f, Observed::default(), &[Op::CreateDevice]), None);
    }

    #[test]
    fn echoes_of_our_ops_agree_and_other_changes_do_not() {
        let leases = peers(2);
        let (m, kernel) = programmed(&leases);
        let r = kernel.routes[0].clone();
        let n = kernel.neighs[0];
        let f = kernel.fdbs[0];
        let route = |route: Route, deleted| Change::Route { oif: route.oif, route: Some(route), deleted };
        let neigh = |e, deleted| Change::Neigh { index: 7, entry: Some(e), deleted };
        assert!(m.agrees(&route(r.clone(), false)));
        assert!(!m.agrees(&route(r.clone(), true)), "a deleted route of ours must be restored");
        let other_gw = Route { gateway: Some("10.244.99.0".parse().unwrap()), ..r.clone() };
        assert!(!m.agrees(&route(other_gw, false)));
        let unknown = Route { dst: "10.244.77.0/24".parse().unwrap(), ..r.clone() };
        assert!(!m.agrees(&route(unknown.clone(), false)), "a route we did not add");
        assert!(m.agrees(&route(unknown, true)), "the echo of our own delete");
        assert!(!m.agrees(&Change::Route { oif: Some(7), route: None, deleted: false }));
        assert!(m.agrees(&neigh(NeighEntry::Neigh(n, true), false)));
        assert!(!m.agrees(&neigh(NeighEntry::Neigh(n, true), true)));
        assert!(!m.agrees(&neigh(NeighEntry::Neigh(n, false), false)), "a non-permanent entry in our entry's place");
        let moved = Fdb { dst: "192.0.2.99".parse().unwrap(), ..f };
        assert!(m.agrees(&neigh(NeighEntry::Fdb(f, true), false)));
        assert!(!m.agrees(&neigh(NeighEntry::Fdb(f, true), true)));
        assert!(!m.agrees(&neigh(NeighEntry::Fdb(moved, true), false)));
        assert!(m.agrees(&neigh(NeighEntry::Fdb(moved, true), true)), "the echo of our own delete");
        assert!(!m.agrees(&Change::Neigh { index: 8, entry: Some(NeighEntry::Neigh(n, true)), deleted: false }));
        assert!(!m.agrees(&Change::Link(7)));
        assert!(!m.agrees(&Change::Overrun));
    }
}
