//! The floor of a user-space TUN-over-UDP relay, for `udp-bench`: the same
//! system calls as the udp backend moving the same bytes, with none of its
//! work per packet.
//!
//! On each node, one thread per CPU with its own queue of a multi-queue TUN
//! (`IFF_VNET_HDR`, TSO) and its own `SO_REUSEPORT` socket (UDP GRO on), and
//! received datagrams spread over the threads by inner flow, as the backend
//! has, and the backend's balancer moving flows from a busy thread to an
//! idle one ([`balance`]). A thread reads what the TUN holds (up to 16 reads, or
//! 64 KB) and sends each read, virtio header included, as it is: one UDP
//! GSO train of 1472-byte segments per read, all in one `sendmmsg`. It takes
//! up to 16 messages with one `recvmmsg` (the backend's own [`RxBatch`]) and
//! writes each, as received, to the TUN. So every byte is copied four times (TUN read, UDP send, UDP
//! receive, TUN write) and the kernel does the rest, as for the backend;
//! nothing is cut, no header or checksum is written, nothing is merged, no
//! peer is looked up, no TTL decremented.
//!
//! With [`Work::Checksums`] it also makes the one pass over every byte
//! that a wire-compatible relay cannot leave out: each segment's TCP
//! checksum (TSO leaves it to the device, and a flannel on the other end
//! writes what it receives to a TUN without a virtio header, so it has to
//! be right on the wire). It sums every segment's header and payload as
//! cutting does, and writes nothing: still no headers, no second UDP
//! message per super-packet (46 segments with their headers exceed one),
//! no merging. So it is a lower bound for any relay of flannel's wire
//! format built from these system calls.
//!
//! This only works because a GSO train sent over a veth arrives whole, as
//! one message, at a socket with UDP GRO on: the segments are not IPv4
//! packets and nothing else could read them. It is a measuring device, not
//! a data path (not wire-compatible with anything).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flanneld_rs::udp::balance::{self, Load};
use flanneld_rs::udp::checksum;
use flanneld_rs::udp::sock::{RxBatch, UdpSocket};
use flanneld_rs::udp::steer;
use flanneld_rs::udp::tun::{self, TunOptions};
use flanneld_rs::udp::vnet::{self, VnetHdr};
use netns_fixtures::Netns;

/// Largest UDP payload of one message (the train as a whole).
const MAX_MSG: usize = 65_507;
/// UDP payload per segment: an underlay MTU of 1500 less 28.
const SEGMENT: u16 = 1472;
/// Reads per round, messages per `recvmmsg`.
const BATCH: usize = 16;
/// Send what was read once this much is queued (as the backend does).
const FLUSH_BYTES: usize = 64 * 1024;
const BUF: usize = 65_536 + 64;

/// What the relay does with each read besides moving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing.
    None,
    /// Every segment's TCP checksum, computed and thrown away.
    Checksums,
}

/// The relay's threads on both nodes; stopped on drop.
pub struct BareRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tids: Arc<Mutex<Vec<i32>>>,
    /// Reads too long for one UDP message (dropped), messages the kernel
    /// refused to send, and writes the TUN refused: all should stay 0.
    pub dropped: Arc<AtomicU64>,
    /// Buckets of flows the balancers moved.
    pub flow_moves: Arc<AtomicU64>,
}

