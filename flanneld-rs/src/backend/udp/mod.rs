//! flannel's `udp` backend data path: a TUN device `flannel0` whose packets
//! travel to peers as UDP datagrams (payload = the raw inner IPv4 packet, one
//! per datagram, port 8285 by default), wire-compatible with flannel.
//!
//! flannel does this with one poll loop that moves one packet per system
//! call each way. Here the cost per byte is cut by:
//!
//! - batching: one `recvmmsg`/`sendmmsg` per batch of datagrams;
//! - a multi-queue TUN (`IFF_MULTI_QUEUE`), one worker thread per queue,
//!   each with its own `SO_REUSEPORT` socket, and received datagrams spread
//!   over the workers by their inner flow ([`steer`]), with flows moved
//!   from a busy worker to an idle one ([`balance`]), so that the flows
//!   between two nodes use every CPU;
//! - TUN offloads (`IFF_VNET_HDR`, `TUN_F_TSO4 | TUN_F_CSUM`): one read
//!   returns a TCP super-packet of up to 64 KB, which [`gso`] cuts into
//!   MTU-sized packets (headers only are written; payloads are sent from
//!   the read buffer), and all of them go to the peer in one `sendmsg` as a
//!   UDP GSO train (`UDP_SEGMENT`);
//! - UDP GRO (`UDP_GRO`) on receive, and [`gro`] merging consecutive TCP
//!   segments of a flow back into one super-packet, written to the TUN in
//!   one `writev` with a virtio header asking the kernel for TSO;
//! - no allocation per packet: every buffer is allocated when a worker
//!   starts.
//!
//! Each of these falls back on its own when the kernel refuses it (no UDP
//! GSO/GRO, no TUN offloads, no multi-queue, no reuseport program), down to
//! flannel's own behaviour; [`Tuning`] turns them off one by one for
//! measurements.

pub mod balance;
pub mod checksum;
pub mod gro;
pub mod gso;
pub mod kernel;
pub mod packet;
pub mod peers;
pub mod sock;
pub mod spec;
pub mod steer;
pub mod tun;
pub mod vnet;
mod worker;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use flannel_net::netns::NetNs;
use ipnet::{IpNet, Ipv4Net};
use log::{info, warn};

use kernel::DeviceSpec;
use peers::PeerTable;
use sock::UdpSocket;
use tun::TunOptions;
use worker::{Counters, Shared, Worker, WorkerOptions};

/// flannel's default UDP port for the udp backend.
pub const DEFAULT_PORT: u16 = 8285;

/// The device name flannel uses.
pub const DEFAULT_TUN_NAME: &str = "flannel0";

/// Bytes of encapsulation: outer IPv4 (20) and UDP (8) headers. The TUN's
/// MTU is the underlay's minus this, so one inner packet fits a datagram.
pub const OVERHEAD: u32 = 28;

/// What the data path needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// The TUN device, `flannel0`.
    pub tun_name: String,
    /// Our lease, e.g. 10.244.1.0/24.
    pub subnet: Ipv4Net,
    /// The cluster Network, e.g. 10.244.0.0/16, routed through the TUN.
    pub network: Ipv4Net,
    /// The TUN's MTU: the underlay's minus [`OVERHEAD`].
    pub mtu: u32,
    /// The UDP port, ours and every peer's (`Backend.Port`, default 8285).
    pub port: u16,
    /// Our underlay address, which the socket binds.
    pub bind: Ipv4Addr,
    /// Worker threads (one TUN queue and socket each); 0 = one per CPU.
    pub queues: usize,
}

/// Which speed-ups to use; all on by default. Turning them off one by one
/// is how the benchmark measures what each buys; the daemon uses the
/// default. Whatever the kernel lacks is turned off regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Packets per TUN read round and datagrams per `recvmmsg`; 1 moves one
    /// packet per system call each way, as flannel does.
    pub batch: usize,
    /// Several TUN queues and workers (`UdpConfig::queues`); off = one
    /// (the device is multi-queue either way).
    pub multi_queue: bool,
    /// TUN offloads: virtio header, TSO and checksum offload.
    pub offload: bool,
    /// UDP GSO on send.
    pub udp_gso: bool,
    /// UDP GRO on receive.
    pub udp_gro: bool,
    /// Merge received TCP segments into super-packets (needs `offload`).
    pub coalesce: bool,
    /// Spread received datagrams over the workers by their inner flow
    /// ([`steer`]); off = the kernel's choice by outer addresses, which puts
    /// each peer on one worker.
    pub steer: bool,
    /// Move flows from a busy worker to a less busy one ([`balance`];
    /// needs `steer`); off = the hash's spread stays.
    pub balance: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            batch: 16,
            multi_queue: true,
            offload: true,
            udp_gso: true,
            udp_gro: true,
            coalesce: true,
            steer: true,
            balance: true,
        }
    }
}

