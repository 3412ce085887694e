//! The user-space WireGuard data path: one thread moving packets between
//! the TUN device `flannel-wg` and one UDP socket on `ListenPort`, one
//! `boringtun` tunnel (Noise state machine) per peer.
//!
//! - Out: a packet read from the TUN goes to the peer whose subnet holds
//!   its destination (WireGuard's cryptokey routing, the peer's allowed IPs
//!   being its subnet), encrypted by that peer's tunnel, to the peer's
//!   endpoint (its public IP and port from its lease, or where it last
//!   sent from: roaming).
//! - In: a datagram is matched to its peer by the receiver index our
//!   tunnel chose (data, handshake responses, cookies) or, for a handshake
//!   initiation, by the initiator's static key (decrypted with ours); a
//!   datagram of no known peer, or that fails authentication, is dropped
//!   and counted. A decrypted packet is written to the TUN only when its
//!   source is in the peer's subnet. An authenticated datagram moves the
//!   peer's endpoint to where it came from, as WireGuard specifies.
//! - Timers: every [`TICK`] each tunnel's timers run (handshake retries
//!   and re-keying, `PersistentKeepaliveInterval`, session expiry).
//!
//! One packet per system call each way, in one thread: simple and correct,
//! not the udp backend's batched multi-queue path (yet).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use flannel_net::netns::NetNs;
use ipnet::Ipv4Net;
use log::{debug, info, warn};

use crate::backend::udp::kernel::{self, DeviceSpec};
use crate::backend::udp::tun::{self, TunOptions};
use crate::backend::TunnelPeer;

/// How often the tunnels' timers run (boringtun's own device uses 250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// A cookie reply's size: the one datagram a tunnel sends back for an
/// initiation it has not authenticated (under load).
const COOKIE_REPLY_LEN: usize = 64;

/// What the data path needs to know.
#[derive(Clone, PartialEq, Eq)]
pub struct WgConfig {
    /// The TUN device, `flannel-wg`.
    pub tun_name: String,
    /// Our lease; the device gets its first address with a /32.
    pub subnet: Ipv4Net,
    /// The Network, routed into the device.
    pub network: Ipv4Net,
    /// The device's MTU.
    pub mtu: u32,
    /// Our UDP port.
    pub port: u16,
    /// Our private key.
    pub private_key: [u8; 32],
    /// The pre-shared key of every peer.
    pub psk: Option<[u8; 32]>,
    /// Persistent keepalive, seconds (0: off).
    pub keepalive: u16,
}

impl std::fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgConfig")
            .field("tun_name", &self.tun_name)
            .field("subnet", &self.subnet)
            .field("network", &self.network)
            .field("mtu", &self.mtu)
            .field("port", &self.port)
            .field("psk", &self.psk.map(|_| "(set)"))
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// Counters since the daemon started (kept across data path restarts).
#[derive(Debug, Default)]
pub struct Counters {
    /// A wireguard data path ran (the counters are rendered).
    pub started: std::sync::atomic::AtomicBool,
    /// Packets from the TUN sent to peers (encrypted).
    pub tx_packets: AtomicU64,
    /// Their bytes (inner packets; not those of packets that waited for a
    /// handshake, which count in `tx_packets` only).
    pub tx_bytes: AtomicU64,
    /// Packets from peers decrypted and written to the TUN.
    pub rx_packets: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Handshake and keepalive datagrams sent.
    pub control_sent: AtomicU64,
    /// Packets from the TUN to a destination no peer owns.
    pub dropped_no_peer: AtomicU64,
    /// Datagrams of no known peer (unknown public key or receiver index).
    pub dropped_unknown_peer: AtomicU64,
    /// Datagrams that are not WireGuard messages or fail authentication
    /// (forged, replayed, wrong key or PSK).
    pub dropped_invalid: AtomicU64,
    /// Decrypted packets whose source is outside the peer's subnet.
    pub dropped_not_allowed: AtomicU64,
    /// Datagrams the kernel refused to send.
    pub send_errors: AtomicU64,
    /// Writes to the TUN that failed.
    pub tun_write_errors: AtomicU64,
    /// Per peer subnet, handshake responses that failed authentication
    /// since the last authenticated datagram from it (another PSK, or a
    /// key not its lease's); absent when none.
    pub failing_handshakes: std::sync::Mutex<std::collections::BTreeMap<Ipv4Net, u64>>,
}

