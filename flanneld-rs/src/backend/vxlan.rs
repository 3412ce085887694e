//! The VXLAN backend: our VTEP `flannel.<VNI>`, and per peer an ARP
//! neighbour for its VTEP address, an FDB entry for its VTEP MAC and a route
//! to its subnet (flannel's exact kernel objects). With `DirectRouting`, a
//! peer on our L2 segment gets a plain route via its public IP instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_net::netlink::{Fdb, Neigh, Route, Scope, VxlanSpec, DEFAULT_VXLAN_PORT};
use flannel_net::MacAddr;
use ipnet::IpNet;

use crate::config::VxlanConfig;
use crate::iface::ExtIface;
use crate::lease::{Family, FamilyLease};
use crate::reconcile::plan::PeerEntries;

/// VXLAN's cost per packet: outer IPv4 (20), UDP (8), VXLAN (8), inner Ethernet (14).
pub const OVERHEAD: u32 = 50;

/// VXLAN over an IPv6 underlay: the outer header is 40 bytes, not 20.
pub const OVERHEAD_V6: u32 = 70;

/// `flannel.<VNI>`.
pub fn device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// The VTEP of `family`: `flannel.<VNI>`, or flannel's `flannel-v6.<VNI>`.
pub fn device_name_of(family: Family, vni: u32) -> String {
    match family {
        Family::V4 => device_name(vni),
        Family::V6 => format!("flannel-v6.{vni}"),
    }
}

/// The IPv6 VTEP we want (dual-stack): `flannel-v6.<VNI>`, tunnelling over
/// the interface's IPv6 address `local` as flannel's does, with its own MAC
/// and 70 bytes of overhead.
pub fn vtep_spec_v6(vx: &VxlanConfig, ext: &ExtIface, local: Ipv6Addr, mac: MacAddr) -> anyhow::Result<VxlanSpec> {
    let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
    if underlay_mtu < 1280 + OVERHEAD_V6 {
        let what = if vx.mtu.is_some() { "Backend.MTU" } else { "the interface MTU" };
        anyhow::bail!(
            "{what} {underlay_mtu} leaves pods less than IPv6's minimum MTU 1280 after VXLAN over IPv6's 70 bytes \
             (need at least 1350)"
        );
    }
    Ok(VxlanSpec {
        name: device_name_of(Family::V6, vx.vni),
        vni: vx.vni,
        local: IpAddr::V6(local),
        dev: ext.index,
        port: if vx.port == 0 { DEFAULT_VXLAN_PORT } else { vx.port },
        learning: vx.learning,
        gbp: vx.gbp,
        mtu: underlay_mtu - OVERHEAD_V6,
        mac,
    })
}

/// The VTEP we want: attributes from the configuration and the interface,
/// and `mac` (which survives restarts).
pub fn vtep_spec(vx: &VxlanConfig, ext: &ExtIface, local: Ipv4Addr, mac: MacAddr) -> anyhow::Result<VxlanSpec> {
    let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
    if underlay_mtu < 68 + OVERHEAD {
        let what = if vx.mtu.is_some() { "Backend.MTU" } else { "the interface MTU" };
        anyhow::bail!("{what} {underlay_mtu} leaves no room for VXLAN's 50 bytes (need at least 118)");
    }
    Ok(VxlanSpec {
        name: device_name(vx.vni),
        vni: vx.vni,
        local: IpAddr::V4(local),
        dev: ext.index,
        port: if vx.port == 0 { DEFAULT_VXLAN_PORT } else { vx.port },
        learning: vx.learning,
        gbp: vx.gbp,
        mtu: underlay_mtu - OVERHEAD,
        mac,
    })
}

/// A peer's neighbour, FDB entry and route (or, with `direct_routing` and
/// the peer on `segment`, its plain route through the underlay), for the
/// peer's part of our VTEP's family.
pub fn peer_entries(
    vtep: &VxlanSpec,
    direct_routing: bool,
    segment: IpNet,
    l: &FamilyLease,
) -> Result<PeerEntries, String> {
    let data_key = match l.family {
        Family::V4 => "BackendData",
        Family::V6 => "BackendV6Data",
    };
    let Some(data) = l.vxlan else {
        return Err(format!("{data_key} has no VtepMAC"));
    };
    if data.vni != vtep.vni {
        return Err(format!("{data_key} VNI {} differs from ours ({})", data.vni, vtep.vni));
    }
    let Some(public_ip) = l.public_ip else {
        return Err(format!("the lease has no {} address", l.family.name()));
    };
    if direct_routing && segment.contains(&public_ip) {
        return Ok(PeerEntries {
            route: Route {
                dst: l.subnet,
                gateway: Some(public_ip),
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
        route: Route { dst: l.subnet, gateway: Some(gw), oif: None, onlink: true, scope: Scope::Global },
        neigh: Some(Neigh { ip: gw, mac: data.vtep_mac }),
        fdb: Some(Fdb { mac: data.vtep_mac, dst: public_ip }),
    })
}
