//! The host-gw backend: no device of ours; per peer a route to its subnet
//! via its public IP on the underlay interface, so every node must be on
//! one L2 segment.

use std::net::IpAddr;

use flannel_net::netlink::{Route, Scope};
use ipnet::{IpNet, Ipv4Net};

use crate::iface::ExtIface;
use crate::lease::Lease;
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
pub fn spec(ext: &ExtIface) -> anyhow::Result<HostGwSpec> {
    if ext.public_ip != ext.addr.addr() {
        anyhow::bail!(
            "Backend.Type host-gw: the public IP {} is not the address of interface {} ({}); peers route \
             to our pods through that address, so it must be on the interface (check --public-ip, \
             --iface, public-ip-overwrite)",
            ext.public_ip,
            ext.name,
            ext.addr
        );
    }
    Ok(HostGwSpec { dev: ext.index, name: ext.name.clone(), mtu: ext.mtu })
}

/// A route to the peer's subnet via its public IP, which must be on our
/// segment (the kernel could not resolve the next hop otherwise).
pub fn peer_entries(h: &HostGwSpec, segment: Ipv4Net, l: &Lease) -> Result<PeerEntries, String> {
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
            oif: Some(h.dev),
            onlink: false,
            scope: Scope::Global,
        },
        neigh: None,
        fdb: None,
    })
}
