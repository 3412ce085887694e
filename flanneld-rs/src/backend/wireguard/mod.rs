//! flannel's `wireguard` backend: pod traffic between nodes encrypted with
//! WireGuard, wire-compatible with flannel's (same device names
//! `flannel-wg` and, for IPv6, `flannel-wg-v6`, key file, ports and lease
//! data).
//!
//! As flannel's default `Mode` `separate`, each family has its own device,
//! port (`ListenPort`, `ListenPortV6`), lease data (`BackendData`,
//! `BackendV6Data`) and underlay: IPv4 pods over IPv4, IPv6 pods over IPv6.
//! Both devices use the one key file.
//!
//! flannel creates a kernel WireGuard device. This slice runs the protocol
//! in user space instead (the kernels here have no WireGuard module): a TUN
//! device named `flannel-wg` with flannel's address, MTU and route, and a
//! data path ([`datapath`]) that runs one `boringtun` Noise state machine
//! per peer (keyed by the peer's public key). The cryptography is
//! boringtun's; nothing here encrypts by itself.
//!
//! What the reconcile loop sees is the same as for the udp backend: a TUN
//! device with one route of the whole Network into it, and a peer table
//! handed to the data path (subnet -> public IP, port, public key).

pub mod datapath;
pub mod kernel;
pub mod keys;

use std::net::{IpAddr, SocketAddr};

use flannel_net::netlink::{Route, Scope};
use ipnet::IpNet;

use crate::config::{WireguardConfig, WireguardMode};
use crate::iface::ExtIface;
use crate::lease::{Family, FamilyLease, WireguardData};
use crate::reconcile::plan::TunSpec;

use super::{TunnelPeer, WireguardPeer};

/// flannel's IPv4 device name.
pub const DEVICE_NAME: &str = "flannel-wg";

/// flannel's IPv6 device name (Mode `separate`).
pub const DEVICE_NAME_V6: &str = "flannel-wg-v6";

/// flannel's MTU accounting: the device gets the underlay's (or the
/// configured `MTU`) minus 80 bytes (outer IPv6 40 + UDP 8 + WireGuard 32,
/// the worst case of either family).
pub const OVERHEAD: u32 = 80;

/// The wireguard backend's device, keys and options.
#[derive(Clone, PartialEq, Eq)]
pub struct WireguardSpec {
    /// The device, `flannel-wg` or `flannel-wg-v6`.
    pub name: String,
    /// The family it carries, inside and outside.
    pub family: Family,
    /// The underlay interface's index.
    pub dev: u32,
    /// Our UDP port (`ListenPort`, `ListenPortV6`), advertised in our lease.
    pub port: u16,
    /// The device's MTU.
    pub mtu: u32,
    /// Our private key (from the key file).
    pub private_key: [u8; 32],
    /// Our public key, advertised in our lease.
    pub public_key: [u8; 32],
    /// `PSK`.
    pub psk: Option<[u8; 32]>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub keepalive: u16,
    /// Mode `auto`, `ipv4` or `ipv6` in a dual-stack cluster: one device
    /// (`flannel-wg`, `ListenPort`) carries both families.
    pub one_device: Option<OneDevice>,
}

/// One device for both families (Mode `auto`, `ipv4`, `ipv6` with
/// `EnableIPv6`), as flannel: each peer is one WireGuard peer whose allowed
/// IPs are its subnets of both families, reached over the family the mode
/// says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneDevice {
    /// The mode.
    pub mode: WireguardMode,
    /// Whether our underlay has an IPv4 address (`auto`'s choice).
    pub our_v4: bool,
    /// Whether our underlay's IPv6 address is public, not in fc00::/7
    /// (`auto`'s choice).
    pub our_v6_public: bool,
}

