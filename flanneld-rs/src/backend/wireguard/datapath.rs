//! The user-space WireGuard data path: packets move between the TUN device
//! `flannel-wg` and UDP sockets on `ListenPort`, one `boringtun` tunnel
//! (Noise state machine) per peer. The same code runs `flannel-wg-v6`
//! (Mode `separate`): IPv6 packets inside, an IPv6 socket on `ListenPortV6`
//! outside.
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
//!   source is in one of the peer's subnets (one; with one device for both
//!   families, its IPv4 and IPv6 subnets). An authenticated datagram moves the
//!   peer's endpoint to where it came from, as WireGuard specifies.
//! - Timers: every [`TICK`] each tunnel's timers run (handshake retries
//!   and re-keying, `PersistentKeepaliveInterval`, session expiry).
//!
//! Speed comes from the udp backend's parts around boringtun's
//! packet-at-a-time encryption (see [`Tuning`]; each falls back on its own
//! when the kernel refuses it):
//!
//! - a multi-queue TUN, one worker thread per CPU with its own
//!   `SO_REUSEPORT` socket; the peers are shared, each tunnel behind its
//!   own lock, taken once per super-packet or per received train;
//! - TUN offloads (`IFF_VNET_HDR`, TSO): one read returns a TCP super-packet
//!   of up to 64 KB, cut into MTU-sized packets in place (each segment's
//!   header is written just before its payload, so it is one contiguous
//!   packet for boringtun, which copies it once as it encrypts);
//! - the encrypted datagrams of a super-packet are all the same size, so
//!   they leave as one UDP GSO train (`UDP_SEGMENT`), bursts batched with
//!   `sendmmsg`; on receive, `recvmmsg` and UDP GRO trains, decrypted one by
//!   one, and consecutive TCP segments merged back into one super-packet
//!   written to the TUN with one `writev` (the udp backend's [`TunWriter`]);
//! - no allocation per packet (boringtun allocates only for packets that
//!   wait for a handshake).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use flannel_net::netns::NetNs;
use ipnet::{IpNet, Ipv6Net};
use log::{debug, info, warn};

use crate::backend::udp::gro::{Pkt, TunWriter};
use crate::backend::udp::gso::{complete_checksum, cut_in_place};
use crate::backend::udp::kernel::DeviceSpec;
use crate::backend::udp::packet::{self, IPV6_HEADER};
use crate::backend::udp::peers::PeerTable;
use crate::backend::udp::sock::{RxBatch, TxBatch, UdpSocket};
use crate::backend::udp::tun::TunOptions;
use crate::backend::udp::vnet::{self, VnetHdr};
use crate::backend::udp::{open_device, Workers};
use crate::backend::TunnelPeer;

/// How often the tunnels' timers run (boringtun's own device uses 250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// A cookie reply's size: the one datagram a tunnel sends back for an
/// initiation it has not authenticated (under load).
const COOKIE_REPLY_LEN: usize = 64;

/// What the data path needs to know.
#[derive(Clone, PartialEq, Eq)]
pub struct WgConfig {
    /// The TUN device, `flannel-wg` (`flannel-wg-v6`).
    pub tun_name: String,
    /// Our lease; the device gets its first address with a /32 (/128). Its
    /// family is the data path's, inside and outside.
    pub subnet: IpNet,
    /// The Network, routed into the device.
    pub network: IpNet,
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
    /// One device for both families (Mode auto, ipv4, ipv6): peers of both,
    /// a dual-stack socket.
    pub one_device: Option<super::OneDevice>,
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
            .field("one_device", &self.one_device)
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
    pub failing_handshakes: std::sync::Mutex<std::collections::BTreeMap<IpNet, u64>>,
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

/// The data path's speed-ups, the udp backend's own set (the same parts
/// around the cryptography).
pub use crate::backend::udp::Tuning;

/// The speed-ups added one at a time, named, for the benchmark.
pub fn stages() -> Vec<(&'static str, Tuning)> {
    let base = Tuning::per_packet();
    vec![
        ("per packet (1 thread, read/sendto/recvfrom/write)", base),
        ("+ batching (recvmmsg/sendmmsg, 16)", Tuning { batch: 16, ..base }),
        ("+ multi-queue TUN, a worker per CPU", Tuning { batch: 16, multi_queue: true, ..base }),
        ("+ TUN TSO, segments cut in place", Tuning { batch: 16, multi_queue: true, offload: true, ..base }),
        ("+ UDP GSO on send", Tuning { batch: 16, multi_queue: true, offload: true, udp_gso: true, ..base }),
        ("+ UDP GRO on receive", Tuning { coalesce: false, ..Tuning::default() }),
        ("+ TCP coalescing into the TUN (all on)", Tuning::default()),
    ]
}

/// One peer: its tunnel and where it is. Shared by the workers; the tunnel
/// has its own lock, the rest is atomic or rarely written.
struct Peer {
    key: [u8; 32],
    tunn: Mutex<Tunn>,
    /// Its subnets (allowed IPs): one, or one per family with one device;
    /// for logs and metrics (packets are checked against the table).
    subnets: RwLock<Vec<IpNet>>,
    /// The endpoint its lease gives.
    lease_endpoint: Mutex<SocketAddr>,
    /// Where datagrams go: the lease's, or where it last sent from.
    endpoint: RwLock<SocketAddr>,
    /// Our index for it (the upper 24 bits of the receiver index).
    index: u32,
    /// Handshake responses from it that failed since its last
    /// authenticated datagram (see [`Counters::failing_handshakes`]).
    failing: AtomicU64,
}

impl Peer {
    /// Its first subnet, which names it in logs and metrics.
    fn subnet(&self) -> IpNet {
        self.subnets.read().unwrap_or_else(|p| p.into_inner())[0]
    }