impl Tuning {
    /// flannel's way: one packet per system call, one queue, no offloads.
    pub fn per_packet() -> Tuning {
        Tuning {
            batch: 1,
            multi_queue: false,
            offload: false,
            udp_gso: false,
            udp_gro: false,
            coalesce: false,
            steer: false,
            balance: false,
        }
    }
}

/// Counters since start, summed over the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Inner packets sent to peers (after cutting super-packets).
    pub tx_packets: u64,
    /// Their bytes (inner IP packets, without UDP/IP encapsulation).
    pub tx_bytes: u64,
    /// Inner packets received from peers and written to the TUN.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Packets from the TUN to a destination no peer owns (each answered
    /// with ICMP net unreachable where allowed).
    pub dropped_no_peer: u64,
    /// Datagrams whose source address is not a current peer's public IP.
    pub dropped_not_peer: u64,
    /// Malformed packets (not IPv4, bad header, lengths that do not add up).
    pub dropped_bad: u64,
    /// Packets whose TTL ran out here.
    pub dropped_ttl: u64,
    /// ICMP net unreachable messages written back into the TUN.
    pub icmp_unreachable_sent: u64,
    /// IPv6 packets from the TUN (the kernel's router solicitations on
    /// the device's link-local address): ignored, the overlay is IPv4.
    pub ignored_ipv6: u64,
    /// Inner packets the kernel refused to send (peer unreachable...).
    pub send_errors: u64,
    /// Writes to the TUN that failed.
    pub tun_write_errors: u64,
    /// Buckets of flows moved from a busy worker to a less busy one
    /// ([`balance`]).
    pub flow_moves: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.dropped_no_peer += o.dropped_no_peer;
        self.dropped_not_peer += o.dropped_not_peer;
        self.dropped_bad += o.dropped_bad;
        self.dropped_ttl += o.dropped_ttl;
        self.icmp_unreachable_sent += o.icmp_unreachable_sent;
        self.ignored_ipv6 += o.ignored_ipv6;
        self.send_errors += o.send_errors;
        self.tun_write_errors += o.tun_write_errors;
        self.flow_moves += o.flow_moves;
    }
}

/// What the data path ended up using, after the kernel had its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Worker threads, TUN queues and sockets.
    pub queues: usize,
    /// Multi-queue TUN.
    pub multi_queue: bool,
    /// TUN offloads (virtio header, TSO).
    pub offload: bool,
    /// UDP GSO.
    pub udp_gso: bool,
    /// UDP GRO.
    pub udp_gro: bool,
    /// Receive-side TCP merging.
    pub coalesce: bool,
    /// Received datagrams spread over the workers by inner flow.
    pub steer: bool,
    /// Flows moved from a busy worker to a less busy one.
    pub balance: bool,
    /// Packets per batch.
    pub batch: usize,
}

/// The running data path: the device, its queues and the worker threads.
/// Dropping it stops the workers; the device stays (it is persistent, like
/// the VXLAN device of the vxlan backend) with its address and route, so a
/// restarted data path adopts it and traffic resumes at once.
pub struct UdpDataPath {
    cfg: UdpConfig,
    spec: DeviceSpec,
    netns: NetNs,
    features: Features,
    shared: Arc<Shared>,
    workers: Workers,
}

impl std::fmt::Debug for UdpDataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDataPath").field("cfg", &self.cfg).field("features", &self.features).finish()
    }
}

impl UdpDataPath {
    /// Starts the data path with every speed-up the kernel offers.
    ///
    /// Creates `cfg.tun_name` (or adopts it; one of another kind or with
    /// other queue flags is deleted and recreated), makes it persistent, sets
    /// its MTU, address `<subnet>.0/32`, up, and a route to `cfg.network`
    /// through it; binds the UDP sockets; spawns the workers. Everything is
    /// created in the calling thread's network namespace, which the worker
    /// threads inherit. No peer is known until [`UdpDataPath::set_peers`].
    pub fn start(cfg: UdpConfig) -> anyhow::Result<UdpDataPath> {
        Self::start_with(cfg, Tuning::default())
    }