impl Counters {
    /// `(name, help, value)` of each, for `/metrics`.
    pub fn list(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("tx_packets", "Packets sent to peers, encrypted.", g(&self.tx_packets)),
            ("tx_bytes", "Bytes of the packets sent to peers (inner packets).", g(&self.tx_bytes)),
            ("rx_packets", "Packets received from peers, decrypted.", g(&self.rx_packets)),
            ("rx_bytes", "Bytes of the packets received from peers (inner packets).", g(&self.rx_bytes)),
            ("control_sent", "Handshake, cookie and keepalive datagrams sent.", g(&self.control_sent)),
            ("dropped_no_peer", "Packets to a destination no peer owns.", g(&self.dropped_no_peer)),
            (
                "dropped_unknown_peer",
                "Datagrams of no known peer (unknown public key or index).",
                g(&self.dropped_unknown_peer),
            ),
            (
                "dropped_invalid",
                "Datagrams not WireGuard or failing authentication (forged, replayed, other key or PSK).",
                g(&self.dropped_invalid),
            ),
            (
                "dropped_not_allowed",
                "Decrypted packets whose source is outside the peer's subnet.",
                g(&self.dropped_not_allowed),
            ),
            ("send_errors", "Datagrams the kernel refused to send.", g(&self.send_errors)),
            ("tun_write_errors", "Writes to the TUN device that failed.", g(&self.tun_write_errors)),
        ]
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// One peer: its tunnel and where it is.
struct Peer {
    tunn: Tunn,
    /// Its subnet (allowed IPs).
    subnet: Ipv4Net,
    /// The endpoint its lease gives.
    lease_endpoint: SocketAddrV4,
    /// Where datagrams go: the lease's, or where it last sent from.
    endpoint: SocketAddrV4,
    /// Our index for it (the upper 24 bits of the receiver index).
    index: u32,
    /// Handshake responses from it that failed since its last
    /// authenticated datagram (see [`Counters::failing_handshakes`]).
    failing: u64,
}

/// The peers, by public key, and our indexes for them.
#[derive(Default)]
struct Table {
    peers: HashMap<[u8; 32], Peer>,
    by_index: HashMap<u32, [u8; 32]>,
    next_index: u32,
}

/// The running data path.
pub struct WgDataPath {
    cfg: WgConfig,
    spec: DeviceSpec,
    netns: NetNs,
    table: Arc<Mutex<Table>>,
    stop: OwnedFd,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WgDataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDataPath").field("cfg", &self.cfg).finish()
    }
}