    fn endpoint(&self) -> SocketAddr {
        *self.endpoint.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set_endpoint(&self, to: SocketAddr) -> SocketAddr {
        std::mem::replace(&mut *self.endpoint.write().unwrap_or_else(|p| p.into_inner()), to)
    }

    fn tunn(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the endpoint to `from` (an authenticated datagram came from
    /// there).
    fn roam(&self, from: SocketAddr) {
        if self.endpoint() == from {
            return;
        }
        let old = self.set_endpoint(from);
        if old != from {
            info!("wireguard backend: peer {} roamed: {old} -> {from}", self.subnet());
        }
    }
}

/// One immutable view of the peers; replaced as a whole by `set_peers`
/// (the peers themselves, and their sessions, carry over).
#[derive(Default)]
struct Table {
    peers: Vec<Arc<Peer>>,
    /// IPv4 subnet -> position in `peers` (the udp backend's longest-prefix
    /// table, its values used as positions).
    routes: PeerTable,
    /// IPv6 subnets and positions, longest prefix first (a node has a few
    /// dozen peers at most in a cluster of that size: a scan is enough).
    routes6: Vec<(Ipv6Net, usize)>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
}

impl Table {
    /// The position of the peer whose subnet holds `dst`.
    fn route_pos(&self, dst: IpAddr) -> Option<usize> {
        match dst {
            IpAddr::V4(v4) => self.routes.lookup(u32::from(v4)).map(|i| i as usize),
            IpAddr::V6(v6) => self.routes6.iter().find(|(n, _)| n.contains(&v6)).map(|(_, i)| *i),
        }
    }

    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.route_pos(dst).map(|i| &self.peers[i])
    }

    /// Whether the peer at `pos` may send from `source`: its allowed IPs
    /// route `source` back to it (WireGuard's cryptokey routing), read from
    /// this table alone, without a lock per packet.
    fn allows(&self, pos: usize, source: IpAddr) -> bool {
        self.route_pos(source) == Some(pos)
    }
}

/// The current table; workers check the generation once per round.
#[derive(Default)]
struct Cell {
    generation: AtomicU64,
    table: RwLock<Arc<Table>>,
}

impl Cell {
    fn store(&self, t: Table) {
        let mut slot = self.table.write().unwrap_or_else(|p| p.into_inner());
        *slot = Arc::new(t);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn load(&self) -> (u64, Arc<Table>) {
        let slot = self.table.read().unwrap_or_else(|p| p.into_inner());
        (self.generation.load(Ordering::Acquire), Arc::clone(&slot))
    }
}

/// What the workers share.
struct Shared {
    cell: Cell,
    /// Serialises `set_peers` (index allocation).
    writer: Mutex<u32>,
    counters: Arc<Counters>,
    secret: StaticSecret,
    public: PublicKey,
    mtu: usize,
}

/// What the data path ended up using, after the kernel had its say (the
/// udp backend's record of it).
pub use crate::backend::udp::Features;

/// The running data path.
pub struct WgDataPath {
    cfg: WgConfig,
    features: Features,
    shared: Arc<Shared>,
    workers: Workers,
}

impl std::fmt::Debug for WgDataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDataPath").field("cfg", &self.cfg).field("features", &self.features).finish()
    }
}

impl WgDataPath {
    /// Creates (or adopts) the TUN device with its MTU, address and route,
    /// binds the UDP port and starts the workers, in the calling thread's
    /// network namespace, with every speed-up the kernel offers. No peer
    /// until [`WgDataPath::set_peers`].
    pub fn start(cfg: WgConfig, counters: Arc<Counters>) -> anyhow::Result<WgDataPath> {
        Self::start_with(cfg, counters, Tuning::default())
    }