    /// [`UdpDataPath::start`] with chosen speed-ups.
    pub fn start_with(cfg: UdpConfig, tuning: Tuning) -> anyhow::Result<UdpDataPath> {
        if !cfg.network.contains(&cfg.subnet) {
            bail!("udp backend: subnet {} is not inside the Network {}", cfg.subnet, cfg.network);
        }
        if cfg.mtu < 68 || cfg.mtu > 65_000 {
            bail!("udp backend: MTU {} out of range (68..65000)", cfg.mtu);
        }
        if cfg.port == 0 {
            bail!("udp backend: port 0");
        }
        let netns = NetNs::current().context("open the current network namespace")?;
        let spec = DeviceSpec {
            name: cfg.tun_name.clone(),
            subnet: IpNet::V4(cfg.subnet),
            network: IpNet::V4(cfg.network),
            mtu: cfg.mtu,
            route_scope: flannel_net::netlink::Scope::Global,
        };
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let wanted = if !tuning.multi_queue {
            1
        } else if cfg.queues == 0 {
            cpus
        } else {
            cfg.queues
        };
        // The device is always multi-queue (when the kernel allows), so that
        // any number of queues can attach to it later without recreating it.
        // The sockets first: a port another program holds is the likeliest
        // failure, and it then leaves nothing behind.
        let mut socks = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            socks.push(UdpSocket::bind(cfg.bind, cfg.port)?);
        }
        let mut opts = TunOptions { multi_queue: true, offload: tuning.offload };
        let queues = open_device(&netns, &spec, wanted, &mut opts, "udp backend")?;
        socks.truncate(queues.len());
        let udp_gso = tuning.udp_gso && socks[0].gso_supported();
        let udp_gro = tuning.udp_gro && socks.iter().all(UdpSocket::enable_gro);
        let table = steer::Table::spread(socks.len() as u32);
        let steer = tuning.steer && socks.len() > 1 && {
            match steer::attach(socks[0].raw(), &table, 0) {
                Ok(()) => true,
                Err(e) => {
                    warn!("udp backend: cannot spread flows over the workers ({e}); each peer stays on one worker");
                    false
                }
            }
        };
        let features = Features {
            queues: queues.len(),
            multi_queue: opts.multi_queue,
            offload: opts.offload,
            udp_gso,
            udp_gro,
            coalesce: tuning.coalesce && opts.offload,
            steer,
            balance: steer && tuning.balance,
            batch: tuning.batch.max(1),
        };
        info!("udp backend on {}: {features:?}", cfg.tun_name);

        let mut workers = Workers::new()?;
        let shared = Arc::new(Shared {
            peers: Default::default(),
            counters: (0..queues.len()).map(|_| Counters::default()).collect(),
            loads: (0..queues.len()).map(|_| Default::default()).collect(),
            flow_moves: Default::default(),
            exited: Default::default(),
        });
        if features.balance {
            // Its own descriptor of the group's first socket, for moving
            // flows between the workers (see [`balance`]).
            // SAFETY: the socket is open; the borrow ends at once.
            let group = unsafe { std::os::fd::BorrowedFd::borrow_raw(socks[0].raw()) }
                .try_clone_to_owned()
                .context("duplicate the udp socket for the balancer")?;
            let shared = Arc::clone(&shared);
            workers.spawn("flannel-udp-bal".into(), move |stop| {
                // It ends with the first worker that ends, so that its
                // descriptor does not keep that worker's socket in the group.
                balance::run(group.as_raw_fd(), 0, table, &shared.loads, &shared.flow_moves, |d| {
                    !stop_signalled(stop, d) && shared.exited.load(Ordering::Relaxed) == 0
                })
            })?;
        }
        let wopts = WorkerOptions {
            batch: features.batch,
            offload: features.offload,
            coalesce: features.coalesce,
            mtu: cfg.mtu as usize,
            icmp_source: icmp_source(&cfg).octets(),
            port: cfg.port,
            udp_gso,
            steer,
            balance: features.balance,
        };
        for (i, (q, sock)) in queues.into_iter().zip(socks).enumerate() {
            let shared = Arc::clone(&shared);
            // Built on its thread: its batches hold raw pointers for the
            // system calls and so never cross threads.
            workers.spawn(format!("flannel-udp-{i}"), move |stop| {
                let _end = EndMark(Arc::clone(&shared));
                Worker::new(i, q, sock, stop, shared, wopts).run()
            })?;
        }
        Ok(UdpDataPath { cfg, spec, netns, features, shared, workers })
    }

    /// Replaces the peer table (subnet -> peer's public IP; peers listen on
    /// our port, as in flannel) in one step. Workers pick it up at their next
    /// batch; traffic never pauses.
    pub fn set_peers(&self, peers: &[(Ipv4Net, Ipv4Addr)]) {
        self.shared.peers.store(PeerTable::new(peers));
    }

    /// Re-asserts the device's MTU, address, up state and route, and says
    /// what had to be fixed (empty when nothing). Fails when the device is
    /// gone: then drop this data path and start a new one.
    pub fn ensure_kernel(&self) -> anyhow::Result<Vec<String>> {
        kernel::ensure_in(&self.netns, &self.spec)
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        sum(&self.shared)
    }

    /// Counters since start, worker by worker (without `flow_moves`).
    pub fn worker_stats(&self) -> Vec<Stats> {
        self.shared.counters.iter().map(of_worker).collect()
    }

    /// A reader of the counters that outlives borrows of the data path
    /// (for `/metrics`); it reads the final counts once the data path stops.
    pub fn stats_reader(&self) -> impl Fn() -> Stats + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || sum(&shared)
    }

    /// Whether every worker thread is still running (one that panicked or
    /// gave up on an error has not: then restart the data path).
    pub fn running(&self) -> bool {
        self.workers.running()
    }

    /// What is in use.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &UdpConfig {
        &self.cfg
    }

    /// Kernel thread ids of the workers and of the balancer (for
    /// `/proc/self/task/<tid>/stat`).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.workers.thread_ids()
    }

    /// Stops the workers and deletes the device (with its address and
    /// route): for switching a node away from the udp backend.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.workers.stop();
        kernel::delete_in(&self.netns, &self.cfg.tun_name).map(drop)
    }
}

