//! From the lease set to the kernel state we want (VXLAN, host-gw), and to
//! the udp data path's peer table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use flannel_net::netlink::{Fdb, Neigh, Route, VxlanSpec};
use ipnet::{IpNet, Ipv4Net};

use super::plan::{Desired, PeerEntries};
use super::Backend;
use crate::config::NetworkConfig;
use crate::lease::Lease;

/// A peer lease that will not be programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where the lease came from (etcd key, node name).
    pub source: String,
    /// Why, in words that name the offending value.
    pub reason: String,
}

/// The VTEP address: the first address of the subnet, as a /32.
pub fn vtep_addr(subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(subnet.network(), 32).expect("a /32 is valid")
}

/// Builds the desired state for our lease `own` and `backend` from `leases`
/// (which may include our own). Leases that must not be programmed are
/// returned with the reason, never half-programmed. `segment` is the underlay
/// interface's subnet: with VXLAN's `DirectRouting`, a peer whose public IP is
/// on it is reached with a plain route through the underlay (no tunnel); with
/// host-gw every peer must be on it.
pub fn desired(
    cfg: &NetworkConfig,
    own: &Lease,
    backend: &Backend,
    segment: Ipv4Net,
    leases: &[Lease],
) -> (Desired, Vec<Rejected>) {
    let mut peers = BTreeMap::new();
    let mut tunnel = BTreeMap::new();
    let mut rejected = Vec::new();
    for l in leases {
        if l.subnet == own.subnet {
            if l.public_ip != own.public_ip {
                rejected.push(Rejected {
                    source: l.source.clone(),
                    reason: format!("claims our subnet {} for {}", l.subnet, l.public_ip),
                });
            }
            continue;
        }
        if let Backend::Udp(_) = backend {
            match check(cfg, own, l).and_then(|()| udp_peer(l)) {
                Ok(ip) => {
                    tunnel.insert(l.subnet, ip);
                }
                Err(reason) => rejected.push(Rejected { source: l.source.clone(), reason }),
            }
            continue;
        }
        let entries = check(cfg, own, l).and_then(|()| match backend {
            Backend::Vxlan(vtep) => vxlan_entries(cfg, vtep, segment, l),
            Backend::HostGw { dev, .. } => host_gw_entries(*dev, segment, l),
            Backend::Udp(_) => unreachable!("handled above"),
        });
        match entries {
            Ok(entries) => {
                peers.insert(l.subnet, entries);
            }
            Err(reason) => rejected.push(Rejected { source: l.source.clone(), reason }),
        }
    }
    let vtep = backend.vtep().cloned();
    let addr = vtep.as_ref().map(|_| vtep_addr(own.subnet));
    (Desired { addr, vtep, peers, tunnel }, rejected)
}

/// udp: the peer's public IP, where its data path listens (on our port:
/// flannel's udp leases carry no port, every node uses the configured one).
fn udp_peer(l: &Lease) -> Result<Ipv4Addr, String> {
    if l.backend_type != "udp" {
        return Err(format!("BackendType {:?} is not udp", l.backend_type));
    }
    Ok(l.public_ip)
}

fn bad_public_ip(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_unspecified() || ip.is_broadcast() {
        Some("not a unicast address")
    } else {
        None
    }
}

/// What every backend asks of a peer lease.
fn check(cfg: &NetworkConfig, own: &Lease, l: &Lease) -> Result<(), String> {
    if !cfg.network.contains(&l.subnet) {
        return Err(format!("subnet {} is outside Network {}", l.subnet, cfg.network));
    }
    if l.subnet.prefix_len() != cfg.subnet_len {
        return Err(format!("subnet {} is not a /{} (SubnetLen)", l.subnet, cfg.subnet_len));
    }
    if let Some(why) = bad_public_ip(l.public_ip) {
        return Err(format!("PublicIP {} is {why}", l.public_ip));
    }
    if l.public_ip == own.public_ip {
        return Err(format!("PublicIP {} is our own address", l.public_ip));
    }
    Ok(())
}

/// host-gw: a route to the peer's subnet via its public IP, which must be on
/// our segment (the kernel could not resolve the next hop otherwise).
fn host_gw_entries(dev: u32, segment: Ipv4Net, l: &Lease) -> Result<PeerEntries, String> {
    if l.backend_type != "host-gw" {
        return Err(format!("BackendType {:?} is not host-gw", l.backend_type));
    }
    if !segment.contains(&l.public_ip) {
        return Err(format!(
            "PublicIP {} is not on our segment {segment}: host-gw needs every node on one L2 network",
            l.public_ip
        ));
    }
    Ok(PeerEntries {
        route: Route {
            dst: IpNet::V4(l.subnet),
            gateway: Some(IpAddr::V4(l.public_ip)),
            oif: Some(dev),
            onlink: false,
        },
        neigh: None,
        fdb: None,
    })
}