impl OneDevice {
    /// The endpoint of a peer with these endpoints of each family, as
    /// flannel chooses it: `ipv4` and `ipv6` the mode's family; `auto` IPv4
    /// when the peer's IPv4 address is not private and we have IPv4, else
    /// IPv6 when both IPv6 addresses are public, else IPv4. A peer with one
    /// family is reached over that one.
    pub fn choose(&self, v4: Option<SocketAddr>, v6: Option<SocketAddr>) -> Option<SocketAddr> {
        let (a, b) = match (v4, v6) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => return a.or(b),
        };
        Some(match self.mode {
            WireguardMode::Ipv6 => b,
            WireguardMode::Ipv4 | WireguardMode::Separate => a,
            WireguardMode::Auto if !is_private(a.ip()) && self.our_v4 => a,
            WireguardMode::Auto if !is_private(b.ip()) && self.our_v6_public => b,
            WireguardMode::Auto => a,
        })
    }
}

/// Go's `net.IP.IsPrivate`: 10/8, 172.16/12, 192.168/16, fc00::/7.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xfe00 == 0xfc00,
    }
}

/// A WireGuard peer as a device gets it: its key, allowed IPs and endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouped {
    /// Its public key.
    pub key: [u8; 32],
    /// Its subnets (one; two with one device for both families).
    pub subnets: Vec<IpNet>,
    /// Where its datagrams go.
    pub endpoint: SocketAddr,
}

/// The WireGuard peers of a data path's peer table: with a device per
/// family, one per entry; with one device, a node's entries of both
/// families (same key) become one peer, reached as [`OneDevice::choose`]
/// says. Two nodes advertising one key in one family: the later one wins,
/// as a WireGuard device can hold the key once (logged).
pub fn group(table: &[(IpNet, TunnelPeer)], one: Option<OneDevice>) -> Vec<Grouped> {
    type Half = Option<(IpNet, SocketAddr)>;
    let mut order: Vec<[u8; 32]> = Vec::new();
    let mut by_key: std::collections::HashMap<[u8; 32], (Half, Half)> = std::collections::HashMap::new();
    for (subnet, p) in table {
        let Some(w) = p.wireguard else { continue };
        let e = by_key.entry(w.public_key).or_insert_with(|| {
            order.push(w.public_key);
            (None, None)
        });
        let slot = if subnet.addr().is_ipv6() { &mut e.1 } else { &mut e.0 };
        if let Some((old, _)) = slot {
            log::warn!(
                "wireguard backend: peers {old} and {subnet} advertise the same public key {}; using {subnet}",
                crate::config::encode_key(&w.public_key)
            );
        }
        *slot = Some((*subnet, SocketAddr::new(p.ip, w.port)));
    }
    order
        .into_iter()
        .filter_map(|key| {
            let (v4, v6) = by_key[&key];
            let subnets: Vec<IpNet> = v4.iter().chain(v6.iter()).map(|(s, _)| *s).collect();
            let endpoint = match one {
                Some(one) => one.choose(v4.map(|h| h.1), v6.map(|h| h.1))?,
                None => v4.or(v6)?.1,
            };
            Some(Grouped { key, subnets, endpoint })
        })
        .collect()
}

impl std::fmt::Debug for WireguardSpec {
    // The private key and the PSK never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardSpec")
            .field("name", &self.name)
            .field("family", &self.family)
            .field("dev", &self.dev)
            .field("port", &self.port)
            .field("mtu", &self.mtu)
            .field("public_key", &crate::config::encode_key(&self.public_key))
            .field("psk", &self.psk.map(|_| "(set)"))
            .field("keepalive", &self.keepalive)
            .field("one_device", &self.one_device)
            .finish()
    }
}

impl WireguardSpec {
    /// The TUN device as the plan sees it.
    pub fn tun(&self) -> TunSpec {
        TunSpec { name: self.name.clone(), mtu: self.mtu }
    }

    /// What our lease advertises (`{"PublicKey":...,"Port":...}`).
    pub fn lease_data(&self) -> WireguardData {
        WireguardData { public_key: self.public_key, port: Some(self.port) }
    }

    /// The data path's configuration for our lease.
    pub fn data_path_config(&self, subnet: IpNet, network: IpNet) -> datapath::WgConfig {
        datapath::WgConfig {
            tun_name: self.name.clone(),
            subnet,
            network,
            mtu: self.mtu,
            port: self.port,
            private_key: self.private_key,
            psk: self.psk,
            keepalive: self.keepalive,
            one_device: self.one_device,
        }
    }
}

