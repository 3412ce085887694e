//! `plan(desired, observed) -> ops`: the pure heart of the reconcile loop.
//!
//! Ordering rules (from flannel's hard-won experience):
//! - For a peer being added: ARP neighbour, then FDB entry, then route (the
//!   plan emits them in phases, all neighbours before all FDB entries before
//!   all routes, which keeps every peer's order and lets a phase be pipelined). With
//!   the route last, the kernel never has a route to a peer whose VTEP MAC it
//!   does not know, so it never ARPs for the gateway.
//! - For a peer being removed: route, then ARP neighbour, then FDB entry.
//! - Adds come before deletes ("make before break"): a peer whose MAC or
//!   public IP changed gets its new entries first, then the old FDB entry goes.

use std::collections::{BTreeMap, BTreeSet};

use flannel_net::netlink::{Fdb, Neigh, Route, VxlanLink, VxlanSpec};
use ipnet::{IpNet, Ipv4Net};

/// What one peer lease asks of our kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntries {
    /// Route to the peer's subnet.
    pub route: Route,
    /// ARP entry for the peer's VTEP address (absent with direct routing).
    pub neigh: Option<Neigh>,
    /// FDB entry for the peer's VTEP MAC (absent with direct routing).
    pub fdb: Option<Fdb>,
}

/// The kernel state the lease set asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Our VTEP (VXLAN); `None` for backends without a device of ours (host-gw).
    pub vtep: Option<VxlanSpec>,
    /// Its address: `<our subnet>.0/32`.
    pub addr: Option<Ipv4Net>,
    /// Per peer subnet.
    pub peers: BTreeMap<Ipv4Net, PeerEntries>,
    /// udp: peers reached through the user-space data path, subnet -> public
    /// IP. They need nothing in the kernel; the plan ignores them.
    pub tunnel: BTreeMap<Ipv4Net, std::net::Ipv4Addr>,
}

/// The kernel state we own, as dumped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Our VTEP, if it exists.
    pub vtep: Option<VxlanLink>,
    /// IPv4 addresses on it.
    pub addrs: Vec<IpNet>,
    /// Main-table routes through it (and, with direct routing, our routes on the underlay).
    pub routes: Vec<Route>,
    /// Permanent neighbours on it.
    pub neighs: Vec<Neigh>,
    /// Permanent FDB entries on it.
    pub fdbs: Vec<Fdb>,
}

/// One kernel change; [`super::kernel::apply`] turns each into one netlink request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the VTEP (it does not exist).
    CreateVtep,
    /// Delete and create the VTEP: its attributes cannot be changed in place.
    RecreateVtep(Vec<String>),
    /// Set the VTEP's MTU.
    SetMtu(u32),
    /// Bring the VTEP up.
    SetUp,
    /// Add an address to the VTEP.
    AddAddr(IpNet),
    /// Remove an address from the VTEP.
    DelAddr(IpNet),
    /// Add or replace an ARP neighbour.
    SetNeigh(Neigh),
    /// Delete an ARP neighbour.
    DelNeigh(Neigh),
    /// Add or replace an FDB entry.
    SetFdb(Fdb),
    /// Delete an FDB entry.
    DelFdb(Fdb),
    /// Add or replace a route.
    SetRoute(Route),
    /// Delete a route.
    DelRoute(Route),
}

/// Observed routes are already those through our device, and desired routes
/// get the device's index only when applied (it changes when the device is
/// recreated), so destination and next hop decide.
impl Op {
    /// The op's name, for summaries (`SetRoute`).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::CreateVtep => "CreateVtep",
            Op::RecreateVtep(_) => "RecreateVtep",
            Op::SetMtu(_) => "SetMtu",
            Op::SetUp => "SetUp",
            Op::AddAddr(_) => "AddAddr",
            Op::DelAddr(_) => "DelAddr",
            Op::SetNeigh(_) => "SetNeigh",
            Op::DelNeigh(_) => "DelNeigh",
            Op::SetFdb(_) => "SetFdb",
            Op::DelFdb(_) => "DelFdb",
            Op::SetRoute(_) => "SetRoute",
            Op::DelRoute(_) => "DelRoute",
        }
    }
}

