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

/// A device of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A VXLAN VTEP (`flannel.<VNI>`), which the executor creates.
    Vxlan(VxlanSpec),
    /// The udp backend's TUN (`flannel0`), which its data path creates
    /// (its queues own it); the plan keeps its MTU, address, state and route.
    Tun(TunSpec),
}

/// A TUN device as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSpec {
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
}

impl Device {
    /// The link a new device of this spec is, with index `index` (the
    /// plan's model of what the kernel makes).
    pub fn created(&self, index: u32) -> VxlanLink {
        match self {
            Device::Vxlan(s) => VxlanLink {
                index,
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
                // A VTEP is made with transmit checksum offload on.
                tx_checksum: Some(true),
            },
            // A new TUN is down, without address or route.
            Device::Tun(t) => VxlanLink {
                index,
                mac: None,
                mtu: t.mtu,
                up: false,
                kind: Some("tun".into()),
                vni: None,
                local: None,
                dev: None,
                port: None,
                learning: None,
                gbp: false,
                tx_checksum: None,
            },
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        match self {
            Device::Vxlan(v) => &v.name,
            Device::Tun(t) => &t.name,
        }
    }

    /// The device's MTU.
    pub fn mtu(&self) -> u32 {
        match self {
            Device::Vxlan(v) => v.mtu,
            Device::Tun(t) => t.mtu,
        }
    }

    /// Why `link` cannot serve as this device without being created anew
    /// (empty: it can).
    pub fn incompatibilities(&self, link: &VxlanLink) -> Vec<String> {
        match self {
            Device::Vxlan(spec) => link.incompatibilities(spec),
            Device::Tun(_) if link.kind.as_deref() == Some("tun") => Vec::new(),
            // The wireguard backend's kernel path: flannel's own devices
            // (`flannel-wg`, and `flannel-wg-v6` in Mode separate).
            Device::Tun(t)
                if [crate::backend::wireguard::DEVICE_NAME, crate::backend::wireguard::DEVICE_NAME_V6]
                    .contains(&t.name.as_str())
                    && link.kind.as_deref() == Some("wireguard") =>
            {
                Vec::new()
            }
            Device::Tun(_) => vec![format!("it is a {} device, not a TUN", link.kind.as_deref().unwrap_or("plain"))],
        }
    }
}

/// The kernel state the lease set asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Our device: a VTEP (VXLAN), a TUN (udp), or `None` for backends
    /// without one (host-gw).
    pub device: Option<Device>,
    /// Its address: `<our subnet>.0/32` (IPv6: `<our subnet>::/128`).
    pub addr: Option<IpNet>,
    /// Per peer subnet.
    pub peers: BTreeMap<IpNet, PeerEntries>,
    /// udp: peers reached through the user-space data path, subnet -> public
    /// IP. They need nothing in the kernel; the plan ignores them.
    pub tunnel: BTreeMap<IpNet, crate::backend::TunnelPeer>,
    /// Routes through our device that are not a peer's (udp: the whole
    /// Network into the TUN).
    pub routes: Vec<Route>,
    /// `--ip-blackhole-route` for our subnet (`None`: not looked after).
    pub blackhole: Option<Blackhole>,
}

/// flannel's `--ip-blackhole-route`: `blackhole <our subnet>` in the main
/// table, so that traffic to our subnet's unused addresses is dropped here
/// (meant for CNI setups without the bridge, which routes each pod /32).
/// Only the route for our own subnet is ours: wanted, it is added when
/// missing; not wanted, it is removed when there (flannel's, or ours before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackhole {
    /// Our subnet.
    pub subnet: Ipv4Net,
    /// Whether the flag is on.
    pub wanted: bool,
}