/// The wireguard backend of `family` on `ext` with options `cfg`, its
/// private key from the key file (created on first use; both families use
/// it, as in flannel). The file is read off the async workers
/// (`block_in_place`: the daemon calls this at start and when the underlay
/// changes, from its multi-threaded runtime). `dual`: the cluster runs the
/// other family too.
pub fn spec(cfg: &WireguardConfig, ext: &ExtIface, family: Family, dual: bool) -> anyhow::Result<WireguardSpec> {
    let underlay = cfg.mtu.unwrap_or(ext.mtu);
    if underlay < 68 + OVERHEAD {
        anyhow::bail!(
            "Backend.Type wireguard: MTU {underlay} (of {}) leaves no room for the {OVERHEAD} bytes of WireGuard \
             encapsulation (need at least {})",
            if cfg.mtu.is_some() { "Backend.MTU".to_string() } else { format!("interface {}", ext.name) },
            68 + OVERHEAD
        );
    }
    let (private_key, public_key) = tokio::task::block_in_place(|| keys::load_or_create(&keys::key_file()))?;
    // Mode auto, ipv4, ipv6: flannel-wg on ListenPort for every family of
    // the cluster (in an IPv4-only cluster that is separate's one device).
    let one = cfg.mode != WireguardMode::Separate && (family == Family::V6 || dual);
    let one_device = one.then(|| OneDevice {
        mode: cfg.mode,
        our_v4: ext.addr.is_some(),
        our_v6_public: ext.v6.is_some_and(|v6| !is_private(IpAddr::V6(v6.addr.addr()))),
    });
    let (name, port) = match (family, one_device) {
        (Family::V4, _) | (Family::V6, Some(_)) => (DEVICE_NAME, cfg.listen_port),
        (Family::V6, None) => (DEVICE_NAME_V6, cfg.listen_port_v6),
    };
    Ok(WireguardSpec {
        name: name.into(),
        family,
        dev: ext.index,
        port,
        mtu: underlay - OVERHEAD,
        private_key,
        public_key,
        psk: cfg.psk,
        keepalive: cfg.persistent_keepalive,
        one_device,
    })
}

/// A peer for the data path of the lease part's family: its public IP of
/// that family (`PublicIP`, `PublicIPv6`), the port its lease gives (our
/// own `port` of that family when it gives none, as flannel reads a v0.20.2
/// lease) and its public key (`BackendData`, `BackendV6Data`).
pub fn peer(own_port: u16, l: &FamilyLease) -> Result<TunnelPeer, String> {
    let (ip_key, data_key) = match l.family {
        Family::V4 => ("PublicIP", "BackendData"),
        Family::V6 => ("PublicIPv6", "BackendV6Data"),
    };
    let ip = match (l.family, l.public_ip) {
        (Family::V4, Some(ip @ IpAddr::V4(_))) | (Family::V6, Some(ip @ IpAddr::V6(_))) => ip,
        _ => return Err(format!("the lease has no {ip_key}")),
    };
    let Some(w) = l.wireguard else {
        return Err(format!("{data_key} has no PublicKey"));
    };
    Ok(TunnelPeer { ip, wireguard: Some(WireguardPeer { public_key: w.public_key, port: w.port.unwrap_or(own_port) }) })
}

/// The family's whole Network into the device, scope link, as flannel's
/// wireguard backend adds it.
pub fn network_route(network: IpNet) -> Route {
    Route { dst: network, gateway: None, oif: None, onlink: false, scope: Scope::Link }
}