fn same_route(a: &Route, b: &Route) -> bool {
    a.dst == b.dst && a.gateway == b.gateway
}

/// Computes the changes that bring `observed` to `desired`. Pure: no I/O.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    let fresh = match (&desired.vtep, &observed.vtep) {
        (None, _) => false,
        (Some(_), None) => {
            ops.push(Op::CreateVtep);
            true
        }
        (Some(spec), Some(link)) => {
            let why = link.incompatibilities(spec);
            if why.is_empty() {
                if link.mtu != spec.mtu {
                    ops.push(Op::SetMtu(spec.mtu));
                }
                if !link.up {
                    ops.push(Op::SetUp);
                }
                false
            } else {
                ops.push(Op::RecreateVtep(why));
                true
            }
        }
    };
    // A new device starts empty: everything is to be added, nothing to delete.
    let empty = Observed::default();
    let observed = if fresh { &empty } else { observed };

    let want_addr = desired.addr.map(IpNet::V4);
    if let Some(a) = want_addr {
        if !observed.addrs.contains(&a) {
            ops.push(Op::AddAddr(a));
        }
    }

    // In phases (every neighbour, then every FDB entry, then every route) so
    // that the executor can pipeline each phase; each peer's own order holds.
    let neighs: BTreeMap<_, _> = observed.neighs.iter().map(|n| (n.ip, n.mac)).collect();
    let fdbs: BTreeSet<Fdb> = observed.fdbs.iter().copied().collect();
    let routes: BTreeMap<IpNet, &Route> = observed.routes.iter().map(|r| (r.dst, r)).collect();
    let (mut set_neighs, mut set_fdbs, mut set_routes) = (Vec::new(), Vec::new(), Vec::new());
    for peer in desired.peers.values() {
        if let Some(n) = peer.neigh {
            if neighs.get(&n.ip) != Some(&n.mac) {
                set_neighs.push(Op::SetNeigh(n));
            }
        }
        if let Some(f) = peer.fdb {
            if !fdbs.contains(&f) {
                set_fdbs.push(Op::SetFdb(f));
            }
        }
        if !routes.get(&peer.route.dst).is_some_and(|r| same_route(r, &peer.route)) {
            set_routes.push(Op::SetRoute(peer.route.clone()));
        }
    }
    ops.extend(set_neighs);
    ops.extend(set_fdbs);
    ops.extend(set_routes);

    for a in &observed.addrs {
        if Some(*a) != want_addr && a.addr().is_ipv4() {
            ops.push(Op::DelAddr(*a));
        }
    }
    let want_routes: BTreeSet<IpNet> = desired.peers.values().map(|p| p.route.dst).collect();
    for r in &observed.routes {
        if !want_routes.contains(&r.dst) {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    let want_neighs: BTreeSet<_> = desired.peers.values().filter_map(|p| p.neigh.map(|n| n.ip)).collect();
    for n in &observed.neighs {
        if !want_neighs.contains(&n.ip) {
            ops.push(Op::DelNeigh(*n));
        }
    }
    let want_fdbs: BTreeSet<Fdb> = desired.peers.values().filter_map(|p| p.fdb).collect();
    for f in &observed.fdbs {
        if !want_fdbs.contains(f) {
            ops.push(Op::DelFdb(*f));
        }
    }
    ops
}

/// Applies `ops` to an in-memory kernel (the plan's model of the kernel's
/// semantics). Used by the tests to check that planning again yields nothing,
/// and by `diagnose` to describe what applying would leave.
pub fn simulate(desired: &Desired, observed: &mut Observed, ops: &[Op]) {
    for op in ops {
        match op {
            Op::CreateVtep | Op::RecreateVtep(_) => {
                let s = desired.vtep.as_ref().expect("only VXLAN plans create a device");
                *observed = Observed {
                    vtep: Some(VxlanLink {
                        index: 100,
                        mac: Some(s.mac),
                        mtu: s.mtu,
                        up: true,
                        kind: Some("vxlan".into()),
                        vni: Some(s.vni),
                        local: Some(s.local),
                        dev: Some(s.dev),
                        port: Some(s.port),
                        learning: Some(s.learning),
                        gbp: s.gbp,
                    }),
                    ..Observed::default()
                };
            }
            Op::SetMtu(m) => observed.vtep.as_mut().expect("vtep").mtu = *m,
            Op::SetUp => observed.vtep.as_mut().expect("vtep").up = true,
            Op::AddAddr(a) => observed.addrs.push(*a),
            Op::DelAddr(a) => observed.addrs.retain(|x| x != a),
            Op::SetNeigh(n) => {
                observed.neighs.retain(|x| x.ip != n.ip);
                observed.neighs.push(*n);
            }
            Op::DelNeigh(n) => observed.neighs.retain(|x| x.ip != n.ip),
            // The kernel keys VXLAN FDB entries by MAC: replace moves the MAC's remote.
            Op::SetFdb(f) => {
                observed.fdbs.retain(|x| x.mac != f.mac);
                observed.fdbs.push(*f);
            }
            Op::DelFdb(f) => observed.fdbs.retain(|x| x != f),
            Op::SetRoute(r) => {
                observed.routes.retain(|x| x.dst != r.dst);
                observed.routes.push(r.clone());
            }
            Op::DelRoute(r) => observed.routes.retain(|x| x.dst != r.dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_net::MacAddr;
    use std::net::{IpAddr, Ipv4Addr};

    use crate::reconcile::test_vtep_spec as spec;

    fn peer(subnet: &str, mac: &str, public: &str) -> (Ipv4Net, PeerEntries) {
        let net: Ipv4Net = subnet.parse().unwrap();
        let vtep_ip = net.network();
        let mac: MacAddr = mac.parse().unwrap();
        (
            net,
            PeerEntries {
                route: Route { dst: IpNet::V4(net), gateway: Some(IpAddr::V4(vtep_ip)), oif: None, onlink: true },
                neigh: Some(Neigh { ip: vtep_ip, mac }),
                fdb: Some(Fdb { mac, dst: public.parse::<Ipv4Addr>().unwrap() }),
            },
        )
    }

    fn desired(peers: &[(&str, &str, &str)]) -> Desired {
        Desired {
            vtep: Some(spec()),
            addr: Some("10.244.1.0/32".parse().unwrap()),
            peers: peers.iter().map(|(s, m, p)| peer(s, m, p)).collect(),
            tunnel: BTreeMap::new(),
        }
    }

    /// The kernel after applying `d` to an empty node.
    fn converged(d: &Desired) -> Observed {
        let mut o = Observed::default();
        simulate(d, &mut o, &plan(d, &Observed::default()));
        o
    }

    const A: (&str, &str, &str) = ("10.244.2.0/24", "02:00:00:00:00:02", "192.0.2.11");
    const B: (&str, &str, &str) = ("10.244.3.0/24", "02:00:00:00:00:03", "192.0.2.12");

    #[test]
    fn fresh_node_creates_vtep_then_arp_fdb_route_per_peer() {
        let d = desired(&[A]);
        let ops = plan(&d, &Observed::default());
        let (net, p) = peer(A.0, A.1, A.2);
        let _ = net;
        assert_eq!(
            ops,
            vec![
                Op::CreateVtep,
                Op::AddAddr("10.244.1.0/32".parse().unwrap()),
                Op::SetNeigh(p.neigh.unwrap()),
                Op::SetFdb(p.fdb.unwrap()),
                Op::SetRoute(p.route),
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_converged() {
        let d = desired(&[A, B]);
        assert_eq!(plan(&d, &converged(&d)), vec![]);
    }

    #[test]
    fn peer_added() {
        let before = desired(&[A]);
        let o = converged(&before);
        let d = desired(&[A, B]);
        let (_, p) = peer(B.0, B.1, B.2);
        assert_eq!(
            plan(&d, &o),
            vec![Op::SetNeigh(p.neigh.unwrap()), Op::SetFdb(p.fdb.unwrap()), Op::SetRoute(p.route)]
        );
    }

    #[test]
    fn peer_removed_route_then_arp_then_fdb() {
        let o = converged(&desired(&[A, B]));
        let d = desired(&[A]);
        let (_, p) = peer(B.0, B.1, B.2);
        assert_eq!(
            plan(&d, &o),
            vec![Op::DelRoute(p.route), Op::DelNeigh(p.neigh.unwrap()), Op::DelFdb(p.fdb.unwrap())]
        );
    }

    #[test]
    fn peer_mac_changed_new_entries_first_then_old_fdb_removed() {
        let o = converged(&desired(&[A]));
        let d = desired(&[(A.0, "02:00:00:00:00:99", A.2)]);
        let (_, old) = peer(A.0, A.1, A.2);
        let (_, new) = peer(A.0, "02:00:00:00:00:99", A.2);
        assert_eq!(
            plan(&d, &o),
            vec![Op::SetNeigh(new.neigh.unwrap()), Op::SetFdb(new.fdb.unwrap()), Op::DelFdb(old.fdb.unwrap())]
        );
    }

    #[test]
    fn peer_public_ip_changed_fdb_replaced() {
        let o = converged(&desired(&[A]));
        let d = desired(&[(A.0, A.1, "192.0.2.99")]);
        let (_, old) = peer(A.0, A.1, A.2);
        let (_, new) = peer(A.0, A.1, "192.0.2.99");
        assert_eq!(plan(&d, &o), vec![Op::SetFdb(new.fdb.unwrap()), Op::DelFdb(old.fdb.unwrap())]);
    }

    #[test]
    fn incompatible_vtep_is_recreated_and_refilled() {
        let d = desired(&[A]);
        let mut o = converged(&d);
        o.vtep.as_mut().unwrap().port = Some(4789);
        let ops = plan(&d, &o);
        assert!(
            matches!(&ops[0], Op::RecreateVtep(why) if why == &vec!["UDP port is 4789, want 8472".to_string()]),
            "{ops:?}"
        );
        assert_eq!(ops.len(), 5, "{ops:?}");
    }

    #[test]
    fn mtu_and_down_device_are_fixed_in_place_and_stale_address_removed() {
        let d = desired(&[A]);
        let mut o = converged(&d);
        let v = o.vtep.as_mut().unwrap();
        v.mtu = 1400;
        v.up = false;
        o.addrs.push("10.244.7.0/32".parse().unwrap());
        assert_eq!(plan(&d, &o), vec![Op::SetMtu(1450), Op::SetUp, Op::DelAddr("10.244.7.0/32".parse().unwrap())]);
    }

    #[test]
    fn entries_deleted_by_hand_come_back() {
        let d = desired(&[A, B]);
        let mut o = converged(&d);
        o.routes.retain(|r| r.dst.to_string() != "10.244.3.0/24");
        o.neighs.retain(|n| n.ip.to_string() != "10.244.2.0");
        o.fdbs.clear();
        let ops = plan(&d, &o);
        assert_eq!(ops.len(), 4, "{ops:?}");
        simulate(&d, &mut o, &ops);
        assert_eq!(plan(&d, &o), vec![]);
    }

    #[test]
    fn applying_the_plan_then_planning_again_yields_nothing() {
        // From a variety of starting points to a variety of targets.
        let starts =
            [Observed::default(), converged(&desired(&[A])), converged(&desired(&[B])), converged(&desired(&[A, B]))];
        let targets =
            [desired(&[]), desired(&[A]), desired(&[A, B]), desired(&[(A.0, "02:00:00:00:00:77", "192.0.2.77")])];
        for s in &starts {
            for t in &targets {
                let mut o = s.clone();
                let ops = plan(t, &o);
                simulate(t, &mut o, &ops);
                assert_eq!(plan(t, &o), vec![], "from {s:?} to {t:?}");
            }
        }
    }
}