impl WgDataPath {
    /// Creates (or adopts) the TUN device with its MTU, address and route,
    /// binds the UDP port and starts the thread, in the calling thread's
    /// network namespace. No peer until [`WgDataPath::set_peers`].
    pub fn start(cfg: WgConfig, counters: Arc<Counters>) -> anyhow::Result<WgDataPath> {
        if !cfg.network.contains(&cfg.subnet) {
            bail!("wireguard backend: subnet {} is not inside the Network {}", cfg.subnet, cfg.network);
        }
        let netns = NetNs::current().context("open the current network namespace")?;
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.port))
            .with_context(|| format!("wireguard backend: bind UDP port {} (Backend.ListenPort)", cfg.port))?;
        sock.set_nonblocking(true)?;
        let spec = DeviceSpec {
            name: cfg.tun_name.clone(),
            subnet: cfg.subnet,
            network: cfg.network,
            mtu: cfg.mtu,
            route_scope: flannel_net::netlink::Scope::Link,
        };
        let opts = TunOptions { multi_queue: false, offload: false };
        let queue = match tun::open_queue(&cfg.tun_name, opts) {
            Ok(q) => q,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EBUSY) => {
                warn!("wireguard backend: {e}; deleting {} and creating it anew", cfg.tun_name);
                kernel::delete_in(&netns, &cfg.tun_name)?;
                tun::open_queue(&cfg.tun_name, opts)?
            }
            Err(e) => return Err(e).context("open the TUN device"),
        };
        tun::set_persist(&queue, &cfg.tun_name, true)?;
        let fixed = kernel::ensure_in(&netns, &spec)?;
        if !fixed.is_empty() {
            info!("wireguard backend: {}", fixed.join("; "));
        }
        // SAFETY: plain eventfd(2) call.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh descriptor we own.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        let table = Arc::new(Mutex::new(Table { next_index: 1, ..Default::default() }));
        counters.started.store(true, Ordering::Relaxed);
        let secret = StaticSecret::from(cfg.private_key);
        let worker = Worker {
            tun: queue,
            sock,
            stop: stop.as_raw_fd(),
            table: Arc::clone(&table),
            public: PublicKey::from(&secret),
            secret,
            counters,
            mtu: cfg.mtu as usize,
        };
        let handle = std::thread::Builder::new()
            .name("flannel-wg".into())
            .spawn(move || worker.run())
            .context("spawn the wireguard thread")?;
        info!(
            "wireguard backend: user-space data path on {} (UDP port {}, MTU {}, {})",
            cfg.tun_name,
            cfg.port,
            cfg.mtu,
            if cfg.psk.is_some() { "with PSK" } else { "no PSK" }
        );
        Ok(WgDataPath { cfg, spec, netns, table, stop, worker: Some(handle) })
    }

    /// Brings the peers in line with `peers` (subnet -> endpoint and key): a
    /// peer whose key is new gets a new tunnel (a re-keyed node: its old
    /// tunnel goes with the old key), one whose lease endpoint changed is
    /// sent there, and a peer no longer listed is removed. Tunnels of
    /// unchanged peers keep their sessions.
    pub fn set_peers(&self, peers: &[(Ipv4Net, TunnelPeer)]) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted: HashMap<[u8; 32], (Ipv4Net, SocketAddrV4)> = HashMap::new();
        for (subnet, p) in peers {
            let Some(w) = p.wireguard else { continue };
            let endpoint = SocketAddrV4::new(p.ip, w.port);
            if let Some((other, _)) = wanted.insert(w.public_key, (*subnet, endpoint)) {
                warn!(
                    "wireguard backend: peers {other} and {subnet} advertise the same public key {}; using {subnet}",
                    crate::config::encode_key(&w.public_key)
                );
            }
        }
        let gone: Vec<[u8; 32]> = t.peers.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
        for k in gone {
            if let Some(p) = t.peers.remove(&k) {
                t.by_index.remove(&p.index);
                info!("wireguard backend: peer {} ({}) removed", p.subnet, crate::config::encode_key(&k));
            }
        }
        for (key, (subnet, endpoint)) in wanted {
            if let Some(p) = t.peers.get_mut(&key) {
                p.subnet = subnet;
                if p.lease_endpoint != endpoint {
                    info!("wireguard backend: peer {subnet} now at {endpoint}");
                    p.lease_endpoint = endpoint;
                    p.endpoint = endpoint;
                }
                continue;
            }
            let index = t.next_index;
            t.next_index = if index >= (1 << 24) - 1 { 1 } else { index + 1 };
            let tunn = Tunn::new(
                StaticSecret::from(self.cfg.private_key),
                PublicKey::from(key),
                self.cfg.psk,
                (self.cfg.keepalive > 0).then_some(self.cfg.keepalive),
                index,
                None,
            );
            info!("wireguard backend: peer {subnet} at {endpoint}, key {}", crate::config::encode_key(&key));
            t.by_index.insert(index, key);
            t.peers.insert(key, Peer { tunn, subnet, lease_endpoint: endpoint, endpoint, index, failing: 0 });
        }
    }

    /// Re-asserts the device's MTU, address, up state and route; fails when
    /// the device is gone.
    pub fn ensure_kernel(&self) -> anyhow::Result<Vec<String>> {
        kernel::ensure_in(&self.netns, &self.spec)
    }

    /// Whether the thread still runs.
    pub fn running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Each peer's subnet, current endpoint and time since its last
    /// handshake (for `diagnose` and tests).
    pub fn peers(&self) -> Vec<(Ipv4Net, SocketAddrV4, Option<Duration>)> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> =
            t.peers.values().map(|p| (p.subnet, p.endpoint, p.tunn.time_since_last_handshake())).collect();
        v.sort();
        v
    }

    fn stop_worker(&mut self) {
        let Some(w) = self.worker.take() else { return };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        let rc = unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if rc != 8 {
            warn!("wireguard backend: signal the thread to stop: {}", std::io::Error::last_os_error());
        }
        let _ = w.join();
    }
}