    /// [`WgDataPath::start`] with chosen speed-ups.
    pub fn start_with(cfg: WgConfig, counters: Arc<Counters>, tuning: Tuning) -> anyhow::Result<WgDataPath> {
        if !cfg.network.contains(&cfg.subnet) {
            bail!("wireguard backend: subnet {} is not inside the Network {}", cfg.subnet, cfg.network);
        }
        let (any, port_key) = match (cfg.subnet, cfg.one_device) {
            (_, Some(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), "Backend.ListenPort"),
            (IpNet::V4(_), None) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), "Backend.ListenPort"),
            (IpNet::V6(_), None) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), "Backend.ListenPortV6"),
        };
        let netns = NetNs::current().context("open the current network namespace")?;
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let wanted = if tuning.multi_queue { cpus } else { 1 };
        // The sockets first: a port another program holds is the likeliest
        // failure, and it then leaves nothing behind.
        let mut socks = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            socks.push(
                (if cfg.one_device.is_some() {
                    UdpSocket::bind_dual(cfg.port)
                } else {
                    UdpSocket::bind_ip(any, cfg.port)
                })
                .with_context(|| format!("wireguard backend: UDP port {} ({port_key})", cfg.port))?,
            );
        }
        let spec = DeviceSpec {
            name: cfg.tun_name.clone(),
            subnet: cfg.subnet,
            network: cfg.network,
            mtu: cfg.mtu,
            route_scope: flannel_net::netlink::Scope::Link,
        };
        let mut opts = TunOptions { multi_queue: true, offload: tuning.offload };
        let queues = open_device(&netns, &spec, wanted, &mut opts, "wireguard backend")?;
        socks.truncate(queues.len());
        let udp_gso = tuning.udp_gso && socks[0].gso_supported();
        let udp_gro = tuning.udp_gro && socks.iter().all(UdpSocket::enable_gro);
        let features = Features {
            queues: queues.len(),
            multi_queue: opts.multi_queue,
            offload: opts.offload,
            udp_gso,
            udp_gro,
            coalesce: tuning.coalesce && opts.offload,
            // Encrypted payloads say nothing about the inner flow.
            steer: false,
            balance: false,
            batch: tuning.batch.max(1),
        };
        let mut workers = Workers::new()?;
        counters.started.store(true, Ordering::Relaxed);
        let secret = StaticSecret::from(cfg.private_key);
        let shared = Arc::new(Shared {
            cell: Cell::default(),
            writer: Mutex::new(1),
            counters,
            public: PublicKey::from(&secret),
            secret,
            mtu: cfg.mtu as usize,
        });
        info!(
            "wireguard backend: user-space data path on {} (UDP port {}, MTU {}, {}): {features:?}",
            cfg.tun_name,
            cfg.port,
            cfg.mtu,
            if cfg.psk.is_some() { "with PSK" } else { "no PSK" }
        );
        for (i, (q, sock)) in queues.into_iter().zip(socks).enumerate() {
            let shared = Arc::clone(&shared);
            // Built on its thread: its batches hold raw pointers for the
            // system calls and so never cross threads.
            workers
                .spawn(format!("flannel-wg-{i}"), move |stop| Worker::new(i, q, sock, stop, shared, features).run())?;
        }
        Ok(WgDataPath { cfg, features, shared, workers })
    }

    /// Brings the peers in line with `peers` (subnet -> endpoint and key): a
    /// peer whose key is new gets a new tunnel (a re-keyed node: its old
    /// tunnel goes with the old key), one whose lease endpoint changed is
    /// sent there, and a peer no longer listed is removed. Tunnels of
    /// unchanged peers keep their sessions. Workers take the new table at
    /// their next round; traffic never pauses.
    pub fn set_peers(&self, peers: &[(IpNet, TunnelPeer)]) {
        let mut next_index = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (_, old) = self.shared.cell.load();
        let v6 = self.cfg.subnet.addr().is_ipv6();
        // Our family only, inside and outside (the reconcile gives each
        // family's data path its own family's leases), unless one device
        // carries both.
        let ours: Vec<(IpNet, TunnelPeer)> = peers
            .iter()
            .filter(|(s, p)| self.cfg.one_device.is_some() || (s.addr().is_ipv6() == v6 && p.ip.is_ipv6() == v6))
            .copied()
            .collect();
        let wanted = super::group(&ours, self.cfg.one_device);
        let seen: std::collections::HashSet<[u8; 32]> = wanted.iter().map(|g| g.key).collect();
        for p in &old.peers {
            if !seen.contains(&p.key) {
                info!("wireguard backend: peer {} ({}) removed", p.subnet(), crate::config::encode_key(&p.key));
            }
        }
        let mut t = Table::default();
        let mut routes = Vec::with_capacity(wanted.len());
        let mut routes6 = Vec::new();
        for super::Grouped { key, subnets, endpoint } in wanted {
            let names = subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
            let peer = match old.by_key.get(&key) {
                Some(&i) => {
                    let p = Arc::clone(&old.peers[i]);
                    let changed =
                        std::mem::replace(&mut *p.subnets.write().unwrap_or_else(|e| e.into_inner()), subnets.clone());
                    if changed != subnets {
                        info!("wireguard backend: peer {names} at {endpoint}, key {}", crate::config::encode_key(&key));
                    }
                    let mut lease = p.lease_endpoint.lock().unwrap_or_else(|e| e.into_inner());
                    if *lease != endpoint {
                        info!("wireguard backend: peer {names} now at {endpoint}");
                        *lease = endpoint;
                        p.set_endpoint(endpoint);
                    }
                    drop(lease);
                    p
                }
                None => {
                    let index = *next_index;
                    *next_index = if index >= (1 << 24) - 1 { 1 } else { index + 1 };
                    let tunn = Tunn::new(
                        StaticSecret::from(self.cfg.private_key),
                        PublicKey::from(key),
                        self.cfg.psk,
                        (self.cfg.keepalive > 0).then_some(self.cfg.keepalive),
                        index,
                        None,
                    );
                    info!("wireguard backend: peer {names} at {endpoint}, key {}", crate::config::encode_key(&key));
                    Arc::new(Peer {
                        key,
                        tunn: Mutex::new(tunn),
                        subnets: RwLock::new(subnets.clone()),
                        lease_endpoint: Mutex::new(endpoint),
                        endpoint: RwLock::new(endpoint),
                        index,
                        failing: AtomicU64::new(0),
                    })
                }
            };
            let pos = t.peers.len();
            for s in &subnets {
                match s {
                    IpNet::V4(s) => routes.push((*s, Ipv4Addr::from(pos as u32))),
                    IpNet::V6(s) => routes6.push((*s, pos)),
                }
            }
            t.by_index.insert(peer.index, pos);
            t.by_key.insert(key, pos);
            t.peers.push(peer);
        }
        t.routes = PeerTable::new(&routes);
        routes6.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        t.routes6 = routes6;
        self.shared.cell.store(t);
    }

    /// Whether every worker still runs.
    pub fn running(&self) -> bool {
        self.workers.running()
    }

    /// Kernel thread ids of the workers (for `/proc/self/task/<tid>/stat`).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.workers.thread_ids()
    }
}