impl BareRelay {
    /// Starts the relay between two nodes: on node `i` (namespace `ns[i]`,
    /// underlay address `underlay[i]`) a TUN `dev` of MTU `mtu` holding
    /// 10.`net`.(i+1).0/32 with a route to 10.`net`.0.0/16, `queues`
    /// threads, UDP port `port`, doing `work` on each read.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ns: [&Netns; 2],
        underlay: [Ipv4Addr; 2],
        dev: &str,
        net: u8,
        mtu: u32,
        port: u16,
        queues: usize,
        work: Work,
    ) -> BareRelay {
        // Made first, so that a panic half-way (node 1's setup after node
        // 0's threads started) drops it, which stops and joins them.
        let mut relay = BareRelay {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            tids: Arc::default(),
            dropped: Arc::new(AtomicU64::new(0)),
            flow_moves: Arc::new(AtomicU64::new(0)),
        };
        for i in 0..2 {
            let opts = TunOptions { multi_queue: true, offload: true };
            let (qs, socks) = ns[i].in_thread(|| {
                let qs: Vec<OwnedFd> =
                    (0..queues).map(|_| tun::open_queue(dev, opts).expect("open a queue of the floor's TUN")).collect();
                let socks: Vec<UdpSocket> = (0..queues)
                    .map(|_| {
                        let s = UdpSocket::bind(underlay[i], port).expect("bind the floor's socket");
                        assert!(s.enable_gro(), "the floor needs UDP GRO");
                        s
                    })
                    .collect();
                if queues > 1 {
                    // The backend's spreading of flows over the workers; here
                    // the inner packet follows the virtio header.
                    steer::attach(socks[0].raw(), &steer::Table::spread(queues as u32), vnet::LEN as u32)
                        .expect("spread the floor's flows over its threads");
                }
                (qs, socks)
            });
            let loads: Arc<Vec<Load>> = Arc::new((0..queues).map(|_| Load::default()).collect());
            if queues > 1 {
                let group = socks[0].raw();
                // SAFETY: the socket is open; the borrow ends at once.
                let group = unsafe { std::os::fd::BorrowedFd::borrow_raw(group) }.try_clone_to_owned().unwrap();
                let (stop, tids, moves, loads) =
                    (relay.stop.clone(), relay.tids.clone(), relay.flow_moves.clone(), loads.clone());
                relay.threads.push(std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tids.lock().unwrap().push(unsafe { libc::gettid() });
                    let table = steer::Table::spread(queues as u32);
                    balance::run(group.as_raw_fd(), vnet::LEN as u32, table, &loads, &moves, |d| {
                        // A tick, not a wait for something to happen.
                        std::thread::sleep(d);
                        !stop.load(Ordering::Relaxed)
                    });
                }));
            }
            ns[i].run_ok("ip", &["link", "set", dev, "mtu", &mtu.to_string(), "up"]);
            ns[i].run_ok("ip", &["addr", "add", &format!("10.{net}.{}.0/32", i + 1), "dev", dev]);
            ns[i].run_ok("ip", &["route", "add", &format!("10.{net}.0.0/16"), "dev", dev]);
            let peer = u32::from(underlay[1 - i]);
            for (k, (q, s)) in qs.into_iter().zip(socks).enumerate() {
                let (stop, tids, dropped) = (relay.stop.clone(), relay.tids.clone(), relay.dropped.clone());
                let loads = loads.clone();
                relay.threads.push(std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tids.lock().unwrap().push(unsafe { libc::gettid() });
                    Worker::new(q, s, peer, port, work).run(&stop, &dropped, &loads[k]);
                }));
            }
        }
        relay
    }

    /// The threads' kernel ids.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.tids.lock().unwrap().clone()
    }
}

impl Drop for BareRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Worker {
    tun: OwnedFd,
    sock: UdpSocket,
    peer: libc::sockaddr_in,
    tx_bufs: Vec<Box<[u8]>>,
    tx_lens: [usize; BATCH],
    /// The backend's receive batch: the same `recvmmsg` as its workers.
    rx: RxBatch,
    cmsg: [[u64; 4]; BATCH],
    work: Work,
    /// Where the checksums go, so that they are not optimised away.
    sink: u16,
}