/// The kernel state we own, as dumped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Our device, if it exists.
    pub device: Option<VxlanLink>,
    /// Its addresses of the plan's family.
    pub addrs: Vec<IpNet>,
    /// Main-table routes through it (and, with direct routing, our routes on the underlay).
    pub routes: Vec<Route>,
    /// Permanent neighbours on it.
    pub neighs: Vec<Neigh>,
    /// Permanent FDB entries on it.
    pub fdbs: Vec<Fdb>,
    /// Whether `blackhole <our subnet>` is in the main table (asked only
    /// when [`Desired::blackhole`] is set).
    pub blackhole: bool,
}

/// One kernel change; [`super::kernel::apply`] turns each into one netlink request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create our device (it does not exist).
    CreateDevice,
    /// Delete and create our device: its attributes cannot be changed in place.
    RecreateDevice(Vec<String>),
    /// Set our device's MTU.
    SetMtu(u32),
    /// Bring our device up.
    SetUp,
    /// Turn our VTEP's transmit checksum offload on or off (`ethtool -K
    /// DEV tx`): a new VXLAN device has it on; flannel-rs wants it off.
    SetTxChecksum(bool),
    /// Add an address to our device.
    AddAddr(IpNet),
    /// Remove an address from our device.
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
    /// Add `blackhole <subnet>` to the main table.
    AddBlackhole(Ipv4Net),
    /// Delete `blackhole <subnet>` from the main table.
    DelBlackhole(Ipv4Net),
}

/// Observed routes are already those through our device, and desired routes
/// get the device's index only when applied (it changes when the device is
/// recreated), so destination and next hop decide.
impl Op {
    /// The op's name, for summaries (`SetRoute`).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::CreateDevice => "CreateDevice",
            Op::RecreateDevice(_) => "RecreateDevice",
            Op::SetMtu(_) => "SetMtu",
            Op::SetUp => "SetUp",
            Op::SetTxChecksum(_) => "SetTxChecksum",
            Op::AddAddr(_) => "AddAddr",
            Op::DelAddr(_) => "DelAddr",
            Op::SetNeigh(_) => "SetNeigh",
            Op::DelNeigh(_) => "DelNeigh",
            Op::SetFdb(_) => "SetFdb",
            Op::DelFdb(_) => "DelFdb",
            Op::SetRoute(_) => "SetRoute",
            Op::DelRoute(_) => "DelRoute",
            Op::AddBlackhole(_) => "AddBlackhole",
            Op::DelBlackhole(_) => "DelBlackhole",
        }
    }
}

impl Op {
    /// The op as an `ip` (or `bridge`) command on device `dev`, for logs
    /// and `diagnose`.
    pub fn as_ip(&self, dev: &str) -> String {
        let via = |r: &Route| r.gateway.map(|g| g.to_string()).unwrap_or_default();
        match self {
            Op::CreateDevice => format!("create {dev}"),
            Op::RecreateDevice(_) => format!("recreate {dev}"),
            Op::SetMtu(m) => format!("ip link set {dev} mtu {m}"),
            Op::SetUp => format!("ip link set {dev} up"),
            Op::SetTxChecksum(on) => format!("ethtool -K {dev} tx {}", if *on { "on" } else { "off" }),
            Op::AddAddr(a) => format!("ip addr add {a} dev {dev}"),
            Op::DelAddr(a) => format!("ip addr del {a} dev {dev}"),
            Op::SetNeigh(n) => format!("ip neigh replace {} lladdr {} dev {dev} nud permanent", n.ip, n.mac),
            Op::DelNeigh(n) => format!("ip neigh del {} dev {dev}", n.ip),
            Op::SetFdb(f) => format!("bridge fdb replace {} dev {dev} dst {} self permanent", f.mac, f.dst),
            Op::DelFdb(f) => format!("bridge fdb del {} dev {dev} dst {}", f.mac, f.dst),
            Op::SetRoute(r) if r.gateway.is_none() => format!("ip route replace {} dev {dev}", r.dst),
            Op::SetRoute(r) if r.onlink => format!("ip route replace {} via {} dev {dev} onlink", r.dst, via(r)),
            Op::SetRoute(r) => format!("ip route replace {} via {}", r.dst, via(r)),
            Op::DelRoute(r) => format!("ip route del {} dev {dev}", r.dst),
            Op::AddBlackhole(n) => format!("ip route add blackhole {n}"),
            Op::DelBlackhole(n) => format!("ip route del blackhole {n}"),
        }
    }
}