impl crate::backend::DataPath for WgDataPath {
    fn running(&self) -> bool {
        WgDataPath::running(self)
    }

    fn set_peers(&self, peers: &[(IpNet, TunnelPeer)]) {
        WgDataPath::set_peers(self, peers)
    }
}

/// Size of a TUN read buffer with offloads: the largest super-packet and
/// its virtio header.
const TUN_BUF_OFFLOAD: usize = 65_536 + vnet::LEN + 64;

/// Room for encrypted datagrams between two sends: two super-packets'
/// worth (each segment grows by 32 bytes).
const ENC_ARENA: usize = 2 * (65_536 + 64 * 64) + 4096;

/// Send what was read once this much is queued (as the udp backend: the
/// peer starts on a super-packet while we read the next).
const TX_FLUSH_BYTES: usize = 64 * 1024;

/// Counters while a round runs, published once per round.
#[derive(Default)]
struct Local {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    control_sent: u64,
    dropped_no_peer: u64,
    dropped_unknown_peer: u64,
    dropped_invalid: u64,
    dropped_not_allowed: u64,
    send_errors: u64,
    tun_write_errors: u64,
}

impl Local {
    fn publish(&mut self, c: &Counters) {
        let pairs = [
            (&mut self.tx_packets, &c.tx_packets),
            (&mut self.tx_bytes, &c.tx_bytes),
            (&mut self.rx_packets, &c.rx_packets),
            (&mut self.rx_bytes, &c.rx_bytes),
            (&mut self.control_sent, &c.control_sent),
            (&mut self.dropped_no_peer, &c.dropped_no_peer),
            (&mut self.dropped_unknown_peer, &c.dropped_unknown_peer),
            (&mut self.dropped_invalid, &c.dropped_invalid),
            (&mut self.dropped_not_allowed, &c.dropped_not_allowed),
            (&mut self.send_errors, &c.send_errors),
            (&mut self.tun_write_errors, &c.tun_write_errors),
        ];
        for (local, shared) in pairs {
            if *local != 0 {
                shared.fetch_add(*local, Ordering::Relaxed);
                *local = 0;
            }
        }
    }
}

/// The encrypted side of one round: datagrams queued for `sendmmsg`, their
/// bytes in an arena that is reused after each send.
struct Out {
    tx: TxBatch,
    arena: Box<[u8]>,
    used: usize,
}