fn vxlan_entries(cfg: &NetworkConfig, vtep: &VxlanSpec, segment: Ipv4Net, l: &Lease) -> Result<PeerEntries, String> {
    if l.backend_type != "vxlan" {
        return Err(format!("BackendType {:?} is not vxlan", l.backend_type));
    }
    let Some(data) = l.vxlan else {
        return Err("BackendData has no VtepMAC".into());
    };
    if data.vni != vtep.vni {
        return Err(format!("VNI {} differs from ours ({})", data.vni, vtep.vni));
    }
    if cfg.vxlan().is_some_and(|v| v.direct_routing) && segment.contains(&l.public_ip) {
        return Ok(PeerEntries {
            route: Route {
                dst: IpNet::V4(l.subnet),
                gateway: Some(IpAddr::V4(l.public_ip)),
                oif: Some(vtep.dev),
                onlink: false,
            },
            neigh: None,
            fdb: None,
        });
    }
    let gw = l.subnet.network();
    Ok(PeerEntries {
        route: Route { dst: IpNet::V4(l.subnet), gateway: Some(IpAddr::V4(gw)), oif: None, onlink: true },
        neigh: Some(Neigh { ip: gw, mac: data.vtep_mac }),
        fdb: Some(Fdb { mac: data.vtep_mac, dst: l.public_ip }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::VxlanData;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, "test").unwrap()
    }

    fn lease(subnet: &str, ip: &str, mac: Option<&str>) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            backend_type: "vxlan".into(),
            vxlan: mac.map(|m| VxlanData { vni: 1, vtep_mac: m.parse().unwrap() }),
            source: format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-")),
        }
    }

    use crate::reconcile::test_vtep_spec as spec;

    #[test]
    fn bad_leases_are_rejected_with_reasons_and_the_rest_programmed() {
        let own = lease("10.244.1.0/24", "192.0.2.10", Some("02:00:00:00:00:10"));
        let mut other_backend = lease("10.244.6.0/24", "192.0.2.16", Some("02:00:00:00:00:16"));
        other_backend.backend_type = "host-gw".into();
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
        let (d, rejected) = desired(&cfg(), &own, &Backend::Vxlan(spec()), "192.0.2.0/24".parse().unwrap(), &leases);
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
        let (d, rejected) =
            desired(&cfg, &own, &Backend::Vxlan(spec()), "192.0.2.0/24".parse().unwrap(), &[own.clone(), near, far]);
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
        let hg = |subnet: &str, ip: &str| Lease { backend_type: "host-gw".into(), ..lease(subnet, ip, None) };
        let own = hg("10.244.1.0/24", "192.0.2.10");
        let leases = [
            own.clone(),
            hg("10.244.2.0/24", "192.0.2.11"),
            hg("10.244.3.0/24", "198.51.100.7"),
            lease("10.244.4.0/24", "192.0.2.13", Some("02:00:00:00:00:13")),
        ];
        let backend = Backend::HostGw { dev: 2, name: "eth0".into(), mtu: 1500 };
        let (d, rejected) = desired(&cfg, &own, &backend, "192.0.2.0/24".parse().unwrap(), &leases);
        assert_eq!(d.vtep, None);
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
        let udp = |subnet: &str, ip: &str| Lease { backend_type: "udp".into(), ..lease(subnet, ip, None) };
        let own = udp("10.244.1.0/24", "192.0.2.10");
        let leases = [
            own.clone(),
            udp("10.244.2.0/24", "192.0.2.11"),
            // Off our segment is fine: datagrams are routed like any other.
            udp("10.244.3.0/24", "198.51.100.7"),
            lease("10.244.4.0/24", "192.0.2.13", Some("02:00:00:00:00:13")),
            udp("10.244.5.0/24", "127.0.0.1"),
        ];
        let backend = Backend::Udp(crate::reconcile::UdpSpec {
            name: "flannel0".into(),
            dev: 2,
            bind: "192.0.2.10".parse().unwrap(),
            port: 8285,
            mtu: 1472,
        });
        let (d, rejected) = desired(&cfg, &own, &backend, "192.0.2.0/24".parse().unwrap(), &leases);
        assert_eq!((d.vtep, d.addr, d.peers.len()), (None, None, 0));
        let tunnel: Vec<String> = d.tunnel.iter().map(|(s, ip)| format!("{s} {ip}")).collect();
        assert_eq!(tunnel, ["10.244.2.0/24 192.0.2.11", "10.244.3.0/24 198.51.100.7"]);
        let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons, ["BackendType \"vxlan\" is not udp", "PublicIP 127.0.0.1 is a loopback address"]);
    }
}
