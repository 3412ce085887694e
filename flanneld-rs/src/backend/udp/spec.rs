//! The udp backend as the reconcile loop sees it: the TUN device and the
//! socket it needs, its peers (subnet -> public IP, on our port: flannel's
//! udp leases carry no port), and the one route of the whole Network into
//! the device.

use std::net::Ipv4Addr;

use flannel_net::netlink::{Route, Scope};
use ipnet::{IpNet, Ipv4Net};

use crate::iface::ExtIface;
use crate::lease::FamilyLease;
use crate::reconcile::plan::TunSpec;

/// The udp backend's device and socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSpec {
    /// The TUN device, `flannel0`.
    pub name: String,
    /// The underlay interface's index.
    pub dev: u32,
    /// The address the socket binds (the underlay interface's).
    pub bind: Ipv4Addr,
    /// The UDP port, ours and every peer's (`Backend.Port`, default 8285).
    pub port: u16,
    /// The device's MTU: the underlay's minus 28 (outer IPv4 and UDP headers).
    pub mtu: u32,
}

impl UdpSpec {
    /// The TUN device as the plan sees it.
    pub fn tun(&self) -> TunSpec {
        TunSpec { name: self.name.clone(), mtu: self.mtu }
    }

    /// The data path's configuration for our lease.
    pub fn data_path_config(&self, subnet: Ipv4Net, network: Ipv4Net) -> super::UdpConfig {
        super::UdpConfig {
            tun_name: self.name.clone(),
            subnet,
            network,
            mtu: self.mtu,
            port: self.port,
            bind: self.bind,
            queues: 0,
        }
    }
}

/// udp on `ext` with UDP port `port`.
pub fn spec(port: u16, ext: &ExtIface, bind: Ipv4Addr) -> anyhow::Result<UdpSpec> {
    if ext.mtu < 68 + super::OVERHEAD {
        anyhow::bail!(
            "Backend.Type udp: interface {} has MTU {}, which leaves no room for the 28 bytes of UDP \
             encapsulation (need at least {})",
            ext.name,
            ext.mtu,
            68 + super::OVERHEAD
        );
    }
    if port == 0 {
        anyhow::bail!("Backend.Port 0: the udp backend needs a UDP port (default 8285)");
    }
    Ok(UdpSpec { name: super::DEFAULT_TUN_NAME.into(), dev: ext.index, bind, port, mtu: ext.mtu - super::OVERHEAD })
}

/// A peer's address for the data path: its public IP (on or off our
/// segment: datagrams are routed like any other).
pub fn peer(l: &FamilyLease) -> Result<Ipv4Addr, String> {
    match l.public_ip {
        Some(std::net::IpAddr::V4(ip)) => Ok(ip),
        _ => Err("the udp backend carries IPv4 only".into()),
    }
}

/// The whole Network into the TUN (no next hop: the device is point to point).
pub fn network_route(network: Ipv4Net) -> Route {
    // Scope global, as flannel's udp backend makes it (not `ip route`'s
    // default for a route without a gateway).
    Route { dst: IpNet::V4(network), gateway: None, oif: None, onlink: false, scope: Scope::Global }
}
