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
pub mod wireguard;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_net::netlink::{Netlink, NlResult, Route, VxlanSpec};
use flannel_net::MacAddr;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{BackendConfig, NetworkConfig};
use crate::health::Metrics;
use crate::iface::ExtIface;
use crate::lease::{BackendType, Family, FamilyLease, LeaseAttrs, VxlanData};
use crate::reconcile::kernel::Sweep;
use crate::reconcile::plan::{Device, PeerEntries};

pub use host_gw::HostGwSpec;
pub use udp::spec::UdpSpec;
pub use wireguard::WireguardSpec;

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
    /// wireguard: like udp a TUN device (`flannel-wg`) with the Network
    /// routed into it, whose packets a user-space data path carries to
    /// peers encrypted with WireGuard (one tunnel per peer public key).
    Wireguard(WireguardSpec),
}

/// What one peer lease asks of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerWant {
    /// Kernel entries (VXLAN, host-gw).
    Kernel(PeerEntries),
    /// A user-space data path's peer: datagrams for the subnet go there.
    Tunnel(TunnelPeer),
}

/// A peer of a user-space data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TunnelPeer {
    /// Its public IP (of the family the data path's socket speaks).
    pub ip: IpAddr,
    /// Its WireGuard port and key (wireguard only).
    pub wireguard: Option<WireguardPeer>,
}

/// A WireGuard peer's port and public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WireguardPeer {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Its UDP port.
    pub port: u16,
}

impl std::fmt::Display for TunnelPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.wireguard {
            None => write!(f, "{}", self.ip),
            Some(w) => write!(
                f,
                "{} key {}",
                std::net::SocketAddr::new(self.ip, w.port),
                crate::config::encode_key(&w.public_key)
            ),
        }
    }
}

/// A backend's user-space data path (udp, wireguard), running beside the
/// reconcile loop.
pub trait DataPath: Send {
    /// Whether all its threads still run.
    fn running(&self) -> bool;
    /// Replaces its peer table (subnet -> peer) without pausing traffic.
    fn set_peers(&self, peers: &[(IpNet, TunnelPeer)]);
}

impl Backend {
    /// The IPv4 backend the configuration asks for (`None` in an IPv6-only
    /// cluster), on interface `ext`, with VTEP MAC `mac` and transmit
    /// checksum offload `tx_checksum` (VXLAN only; see [`vxlan::vtep_spec`]).
    /// Refuses what cannot work, naming the field and the value.
    pub fn for_config(
        cfg: &NetworkConfig,
        ext: &ExtIface,
        mac: MacAddr,
        tx_checksum: Option<bool>,
    ) -> anyhow::Result<Option<Backend>> {
        let Some(c4) = &cfg.ipv4 else { return Ok(None) };
        let (Some(addr), Some(public_ip)) = (ext.addr, ext.public_ip) else {
            anyhow::bail!(
                "interface {} has no IPv4 address to carry the IPv4 overlay (Network {})",
                ext.name,
                c4.network
            );
        };
        Ok(Some(match &cfg.backend {
            BackendConfig::Vxlan(vx) => Backend::Vxlan {
                vtep: vxlan::vtep_spec(vx, ext, addr.addr(), mac, tx_checksum)?,
                direct_routing: vx.direct_routing,
            },
            BackendConfig::HostGw => Backend::HostGw(host_gw::spec(ext, addr, public_ip)?),
            BackendConfig::Udp { port } => Backend::Udp(udp::spec::spec(*port, ext, addr.addr())?),
            BackendConfig::Wireguard(wg) => {
                Backend::Wireguard(wireguard::spec(wg, ext, Family::V4, cfg.ipv6.is_some())?)
            }
        }))
    }

    /// The IPv6 backend of a dual-stack or IPv6-only network (`None` without
    /// `EnableIPv6`): VXLAN's `flannel-v6.<VNI>` over the interface's IPv6
    /// address with its own MAC `mac`, or host-gw's IPv6 routes on the same
    /// interface, or wireguard's `flannel-wg-v6` (Mode `separate`). The udp
    /// backend carries no IPv6 (the configuration refuses the combination).
    pub fn for_config_v6(
        cfg: &NetworkConfig,
        ext: &ExtIface,
        mac: MacAddr,
        tx_checksum: Option<bool>,
    ) -> anyhow::Result<Option<Backend>> {
        if cfg.ipv6.is_none() {
            return Ok(None);
        }
        let Some(v6) = ext.v6 else {
            anyhow::bail!(
                "EnableIPv6 true: interface {} has no global IPv6 address to carry the IPv6 overlay (give it one, \
                 or choose another with --iface/--iface-regex)",
                ext.name
            );
        };
        match &cfg.backend {
            BackendConfig::Vxlan(vx) => Ok(Some(Backend::Vxlan {
                vtep: vxlan::vtep_spec_v6(vx, ext, v6.addr.addr(), mac, tx_checksum)?,
                direct_routing: vx.direct_routing,
            })),
            BackendConfig::HostGw => Ok(Some(Backend::HostGw(host_gw::spec_v6(ext, &v6)?))),
            BackendConfig::Udp { .. } => {
                anyhow::bail!("the udp backend carries IPv4 only; EnableIPv6 needs vxlan or host-gw")
            }
            BackendConfig::Wireguard(wg) => {
                Ok(Some(Backend::Wireguard(wireguard::spec(wg, ext, Family::V6, cfg.ipv4.is_some())?)))
            }
        }
    }

