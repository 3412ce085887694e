//! One worker: a TUN queue and a UDP socket, both directions, on its own
//! thread. Each round reads what the TUN queue holds (up to the batch) and
//! sends it with one `sendmmsg`, then takes what the socket holds with one
//! `recvmmsg` and writes it to the TUN; it sleeps in `poll` only when both
//! are empty. No allocation happens after [`Worker::new`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::warn;

use super::balance::Load;
use super::gro::{Pkt, TunWriter};
use super::gso::{self, Outbound};
use super::packet::{self, Discard};
use super::peers::{PeerCell, PeerView};
use super::sock::{RxBatch, TxBatch, UdpSocket};
use super::steer;
use super::vnet::{self, VnetHdr};

/// Size of a TUN read buffer with offloads: the largest super-packet the
/// kernel hands a TUN (64 KB) and its virtio header, then [`SPREAD_ROOM`].
const TUN_BUF_OFFLOAD: usize = 65_536 + vnet::LEN + 64 + SPREAD_ROOM;

/// Room for a super-packet's segments to be laid out back to back
/// ([`gso::spread_in_place`]): one more header per segment, for at least
/// 64 segments of the usual 52 bytes (IPv4 and TCP with timestamps). Where
/// a read leaves less, its segments take their headers from the batch's
/// slots instead.
const SPREAD_ROOM: usize = 64 * 52;

/// Send what was read once this much is queued, rather than reading the
/// whole batch first: the peer starts on a super-packet while we read the
/// next (measured: +10-20% for one stream), and small packets still go out
/// in batches of up to `batch`.
const TX_FLUSH_BYTES: usize = 64 * 1024;

/// Per-worker counters, written by the worker once per round.
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub no_peer: AtomicU64,
    pub not_from_peer: AtomicU64,
    pub bad: AtomicU64,
    pub ttl_expired: AtomicU64,
    pub icmp_sent: AtomicU64,
    pub ipv6: AtomicU64,
    pub send_errors: AtomicU64,
    pub tun_write_errors: AtomicU64,
}

/// The same, as plain numbers while a round runs.
#[derive(Debug, Default)]
struct Local {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    no_peer: u64,
    not_from_peer: u64,
    bad: u64,
    ttl_expired: u64,
    icmp_sent: u64,
    ipv6: u64,
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
            (&mut self.no_peer, &c.no_peer),
            (&mut self.not_from_peer, &c.not_from_peer),
            (&mut self.bad, &c.bad),
            (&mut self.ttl_expired, &c.ttl_expired),
            (&mut self.icmp_sent, &c.icmp_sent),
            (&mut self.ipv6, &c.ipv6),
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

/// What the workers share with the handle.
#[derive(Default)]
pub struct Shared {
    /// The peer table.
    pub peers: PeerCell,
    /// One set of counters per worker.
    pub counters: Vec<Counters>,
    /// Bytes per bucket of flows, one per worker, while balancing.
    pub loads: Vec<Load>,
    /// Buckets the balancer moved to another worker.
    pub flow_moves: AtomicU64,
    /// Workers that ended.
    pub exited: std::sync::atomic::AtomicUsize,
}

/// How a worker runs.
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// TUN reads per round, and messages per `recvmmsg`.
    pub batch: usize,
    /// The TUN queue has a virtio header and TSO.
    pub offload: bool,
    /// Merge received TCP segments (needs `offload`).
    pub coalesce: bool,
    /// Largest inner packet (the TUN MTU), for buffer sizes.
    pub mtu: usize,
    /// The ICMP errors' source address.
    pub icmp_source: [u8; 4],
    /// The UDP port peers listen on.
    pub port: u16,
    /// Use UDP GSO.
    pub udp_gso: bool,
    /// The receivers spread flows over their workers ([`super::steer`]):
    /// a GSO train holds one flow only.
    pub steer: bool,
    /// A balancer reads the bytes per bucket ([`super::balance`]): count
    /// them (needs `steer`).
    pub balance: bool,
}

/// One worker's state.
pub struct Worker {
    index: usize,
    tun: OwnedFd,
    sock: UdpSocket,
    stop: RawFd,
    shared: Arc<Shared>,
    opts: WorkerOptions,
    view: PeerView,
    tun_bufs: Vec<Box<[u8]>>,
    tx: TxBatch,
    rx: RxBatch,
    /// References to the valid inner packets of one receive batch.
    inner: Vec<Pkt>,
    /// Writes the received packets to the TUN.
    writer: TunWriter,
    local: Local,
    gso_warned: bool,
}

