//! flannel's `wireguard` backend: pod traffic between nodes encrypted with
//! WireGuard, wire-compatible with flannel's (same device name
//! `flannel-wg`, key file, ports and lease data).
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

use std::net::Ipv4Addr;

use flannel_net::netlink::{Route, Scope};
use ipnet::{IpNet, Ipv4Net};

use crate::config::WireguardConfig;
use crate::iface::ExtIface;
use crate::lease::{FamilyLease, WireguardData};
use crate::reconcile::plan::TunSpec;

use super::{TunnelPeer, WireguardPeer};

/// flannel's IPv4 device name.
pub const DEVICE_NAME: &str = "flannel-wg";

/// flannel's MTU accounting: the device gets the underlay's (or the
/// configured `MTU`) minus 80 bytes (outer IPv6 40 + UDP 8 + WireGuard 32,
/// the worst case of either family).
pub const OVERHEAD: u32 = 80;

/// The wireguard backend's device, keys and options.
#[derive(Clone, PartialEq, Eq)]
pub struct WireguardSpec {
    /// The device, `flannel-wg`.
    pub name: String,
    /// The underlay interface's index.
    pub dev: u32,
    /// Our UDP port (`ListenPort`), advertised in our lease.
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
    pub fn data_path_config(&self, subnet: Ipv4Net, network: Ipv4Net) -> datapath::WgConfig {
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

/// The wireguard backend on `ext` with options `cfg`, its private key from
/// the key file (created on first use). The file is read off the async
/// workers (`block_in_place`: the daemon calls this at start and when the
/// underlay changes, from its multi-threaded runtime).
pub fn spec(cfg: &WireguardConfig, ext: &ExtIface) -> anyhow::Result<WireguardSpec> {
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
    Ok(WireguardSpec {
        name: DEVICE_NAME.into(),
        dev: ext.index,
        port: cfg.listen_port,
        mtu: underlay - OVERHEAD,
        private_key,
        public_key,
        psk: cfg.psk,
        keepalive: cfg.persistent_keepalive,
    })
}

/// A peer for the data path: its public IP, the port its lease gives (our
/// own `port` when it gives none, as flannel reads a v0.20.2 lease) and its
/// public key.
pub fn peer(own_port: u16, l: &FamilyLease) -> Result<TunnelPeer, String> {
    let Some(std::net::IpAddr::V4(ip)) = l.public_ip else {
        return Err("the wireguard backend carries IPv4 only so far".into());
    };
    let Some(w) = l.wireguard else {
        return Err("BackendData has no PublicKey".into());
    };
    Ok(TunnelPeer { ip, wireguard: Some(WireguardPeer { public_key: w.public_key, port: w.port.unwrap_or(own_port) }) })
}

/// The whole Network into the device, scope link, as flannel's wireguard
/// backend adds it.
pub fn network_route(network: Ipv4Net) -> Route {
    Route { dst: IpNet::V4(network), gateway: None, oif: None, onlink: false, scope: Scope::Link }
}

/// Our device's address: `<subnet>.0/32`, as flannel gives it.
pub fn device_addr(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

/// Starts the wireguard data path for our lease: flannel's kernel device
/// when the kernel has WireGuard ([`kernel`]), else the user-space path
/// ([`datapath`]; why is logged once per process). Either way the device
/// gets flannel's address, MTU and route through the same plan.
pub fn start_data_path(
    w: &WireguardSpec,
    subnet: Ipv4Net,
    network: Ipv4Net,
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