/// Starts the wireguard data path for our lease: flannel's kernel device
/// when the kernel has WireGuard ([`kernel`]), else the user-space path
/// ([`datapath`]; why is logged once per process). Either way the device
/// gets flannel's address, MTU and route through the same plan.
pub fn start_data_path(
    w: &WireguardSpec,
    subnet: IpNet,
    network: IpNet,
    metrics: &crate::health::Metrics,
) -> anyhow::Result<Box<dyn super::DataPath>> {
    static FALLBACK_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let once = || !FALLBACK_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed);
    match kernel::create_link(&w.name, w.mtu) {
        Ok(None) => {
            let dp = kernel::KernelWg::start(w)?;
            let netns = flannel_net::netns::NetNs::current()?;
            let spec = crate::backend::udp::kernel::DeviceSpec {
                name: w.name.clone(),
                subnet,
                network,
                mtu: w.mtu,
                route_scope: Scope::Link,
            };
            let fixed = crate::backend::udp::kernel::ensure_in(&netns, &spec)?;
            if !fixed.is_empty() {
                log::info!("wireguard backend: {}", fixed.join("; "));
            }
            return Ok(Box::new(dp));
        }
        Ok(Some(why)) if once() => log::info!(
            "wireguard backend: no kernel WireGuard (ip link add {} type wireguard: {why}); running the protocol in \
             user space",
            w.name
        ),
        Err(e) if once() => log::warn!(
            "wireguard backend: ip link add {} type wireguard: {e}; running the protocol in user space",
            w.name
        ),
        _ => {}
    }
    let dp =
        datapath::WgDataPath::start(w.data_path_config(subnet, network), std::sync::Arc::clone(&metrics.wireguard))?;
    Ok(Box::new(dp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, key: u8, port: u16) -> TunnelPeer {
        TunnelPeer { ip: ip.parse().unwrap(), wireguard: Some(WireguardPeer { public_key: [key; 32], port }) }
    }

    #[test]
    fn auto_chooses_the_endpoint_as_flannel() {
        let one = |mode, our_v4, our_v6_public| OneDevice { mode, our_v4, our_v6_public };
        let a = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let (pub4, priv4, pub6, priv6) =
            (a("192.0.2.11:51820"), a("10.0.0.11:51820"), a("[2001:db8::11]:51820"), a("[fd00::11]:51820"));
        let auto = one(WireguardMode::Auto, true, true);
        assert_eq!(auto.choose(pub4, pub6), pub4, "a public IPv4 address first");
        assert_eq!(auto.choose(priv4, pub6), pub6, "a private one: IPv6 when both ends' are public");
        assert_eq!(auto.choose(priv4, priv6), priv4, "else IPv4");
        assert_eq!(one(WireguardMode::Auto, true, false).choose(priv4, pub6), priv4, "our IPv6 address private");
        assert_eq!(one(WireguardMode::Auto, false, true).choose(pub4, pub6), pub6, "we have no IPv4");
        assert_eq!(one(WireguardMode::Ipv6, true, true).choose(pub4, pub6), pub6);
        assert_eq!(one(WireguardMode::Ipv4, true, true).choose(pub4, pub6), pub4);
        assert_eq!(auto.choose(None, pub6), pub6, "a peer of one family over that one");
    }

    #[test]
    fn one_device_makes_one_peer_per_node_with_both_subnets() {
        let table: Vec<(IpNet, TunnelPeer)> = vec![
            ("10.244.2.0/24".parse().unwrap(), peer("192.0.2.12", 2, 51820)),
            ("10.244.3.0/24".parse().unwrap(), peer("192.0.2.13", 3, 51820)),
            ("2001:db8:10:2::/64".parse().unwrap(), peer("2001:db8::12", 2, 51820)),
        ];
        let one = OneDevice { mode: WireguardMode::Ipv6, our_v4: true, our_v6_public: true };
        let g = group(&table, Some(one));
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].key, [2; 32]);
        assert_eq!(g[0].subnets, ["10.244.2.0/24".parse::<IpNet>().unwrap(), "2001:db8:10:2::/64".parse().unwrap()]);
        assert_eq!(g[0].endpoint, "[2001:db8::12]:51820".parse().unwrap());
        // Node 3 has no IPv6 half: reached over IPv4.
        assert_eq!(g[1].endpoint, "192.0.2.13:51820".parse().unwrap());
        // A device per family: one peer per entry, the later of one key.
        let twice = vec![table[0], ("10.244.9.0/24".parse().unwrap(), peer("192.0.2.19", 2, 51820))];
        let g = group(&twice, None);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].subnets, ["10.244.9.0/24".parse::<IpNet>().unwrap()]);
    }
}
