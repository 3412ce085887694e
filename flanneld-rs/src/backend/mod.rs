//! Backends: how traffic reaches peers. Each backend lives in its own
//! folder; this module is the one interface the rest of the daemon uses,
//! and [`Backend::for_config`] the one place a backend is chosen.
//!
//! A backend says what device of ours it needs (a VXLAN VTEP, a TUN, or
//! none), what kernel entries each peer lease asks for (or, for a backend
//! with a user-space data path, where the peer's datagrams go), what it
//! advertises in our lease, and the MTU pods get. The reconcile loop turns
//! that into kernel state through one plan for every backend.

pub mod host_gw;
pub mod udp;
pub mod vxlan;

use std::net::Ipv4Addr;

use flannel_net::netlink::{Netlink, NlResult, Route, VxlanSpec};
use flannel_net::MacAddr;
use ipnet::Ipv4Net;

use crate::config::{BackendConfig, NetworkConfig};
use crate::health::Metrics;
use crate::iface::ExtIface;
use crate::lease::{BackendType, Lease, LeaseAttrs, VxlanData};
use crate::reconcile::kernel::Sweep;
use crate::reconcile::plan::{Device, PeerEntries};

pub use host_gw::HostGwSpec;
pub use udp::spec::UdpSpec;

/// How traffic reaches peers, as far as this node is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// VXLAN: our VTEP; per peer an ARP neighbour, an FDB entry and a route
    /// (with `DirectRouting`, a plain route for peers on our segment).
    Vxlan {
        /// The VTEP.
        vtep: VxlanSpec,
        /// `DirectRouting`.
        direct_routing: bool,
    },
    /// host-gw: per peer a route to its subnet via its public IP on the
    /// underlay interface (every node on one L2 segment, no encapsulation).
    HostGw(HostGwSpec),
    /// udp: a TUN device whose packets a user-space data path carries to
    /// peers in UDP datagrams; the kernel holds one route to the whole
    /// Network through the device, nothing per peer (the data path keeps the
    /// peer table).
    Udp(UdpSpec),
}

/// What one peer lease asks of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerWant {
    /// Kernel entries (VXLAN, host-gw).
    Kernel(PeerEntries),
    /// A user-space data path's peer: datagrams for the subnet go to this address.
    Tunnel(Ipv4Addr),
}

/// A backend's user-space data path (udp), running beside the reconcile loop.
pub trait DataPath: Send {
    /// Whether all its threads still run.
    fn running(&self) -> bool;
    /// Replaces its peer table (subnet -> public IP) without pausing traffic.
    fn set_peers(&self, peers: &[(Ipv4Net, Ipv4Addr)]);
}

impl Backend {
    /// The backend the configuration asks for, on interface `ext`, with
    /// VTEP MAC `mac` (VXLAN only). Refuses what cannot work, naming the
    /// field and the value.
    pub fn for_config(cfg: &NetworkConfig, ext: &ExtIface, mac: MacAddr) -> anyhow::Result<Backend> {
        match &cfg.backend {
            BackendConfig::Vxlan(vx) => {
                Ok(Backend::Vxlan { vtep: vxlan::vtep_spec(vx, ext, mac)?, direct_routing: vx.direct_routing })
            }
            BackendConfig::HostGw => Ok(Backend::HostGw(host_gw::spec(ext)?)),
            BackendConfig::Udp { port } => Ok(Backend::Udp(udp::spec::spec(*port, ext)?)),
        }
    }

    /// The type written in our lease.
    pub fn backend_type(&self) -> BackendType {
        match self {
            Backend::Vxlan { .. } => BackendType::Vxlan,
            Backend::HostGw(_) => BackendType::HostGw,
            Backend::Udp(_) => BackendType::Udp,
        }
    }

    /// What our lease advertises: the backend type and its data.
    pub fn lease_attrs(&self, public_ip: Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs {
            public_ip,
            backend: self.backend_type(),
            vxlan: self.vtep().map(|v| VxlanData { vni: v.vni, vtep_mac: v.mac }),
            public_ipv6: None,
            vxlan6: None,
        }
    }

    /// The VTEP, for VXLAN.
    pub fn vtep(&self) -> Option<&VxlanSpec> {
        match self {
            Backend::Vxlan { vtep, .. } => Some(vtep),
            Backend::HostGw(_) | Backend::Udp(_) => None,
        }
    }

    /// The device of ours the backend needs, if any.
    pub fn device(&self) -> Option<Device> {
        match self {
            Backend::Vxlan { vtep, .. } => Some(Device::Vxlan(vtep.clone())),
            Backend::HostGw(_) => None,
            Backend::Udp(u) => Some(Device::Tun(u.tun())),
        }
    }

    /// The underlay interface's index.
    pub fn underlay(&self) -> u32 {
        match self {
            Backend::Vxlan { vtep, .. } => vtep.dev,
            Backend::HostGw(h) => h.dev,
            Backend::Udp(u) => u.dev,
        }
    }

    /// The device the entries live on, for messages (`flannel.1`, `eth0`, `flannel0`).
    pub fn device_name(&self) -> &str {
        match self {
            Backend::Vxlan { vtep, .. } => &vtep.name,
            Backend::HostGw(h) => &h.name,
            Backend::Udp(u) => &u.name,
        }
    }

    /// The MTU pods get (subnet.env's FLANNEL_MTU).
    pub fn pod_mtu(&self) -> u32 {
        match self {
            Backend::Vxlan { vtep, .. } => vtep.mtu,
            Backend::HostGw(h) => h.mtu,
            Backend::Udp(u) => u.mtu,
        }
    }