    /// The type written in our lease.
    pub fn backend_type(&self) -> BackendType {
        match self {
            Backend::Vxlan { .. } => BackendType::Vxlan,
            Backend::HostGw(_) => BackendType::HostGw,
            Backend::Udp(_) => BackendType::Udp,
            Backend::Wireguard(_) => BackendType::Other("wireguard".into()),
        }
    }

    /// The VTEP, for VXLAN.
    pub fn vtep(&self) -> Option<&VxlanSpec> {
        match self {
            Backend::Vxlan { vtep, .. } => Some(vtep),
            Backend::HostGw(_) | Backend::Udp(_) | Backend::Wireguard(_) => None,
        }
    }

    /// The device of ours the backend needs, if any.
    pub fn device(&self) -> Option<Device> {
        match self {
            Backend::Vxlan { vtep, .. } => Some(Device::Vxlan(vtep.clone())),
            Backend::HostGw(_) => None,
            Backend::Udp(u) => Some(Device::Tun(u.tun())),
            Backend::Wireguard(w) => Some(Device::Tun(w.tun())),
        }
    }

    /// The underlay interface's index.
    pub fn underlay(&self) -> u32 {
        match self {
            Backend::Vxlan { vtep, .. } => vtep.dev,
            Backend::HostGw(h) => h.dev,
            Backend::Udp(u) => u.dev,
            Backend::Wireguard(w) => w.dev,
        }
    }

    /// The device the entries live on, for messages (`flannel.1`, `eth0`, `flannel0`).
    pub fn device_name(&self) -> &str {
        match self {
            Backend::Vxlan { vtep, .. } => &vtep.name,
            Backend::HostGw(h) => &h.name,
            Backend::Udp(u) => &u.name,
            Backend::Wireguard(w) => &w.name,
        }
    }

    /// The MTU pods get (subnet.env's FLANNEL_MTU).
    pub fn pod_mtu(&self) -> u32 {
        match self {
            Backend::Vxlan { vtep, .. } => vtep.mtu,
            Backend::HostGw(h) => h.mtu,
            Backend::Udp(u) => u.mtu,
            Backend::Wireguard(w) => w.mtu,
        }
    }

    /// The backend in words, for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Vxlan { vtep, .. } => format!("VTEP {} {}", vtep.name, vtep.mac),
            Backend::HostGw(h) => format!("host-gw routes on {}", h.name),
            Backend::Udp(u) => format!("udp data path on {} (UDP port {}, MTU {})", u.name, u.port, u.mtu),
            Backend::Wireguard(w) => format!(
                "wireguard user-space data path on {} (UDP port {}, MTU {}, public key {})",
                w.name,
                w.port,
                w.mtu,
                crate::config::encode_key(&w.public_key)
            ),
        }
    }

    /// What a peer lease's part of our family (already checked by
    /// [`check_peer`]) asks of us; `segment` is the underlay interface's
    /// subnet of that family. An error says why the lease cannot be
    /// programmed, naming the value.
    pub fn peer(&self, segment: IpNet, l: &FamilyLease) -> Result<PeerWant, String> {
        match self {
            Backend::Vxlan { vtep, direct_routing } => {
                vxlan::peer_entries(vtep, *direct_routing, segment, l).map(PeerWant::Kernel)
            }
            Backend::HostGw(h) => host_gw::peer_entries(h, segment, l).map(PeerWant::Kernel),
            Backend::Udp(_) => {
                udp::spec::peer(l).map(|ip| PeerWant::Tunnel(TunnelPeer { ip: IpAddr::V4(ip), wireguard: None }))
            }
            Backend::Wireguard(w) => wireguard::peer(w.port, l).map(PeerWant::Tunnel),
        }
    }

    /// Routes through our device that are not any peer's: udp routes the
    /// whole Network into its TUN, wireguard the family's Network into the
    /// family's device.
    pub fn device_routes(&self, network: IpNet) -> Vec<Route> {
        match (self, network) {
            (Backend::Udp(_), IpNet::V4(network)) => vec![udp::spec::network_route(network)],
            (Backend::Wireguard(_), network) => vec![wireguard::network_route(network)],
            _ => Vec::new(),
        }
    }

    /// Which routes with a next hop into the Network are ours to sweep:
    /// those on the underlay (host-gw, `DirectRouting`), or with udp those on
    /// any device (left by host-gw or VXLAN, they would take traffic away
    /// from the data path).
    pub fn sweep(&self) -> Sweep {
        match self {
            Backend::Udp(_) | Backend::Wireguard(_) => Sweep::AnyDevice,
            Backend::Vxlan { .. } | Backend::HostGw(_) => Sweep::Underlay(self.underlay()),
        }
    }

    /// Starts the backend's user-space data path for our lease, if it has
    /// one (blocking: it opens the device and its sockets). It creates its
    /// device and brings it in line with the plan.
    pub fn start_data_path(
        &self,
        subnet: IpNet,
        network: IpNet,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Box<dyn DataPath>>> {
        match (self, subnet, network) {
            (Backend::Udp(u), IpNet::V4(subnet), IpNet::V4(network)) => {
                let dp = udp::UdpDataPath::start(u.data_path_config(subnet, network))?;
                metrics.udp.attach(dp.stats_reader());
                Ok(Some(Box::new(dp)))
            }
            (Backend::Wireguard(w), subnet, network) => {
                wireguard::start_data_path(w, subnet, network, metrics).map(Some)
            }
            (Backend::Udp(_), ..) => anyhow::bail!("the udp backend carries IPv4 only (subnet {subnet})"),
            (Backend::Vxlan { .. } | Backend::HostGw(_), ..) => Ok(None),
        }
    }

    /// Whether this backend runs a user-space data path.
    pub fn has_data_path(&self) -> bool {
        matches!(self, Backend::Udp(_) | Backend::Wireguard(_))
    }
}