impl Out {
    /// A slice of at least `need` bytes for the next datagram, sending what
    /// is queued first when the arena is full.
    fn room(&mut self, sock: &UdpSocket, need: usize) -> &mut [u8] {
        if self.used + need > self.arena.len() {
            self.flush(sock);
        }
        self.tx.reserve(sock);
        &mut self.arena[self.used..]
    }

    /// Queues the `len` bytes just written at the start of [`Out::room`]'s
    /// slice for `to`.
    fn commit(&mut self, to: SocketAddr, len: usize) {
        let d = &self.arena[self.used..self.used + len];
        // SAFETY: the arena is neither written nor freed before the next
        // flush (room() flushes before it starts over, and so does drop).
        unsafe { self.tx.push_to(to.ip(), to.port(), 0, d) };
        self.used += len;
    }

    fn flush(&mut self, sock: &UdpSocket) {
        if !self.tx.is_empty() {
            self.tx.flush(sock);
        }
        self.used = 0;
    }
}

struct Worker {
    index: usize,
    tun: OwnedFd,
    sock: UdpSocket,
    stop: RawFd,
    shared: Arc<Shared>,
    features: Features,
    generation: u64,
    table: Arc<Table>,
    tun_bufs: Vec<Box<[u8]>>,
    out: Out,
    rx: RxBatch,
    /// Decrypted packets, one buffer per received message.
    plain: Vec<Box<[u8]>>,
    /// The valid decrypted packets of one receive batch.
    inner: Vec<Pkt>,
    /// Writes the decrypted packets to the TUN.
    writer: TunWriter,
    /// For handshakes, cookies and timers.
    scratch: Box<[u8]>,
    local: Local,
    gso_warned: bool,
}

impl Worker {
    fn new(index: usize, tun: OwnedFd, sock: UdpSocket, stop: RawFd, shared: Arc<Shared>, f: Features) -> Worker {
        let tun_buf = if f.offload { TUN_BUF_OFFLOAD } else { (shared.mtu + 64).max(1600) };
        let (generation, table) = shared.cell.load();
        Worker {
            index,
            tun,
            sock,
            stop,
            features: f,
            generation,
            table,
            tun_bufs: (0..f.batch).map(|_| vec![0u8; tun_buf].into_boxed_slice()).collect(),
            out: Out { tx: TxBatch::new(0, f.udp_gso), arena: vec![0u8; ENC_ARENA].into_boxed_slice(), used: 0 },
            rx: RxBatch::new(f.batch),
            plain: (0..f.batch).map(|_| vec![0u8; crate::backend::udp::sock::RX_BUF].into_boxed_slice()).collect(),
            inner: Vec::with_capacity(f.batch * crate::backend::udp::sock::GSO_SEGS * 2),
            writer: TunWriter::new(),
            scratch: vec![0u8; 65_536 + 256].into_boxed_slice(),
            local: Local::default(),
            gso_warned: false,
            shared,
        }
    }

    fn run(mut self) {
        let tun = self.tun.as_raw_fd();
        let sock = self.sock.raw();
        // Worker 0 runs the tunnels' timers.
        let mut next_tick = Instant::now();
        loop {
            let timeout = if self.index == 0 {
                let now = Instant::now();
                if now >= next_tick {
                    self.tick();
                    next_tick = now + TICK;
                }
                next_tick.saturating_duration_since(Instant::now()).as_millis().max(1) as libc::c_int
            } else {
                -1
            };
            let mut fds = [
                libc::pollfd { fd: tun, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: three valid pollfd entries.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("wireguard worker {}: poll: {e}; the data path stops (the reconcile restarts it)", self.index);
                return;
            }
            if fds[2].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // A TUN whose device was deleted polls as an error forever:
                // the worker ends and the reconcile starts the data path
                // anew (which recreates the device).
                warn!(
                    "wireguard worker {}: the TUN device went away; the data path stops (the reconcile restarts it)",
                    self.index
                );
                return;
            }
            // Keep going while there is work: an empty read costs less than
            // a poll, and under load most rounds find both sides busy.
            for _ in 0..256 {
                let g = self.shared.cell.generation.load(Ordering::Acquire);
                if g != self.generation {
                    (self.generation, self.table) = self.shared.cell.load();
                }
                let tx = self.tun_to_udp();
                let rx = self.udp_to_tun();
                self.local.publish(&self.shared.counters);
                if !tx && !rx {
                    break;
                }
                if self.index == 0 && Instant::now() >= next_tick {
                    break;
                }
            }
        }
    }