fn same_route(a: &Route, b: &Route) -> bool {
    a.dst == b.dst && a.gateway == b.gateway
}

/// Computes the changes that bring `observed` to `desired`. Pure: no I/O.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    let fresh = match (&desired.device, &observed.device) {
        (None, _) => false,
        (Some(_), None) => {
            ops.push(Op::CreateDevice);
            true
        }
        (Some(spec), Some(link)) => {
            let why = spec.incompatibilities(link);
            if why.is_empty() {
                if link.mtu != spec.mtu() {
                    ops.push(Op::SetMtu(spec.mtu()));
                }
                if !link.up {
                    ops.push(Op::SetUp);
                }
                if let (Device::Vxlan(v), Some(have)) = (spec, link.tx_checksum) {
                    match v.tx_checksum {
                        Some(want) if want != have => ops.push(Op::SetTxChecksum(want)),
                        _ => {}
                    }
                }
                false
            } else {
                ops.push(Op::RecreateDevice(why));
                true
            }
        }
    };
    match (fresh, &desired.device) {
        // A TUN is made down and with the default MTU (a VTEP is made with
        // both set).
        (true, Some(Device::Tun(t))) => {
            ops.push(Op::SetMtu(t.mtu));
            ops.push(Op::SetUp);
        }
        // A VTEP is made with transmit checksum offload on.
        (true, Some(Device::Vxlan(v))) if v.tx_checksum == Some(false) => ops.push(Op::SetTxChecksum(false)),
        _ => {}
    }
    // A new device starts empty: everything is to be added, nothing to delete.
    let observed_all = observed;
    let empty = Observed::default();
    let observed = if fresh { &empty } else { observed };

    let want_addr = desired.addr;
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
    for r in &desired.routes {
        if !routes.get(&r.dst).is_some_and(|have| same_route(have, r)) {
            set_routes.push(Op::SetRoute(r.clone()));
        }
    }
    ops.extend(set_neighs);
    ops.extend(set_fdbs);
    ops.extend(set_routes);

    // The observed addresses are of the plan's family only.
    for a in &observed.addrs {
        if Some(*a) != want_addr {
            ops.push(Op::DelAddr(*a));
        }
    }
    let want_routes: BTreeSet<IpNet> =
        desired.peers.values().map(|p| p.route.dst).chain(desired.routes.iter().map(|r| r.dst)).collect();
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
    // Not on our device: a new device does not take it away.
    let blackhole_there = observed_all.blackhole;
    match desired.blackhole {
        Some(Blackhole { subnet, wanted: true }) if !blackhole_there => ops.push(Op::AddBlackhole(subnet)),
        Some(Blackhole { subnet, wanted: false }) if blackhole_there => ops.push(Op::DelBlackhole(subnet)),
        _ => {}
    }
    ops
}

