//! The reconcile loop's parts: desired state from leases ([`desired`]), a pure
//! [`plan`], and the thin [`kernel`] side that observes and applies.

pub mod desired;
pub mod kernel;
pub mod plan;

use flannel_net::netlink::VxlanSpec;

/// How traffic reaches peers, as far as the kernel is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// VXLAN: our VTEP; per peer an ARP neighbour, an FDB entry and a route.
    Vxlan(VxlanSpec),
    /// host-gw: per peer a route to its subnet via its public IP on the
    /// underlay interface (every node on one L2 segment, no encapsulation).
    HostGw {
        /// The underlay interface's index.
        dev: u32,
        /// Its name, for messages.
        name: String,
        /// Its MTU (pods get the same: nothing is added to their packets).
        mtu: u32,
    },
    /// udp: a TUN device whose packets a user-space data path carries to
    /// peers in UDP datagrams; the kernel holds one route to the whole
    /// Network through the device, nothing per peer (the data path keeps the
    /// peer table).
    Udp(UdpSpec),
}

/// The udp backend's device and socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSpec {
    /// The TUN device, `flannel0`.
    pub name: String,
    /// The underlay interface's index.
    pub dev: u32,
    /// The address the socket binds (the underlay interface's).
    pub bind: std::net::Ipv4Addr,
    /// The UDP port, ours and every peer's (`Backend.Port`, default 8285).
    pub port: u16,
    /// The device's MTU: the underlay's minus 28 (outer IPv4 and UDP headers).
    pub mtu: u32,
}

impl Backend {
    /// The VTEP, for VXLAN.
    pub fn vtep(&self) -> Option<&VxlanSpec> {
        match self {
            Backend::Vxlan(v) => Some(v),
            Backend::HostGw { .. } | Backend::Udp(_) => None,
        }
    }

    /// The underlay interface's index.
    pub fn underlay(&self) -> u32 {
        match self {
            Backend::Vxlan(v) => v.dev,
            Backend::HostGw { dev, .. } => *dev,
            Backend::Udp(u) => u.dev,
        }
    }

    /// The device the entries live on, for messages (`flannel.1`, `eth0`, `flannel0`).
    pub fn device_name(&self) -> &str {
        match self {
            Backend::Vxlan(v) => &v.name,
            Backend::HostGw { name, .. } => name,
            Backend::Udp(u) => &u.name,
        }
    }

    /// The MTU pods get (subnet.env's FLANNEL_MTU).
    pub fn pod_mtu(&self) -> u32 {
        match self {
            Backend::Vxlan(v) => v.mtu,
            Backend::HostGw { mtu, .. } => *mtu,
            Backend::Udp(u) => u.mtu,
        }
    }
}

/// The VTEP the unit tests of this module plan for.
#[cfg(test)]
pub(crate) fn test_vtep_spec() -> flannel_net::netlink::VxlanSpec {
    flannel_net::netlink::VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: "192.0.2.10".parse().unwrap(),
        dev: 2,
        port: 8472,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac: "02:00:00:00:00:10".parse().unwrap(),
    }
}
