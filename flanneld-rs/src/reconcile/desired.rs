//! From the lease set to the kernel state we want, and to a user-space data
//! path's peer table. The backend says what each peer asks for; this module
//! applies the checks every backend shares and gathers the result.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::plan::{Desired, PeerEntries};
use crate::backend::{check_peer, family_network, Backend, PeerWant, TunnelPeer};
use crate::config::NetworkConfig;
use crate::lease::{Family, FamilyLease, Lease};

/// A peer lease that will not be programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where the lease came from (etcd key, node name).
    pub source: String,
    /// Why, in words that name the offending value.
    pub reason: String,
}

/// The device address: the first address of the subnet, as a /32 (IPv6: a /128).
pub fn vtep_addr(subnet: IpNet) -> IpNet {
    let host = match subnet {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    };
    IpNet::new(subnet.network(), host).expect("a host prefix is valid")
}

/// What one lease asks of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derived {
    /// Nothing: the lease has no part of this family, or it is our own.
    Nothing,
    /// Kernel entries for the peer's subnet.
    Kernel(IpNet, PeerEntries),
    /// A user-space data path's peer.
    Tunnel(IpNet, TunnelPeer),
    /// Not to be programmed, and why.
    Rejected(Rejected),
}

/// What lease `l` asks of `family` for our lease's part `own` of it and
/// `backend` (that family's): the checks every backend shares, then the
/// backend's entries. The full reconcile ([`desired`]) and the incremental
/// one both derive each lease with it.
pub fn derive(cfg: &NetworkConfig, own: &FamilyLease, backend: &Backend, segment: IpNet, l: &Lease) -> Derived {
    let family = own.family;
    let Some(l) = l.family(family) else { return Derived::Nothing };
    if l.subnet == own.subnet {
        if l.public_ip != own.public_ip {
            let ip = l.public_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "a node without an address".into());
            return Derived::Rejected(Rejected {
                source: l.source.to_string(),
                reason: format!("claims our subnet {} for {ip}", l.subnet),
            });
        }
        return Derived::Nothing;
    }
    match check_peer(cfg, own, backend, &l).and_then(|()| backend.peer(segment, &l)) {
        Ok(PeerWant::Kernel(entries)) => Derived::Kernel(l.subnet, entries),
        Ok(PeerWant::Tunnel(ip)) => Derived::Tunnel(l.subnet, ip),
        Err(reason) => {
            let reason = match family {
                Family::V4 => reason,
                Family::V6 => format!("IPv6: {reason}"),
            };
            Derived::Rejected(Rejected { source: l.source.to_string(), reason })
        }
    }
}

/// The desired state of one family ([`desired`]): the kernel state, the
/// leases not programmed and, for the incremental reconcile, which lease
/// each peer's entries came from.
#[derive(Debug, Clone, Default)]
pub struct Full {
    /// The desired state.
    pub desired: Desired,
    /// The leases not programmed.
    pub rejected: Vec<Rejected>,
    /// Each programmed subnet's lease (its source).
    pub sources: BTreeMap<IpNet, String>,
    /// Whether two leases asked for the same subnet (then the later one won,
    /// and removing it would bring the other back: only a full reconcile
    /// gets that right).
    pub duplicates: bool,
}