/// Counts a worker's end in [`Shared::exited`], however it ends.
struct EndMark(Arc<Shared>);

impl Drop for EndMark {
    fn drop(&mut self) {
        self.0.exited.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits up to `d` for the stop eventfd; whether it fired.
fn stop_signalled(stop: RawFd, d: std::time::Duration) -> bool {
    let mut fds = [libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd entry. EINTR counts as a timeout.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, d.as_millis() as libc::c_int) > 0 }
}

/// The workers' counters, summed.
fn sum(shared: &Shared) -> Stats {
    let mut s = Stats { flow_moves: shared.flow_moves.load(Ordering::Relaxed), ..Stats::default() };
    for c in &shared.counters {
        s += of_worker(c);
    }
    s
}

/// One worker's counters.
fn of_worker(c: &Counters) -> Stats {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Stats {
        tx_packets: g(&c.tx_packets),
        tx_bytes: g(&c.tx_bytes),
        rx_packets: g(&c.rx_packets),
        rx_bytes: g(&c.rx_bytes),
        dropped_no_peer: g(&c.no_peer),
        dropped_not_peer: g(&c.not_from_peer),
        dropped_bad: g(&c.bad),
        dropped_ttl: g(&c.ttl_expired),
        icmp_unreachable_sent: g(&c.icmp_sent),
        ignored_ipv6: g(&c.ipv6),
        send_errors: g(&c.send_errors),
        tun_write_errors: g(&c.tun_write_errors),
        flow_moves: 0,
    }
}

/// The source of our ICMP errors. flannel uses the TUN's own address,
/// `<subnet>.0`, but that address is local to the node, so Linux drops the
/// error as a martian when it comes out of the TUN (unless `accept_local`)
/// and the sender never sees it. The Network's own address (10.244.0.0) is
/// not local, is routed back through the TUN, and is never a pod's; should
/// our subnet start there (SubnetMin set to the first subnet), the
/// Network's broadcast address serves instead.
fn icmp_source(cfg: &UdpConfig) -> Ipv4Addr {
    if cfg.network.network() == cfg.subnet.network() {
        cfg.network.broadcast()
    } else {
        cfg.network.network()
    }
}

/// A data path's worker threads: the eventfd that tells them to stop,
/// their handles and their kernel thread ids. Dropping it stops them.
pub(crate) struct Workers {
    stop: OwnedFd,
    handles: Vec<JoinHandle<()>>,
    tids: Arc<Mutex<Vec<i32>>>,
}

impl Workers {
    /// No worker yet; the stop eventfd made.
    pub(crate) fn new() -> anyhow::Result<Workers> {
        // SAFETY: plain eventfd(2) call.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh descriptor we own.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Workers { stop, handles: Vec::new(), tids: Arc::default() })
    }

