//! The host-gw backend: no device of ours; per peer a route to its subnet
//! via its public IP on the underlay interface, so every node must be on
//! one L2 segment.

use flannel_net::netlink::{Route, Scope};
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use crate::iface::{ExtIface, ExtIface6};
use crate::lease::FamilyLease;
use crate::reconcile::plan::PeerEntries;

/// The underlay interface host-gw routes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGwSpec {
    /// Its index.
    pub dev: u32,
    /// Its name, for messages.
    pub name: String,
    /// Its MTU (pods get the same: nothing is added to their packets).
    pub mtu: u32,
}

/// host-gw on `ext`, which must hold the public IP: peers route to our pods
/// through that address.
pub fn spec(ext: &ExtIface, addr: Ipv4Net, public_ip: Ipv4Addr) -> anyhow::Result<HostGwSpec> {
    if public_ip != addr.addr() {
        anyhow::bail!(
            "Backend.Type host-gw: the public IP {public_ip} is not the address of interface {} ({addr}); peers \
             route to our pods through that address, so it must be on the interface (check --public-ip, \
             --iface, public-ip-overwrite)",
            ext.name,
        );
    }
    spec_on(ext)
}

/// host-gw's IPv6 routes (dual-stack) on the same interface, which must hold
/// the public IPv6 address.
pub fn spec_v6(ext: &ExtIface, v6: &ExtIface6) -> anyhow::Result<HostGwSpec> {
    if v6.public_ip != v6.addr.addr() {
        anyhow::bail!(
            "Backend.Type host-gw: the public IPv6 address {} is not the address of interface {} ({}); peers \
             route to our pods through that address, so it must be on the interface (check --public-ipv6, \
             public-ipv6-overwrite)",
            v6.public_ip,
            ext.name,
            v6.addr
        );
    }
    spec_on(ext)
}

fn spec_on(ext: &ExtIface) -> anyhow::Result<HostGwSpec> {
    Ok(HostGwSpec { dev: ext.index, name: ext.name.clone(), mtu: ext.mtu })
}

/// A route to the peer's subnet via its public IP of that family, which
/// must be on our segment (the kernel could not resolve the next hop
/// otherwise).
pub fn peer_entries(h: &HostGwSpec, segment: IpNet, l: &FamilyLease) -> Result<PeerEntries, String> {
    let Some(public_ip) = l.public_ip else {
        return Err(format!("the lease has no {} address", l.family.name()));
    };
    if !segment.contains(&public_ip) {
        let key = if public_ip.is_ipv6() { "PublicIPv6" } else { "PublicIP" };
        return Err(format!(
            "{key} {public_ip} is not on our segment {segment}: host-gw needs every node on one L2 network"
        ));
    }
    Ok(PeerEntries {
        route: Route { dst: l.subnet, gateway: Some(public_ip), oif: Some(h.dev), onlink: false, scope: Scope::Global },
        neigh: None,
        fdb: None,
    })
}