    /// Sends one control datagram (handshake, cookie, keepalive) at once.
    fn send_now(&mut self, to: SocketAddr, d: &[u8]) -> bool {
        let (sa, len) = crate::backend::udp::sock::sockaddr_of(to.ip(), to.port());
        // SAFETY: sends `d` to a valid sockaddr of the given length.
        let rc = unsafe {
            libc::sendto(self.sock.raw(), d.as_ptr().cast(), d.len(), 0, (&sa as *const libc::sockaddr_in6).cast(), len)
        };
        if rc < 0 {
            self.local.send_errors += 1;
            debug!("wireguard backend: send to {to}: {}", std::io::Error::last_os_error());
            false
        } else {
            true
        }
    }

    fn tick(&mut self) {
        let (_, t) = self.shared.cell.load();
        let mut dst = std::mem::take(&mut self.scratch);
        for p in &t.peers {
            let r = p.tunn().update_timers(&mut dst);
            match r {
                TunnResult::WriteToNetwork(d) => {
                    let d: &[u8] = d;
                    if self.send_now(p.endpoint(), d) {
                        self.local.control_sent += 1;
                    }
                }
                TunnResult::Err(e) => debug!("wireguard backend: peer {}: {e:?}", p.subnet()),
                _ => {}
            }
        }
        self.scratch = dst;
        self.local.publish(&self.shared.counters);
    }

    /// Reads up to a batch of packets from the TUN, encrypts them and sends
    /// them. Returns whether there was anything.
    fn tun_to_udp(&mut self) -> bool {
        let tun = self.tun.as_raw_fd();
        let mut reads = 0;
        while reads < self.tun_bufs.len() {
            let buf = &mut self.tun_bufs[reads];
            // SAFETY: reads into our own buffer, within its length.
            let n = unsafe { libc::read(tun, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => {}
                    _ => warn!("wireguard worker {}: read from TUN: {e}", self.index),
                }
                break;
            }
            reads += 1;
            let n = n as usize;
            let (hdr, pkt) = if self.features.offload {
                let Some((h, p)) = buf[..n].split_first_chunk_mut::<{ vnet::LEN }>() else {
                    continue;
                };
                (VnetHdr::decode(h), p)
            } else {
                (VnetHdr::default(), &mut buf[..n])
            };
            outbound(pkt, hdr, &self.table, &mut self.out, &self.sock, &mut self.local);
            if self.out.tx.queued_bytes() >= TX_FLUSH_BYTES {
                break;
            }
        }
        self.out.flush(&self.sock);
        let sent = std::mem::take(&mut self.out.tx.sent);
        self.local.send_errors += sent.errors;
        if let (Some(e), false) = (&self.out.tx.gso_failed, self.gso_warned) {
            warn!("wireguard worker {}: the kernel refused UDP GSO ({e}); sending datagram by datagram", self.index);
            self.gso_warned = true;
        }
        reads > 0
    }

