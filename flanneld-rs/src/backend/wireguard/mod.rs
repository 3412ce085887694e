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

use std::net::IpAddr;

use flannel_net::netlink::{Route, Scope};
use ipnet::IpNet;

use crate::config::WireguardConfig;
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
        }
    }
}

/// The wireguard backend of `family` on `ext` with options `cfg`, its
/// private key from the key file (created on first use; both families use
/// it, as in flannel). The file is read off the async workers
/// (`block_in_place`: the daemon calls this at start and when the underlay
/// changes, from its multi-threaded runtime).
pub fn spec(cfg: &WireguardConfig, ext: &ExtIface, family: Family) -> anyhow::Result<WireguardSpec> {
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
    let (name, port) = match family {
        Family::V4 => (DEVICE_NAME, cfg.listen_port),
        Family::V6 => (DEVICE_NAME_V6, cfg.listen_port_v6),
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