/// What a node advertises in its lease: the IPv4 backend with the public IP
/// and the IPv6 one with the public IPv6 address, each when the cluster
/// runs that family (one of them at least; both are of one type).
pub fn lease_attrs(v4: Option<(&Backend, Ipv4Addr)>, v6: Option<(&Backend, Ipv6Addr)>) -> LeaseAttrs {
    let vxlan = |b: &Backend| b.vtep().map(|v| VxlanData { vni: v.vni, vtep_mac: v.mac });
    let wg = |b: &Backend| match b {
        Backend::Wireguard(w) => Some(w.lease_data()),
        _ => None,
    };
    let any = v4.map(|(b, _)| b).or(v6.map(|(b, _)| b)).expect("a cluster runs at least one family");
    LeaseAttrs {
        public_ip: v4.map(|(_, ip)| ip),
        backend: any.backend_type(),
        vxlan: v4.and_then(|(b, _)| vxlan(b)),
        public_ipv6: v6.map(|(_, ip)| ip),
        vxlan6: v6.and_then(|(b, _)| vxlan(b)),
        wireguard: v4.and_then(|(b, _)| wg(b)),
        wireguard6: v6.and_then(|(b, _)| wg(b)),
    }
}

/// The cluster network of `family` and its subnets' prefix length
/// (`Network`/`SubnetLen`, `IPv6Network`/`IPv6SubnetLen`); `None` for IPv6
/// without `EnableIPv6`.
pub fn family_network(cfg: &NetworkConfig, family: Family) -> Option<(IpNet, u8)> {
    match family {
        Family::V4 => cfg.ipv4.map(|v4| (IpNet::V4(v4.network), v4.subnet_len)),
        Family::V6 => cfg.ipv6.map(|v6| (IpNet::V6(v6.network), v6.subnet_len)),
    }
}

/// What every backend asks of a peer lease's part of one family: its subnet
/// a /SubnetLen inside the family's network, a usable public IP of that
/// family that is not ours, and our backend's type. The messages use
/// flannel's field names (`PublicIP`, `PublicIPv6`, `SubnetLen`,
/// `IPv6SubnetLen`).
pub fn check_peer(cfg: &NetworkConfig, own: &FamilyLease, backend: &Backend, l: &FamilyLease) -> Result<(), String> {
    let Some((network, subnet_len)) = family_network(cfg, l.family) else {
        return Err(format!("{} is not enabled", l.family.name()));
    };
    let (net_key, len_key, ip_key) = match l.family {
        Family::V4 => ("Network", "SubnetLen", "PublicIP"),
        Family::V6 => ("IPv6Network", "IPv6SubnetLen", "PublicIPv6"),
    };
    if !network.contains(&l.subnet) {
        return Err(format!("subnet {} is outside {net_key} {network}", l.subnet));
    }
    if l.subnet.prefix_len() != subnet_len {
        return Err(format!("subnet {} is not a /{subnet_len} ({len_key})", l.subnet));
    }
    let ours = backend.backend_type();
    if *l.backend != ours {
        return Err(format!("BackendType {:?} is not {ours}", l.backend.as_str()));
    }
    let Some(ip) = l.public_ip else {
        return Err(format!("the lease has no {ip_key}"));
    };
    if let Some(why) = bad_public_ip(ip) {
        return Err(format!("{ip_key} {ip} is {why}"));
    }
    if Some(ip) == own.public_ip {
        return Err(format!("{ip_key} {ip} is our own address"));
    }
    Ok(())
}