    /// Receives a batch of datagrams, decrypts them and writes their
    /// packets to the TUN. Returns whether there was anything.
    fn udp_to_tun(&mut self) -> bool {
        let n = match self.rx.recv(&self.sock) {
            Ok(n) => n,
            Err(e) => {
                if e.raw_os_error() != Some(libc::ECONNREFUSED) {
                    warn!("wireguard worker {}: receive: {e}", self.index);
                }
                return true;
            }
        };
        if n == 0 {
            return false;
        }
        self.inner.clear();
        let table = Arc::clone(&self.table);
        for m in 0..n {
            let r = self.rx.get(m);
            let from = r.from;
            let mut off = 0;
            // The peer whose tunnel is locked, kept across the datagrams of
            // a train (they come from one sender).
            let mut held: Option<(usize, MutexGuard<'_, Tunn>)> = None;
            // The peer last moved to `from` in this message: the datagrams of
            // a train share their sender, so one look at the endpoint (a
            // lock) per peer and train, not one per packet.
            let mut roamed: Option<usize> = None;
            while off < r.len {
                let len = r.seg.min(r.len - off);
                let d = &self.rx.buf(m)[off..off + len];
                let idx = data_receiver(d);
                match idx.and_then(|i| table.by_index.get(&(i >> 8)).copied()) {
                    Some(pos) => {
                        let peer = &table.peers[pos];
                        if held.as_ref().map(|h| h.0) != Some(pos) {
                            // One tunnel locked at a time.
                            drop(held.take());
                            held = Some((pos, peer.tunn()));
                        }
                        let tunn = &mut held.as_mut().expect("just set").1;
                        let plain = &mut self.plain[m][off..];
                        let r = tunn.decapsulate(Some(from.ip()), d, plain);
                        let r = match r {
                            TunnResult::WriteToTunnelV4(pkt, source) => Ok((pkt.len(), IpAddr::V4(source))),
                            TunnResult::WriteToTunnelV6(pkt, source) => Ok((pkt.len(), IpAddr::V6(source))),
                            other => Err(other),
                        };
                        let authenticated = match r {
                            // The packet's family must be the device's (its
                            // peers' subnets are), its source inside the
                            // peer's subnet.
                            Ok((plen, source)) => {
                                if table.allows(pos, source) && plen <= self.shared.mtu {
                                    self.local.rx_packets += 1;
                                    self.local.rx_bytes += plen as u64;
                                    self.inner.push(Pkt { buf: m as u16, off: off as u32, len: plen as u32 });
                                } else {
                                    self.local.dropped_not_allowed += 1;
                                }
                                true
                            }
                            // A keepalive.
                            Err(TunnResult::Done) => true,
                            Err(TunnResult::Err(e)) => {
                                self.local.dropped_invalid += 1;
                                debug!(
                                    "wireguard backend: datagram from {from} for peer {} dropped: {e:?}",
                                    peer.subnet()
                                );
                                false
                            }
                            Err(_) => false,
                        };
                        if authenticated && roamed != Some(pos) {
                            peer.roam(from);
                            roamed = Some(pos);
                        }
                    }
                    None if idx.is_some() => {
                        self.local.dropped_unknown_peer += 1;
                        debug!("wireguard backend: datagram from {from} of no known peer dropped");
                    }
                    None => {
                        held = None;
                        let d = d.to_vec();
                        self.control(&table, &d, from);
                    }
                }
                off += len;
            }
            // Packets that waited in the tunnel for a session go out now
            // (usually none: one look at an empty queue).
            if let Some((pos, mut tunn)) = held {
                let mut dst = std::mem::take(&mut self.scratch);
                let to = table.peers[pos].endpoint();
                while let TunnResult::WriteToNetwork(q) = tunn.decapsulate(None, &[], &mut dst) {
                    let q: &[u8] = q;
                    if self.send_now(to, q) {
                        self.local.tx_packets += 1;
                    }
                }
                self.scratch = dst;
            }
        }
        let f = self.features;
        self.local.tun_write_errors +=
            self.writer.write(self.tun.as_raw_fd(), f.offload, f.coalesce, &self.plain, &self.inner);
        true
    }

    /// A datagram that is not a data message: a handshake initiation or
    /// response, a cookie reply, or junk.
    fn control(&mut self, table: &Table, d: &[u8], from: SocketAddr) {
        let parsed = match Tunn::parse_incoming_packet(d) {
            Ok(p) => p,
            Err(_) => {
                self.local.dropped_invalid += 1;
                return;
            }
        };
        let is_data = matches!(parsed, Packet::PacketData(_));
        let pos = match &parsed {
            Packet::HandshakeInit(h) => match parse_handshake_anon(&self.shared.secret, &self.shared.public, h) {
                Ok(half) => table.by_key.get(&half.peer_static_public).copied(),
                Err(_) => {
                    // Not encrypted to our key, or forged.
                    self.local.dropped_invalid += 1;
                    return;
                }
            },
            Packet::HandshakeResponse(h) => table.by_index.get(&(h.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(c) => table.by_index.get(&(c.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => table.by_index.get(&(p.receiver_idx >> 8)).copied(),
        };
        let Some(pos) = pos else {
            self.local.dropped_unknown_peer += 1;
            debug!("wireguard backend: datagram from {from} of no known peer dropped");
            return;
        };
        let peer = Arc::clone(&table.peers[pos]);
        let mut dst = std::mem::take(&mut self.scratch);
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let authenticated = {
            let mut tunn = peer.tunn();
            let auth = match tunn.decapsulate(Some(from.ip()), d, &mut dst) {
                TunnResult::WriteToNetwork(reply) => {
                    replies.push(reply.to_vec());
                    reply.len() != COOKIE_REPLY_LEN
                }
                TunnResult::Done => is_data,
                TunnResult::Err(e) => {
                    self.local.dropped_invalid += 1;
                    debug!("wireguard backend: datagram from {from} for peer {} dropped: {e:?}", peer.subnet());
                    if matches!(parsed, Packet::HandshakeResponse(_)) {
                        let n = peer.failing.fetch_add(1, Ordering::Relaxed) + 1;
                        let counters = &self.shared.counters;
                        counters.failing_handshakes.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.subnet(), n);
                    }
                    false
                }
                // Data never comes this way.
                _ => true,
            };
            if auth {
                // Packets queued while the handshake ran go out now.
                while let TunnResult::WriteToNetwork(q) = tunn.decapsulate(None, &[], &mut dst) {
                    replies.push(q.to_vec());
                }
            }
            auth
        };
        self.scratch = dst;
        if authenticated {
            peer.roam(from);
            if peer.failing.swap(0, Ordering::Relaxed) != 0 {
                let counters = &self.shared.counters;
                counters.failing_handshakes.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer.subnet());
            }
        }
        let to = if authenticated { peer.endpoint() } else { from };
        for (i, r) in replies.iter().enumerate() {
            if self.send_now(to, r) {
                if i == 0 {
                    self.local.control_sent += 1;
                } else {
                    self.local.tx_packets += 1;
                }
            }
        }
    }
}

/// The receiver index of a data message (type 4, at least the header and
/// the tag), or `None` for anything else.
fn data_receiver(d: &[u8]) -> Option<u32> {
    if d.len() < 32 || d[..4] != [4, 0, 0, 0] {
        return None;
    }
    Some(u32::from_le_bytes([d[4], d[5], d[6], d[7]]))
}

/// Handles one packet read from the TUN: to its peer's tunnel, cut into
/// segments first when it is a super-packet.
fn outbound(pkt: &mut [u8], hdr: VnetHdr, table: &Table, out: &mut Out, sock: &UdpSocket, local: &mut Local) {
    // The destination and the packet's length from its header.
    let (dst, tot) = match pkt.first().map(|b| b >> 4) {
        Some(4) if packet::ipv4_header_len(pkt).is_some() => {
            (IpAddr::V4(Ipv4Addr::from(packet::dst(pkt))), packet::total_len(pkt))
        }
        Some(6) if pkt.len() >= IPV6_HEADER => {
            let d: [u8; 16] = pkt[24..40].try_into().expect("16 bytes");
            if d[0] == 0xff {
                // Multicast: the kernel's router and neighbour solicitations
                // on the device, no peer's.
                return;
            }
            (IpAddr::V6(Ipv6Addr::from(d)), IPV6_HEADER + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])))
        }
        _ => return,
    };
    let Some(peer) = table.route(dst) else {
        local.dropped_no_peer += 1;
        return;
    };
    let to = peer.endpoint();
    let mut tunn = peer.tunn();
    let mut seal = |p: &[u8]| {
        let dst = out.room(sock, (p.len() + 32).max(148));
        match tunn.encapsulate(p, dst) {
            TunnResult::WriteToNetwork(d) => {
                let len = d.len();
                // A data message (type 4); otherwise a handshake initiation,
                // and the packet waits in the tunnel's queue until the
                // handshake is done.
                if d[0] == 4 {
                    local.tx_packets += 1;
                    local.tx_bytes += p.len() as u64;
                } else {
                    local.control_sent += 1;
                }
                out.commit(to, len);
            }
            TunnResult::Err(e) => debug!("wireguard backend: to {to}: {e:?}"),
            _ => {}
        }
    };
    match hdr.gso_type & !vnet::GSO_ECN {
        vnet::GSO_NONE => {
            if tot < 20 || tot > pkt.len() {
                return;
            }
            let pkt = &mut pkt[..tot];
            if hdr.flags & vnet::F_NEEDS_CSUM != 0
                && !complete_checksum(pkt, usize::from(hdr.csum_start), usize::from(hdr.csum_offset))
            {
                return;
            }
            seal(pkt);
        }
        // IPv6 super-packets come on flannel-wg-v6 only (TUN_F_TSO6).
        vnet::GSO_TCPV4 | vnet::GSO_TCPV6 if (hdr.gso_type & !vnet::GSO_ECN == vnet::GSO_TCPV6) == dst.is_ipv6() => {
            cut_in_place(pkt, usize::from(hdr.gso_size), &mut seal);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_may_send_only_from_its_own_subnets() {
        // Peer 0 has an IPv4 and an IPv6 subnet (one device for both
        // families), peer 1 an IPv4 one.
        let v4 = |s: &str| s.parse::<ipnet::Ipv4Net>().unwrap();
        let t = Table {
            routes: PeerTable::new(&[
                (v4("10.244.1.0/24"), Ipv4Addr::from(0u32)),
                (v4("10.244.2.0/24"), Ipv4Addr::from(1u32)),
            ]),
            routes6: vec![("2001:db8:10:1::/64".parse().unwrap(), 0)],
            ..Table::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.allows(0, ip("10.244.1.7")));
        assert!(t.allows(0, ip("2001:db8:10:1::7")));
        assert!(t.allows(1, ip("10.244.2.7")));
        assert!(!t.allows(1, ip("10.244.1.7")), "another peer's subnet");
        assert!(!t.allows(1, ip("2001:db8:10:1::7")), "another peer's IPv6 subnet");
        assert!(!t.allows(0, ip("10.244.3.7")), "no peer's");
        assert!(!t.allows(0, ip("192.0.2.7")), "outside the Network");
    }

    #[test]
    fn data_receiver_reads_only_data_messages() {
        let mut d = [0u8; 32];
        d[0] = 4;
        d[4..8].copy_from_slice(&0x0102_0304u32.to_le_bytes());
        assert_eq!(data_receiver(&d), Some(0x0102_0304));
        d[0] = 1;
        assert_eq!(data_receiver(&d), None);
        assert_eq!(data_receiver(&d[..31]), None);
    }
}
