//! The VXLAN backend: our VTEP `flannel.<VNI>`, and per peer an ARP
//! neighbour for its VTEP address, an FDB entry for its VTEP MAC and a route
//! to its subnet (flannel's exact kernel objects). With `DirectRouting`, a
//! peer on our L2 segment gets a plain route via its public IP instead.

use std::net::IpAddr;

use flannel_net::netlink::{Fdb, Neigh, Route, Scope, VxlanSpec, DEFAULT_VXLAN_PORT};
use flannel_net::MacAddr;
use ipnet::{IpNet, Ipv4Net};

use crate::config::VxlanConfig;
use crate::iface::ExtIface;
use crate::lease::Lease;
use crate::reconcile::plan::PeerEntries;

/// VXLAN's cost per packet: outer IPv4 (20), UDP (8), VXLAN (8), inner Ethernet (14).
pub const OVERHEAD: u32 = 50;

/// `flannel.<VNI>`.
pub fn device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// The VTEP we want: attributes from the configuration and the interface,
/// and `mac` (which survives restarts).
pub fn vtep_spec(vx: &VxlanConfig, ext: &ExtIface, mac: MacAddr) -> anyhow::Result<VxlanSpec> {
    let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
    if underlay_mtu < 68 + OVERHEAD {
        let what = if vx.mtu.is_some() { "Backend.MTU" } else { "the interface MTU" };
        anyhow::bail!("{what} {underlay_mtu} leaves no room for VXLAN's 50 bytes (need at least 118)");
    }
    Ok(VxlanSpec {
        name: device_name(vx.vni),
        vni: vx.vni,
        local: ext.addr.addr(),
        dev: ext.index,
        port: if vx.port == 0 { DEFAULT_VXLAN_PORT } else { vx.port },
        learning: vx.learning,
        gbp: vx.gbp,
        mtu: underlay_mtu - OVERHEAD,
        mac,
    })
}

/// A peer's neighbour, FDB entry and route (or, with `direct_routing` and
/// the peer on `segment`, its plain route through the underlay).
pub fn peer_entries(
    vtep: &VxlanSpec,
    direct_routing: bool,
    segment: Ipv4Net,
    l: &Lease,
) -> Result<PeerEntries, String> {
    let Some(data) = l.vxlan else {
        return Err("BackendData has no VtepMAC".into());
    };
    if data.vni != vtep.vni {
        return Err(format!("VNI {} differs from ours ({})", data.vni, vtep.vni));
    }
    if direct_routing && segment.contains(&l.public_ip) {
        return Ok(PeerEntries {
            route: Route {
                dst: IpNet::V4(l.subnet),
                gateway: Some(IpAddr::V4(l.public_ip)),
                oif: Some(vtep.dev),
                onlink: false,
                scope: Scope::Global,
            },
            neigh: None,
            fdb: None,
        });
    }
    let gw = l.subnet.network();
    Ok(PeerEntries {
        route: Route {
            dst: IpNet::V4(l.subnet),
            gateway: Some(IpAddr::V4(gw)),
            oif: None,
            onlink: true,
            scope: Scope::Global,
        },
        neigh: Some(Neigh { ip: gw, mac: data.vtep_mac }),
        fdb: Some(Fdb { mac: data.vtep_mac, dst: l.public_ip }),
    })
}