impl Drop for WgDataPath {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl crate::backend::DataPath for WgDataPath {
    fn running(&self) -> bool {
        WgDataPath::running(self)
    }

    fn set_peers(&self, peers: &[(Ipv4Net, TunnelPeer)]) {
        WgDataPath::set_peers(self, peers)
    }
}

struct Worker {
    tun: OwnedFd,
    sock: UdpSocket,
    stop: RawFd,
    table: Arc<Mutex<Table>>,
    secret: StaticSecret,
    public: PublicKey,
    counters: Arc<Counters>,
    mtu: usize,
}

/// Packets handled per readiness before looking at the other side again.
const BURST: usize = 64;

impl Worker {
    fn run(self) {
        let mut src = vec![0u8; 65536];
        let mut dst = vec![0u8; 65536 + 64];
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_tick {
                self.tick(&mut dst);
                next_tick = now + TICK;
            }
            let timeout = next_tick.saturating_duration_since(Instant::now()).as_millis().max(1) as libc::c_int;
            let mut fds = [
                libc::pollfd { fd: self.tun.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: three valid pollfd structures.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("wireguard backend: poll: {e}; the data path stops (the reconcile restarts it)");
                return;
            }
            if fds[2].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                warn!("wireguard backend: the TUN device went away; the data path stops (the reconcile restarts it)");
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.read_tun(&mut src, &mut dst);
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.read_network(&mut src, &mut dst);
            }
        }
    }

    fn send(&self, to: SocketAddrV4, d: &[u8]) -> bool {
        match self.sock.send_to(d, to) {
            Ok(_) => true,
            Err(e) => {
                inc(&self.counters.send_errors);
                debug!("wireguard backend: send to {to}: {e}");
                false
            }
        }
    }