/// [`crate::lease::unusable_address`] in the words a peer's message uses.
fn bad_public_ip(ip: IpAddr) -> Option<&'static str> {
    crate::lease::unusable_address(ip).map(|why| match why {
        "loopback" => "a loopback address",
        "multicast" => "a multicast address",
        "link-local" => "a link-local address",
        "unspecified" | "broadcast" => "not a unicast address",
        other => other,
    })
}

/// Devices that an earlier run of this Network with another backend, or
/// with another family, left behind: `flannel0` (a TUN, udp),
/// `flannel.<VNI>` or `flannel-v6.<VNI>` (VXLAN) that is not a device of the
/// backends in use (`ours`) and carries an address inside `network` or
/// `network6` (which makes it this Network's, not another flannel's), or is
/// a device of a family the cluster no longer runs (`flannel-v6.*` without
/// `network6`: `EnableIPv6` turned off; `flannel.*` and `flannel0` without
/// `network`: an IPv6-only cluster), whose address no configuration names
/// any more. Their routes would shadow ours or lead nowhere. Index and name
/// of each.
pub async fn leftover_devices(
    nl: &Netlink,
    ours: &[&str],
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
) -> NlResult<Vec<(u32, String)>> {
    let mut found = Vec::new();
    for link in nl.links().await? {
        let kind = link.kind.as_deref();
        let v4 = ((link.name == "flannel0" || link.name == wireguard::DEVICE_NAME) && kind == Some("tun"))
            || (link.name == wireguard::DEVICE_NAME && kind == Some("wireguard"))
            || (link.name.starts_with("flannel.") && kind == Some("vxlan"));
        let v6 = (link.name.starts_with("flannel-v6.") && kind == Some("vxlan"))
            || (link.name == wireguard::DEVICE_NAME_V6 && matches!(kind, Some("tun") | Some("wireguard")));
        if !(v4 || v6) || ours.contains(&link.name.as_str()) {
            continue;
        }
        if (v4 && network.is_none()) || (v6 && network6.is_none()) {
            found.push((link.index, link.name));
            continue;
        }
        let addrs = nl.addrs(link.index).await?;
        let in_ours = |a: &IpNet| match a {
            IpNet::V4(v) => network.is_some_and(|n| n.contains(&v.addr())),
            IpNet::V6(v) => network6.is_some_and(|n| n.contains(&v.addr())),
        };
        if addrs.iter().any(in_ours) {
            found.push((link.index, link.name));
        }
    }
    Ok(found)
}

/// Deletes [`leftover_devices`] (with their addresses and routes).
pub async fn remove_leftover_devices(
    nl: &Netlink,
    backends: &[&Backend],
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
) {
    let names: Vec<String> = backends.iter().filter_map(|b| b.device().map(|d| d.name().to_string())).collect();
    let ours: Vec<&str> = names.iter().map(String::as_str).collect();
    let found = match leftover_devices(nl, &ours, network, network6).await {
        Ok(f) => f,
        Err(e) => return log::warn!("look for devices of an earlier backend: {e}"),
    };
    let now = backends.iter().map(|b| b.describe()).collect::<Vec<_>>().join(", ");
    for (index, name) in found {
        let networks: Vec<String> =
            network.map(|n| n.to_string()).into_iter().chain(network6.map(|n| n.to_string())).collect();
        log::info!(
            "deleting {name}: an earlier backend's or family's device (Network now {}, {now})",
            networks.join(" and ")
        );
        if let Err(e) = nl.del_link(index, &name).await {
            log::warn!("delete {name}: {e}");
        }
    }
}

/// The VTEP MAC survives restarts, so that peers' FDB entries stay valid:
/// the existing device's, else the one our lease advertises, else a new one.
/// For `family`'s VTEP (`flannel.<VNI>`, `flannel-v6.<VNI>`).
pub async fn vtep_mac(
    nl: &Netlink,
    cfg: &NetworkConfig,
    family: Family,
    advertised: Option<MacAddr>,
) -> anyhow::Result<MacAddr> {
    let existing = match cfg.vxlan() {
        Some(vx) => nl.vxlan_by_name(&vxlan::device_name_of(family, vx.vni)).await?.and_then(|v| v.mac),
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