/// Builds the desired state of `family` for our lease `own` and `backend`
/// (that family's) from `leases` (which may include our own). Leases that
/// must not be programmed are returned with the reason, never
/// half-programmed; a lease without a part of `family` (an IPv4-only lease
/// in a dual-stack network) asks for nothing in it. `segment` is the
/// underlay interface's subnet of that family: with VXLAN's
/// `DirectRouting`, a peer whose public IP is on it is reached with a plain
/// route through the underlay (no tunnel); with host-gw every peer must be
/// on it.
pub fn desired<'a>(
    cfg: &NetworkConfig,
    family: Family,
    own: &Lease,
    backend: &Backend,
    segment: IpNet,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> Full {
    let mut full = Full::default();
    let (Some(own), Some((network, _))) = (own.family(family), family_network(cfg, family)) else {
        return full;
    };
    for l in leases {
        match derive(cfg, &own, backend, segment, l) {
            Derived::Nothing => {}
            Derived::Kernel(subnet, entries) => {
                full.duplicates |= full.desired.peers.insert(subnet, entries).is_some();
                full.sources.insert(subnet, l.source.clone());
            }
            Derived::Tunnel(subnet, ip) => {
                full.duplicates |= full.desired.tunnel.insert(subnet, ip).is_some();
            }
            Derived::Rejected(r) => full.rejected.push(r),
        }
    }
    let device = backend.device();
    full.desired.addr = device.as_ref().map(|_| vtep_addr(own.subnet));
    full.desired.device = device;
    full.desired.routes = backend.device_routes(network);
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{HostGwSpec, UdpSpec};
    use crate::lease::{BackendType, Lease4, VxlanData};
    use crate::reconcile::plan::Device;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, "test").unwrap()
    }

    fn lease(subnet: &str, ip: &str, mac: Option<&str>) -> Lease {
        Lease {
            ipv4: Some(Lease4 {
                subnet: subnet.parse().unwrap(),
                public_ip: ip.parse().unwrap(),
                vxlan: mac.map(|m| VxlanData { vni: 1, vtep_mac: m.parse().unwrap() }),
                wireguard: None,
            }),
            backend: BackendType::Vxlan,
            source: format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-")),
            ipv6: None,
        }
    }

    use crate::reconcile::test_vtep_spec as spec;

    #[test]
    fn bad_leases_are_rejected_with_reasons_and_the_rest_programmed() {
        let own = lease("10.244.1.0/24", "192.0.2.10", Some("02:00:00:00:00:10"));
        let mut other_backend = lease("10.244.6.0/24", "192.0.2.16", Some("02:00:00:00:00:16"));
        other_backend.backend = BackendType::HostGw;
        let leases = vec![
            own.clone(),
            lease("10.244.2.0/24", "192.0.2.11", Some("02:00:00:00:00:11")),
            lease("10.244.3.0/24", "127.0.0.1", Some("02:00:00:00:00:12")),
            lease("10.244.4.0/24", "224.0.0.5", Some("02:00:00:00:00:13")),
            lease("10.244.5.0/24", "192.0.2.10", Some("02:00:00:00:00:14")),
            lease("10.9.0.0/24", "192.0.2.15", Some("02:00:00:00:00:15")),
            other_backend,
            lease("10.244.7.0/24", "192.0.2.17", None),
            lease("10.244.1.0/24", "192.0.2.99", Some("02:00:00:00:00:99")),
        ];
        let Full { desired: d, rejected, .. } = desired(
            &cfg(),
            Family::V4,
            &own,
            &Backend::Vxlan { vtep: spec(), direct_routing: false },
            "192.0.2.0/24".parse().unwrap(),
            &leases,
        );
        assert_eq!(d.peers.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["10.244.2.0/24"]);
        assert_eq!(d.addr.unwrap().to_string(), "10.244.1.0/32");
        let reasons: Vec<String> = rejected.iter().map(|r| format!("{}: {}", r.source, r.reason)).collect();
        let want = [
            "10.244.3.0-24: PublicIP 127.0.0.1 is a loopback address",
            "10.244.4.0-24: PublicIP 224.0.0.5 is a multicast address",
            "10.244.5.0-24: PublicIP 192.0.2.10 is our own address",
            "10.9.0.0-24: subnet 10.9.0.0/24 is outside Network 10.244.0.0/16",
            "10.244.6.0-24: BackendType \"host-gw\" is not vxlan",
            "10.244.7.0-24: BackendData has no VtepMAC",
            "10.244.1.0-24: claims our subnet 10.244.1.0/24 for 192.0.2.99",
        ];
        assert_eq!(reasons.len(), want.len(), "{reasons:#?}");
        for (r, w) in reasons.iter().zip(want) {
            assert!(r.ends_with(w), "{r} does not end with {w}");
        }
        let p = &d.peers[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(p.neigh.unwrap().ip.to_string(), "10.244.2.0");
        assert_eq!(p.fdb.unwrap().dst.to_string(), "192.0.2.11");
        assert!(p.route.onlink);
    }

    #[test]
    fn direct_routing_uses_the_underlay_for_peers_on_the_same_segment() {
        let cfg =
            NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#, "t")
                .unwrap();
        let own = lease("10.244.1.0/24", "192.0.2.10", Some("02:00:00:00:00:10"));
        let near = lease("10.244.2.0/24", "192.0.2.11", Some("02:00:00:00:00:11"));
        let far = lease("10.244.3.0/24", "198.51.100.7", Some("02:00:00:00:00:12"));
        let Full { desired: d, rejected, .. } = desired(
            &cfg,
            Family::V4,
            &own,
            &Backend::Vxlan { vtep: spec(), direct_routing: true },
            "192.0.2.0/24".parse().unwrap(),
            &[own.clone(), near, far],
        );
        assert!(rejected.is_empty());
        let near = &d.peers[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(near.route.gateway, Some("192.0.2.11".parse().unwrap()));
        assert_eq!(near.route.oif, Some(2));
        assert!(near.neigh.is_none() && near.fdb.is_none());
        let far = &d.peers[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!(far.route.gateway, Some("10.244.3.0".parse().unwrap()));
        assert!(far.fdb.is_some());
    }

    #[test]
    fn host_gw_routes_via_peers_on_the_segment_and_rejects_the_rest() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#, "t").unwrap();
        let hg = |subnet: &str, ip: &str| Lease { backend: BackendType::HostGw, ..lease(subnet, ip, None) };
        let own = hg("10.244.1.0/24", "192.0.2.10");
        let leases = [
            own.clone(),
            hg("10.244.2.0/24", "192.0.2.11"),
            hg("10.244.3.0/24", "198.51.100.7"),
            lease("10.244.4.0/24", "192.0.2.13", Some("02:00:00:00:00:13")),
        ];
        let backend = Backend::HostGw(HostGwSpec { dev: 2, name: "eth0".into(), mtu: 1500 });
        let Full { desired: d, rejected, .. } =
            desired(&cfg, Family::V4, &own, &backend, "192.0.2.0/24".parse().unwrap(), &leases);
        assert_eq!(d.device, None);
        assert_eq!(d.addr, None);
        assert_eq!(d.peers.len(), 1);
        let p = &d.peers[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(p.route.gateway, Some("192.0.2.11".parse().unwrap()));
        assert_eq!((p.route.oif, p.route.onlink, p.neigh, p.fdb), (Some(2), false, None, None));
        let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "PublicIP 198.51.100.7 is not on our segment 192.0.2.0/24: host-gw needs every node on one L2 network",
                "BackendType \"vxlan\" is not host-gw"
            ]
        );
        // Planned from scratch: only routes, and planning again yields nothing.
        let ops = crate::reconcile::plan::plan(&d, &Default::default());
        assert_eq!(ops, [crate::reconcile::plan::Op::SetRoute(p.route.clone())]);
        let mut o = Default::default();
        crate::reconcile::plan::simulate(&d, &mut o, &ops);
        assert!(crate::reconcile::plan::plan(&d, &o).is_empty());
    }

    #[test]
    fn udp_peers_go_to_the_data_path_with_nothing_in_the_kernel() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#, "t").unwrap();
        let udp = |subnet: &str, ip: &str| Lease { backend: BackendType::Udp, ..lease(subnet, ip, None) };
        let own = udp("10.244.1.0/24", "192.0.2.10");
        let leases = [
            own.clone(),
            udp("10.244.2.0/24", "192.0.2.11"),
            // Off our segment is fine: datagrams are routed like any other.
            udp("10.244.3.0/24", "198.51.100.7"),
            lease("10.244.4.0/24", "192.0.2.13", Some("02:00:00:00:00:13")),
            udp("10.244.5.0/24", "127.0.0.1"),
        ];
        let backend = Backend::Udp(UdpSpec {
            name: "flannel0".into(),
            dev: 2,
            bind: "192.0.2.10".parse().unwrap(),
            port: 8285,
            mtu: 1472,
        });
        let Full { desired: d, rejected, .. } =
            desired(&cfg, Family::V4, &own, &backend, "192.0.2.0/24".parse().unwrap(), &leases);
        assert_eq!(d.peers.len(), 0);
        assert_eq!(d.device, Some(Device::Tun(crate::reconcile::plan::TunSpec { name: "flannel0".into(), mtu: 1472 })));
        assert_eq!(d.routes.len(), 1);
        let tunnel: Vec<String> = d.tunnel.iter().map(|(s, ip)| format!("{s} {ip}")).collect();
        assert_eq!(tunnel, ["10.244.2.0/24 192.0.2.11", "10.244.3.0/24 198.51.100.7"]);
        let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons, ["BackendType \"vxlan\" is not udp", "PublicIP 127.0.0.1 is a loopback address"]);
    }

    fn dual(subnet: &str, ip: &str, v6: Option<(&str, Option<&str>, Option<&str>)>) -> Lease {
        let n: u8 = subnet.split('.').nth(2).unwrap().parse().unwrap();
        let mut l = lease(subnet, ip, Some(&format!("02:00:00:00:00:{n:02x}")));
        l.ipv6 = v6.map(|(s, ip6, mac)| crate::lease::Lease6 {
            subnet: s.parse().unwrap(),
            public_ip: ip6.map(|i| i.parse().unwrap()),
            vxlan: mac.map(|m| VxlanData { vni: 1, vtep_mac: m.parse().unwrap() }),
            wireguard: None,
        });
        l
    }

    fn cfg6(backend: &str) -> NetworkConfig {
        let text = format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{{"Type":"{backend}"}}}}"#
        );
        NetworkConfig::parse(&text, "t").unwrap()
    }

    fn vtep6() -> flannel_net::netlink::VxlanSpec {
        flannel_net::netlink::VxlanSpec {
            name: "flannel-v6.1".into(),
            local: "2001:db8::10".parse().unwrap(),
            mtu: 1430,
            mac: "02:00:00:00:01:10".parse().unwrap(),
            ..spec()
        }
    }

    #[test]
    fn the_ipv6_plane_programs_each_peers_ipv6_half_and_names_what_is_missing() {
        let own = dual(
            "10.244.1.0/24",
            "192.0.2.10",
            Some(("2001:db8:10:1::/64", Some("2001:db8::10"), Some("02:00:00:00:01:10"))),
        );
        let leases = [
            own.clone(),
            dual(
                "10.244.2.0/24",
                "192.0.2.11",
                Some(("2001:db8:10:2::/64", Some("2001:db8::11"), Some("02:00:00:00:01:11"))),
            ),
            // An IPv4-only peer asks nothing of the IPv6 plane.
            dual("10.244.3.0/24", "192.0.2.12", None),
            dual("10.244.4.0/24", "192.0.2.13", Some(("2001:db8:10:4::/64", None, Some("02:00:00:00:01:13")))),
            dual("10.244.5.0/24", "192.0.2.14", Some(("2001:db8:10:5::/64", Some("2001:db8::14"), None))),
            dual(
                "10.244.6.0/24",
                "192.0.2.15",
                Some(("2001:db8:99::/64", Some("2001:db8::15"), Some("02:00:00:00:01:15"))),
            ),
            dual(
                "10.244.7.0/24",
                "192.0.2.16",
                Some(("2001:db8:10:7::/64", Some("fe80::16"), Some("02:00:00:00:01:16"))),
            ),
            dual(
                "10.244.8.0/24",
                "192.0.2.17",
                Some(("2001:db8:10:1::/64", Some("2001:db8::17"), Some("02:00:00:00:01:17"))),
            ),
        ];
        let backend = Backend::Vxlan { vtep: vtep6(), direct_routing: false };
        let Full { desired: d, rejected, .. } =
            desired(&cfg6("vxlan"), Family::V6, &own, &backend, "2001:db8::/64".parse().unwrap(), &leases);
        assert_eq!(d.addr.unwrap().to_string(), "2001:db8:10:1::/128");
        assert_eq!(d.peers.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["2001:db8:10:2::/64"]);
        let p = &d.peers[&"2001:db8:10:2::/64".parse().unwrap()];
        assert_eq!(p.route.gateway.unwrap().to_string(), "2001:db8:10:2::");
        assert!(p.route.onlink);
        assert_eq!(p.neigh.unwrap().ip.to_string(), "2001:db8:10:2::");
        assert_eq!(p.neigh.unwrap().mac.to_string(), "02:00:00:00:01:11");
        assert_eq!(p.fdb.unwrap().dst.to_string(), "2001:db8::11");
        let reasons: Vec<String> = rejected.iter().map(|r| r.reason.clone()).collect();
        assert_eq!(
            reasons,
            [
                "IPv6: the lease has no PublicIPv6",
                "IPv6: BackendV6Data has no VtepMAC",
                "IPv6: subnet 2001:db8:99::/64 is outside IPv6Network 2001:db8:10::/56",
                "IPv6: PublicIPv6 fe80::16 is a link-local address",
                "claims our subnet 2001:db8:10:1::/64 for 2001:db8::17",
            ]
        );
        // Planned from scratch and planned again: nothing left to do.
        let ops = crate::reconcile::plan::plan(&d, &Default::default());
        let mut o = Default::default();
        crate::reconcile::plan::simulate(&d, &mut o, &ops);
        assert!(crate::reconcile::plan::plan(&d, &o).is_empty());
        // The IPv4 plane of the same leases is untouched by the IPv6 halves.
        let Full { desired: d4, .. } = desired(
            &cfg6("vxlan"),
            Family::V4,
            &own,
            &Backend::Vxlan { vtep: spec(), direct_routing: false },
            "192.0.2.0/24".parse().unwrap(),
            &leases,
        );
        assert_eq!(d4.peers.len(), 7);
    }

    #[test]
    fn host_gw_ipv6_routes_go_via_the_peers_public_ipv6_on_the_segment() {
        let hg =
            |l: Lease| Lease { backend: BackendType::HostGw, ipv4: l.ipv4.map(|v4| Lease4 { vxlan: None, ..v4 }), ..l };
        let own = hg(dual("10.244.1.0/24", "192.0.2.10", Some(("2001:db8:10:1::/64", Some("2001:db8::10"), None))));
        let leases = [
            own.clone(),
            hg(dual("10.244.2.0/24", "192.0.2.11", Some(("2001:db8:10:2::/64", Some("2001:db8::11"), None)))),
            hg(dual("10.244.3.0/24", "192.0.2.12", Some(("2001:db8:10:3::/64", Some("2001:db8:1::12"), None)))),
        ];
        let backend = Backend::HostGw(HostGwSpec { dev: 2, name: "eth0".into(), mtu: 1500 });
        let Full { desired: d, rejected, .. } =
            desired(&cfg6("host-gw"), Family::V6, &own, &backend, "2001:db8::/64".parse().unwrap(), &leases);
        assert_eq!((d.device.clone(), d.addr), (None, None));
        let p = &d.peers[&"2001:db8:10:2::/64".parse().unwrap()];
        assert_eq!((p.route.gateway.unwrap().to_string(), p.route.oif), ("2001:db8::11".to_string(), Some(2)));
        assert_eq!(
            rejected.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(),
            ["IPv6: PublicIPv6 2001:db8:1::12 is not on our segment 2001:db8::/64: host-gw needs every node on one L2 network"]
        );
    }

    #[test]
    fn ipv6_direct_routing_uses_the_underlay_for_peers_on_our_ipv6_segment() {
        let own = dual(
            "10.244.1.0/24",
            "192.0.2.10",
            Some(("2001:db8:10:1::/64", Some("2001:db8::10"), Some("02:00:00:00:01:10"))),
        );
        let near = dual(
            "10.244.2.0/24",
            "192.0.2.11",
            Some(("2001:db8:10:2::/64", Some("2001:db8::11"), Some("02:00:00:00:01:11"))),
        );
        let far = dual(
            "10.244.3.0/24",
            "192.0.2.12",
            Some(("2001:db8:10:3::/64", Some("2001:db8:1::12"), Some("02:00:00:00:01:12"))),
        );
        let backend = Backend::Vxlan { vtep: vtep6(), direct_routing: true };
        let Full { desired: d, rejected, .. } = desired(
            &cfg6("vxlan"),
            Family::V6,
            &own,
            &backend,
            "2001:db8::/64".parse().unwrap(),
            &[own.clone(), near, far],
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let near = &d.peers[&"2001:db8:10:2::/64".parse().unwrap()];
        assert_eq!((near.route.gateway.unwrap().to_string(), near.route.oif), ("2001:db8::11".to_string(), Some(2)));
        assert!(near.neigh.is_none() && near.fdb.is_none());
        let far = &d.peers[&"2001:db8:10:3::/64".parse().unwrap()];
        assert_eq!(far.route.gateway.unwrap().to_string(), "2001:db8:10:3::");
        assert_eq!(far.fdb.unwrap().dst.to_string(), "2001:db8:1::12");
    }
}