impl Worker {
    /// Allocates everything the worker will ever use. `stop` is an eventfd
    /// that becomes readable when the worker must end.
    pub fn new(
        index: usize,
        tun: OwnedFd,
        sock: UdpSocket,
        stop: RawFd,
        shared: Arc<Shared>,
        opts: WorkerOptions,
    ) -> Worker {
        let batch = opts.batch.max(1);
        let tun_buf = if opts.offload { TUN_BUF_OFFLOAD } else { (opts.mtu + 64).max(1600) };
        let view = PeerView::new(&shared.peers);
        Worker {
            index,
            tun,
            sock,
            stop,
            opts,
            view,
            tun_bufs: (0..batch).map(|_| vec![0u8; tun_buf].into_boxed_slice()).collect(),
            tx: TxBatch::new(opts.port, opts.udp_gso),
            rx: RxBatch::new(batch),
            inner: Vec::with_capacity(batch * super::sock::GSO_SEGS * 2),
            writer: TunWriter::new(),
            local: Local::default(),
            gso_warned: false,
            shared,
        }
    }

    /// Runs until the stop eventfd fires.
    pub fn run(mut self) {
        let tun = self.tun.as_raw_fd();
        let sock = self.sock.raw();
        let mut broken = false;
        loop {
            let mut fds = [
                libc::pollfd { fd: tun, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop, events: libc::POLLIN, revents: 0 },
            ];
            // A TUN whose device was deleted polls as an error forever: wait
            // on the socket and the stop signal only, and sleep between
            // rounds, until the owner restarts us.
            let timeout = if broken { 100 } else { -1 };
            if broken {
                fds[0].fd = -1;
            }
            // SAFETY: three valid pollfd entries.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("udp worker {}: poll: {e}", self.index);
                return;
            }
            if fds[2].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && !broken {
                warn!(
                    "udp worker {}: the TUN queue reports an error (device deleted?); idle until restarted",
                    self.index
                );
                broken = true;
            }
            // Keep going while there is work: an empty read costs less than
            // a poll, and most rounds under load find both sides busy.
            for _ in 0..256 {
                self.view.refresh(&self.shared.peers);
                let tx = !broken && self.tun_to_udp();
                let rx = self.udp_to_tun();
                self.local.publish(&self.shared.counters[self.index]);
                if !tx && !rx {
                    break;
                }
            }
        }
    }

    /// Reads up to a batch of packets from the TUN and sends them to peers.
    /// Returns whether there was anything.
    fn tun_to_udp(&mut self) -> bool {
        let tun = self.tun.as_raw_fd();
        let mut reads = 0;
        while reads < self.tun_bufs.len() {
            let buf = &mut self.tun_bufs[reads];
            // SAFETY: reads into our own buffer, within its length.
            let n = unsafe { libc::read(tun, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {}
                    _ => warn!("udp worker {}: read from TUN: {e}", self.index),
                }
                break;
            }
            reads += 1;
            let n = n as usize;
            // The packet, and the room after it (for a super-packet's
            // segments laid out back to back).
            let (hdr, room, len) = if self.opts.offload {
                let Some((h, p)) = buf.split_first_chunk_mut::<{ vnet::LEN }>().filter(|_| n >= vnet::LEN) else {
                    self.local.bad += 1;
                    continue;
                };
                (VnetHdr::decode(h), p, n - vnet::LEN)
            } else {
                (VnetHdr::default(), &mut buf[..], n)
            };
            let load = &self.shared.loads[self.index];
            outbound(room, len, hdr, tun, &self.opts, &self.view, &mut self.tx, &self.sock, load, &mut self.local);
            if self.tx.queued_bytes() >= TX_FLUSH_BYTES {
                break;
            }
        }
        if !self.tx.is_empty() {
            self.tx.flush(&self.sock);
        }
        let sent = std::mem::take(&mut self.tx.sent);
        self.local.tx_packets += sent.packets;
        self.local.tx_bytes += sent.bytes;
        self.local.send_errors += sent.errors;
        if let (Some(e), false) = (&self.tx.gso_failed, self.gso_warned) {
            warn!("udp worker {}: the kernel refused UDP GSO ({e}); sending datagram by datagram", self.index);
            self.gso_warned = true;
        }
        reads > 0
    }

    /// Receives a batch of datagrams and writes their packets to the TUN.
    /// Returns whether there was anything.
    fn udp_to_tun(&mut self) -> bool {
        let n = match self.rx.recv(&self.sock) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors from earlier sends surface here; nothing to do.
                if e.raw_os_error() != Some(libc::ECONNREFUSED) {
                    warn!("udp worker {}: receive: {e}", self.index);
                }
                return true;
            }
        };
        if n == 0 {
            return false;
        }
        self.inner.clear();
        let table = self.view.table();
        for m in 0..n {
            let r = self.rx.get(m);
            if !table.is_peer(r.src()) {
                self.local.not_from_peer += r.len.div_ceil(r.seg) as u64;
                continue;
            }
            let buf = self.rx.buf_mut(m);
            if self.opts.balance {
                // The program placed the whole message by its first packet.
                if let Some(key) = steer::flow_key(&buf[..r.len.min(r.seg)]) {
                    self.shared.loads[self.index].received(key, r.len);
                }
            }
            let mut off = 0;
            while off < r.len {
                let len = r.seg.min(r.len - off);
                let p = &mut buf[off..off + len];
                match packet::check_inbound(p) {
                    Ok(tot) => {
                        self.local.rx_packets += 1;
                        self.local.rx_bytes += tot as u64;
                        self.inner.push(Pkt { buf: m as u16, off: off as u32, len: tot as u32 });
                    }
                    Err(Discard::TtlExpired) => self.local.ttl_expired += 1,
                    Err(Discard::Bad) => self.local.bad += 1,
                }
                off += len;
            }
        }
        self.local.tun_write_errors +=
            self.writer.write(self.tun.as_raw_fd(), self.opts.offload, self.opts.coalesce, self.rx.bufs(), &self.inner);
        true
    }
}