    /// The backend in words, for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Vxlan { vtep, .. } => format!("VTEP {} {}", vtep.name, vtep.mac),
            Backend::HostGw(h) => format!("host-gw routes on {}", h.name),
            Backend::Udp(u) => format!("udp data path on {} (UDP port {}, MTU {})", u.name, u.port, u.mtu),
        }
    }

    /// What a peer lease (already checked by [`check_peer`]) asks of us;
    /// `segment` is the underlay interface's subnet. An error says why the
    /// lease cannot be programmed, naming the value.
    pub fn peer(&self, segment: Ipv4Net, l: &Lease) -> Result<PeerWant, String> {
        match self {
            Backend::Vxlan { vtep, direct_routing } => {
                vxlan::peer_entries(vtep, *direct_routing, segment, l).map(PeerWant::Kernel)
            }
            Backend::HostGw(h) => host_gw::peer_entries(h, segment, l).map(PeerWant::Kernel),
            Backend::Udp(_) => udp::spec::peer(l).map(PeerWant::Tunnel),
        }
    }

    /// Routes through our device that are not any peer's: udp routes the
    /// whole Network into its TUN.
    pub fn device_routes(&self, network: Ipv4Net) -> Vec<Route> {
        match self {
            Backend::Udp(_) => vec![udp::spec::network_route(network)],
            Backend::Vxlan { .. } | Backend::HostGw(_) => Vec::new(),
        }
    }

    /// Which routes with a next hop into the Network are ours to sweep:
    /// those on the underlay (host-gw, `DirectRouting`), or with udp those on
    /// any device (left by host-gw or VXLAN, they would take traffic away
    /// from the data path).
    pub fn sweep(&self) -> Sweep {
        match self {
            Backend::Udp(_) => Sweep::AnyDevice,
            Backend::Vxlan { .. } | Backend::HostGw(_) => Sweep::Underlay(self.underlay()),
        }
    }

    /// Starts the backend's user-space data path for our lease, if it has
    /// one (blocking: it opens the device and its sockets). It creates its
    /// device and brings it in line with the plan.
    pub fn start_data_path(
        &self,
        subnet: Ipv4Net,
        network: Ipv4Net,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Box<dyn DataPath>>> {
        match self {
            Backend::Udp(u) => {
                let dp = udp::UdpDataPath::start(u.data_path_config(subnet, network))?;
                metrics.udp.attach(dp.stats_reader());
                Ok(Some(Box::new(dp)))
            }
            Backend::Vxlan { .. } | Backend::HostGw(_) => Ok(None),
        }
    }

    /// Whether this backend runs a user-space data path.
    pub fn has_data_path(&self) -> bool {
        matches!(self, Backend::Udp(_))
    }
}

/// What every backend asks of a peer lease: its subnet a /SubnetLen inside
/// Network, a usable public IP that is not ours, and our backend's type.
pub fn check_peer(cfg: &NetworkConfig, own: &Lease, backend: &Backend, l: &Lease) -> Result<(), String> {
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
    let ours = backend.backend_type();
    if l.backend != ours {
        return Err(format!("BackendType {:?} is not {ours}", l.backend.as_str()));
    }
    Ok(())
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

/// Devices that an earlier run of this Network with another backend left
/// behind: `flannel0` (a TUN, udp) or `flannel.<VNI>` (VXLAN) that is not
/// the device of the backend in use and carries an address inside Network
/// (which makes it this Network's, not another flannel's). Their routes
/// would shadow ours. Index and name of each.
pub async fn leftover_devices(nl: &Netlink, backend: &Backend, network: Ipv4Net) -> NlResult<Vec<(u32, String)>> {
    let ours = backend.device().map(|d| d.name().to_string());
    let mut found = Vec::new();
    for link in nl.links().await? {
        let kind = link.kind.as_deref();
        let flannels = (link.name == "flannel0" && kind == Some("tun"))
            || (link.name.starts_with("flannel.") && kind == Some("vxlan"));
        if !flannels || Some(&link.name) == ours.as_ref() {
            continue;
        }
        let addrs = nl.addrs(link.index).await?;
        if addrs.iter().any(|a| matches!(a, ipnet::IpNet::V4(v) if network.contains(&v.addr()))) {
            found.push((link.index, link.name));
        }
    }
    Ok(found)
}

/// Deletes [`leftover_devices`] (with their addresses and routes).
pub async fn remove_leftover_devices(nl: &Netlink, backend: &Backend, network: Ipv4Net) {
    let found = match leftover_devices(nl, backend, network).await {
        Ok(f) => f,
        Err(e) => return log::warn!("look for devices of an earlier backend: {e}"),
    };
    for (index, name) in found {
        log::info!("deleting {name}: an earlier backend's device for Network {network} (now {})", backend.describe());
        if let Err(e) = nl.del_link(index, &name).await {
            log::warn!("delete {name}: {e}");
        }
    }
}

/// The VTEP MAC survives restarts, so that peers' FDB entries stay valid:
/// the existing device's, else the one our lease advertises, else a new one.
pub async fn vtep_mac(nl: &Netlink, cfg: &NetworkConfig, advertised: Option<MacAddr>) -> anyhow::Result<MacAddr> {
    let existing = match cfg.vxlan() {
        Some(vx) => nl.vxlan_by_name(&vxlan::device_name(vx.vni)).await?.and_then(|v| v.mac),
        None => None,
    };
    Ok(existing.or(advertised).unwrap_or_else(random_mac))
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> MacAddr {
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    MacAddr(b)
}