impl Worker {
    fn new(tun: OwnedFd, sock: UdpSocket, peer: u32, port: u16, work: Work) -> Worker {
        let peer = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: peer.to_be() },
            sin_zero: [0; 8],
        };
        let buf = || vec![0u8; BUF].into_boxed_slice();
        Worker {
            tun,
            sock,
            peer,
            tx_bufs: (0..BATCH).map(|_| buf()).collect(),
            tx_lens: [0; BATCH],
            rx: RxBatch::new(BATCH),
            cmsg: [[0; 4]; BATCH],
            work,
            sink: 0,
        }
    }

    fn run(mut self, stop: &AtomicBool, dropped: &AtomicU64, load: &Load) {
        let (tun, sock) = (self.tun.as_raw_fd(), self.sock.raw());
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [
                libc::pollfd { fd: tun, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfd entries. The timeout is how often
            // the stop flag is looked at when idle.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) } <= 0 {
                continue;
            }
            for _ in 0..256 {
                let tx = self.tun_to_udp(dropped, load);
                let rx = self.udp_to_tun(dropped, load);
                if !tx && !rx {
                    break;
                }
            }
        }
    }

    fn tun_to_udp(&mut self, dropped: &AtomicU64, load: &Load) -> bool {
        let tun = self.tun.as_raw_fd();
        let (mut n, mut bytes) = (0, 0);
        while n < BATCH && bytes < FLUSH_BYTES {
            let buf = &mut self.tx_bufs[n];
            // SAFETY: reads into our own buffer, within its length.
            let len = unsafe { libc::read(tun, buf.as_mut_ptr().cast(), buf.len()) };
            if len <= 0 {
                break;
            }
            let len = len as usize;
            if len > MAX_MSG {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(key) = steer::flow_key(&self.tx_bufs[n][vnet::LEN.min(len)..len]) {
                load.sent(key, len);
            }
            if self.work == Work::Checksums {
                self.sink ^= std::hint::black_box(segment_checksums(&self.tx_bufs[n][..len]));
            }
            self.tx_lens[n] = len;
            bytes += len;
            n += 1;
        }
        if n == 0 {
            return false;
        }
        // SAFETY: plain data for which all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..n {
            iov[k] = libc::iovec { iov_base: self.tx_bufs[k].as_mut_ptr().cast(), iov_len: self.tx_lens[k] };
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (&mut self.peer as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iov[k];
            h.msg_iovlen = 1;
            // Not the backend's TxBatch: it builds a train from segments
            // pushed one by one (an iovec each, at most 65,000 bytes), the
            // work per packet this floor leaves out. Here a read is one
            // iovec, cut by the kernel.
            if self.tx_lens[k] > usize::from(SEGMENT) {
                let buf = self.cmsg[k].as_mut_ptr() as *mut u8;
                // SAFETY: room for CMSG_SPACE(2) (24 of 32 bytes), 8-aligned.
                unsafe {
                    let c = buf as *mut libc::cmsghdr;
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, SEGMENT);
                    h.msg_control = buf.cast();
                    h.msg_controllen = libc::CMSG_SPACE(2) as _;
                }
            }
        }
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..n] point at live buffers of this worker.
            let rc = unsafe { libc::sendmmsg(self.sock.raw(), msgs[done..].as_mut_ptr(), (n - done) as u32, 0) };
            if rc <= 0 {
                dropped.fetch_add(1, Ordering::Relaxed);
                done += 1;
            } else {
                done += rc as usize;
            }
        }
        true
    }

    fn udp_to_tun(&mut self, dropped: &AtomicU64, load: &Load) -> bool {
        let n = self.rx.recv(&self.sock).unwrap_or(0);
        for k in 0..n {
            let len = self.rx.get(k).len;
            let buf = &self.rx.buf(k)[..len];
            if let Some(key) = steer::flow_key(&buf[vnet::LEN.min(len)..]) {
                load.received(key, len);
            }
            // SAFETY: writes bytes the kernel just put in the batch's buffer.
            let w = unsafe { libc::write(self.tun.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if w < 0 {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        n > 0
    }
}

/// The checksums a relay of flannel's wire format has to compute for one
/// TUN read (virtio header first): for a TCP super-packet, each segment's
/// (its TCP header and its share of the payload; the pseudo-header is a few
/// additions and left out), for a single packet with the checksum left to
/// the device, that one. Folded together, to be thrown away.
fn segment_checksums(read: &[u8]) -> u16 {
    let Some((hdr, pkt)) = read.split_first_chunk::<{ vnet::LEN }>() else { return 0 };
    let hdr = VnetHdr::decode(hdr);
    let start = usize::from(hdr.csum_start);
    if hdr.flags & vnet::F_NEEDS_CSUM == 0 || start >= pkt.len() {
        return 0;
    }
    let body = &pkt[start..];
    if hdr.gso_type & !vnet::GSO_ECN == vnet::GSO_NONE || hdr.gso_size == 0 {
        return checksum::sum(body);
    }
    let thl = (usize::from(body.get(12).map_or(5, |b| b >> 4)) * 4).min(body.len());
    let (tcp, payload) = body.split_at(thl);
    let tcp_sum = checksum::sum(tcp);
    payload
        .chunks(usize::from(hdr.gso_size))
        .fold(0, |acc, seg| checksum::add(acc, checksum::add(tcp_sum, checksum::sum(seg))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One's-complement sum the slow way: 16-bit big-endian words.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u64 = data.chunks(2).map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn the_checksum_pass_sums_each_segment_with_its_tcp_header() {
        let (mss, payload_len) = (1000usize, 2500usize);
        let hdr = VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut read = hdr.encode().to_vec();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 6;
        read.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[12] = 5 << 4;
        tcp[4..8].copy_from_slice(&[1, 2, 3, 4]);
        read.extend_from_slice(&tcp);
        read.extend((0..payload_len).map(|i| (i * 7 + 3) as u8));
        let payload = &read[vnet::LEN + 40..];
        let want = payload.chunks(mss).fold(0u16, |acc, seg| {
            let mut one = tcp.to_vec();
            one.extend_from_slice(seg);
            naive(&[acc.to_be_bytes(), naive(&one).to_be_bytes()].concat())
        });
        assert_eq!(segment_checksums(&read), want);
        // A packet without a checksum left to the device costs nothing.
        read[0] = 0;
        assert_eq!(segment_checksums(&read), 0);
    }
}