/// Applies `ops` to an in-memory kernel (the plan's model of the kernel's
/// semantics). Used by the tests to check that planning again yields nothing,
/// and by `diagnose` to describe what applying would leave.
pub fn simulate(desired: &Desired, observed: &mut Observed, ops: &[Op]) {
    for op in ops {
        match op {
            Op::CreateDevice | Op::RecreateDevice(_) => {
                let link = desired.device.as_ref().expect("only plans with a device create one").created(100);
                *observed = Observed { device: Some(link), blackhole: observed.blackhole, ..Observed::default() };
            }
            Op::SetMtu(m) => observed.device.as_mut().expect("device").mtu = *m,
            Op::SetUp => observed.device.as_mut().expect("device").up = true,
            Op::SetTxChecksum(on) => observed.device.as_mut().expect("device").tx_checksum = Some(*on),
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
            Op::AddBlackhole(_) => observed.blackhole = true,
            Op::DelBlackhole(_) => observed.blackhole = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_net::netlink::Scope;
    use flannel_net::MacAddr;
    use std::net::{IpAddr, Ipv4Addr};

    use crate::reconcile::test_vtep_spec as spec;

    fn peer(subnet: &str, mac: &str, public: &str) -> (IpNet, PeerEntries) {
        let net: Ipv4Net = subnet.parse().unwrap();
        let vtep_ip = net.network();
        let mac: MacAddr = mac.parse().unwrap();
        (
            IpNet::V4(net),
            PeerEntries {
                route: Route {
                    dst: IpNet::V4(net),
                    gateway: Some(IpAddr::V4(vtep_ip)),
                    oif: None,
                    onlink: true,
                    scope: Scope::Global,
                },
                neigh: Some(Neigh { ip: IpAddr::V4(vtep_ip), mac }),
                fdb: Some(Fdb { mac, dst: IpAddr::V4(public.parse::<Ipv4Addr>().unwrap()) }),
            },
        )
    }

    fn desired(peers: &[(&str, &str, &str)]) -> Desired {
        Desired {
            device: Some(Device::Vxlan(spec())),
            addr: Some("10.244.1.0/32".parse().unwrap()),
            peers: peers.iter().map(|(s, m, p)| peer(s, m, p)).collect(),
            tunnel: BTreeMap::new(),
            routes: Vec::new(),
            blackhole: None,
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
    fn a_tun_device_goes_through_the_same_plan() {
        let network: IpNet = "10.244.0.0/16".parse().unwrap();
        let d = Desired {
            device: Some(Device::Tun(TunSpec { name: "flannel0".into(), mtu: 1472 })),
            addr: Some("10.244.1.0/32".parse().unwrap()),
            peers: BTreeMap::new(),
            tunnel: BTreeMap::new(),
            routes: vec![Route { dst: network, gateway: None, oif: None, onlink: false, scope: Scope::Global }],
            blackhole: None,
        };
        // Made by the data path: down, default MTU; then address, up, route.
        let ops = plan(&d, &Observed::default());
        assert_eq!(
            ops.iter().map(Op::kind).collect::<Vec<_>>(),
            ["CreateDevice", "SetMtu", "SetUp", "AddAddr", "SetRoute"]
        );
        let mut o = Observed::default();
        simulate(&d, &mut o, &ops);
        assert!(plan(&d, &o).is_empty());
        // A stray address and a route through the device go; a VXLAN device
        // under the TUN's name is made anew.
        o.addrs.push("10.244.77.0/32".parse().unwrap());
        let stray = Route {
            dst: "10.244.66.0/24".parse().unwrap(),
            gateway: None,
            oif: Some(100),
            onlink: false,
            scope: Scope::Link,
        };
        o.routes.push(stray.clone());
        assert_eq!(plan(&d, &o), [Op::DelAddr("10.244.77.0/32".parse().unwrap()), Op::DelRoute(stray)]);
        o.device.as_mut().unwrap().kind = Some("vxlan".into());
        assert!(matches!(&plan(&d, &o)[0], Op::RecreateDevice(why) if why[0].contains("not a TUN")));
        // A kernel WireGuard device serves as wireguard's TUN under either
        // family's name, and under no other.
        for (name, kept) in [("flannel-wg", true), ("flannel-wg-v6", true), ("flannel0", false)] {
            let spec = Device::Tun(TunSpec { name: name.into(), mtu: 1420 });
            let link = VxlanLink { kind: Some("wireguard".into()), ..spec.created(7) };
            assert_eq!(spec.incompatibilities(&link).is_empty(), kept, "{name}");
        }
        assert_eq!(Op::SetRoute(d.routes[0].clone()).as_ip("flannel0"), "ip route replace 10.244.0.0/16 dev flannel0");
    }

    #[test]
    fn fresh_node_creates_vtep_then_arp_fdb_route_per_peer() {
        let d = desired(&[A]);
        let ops = plan(&d, &Observed::default());
        let (net, p) = peer(A.0, A.1, A.2);
        let _ = net;
        assert_eq!(
            ops,
            vec![
                Op::CreateDevice,
                Op::SetTxChecksum(false),
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
        o.device.as_mut().unwrap().port = Some(4789);
        let ops = plan(&d, &o);
        assert!(
            matches!(&ops[0], Op::RecreateDevice(why) if why == &vec!["UDP port is 4789, want 8472".to_string()]),
            "{ops:?}"
        );
        assert_eq!(ops.len(), 6, "{ops:?}");
        assert_eq!(ops[1], Op::SetTxChecksum(false), "{ops:?}");
    }

    #[test]
    fn tx_checksum_offload_turned_back_on_is_turned_off_in_place() {
        let d = desired(&[A]);
        let mut o = converged(&d);
        assert_eq!(o.device.as_ref().unwrap().tx_checksum, Some(false));
        o.device.as_mut().unwrap().tx_checksum = Some(true);
        assert_eq!(plan(&d, &o), vec![Op::SetTxChecksum(false)]);
        // Not read (the device went in between): nothing to say about it.
        o.device.as_mut().unwrap().tx_checksum = None;
        assert_eq!(plan(&d, &o), vec![]);
        assert_eq!(Op::SetTxChecksum(false).as_ip("flannel.1"), "ethtool -K flannel.1 tx off");
        // Not kept (flannel's way): left as it is, on a new device too.
        let mut d = d;
        if let Some(Device::Vxlan(v)) = d.device.as_mut() {
            v.tx_checksum = None;
        }
        o.device.as_mut().unwrap().tx_checksum = Some(true);
        assert_eq!(plan(&d, &o), vec![]);
        assert!(!plan(&d, &Observed::default()).iter().any(|op| matches!(op, Op::SetTxChecksum(_))));
    }

    #[test]
    fn mtu_and_down_device_are_fixed_in_place_and_stale_address_removed() {
        let d = desired(&[A]);
        let mut o = converged(&d);
        let v = o.device.as_mut().unwrap();
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

    #[test]
    fn blackhole_route_added_when_wanted_and_missing_removed_when_not_wanted() {
        let subnet: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let mut d = desired(&[A]);
        d.blackhole = Some(Blackhole { subnet, wanted: true });
        // Fresh node: added after everything else.
        let ops = plan(&d, &Observed::default());
        assert_eq!(ops.last(), Some(&Op::AddBlackhole(subnet)));
        let mut o = Observed::default();
        simulate(&d, &mut o, &ops);
        assert!(o.blackhole);
        assert!(plan(&d, &o).is_empty());
        // Deleted by hand: back with the next reconcile.
        o.blackhole = false;
        assert_eq!(plan(&d, &o), [Op::AddBlackhole(subnet)]);
        o.blackhole = true;
        // A device made anew leaves it be.
        o.device.as_mut().unwrap().port = Some(4789);
        assert!(!plan(&d, &o).contains(&Op::AddBlackhole(subnet)));
        o.device.as_mut().unwrap().port = Some(8472);
        // The flag off: ours (or flannel's) goes.
        d.blackhole = Some(Blackhole { subnet, wanted: false });
        assert_eq!(plan(&d, &o), [Op::DelBlackhole(subnet)]);
        simulate(&d, &mut o, &[Op::DelBlackhole(subnet)]);
        assert!(plan(&d, &o).is_empty());
        // Not looked after: nothing either way.
        d.blackhole = None;
        o.blackhole = true;
        assert!(plan(&d, &o).is_empty());
        assert_eq!(Op::AddBlackhole(subnet).as_ip("flannel.1"), "ip route add blackhole 10.244.1.0/24");
    }
}