    /// Starts thread `name` running `f`, which gets the stop eventfd (it
    /// becomes readable when the worker must end).
    pub(crate) fn spawn(&mut self, name: String, f: impl FnOnce(RawFd) + Send + 'static) -> anyhow::Result<()> {
        let (stop, tids) = (self.stop.as_raw_fd(), Arc::clone(&self.tids));
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tids.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
                f(stop)
            })
            .with_context(|| format!("spawn the worker thread {name}"))?;
        self.handles.push(handle);
        Ok(())
    }

    /// Whether there are workers and every one still runs (one that
    /// panicked or gave up on an error has not: then restart the data path).
    pub(crate) fn running(&self) -> bool {
        !self.handles.is_empty() && self.handles.iter().all(|w| !w.is_finished())
    }

    /// Their kernel thread ids (for `/proc/self/task/<tid>/stat`).
    pub(crate) fn thread_ids(&self) -> Vec<i32> {
        self.tids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Signals every worker to stop and waits for them.
    pub(crate) fn stop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        let rc = unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if rc != 8 {
            warn!("signal the data path's workers to stop: {}", std::io::Error::last_os_error());
        }
        for w in self.handles.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens `n` queues of the TUN device `spec.name` in `netns` (the calling
/// thread's; see [`open_queues`]), makes it persistent and gives it its
/// MTU, address, up state and route. A device this call made and could
/// not finish is deleted again: nothing half-made stays. `opts` says what
/// the kernel granted; `who` names the backend in logs.
pub(crate) fn open_device(
    netns: &NetNs,
    spec: &DeviceSpec,
    n: usize,
    opts: &mut TunOptions,
    who: &str,
) -> anyhow::Result<Vec<OwnedFd>> {
    let existed = device_exists(&spec.name);
    let device = open_queues(netns, &spec.name, n, opts).and_then(|queues| {
        tun::set_persist(&queues[0], &spec.name, true)?;
        let fixed = kernel::ensure_in(netns, spec)?;
        if !fixed.is_empty() {
            info!("{who}: {}", fixed.join("; "));
        }
        Ok(queues)
    });
    if device.is_err() && !existed && device_exists(&spec.name) {
        if let Err(d) = kernel::delete_in(netns, &spec.name) {
            warn!("{who}: delete the half-made {}: {d:#}", spec.name);
        }
    }
    device
}

/// Whether a network device of that name exists in the calling thread's
/// network namespace.
fn device_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Opens `n` queues of the device, in `netns` (the calling thread's). When
/// the device exists with flags we cannot attach to (single-queue, or not a
/// TUN at all), it is deleted and created anew; when multi-queue is refused
/// outright, one plain queue is used; when offloads are refused, none.
fn open_queues(netns: &NetNs, name: &str, n: usize, opts: &mut TunOptions) -> anyhow::Result<Vec<OwnedFd>> {
    let first = match tun::open_queue(name, *opts) {
        Ok(q) => q,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EBUSY) => {
            warn!("TUN {name}: {e}; deleting {name} and creating it anew");
            kernel::delete_in(netns, name)?;
            match tun::open_queue(name, *opts) {
                Ok(q) => q,
                Err(e) if opts.offload => {
                    warn!("TUN {name}: {e}; trying without TUN offloads");
                    opts.offload = false;
                    tun::open_queue(name, *opts)?
                }
                Err(e) if opts.multi_queue => {
                    warn!("TUN {name}: {e}; trying a single-queue TUN");
                    opts.multi_queue = false;
                    tun::open_queue(name, *opts)?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e).context("open the TUN device"),
    };
    let mut queues = vec![first];
    while opts.multi_queue && queues.len() < n {
        match tun::open_queue(name, *opts) {
            Ok(q) => queues.push(q),
            Err(e) => {
                warn!("TUN {name}: {e}; running {} queue(s)", queues.len());
                break;
            }
        }
    }
    Ok(queues)
}

impl crate::backend::DataPath for UdpDataPath {
    fn running(&self) -> bool {
        UdpDataPath::running(self)
    }

    fn set_peers(&self, peers: &[(IpNet, crate::backend::TunnelPeer)]) {
        // IPv4 only: the configuration refuses udp with IPv6.
        let peers: Vec<(Ipv4Net, Ipv4Addr)> = peers
            .iter()
            .filter_map(|(s, p)| match (s, p.ip) {
                (IpNet::V4(s), std::net::IpAddr::V4(ip)) => Some((*s, ip)),
                _ => None,
            })
            .collect();
        UdpDataPath::set_peers(self, &peers)
    }
}