    fn tick(&self, dst: &mut [u8]) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for p in t.peers.values_mut() {
            match p.tunn.update_timers(dst) {
                TunnResult::WriteToNetwork(d) if self.send(p.endpoint, d) => inc(&self.counters.control_sent),
                TunnResult::Err(e) => debug!("wireguard backend: peer {}: {e:?}", p.subnet),
                _ => {}
            }
        }
    }

    fn read_tun(&self, src: &mut [u8], dst: &mut [u8]) {
        for _ in 0..BURST {
            // SAFETY: reads at most `src.len()` bytes into `src`.
            let n = unsafe { libc::read(self.tun.as_raw_fd(), src.as_mut_ptr().cast(), src.len()) };
            if n <= 0 {
                return;
            }
            let pkt = &src[..n as usize];
            if pkt.len() < 20 || pkt[0] >> 4 != 4 {
                // IPv6 (the kernel's router solicitations) or junk: the
                // device carries IPv4 only.
                continue;
            }
            let to = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let Some(p) = t.peers.values_mut().find(|p| p.subnet.contains(&to)) else {
                inc(&self.counters.dropped_no_peer);
                continue;
            };
            match p.tunn.encapsulate(pkt, dst) {
                TunnResult::WriteToNetwork(d) => {
                    // A data message (type 4); otherwise a handshake
                    // initiation, and the packet waits in the tunnel's
                    // queue until the handshake is done.
                    let data = d.first() == Some(&4);
                    if self.send(p.endpoint, d) {
                        if data {
                            inc(&self.counters.tx_packets);
                            self.counters.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                        } else {
                            inc(&self.counters.control_sent);
                        }
                    }
                }
                TunnResult::Err(e) => debug!("wireguard backend: to {to}: {e:?}"),
                _ => {}
            }
        }
    }

    fn read_network(&self, src: &mut [u8], dst: &mut [u8]) {
        for _ in 0..BURST {
            let (n, from) = match self.sock.recv_from(src) {
                Ok((n, SocketAddr::V4(from))) => (n, from),
                Ok(_) => continue,
                Err(_) => return,
            };
            self.datagram(&src[..n], from, dst);
        }
    }

    fn datagram(&self, d: &[u8], from: SocketAddrV4, dst: &mut [u8]) {
        let parsed = match Tunn::parse_incoming_packet(d) {
            Ok(p) => p,
            Err(_) => {
                inc(&self.counters.dropped_invalid);
                return;
            }
        };
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let is_data = matches!(parsed, Packet::PacketData(_));
        let key = match &parsed {
            Packet::HandshakeInit(h) => match parse_handshake_anon(&self.secret, &self.public, h) {
                Ok(half) => Some(half.peer_static_public),
                Err(_) => {
                    // Not encrypted to our key, or forged.
                    inc(&self.counters.dropped_invalid);
                    return;
                }
            },
            Packet::HandshakeResponse(h) => t.by_index.get(&(h.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(c) => t.by_index.get(&(c.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => t.by_index.get(&(p.receiver_idx >> 8)).copied(),
        };
        let Some(p) = key.and_then(|k| t.peers.get_mut(&k)) else {
            inc(&self.counters.dropped_unknown_peer);
            debug!("wireguard backend: datagram from {from} of no known peer dropped");
            return;
        };
        let authenticated = match p.tunn.decapsulate(Some(IpAddr::V4(*from.ip())), d, dst) {
            TunnResult::WriteToNetwork(reply) => {
                let auth = reply.len() != COOKIE_REPLY_LEN;
                if self.send(from, reply) {
                    inc(&self.counters.control_sent);
                }
                auth
            }
            TunnResult::WriteToTunnelV4(pkt, source) => {
                if p.subnet.contains(&source) && pkt.len() <= self.mtu {
                    let len = pkt.len();
                    // SAFETY: writes `len` bytes from `pkt`.
                    let rc = unsafe { libc::write(self.tun.as_raw_fd(), pkt.as_ptr().cast(), len) };
                    if rc < 0 {
                        inc(&self.counters.tun_write_errors);
                    } else {
                        inc(&self.counters.rx_packets);
                        self.counters.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                } else {
                    inc(&self.counters.dropped_not_allowed);
                }
                true
            }
            TunnResult::WriteToTunnelV6(..) => {
                inc(&self.counters.dropped_not_allowed);
                true
            }
            // A keepalive (authenticated data without a packet), or a cookie.
            TunnResult::Done => is_data,
            TunnResult::Err(e) => {
                inc(&self.counters.dropped_invalid);
                debug!("wireguard backend: datagram from {from} for peer {} dropped: {e:?}", p.subnet);
                if matches!(parsed, Packet::HandshakeResponse(_)) {
                    p.failing += 1;
                    let mut f = self.counters.failing_handshakes.lock().unwrap_or_else(|p| p.into_inner());
                    f.insert(p.subnet, p.failing);
                }
                false
            }
        };
        if !authenticated {
            return;
        }
        if p.failing != 0 {
            p.failing = 0;
            self.counters.failing_handshakes.lock().unwrap_or_else(|p| p.into_inner()).remove(&p.subnet);
        }
        if p.endpoint != from {
            info!("wireguard backend: peer {} roamed: {} -> {from}", p.subnet, p.endpoint);
            p.endpoint = from;
        }
        // Packets queued while the handshake ran go out now.
        while let TunnResult::WriteToNetwork(d) = p.tunn.decapsulate(None, &[], dst) {
            if self.send(p.endpoint, d) {
                inc(&self.counters.tx_packets);
            }
        }
    }
}