/// Handles one packet read from the TUN, `room[..len]`: route it to a peer
/// and queue it (cut into segments when it is a super-packet, laid out
/// back to back in `room` when it has space), or answer it with ICMP net
/// unreachable, or drop it.
#[allow(clippy::too_many_arguments)]
fn outbound(
    room: &mut [u8],
    len: usize,
    hdr: VnetHdr,
    tun: RawFd,
    opts: &WorkerOptions,
    view: &PeerView,
    tx: &mut TxBatch,
    sock: &UdpSocket,
    load: &Load,
    local: &mut Local,
) {
    let pkt = &mut room[..len];
    if packet::ipv4_header_len(pkt).is_none() {
        // The kernel gives the TUN an IPv6 link-local address and sends
        // router solicitations through it: chatter, not bad traffic.
        if pkt.first().is_some_and(|b| b >> 4 == 6) {
            local.ipv6 += 1;
        } else {
            local.bad += 1;
        }
        return;
    }
    let Some(peer) = view.table().lookup(packet::dst(pkt)) else {
        local.no_peer += 1;
        let mut icmp = [0u8; packet::ICMP_ERROR_MAX];
        if let Some(n) = packet::net_unreachable(pkt, opts.icmp_source, &mut icmp) {
            let zero = [0u8; vnet::LEN];
            let mut iov = [
                libc::iovec { iov_base: zero.as_ptr() as *mut libc::c_void, iov_len: vnet::LEN },
                libc::iovec { iov_base: icmp.as_mut_ptr().cast(), iov_len: n },
            ];
            let parts = if opts.offload { &mut iov[..] } else { &mut iov[1..] };
            // SAFETY: the iovecs point at live local buffers.
            if unsafe { libc::writev(tun, parts.as_ptr(), parts.len() as libc::c_int) } >= 0 {
                local.icmp_sent += 1;
            }
        }
        return;
    };
    if opts.steer {
        let key = steer::flow_key(pkt);
        tx.set_flow(key.map_or(u64::MAX, u64::from));
        if let (true, Some(key)) = (opts.balance, key) {
            load.sent(key, pkt.len());
        }
    }
    let cut = match gso::prepare_outbound(pkt, hdr) {
        Ok(Outbound::Single(pkt)) => {
            tx.reserve(sock);
            // SAFETY: `pkt` lives in a TUN buffer that the caller does not
            // reuse before it flushes `tx`.
            unsafe { tx.push(peer, 0, pkt) };
            return;
        }
        Ok(Outbound::Super(sup)) => sup.cut(),
        Err(Discard::TtlExpired) => return local.ttl_expired += 1,
        Err(Discard::Bad) => return local.bad += 1,
    };
    if let Some(train) = cut.spread(room, len) {
        // Contiguous segments: the batch joins them into one iovec per
        // train.
        for i in 0..train.segments {
            tx.reserve(sock);
            // SAFETY: as above.
            unsafe { tx.push(peer, 0, &room[train.segment(i)]) };
        }
        return;
    }
    // No room (a read near the buffer's end; `room` is unchanged): headers
    // in the batch's slots.
    let sup = cut.of_parsed(&room[..len]);
    let (hl, pkt) = (sup.header_len(), sup.bytes());
    for i in 0..sup.segments() {
        tx.reserve(sock);
        let range = sup.segment(i, tx.header());
        // SAFETY: as above.
        unsafe { tx.push(peer, hl, &pkt[range]) };
    }
}
