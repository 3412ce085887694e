//! Receive side coalescing: consecutive TCP segments of one flow, as they
//! arrive from a peer (one inner packet per UDP datagram), are merged back
//! into one super-packet that is written to the TUN with a `virtio_net_hdr`
//! asking for TCP segmentation. The kernel then forwards and delivers one
//! 64 KB packet instead of ~45 small ones, which is where most of the
//! receive cost of a per-packet relay goes.
//!
//! No payload is copied: a merged packet is written as a fresh header plus
//! the payload slices of its segments, where they lie in the receive
//! buffers. The checksum is left to the kernel (`F_NEEDS_CSUM`, the field
//! holding the pseudo-header sum); the segments' own TCP checksums are not
//! re-verified, because the outer UDP checksum, which the kernel did verify,
//! already covers every byte of them.
//!
//! IPv6 too (the wireguard backend's `flannel-wg-v6`): a 40-byte header
//! with TCP next (no extension headers), the same traffic class, flow label
//! and hop limit; written back as a `GSO_TCPV6` super-packet.
//!
//! Merge rules (those of Linux's TCP GRO): same addresses and ports, same
//! IP TOS, TTL and DF, no IP options, not a fragment, same TCP ACK number,
//! window, header length and options; flags ACK, or ACK|PSH where the PSH
//! closes the merge; each segment starts where the previous one ended, and
//! only the last may be shorter than the first. Anything else of the same
//! flow first flushes what was merged so far, so order is kept.

use super::checksum;
use super::gso::MAX_HEADERS;
use super::packet::{self, IPV6_HEADER, PROTO_TCP};
use super::vnet::{self, VnetHdr};

/// A flow's key: addresses and ports as on the wire (IPv4: 12 bytes, IPv6:
/// 36), then the IP version.
const KEY: usize = 37;

/// Flows merged at the same time; a new flow beyond this flushes the oldest.
pub const MAX_FLOWS: usize = 8;

/// Segments merged into one packet at most.
pub const MAX_SEGMENTS: usize = 64;

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// Where a packet lies in the caller's receive buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pkt {
    /// Which buffer.
    pub buf: u16,
    /// Offset of its first byte.
    pub off: u32,
    /// Its length.
    pub len: u32,
}

/// What to write to the TUN, in this order.
#[derive(Debug)]
pub enum Emit<'g> {
    /// One packet, unchanged.
    Single(Pkt),
    /// A merged packet: this virtio header, this IP+TCP header, then the
    /// payload slices.
    Super {
        /// The virtio header asking for TCP segmentation.
        vnet: [u8; vnet::LEN],
        /// The IP and TCP headers.
        header: &'g [u8],
        /// The payloads, in order.
        payloads: &'g [Pkt],
    },
}

/// A flow being merged.
struct Group {
    active: bool,
    /// Creation order, to flush the oldest first.
    age: u64,
    /// Addresses and ports, as on the wire.
    key: [u8; KEY],
    /// The IP header's length (20, or 40 for IPv6).
    ihl: usize,
    header: [u8; MAX_HEADERS],
    hl: usize,
    first: Pkt,
    mss: usize,
    next_seq: u32,
    payload: usize,
    pieces: Vec<Pkt>,
    closed: bool,
    psh: bool,
}

impl Group {
    fn new() -> Group {
        Group {
            active: false,
            age: 0,
            key: [0; KEY],
            ihl: 0,
            header: [0; MAX_HEADERS],
            hl: 0,
            first: Pkt { buf: 0, off: 0, len: 0 },
            mss: 0,
            next_seq: 0,
            payload: 0,
            pieces: Vec::with_capacity(MAX_SEGMENTS),
            closed: false,
            psh: false,
        }
    }
}

/// What a TCP segment's header says, as far as merging is concerned.
struct Seg {
    key: [u8; KEY],
    ihl: usize,
    hl: usize,
    seq: u32,
    flags: u8,
    mergeable: bool,
}

fn parse(data: &[u8]) -> Option<Seg> {
    let v6 = *data.first()? >> 4 == 6;
    let ihl = if v6 {
        // TCP right after the fixed header; extension headers are not merged.
        (data.len() >= IPV6_HEADER && data[6] == PROTO_TCP).then_some(IPV6_HEADER)?
    } else {
        let ihl = packet::ipv4_header_len(data)?;
        (packet::protocol(data) == PROTO_TCP).then_some(ihl)?
    };
    if data.len() < ihl + 20 {
        return None;
    }
    let mut key = [0u8; KEY];
    let addrs = if v6 { 8..40 } else { 12..20 };
    let n = addrs.len();
    key[..n].copy_from_slice(&data[addrs]);
    key[n..n + 4].copy_from_slice(&data[ihl..ihl + 4]);
    key[KEY - 1] = data[0] >> 4;
    let thl = usize::from(data[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    let flags = data[ihl + 13];
    let seq = u32::from_be_bytes([data[ihl + 4], data[ihl + 5], data[ihl + 6], data[ihl + 7]]);
    let mergeable = (v6 || (ihl == 20 && !packet::is_fragment(data)))
        && thl >= 20
        && hl < data.len()
        && hl <= MAX_HEADERS
        && flags & ACK != 0
        && flags & !(ACK | PSH) == 0;
    Some(Seg { key, ihl, hl, seq, flags, mergeable })
}

/// Writes a receive batch's inner packets to the TUN: merged by a
/// [`Coalescer`] when asked (and the TUN has offloads), else one `writev`
/// each. Holds the coalescer and the iovecs, allocated once per worker.
pub struct TunWriter {
    coalescer: Coalescer,
    iov: Vec<libc::iovec>,
}

impl Default for TunWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TunWriter {
    /// A writer; all its memory is allocated here.
    pub fn new() -> TunWriter {
        TunWriter { coalescer: Coalescer::new(), iov: Vec::with_capacity(2 + MAX_SEGMENTS) }
    }

    /// Writes `pkts`, which lie in `bufs`, to the TUN queue `tun` (whose
    /// packets carry a virtio header when `offload`), merging TCP segments
    /// when `coalesce` and `offload`. Returns how many writes failed.
    pub fn write(
        &mut self,
        tun: std::os::fd::RawFd,
        offload: bool,
        coalesce: bool,
        bufs: &[Box<[u8]>],
        pkts: &[Pkt],
    ) -> u64 {
        let iov = &mut self.iov;
        let mut errors = 0;
        let mut emit = |e: Emit<'_>| {
            if write_emit(tun, offload, bufs, iov, e).is_err() {
                errors += 1;
            }
        };
        if coalesce && offload {
            for p in pkts {
                let data = &bufs[usize::from(p.buf)][p.off as usize..][..p.len as usize];
                self.coalescer.push(*p, data, &mut emit);
            }
            self.coalescer.flush(&mut emit);
        } else {
            for p in pkts {
                emit(Emit::Single(*p));
            }
        }
        errors
    }
}

/// Writes one packet, or one merged packet, to the TUN.
fn write_emit(
    tun: std::os::fd::RawFd,
    offload: bool,
    bufs: &[Box<[u8]>],
    iov: &mut Vec<libc::iovec>,
    e: Emit<'_>,
) -> std::io::Result<()> {
    static ZERO: [u8; vnet::LEN] = [0; vnet::LEN];
    let slice = |p: &Pkt| &bufs[usize::from(p.buf)][p.off as usize..][..p.len as usize];
    let io = |b: &[u8]| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() };
    iov.clear();
    let vnet_hdr;
    match e {
        Emit::Single(p) => {
            if offload {
                iov.push(io(&ZERO));
            }
            iov.push(io(slice(&p)));
        }
        Emit::Super { vnet, header, payloads } => {
            vnet_hdr = vnet;
            iov.push(io(&vnet_hdr));
            iov.push(io(header));
            iov.extend(payloads.iter().map(|p| io(slice(p))));
        }
    }
    // SAFETY: every iovec points into a buffer borrowed for this call.
    let rc = unsafe { libc::writev(tun, iov.as_ptr(), iov.len() as libc::c_int) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Merges TCP segments; see the module documentation.
pub struct Coalescer {
    groups: Vec<Group>,
    clock: u64,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// An empty coalescer; all its memory is allocated here.
    pub fn new() -> Coalescer {
        Coalescer { groups: (0..MAX_FLOWS).map(|_| Group::new()).collect(), clock: 0 }
    }

    /// Takes the next received packet `pkt`, whose bytes are `data` (a
    /// checked IPv4 packet, trimmed to its total length, TTL already
    /// decremented), and emits what can be written so far.
    pub fn push(&mut self, pkt: Pkt, data: &[u8], emit: &mut impl FnMut(Emit<'_>)) {
        let Some(seg) = parse(data) else {
            emit(Emit::Single(pkt));
            return;
        };
        let found = self.groups.iter().position(|g| g.active && g.key == seg.key);
        if !seg.mergeable {
            if let Some(i) = found {
                self.flush_group(i, emit);
            }
            emit(Emit::Single(pkt));
            return;
        }
        let slot = match found {
            Some(i) if self.groups[i].can_take(&seg, data) => {
                self.groups[i].take(pkt, &seg, data);
                return;
            }
            Some(i) => {
                self.flush_group(i, emit);
                i
            }
            None => match self.groups.iter().position(|g| !g.active) {
                Some(i) => i,
                None => {
                    let oldest = (0..self.groups.len()).min_by_key(|&i| self.groups[i].age).unwrap_or(0);
                    self.flush_group(oldest, emit);
                    oldest
                }
            },
        };
        self.clock += 1;
        self.groups[slot].start(self.clock, pkt, &seg, data);
    }

    /// Emits every flow still being merged, oldest first. Call it before
    /// the receive buffers are reused.
    pub fn flush(&mut self, emit: &mut impl FnMut(Emit<'_>)) {
        while let Some(i) =
            (0..self.groups.len()).filter(|&i| self.groups[i].active).min_by_key(|&i| self.groups[i].age)
        {
            self.flush_group(i, emit);
        }
    }

    fn flush_group(&mut self, i: usize, emit: &mut impl FnMut(Emit<'_>)) {
        let g = &mut self.groups[i];
        g.active = false;
        if g.pieces.len() == 1 {
            emit(Emit::Single(g.first));
            return;
        }
        let (hl, t) = (g.hl, g.ihl);
        let h = &mut g.header[..hl];
        let tcp_len = (hl - t + g.payload) as u16;
        let v6 = t == IPV6_HEADER;
        let ph = if v6 {
            h[4..6].copy_from_slice(&tcp_len.to_be_bytes());
            let src: [u8; 16] = h[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = h[24..40].try_into().expect("16 bytes");
            checksum::pseudo_header6(src, dst, PROTO_TCP, u32::from(tcp_len))
        } else {
            let tot = (hl + g.payload) as u16;
            h[2..4].copy_from_slice(&tot.to_be_bytes());
            packet::set_header_checksum(h, 20);
            checksum::pseudo_header([h[12], h[13], h[14], h[15]], [h[16], h[17], h[18], h[19]], PROTO_TCP, tcp_len)
        };
        if g.psh {
            h[t + 13] |= PSH;
        }
        h[t + 16..t + 18].copy_from_slice(&ph.to_be_bytes());
        let vnet = VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 },
            hdr_len: hl as u16,
            gso_size: g.mss as u16,
            csum_start: t as u16,
            csum_offset: 16,
        }
        .encode();
        emit(Emit::Super { vnet, header: &g.header[..hl], payloads: &g.pieces });
    }
}

impl Group {
    fn start(&mut self, age: u64, pkt: Pkt, seg: &Seg, data: &[u8]) {
        let plen = data.len() - seg.hl;
        self.active = true;
        self.age = age;
        self.key = seg.key;
        self.ihl = seg.ihl;
        self.hl = seg.hl;
        self.header[..seg.hl].copy_from_slice(&data[..seg.hl]);
        self.first = pkt;
        self.mss = plen;
        self.next_seq = seg.seq.wrapping_add(plen as u32);
        self.payload = plen;
        self.pieces.clear();
        self.pieces.push(Pkt { buf: pkt.buf, off: pkt.off + seg.hl as u32, len: plen as u32 });
        self.psh = seg.flags & PSH != 0;
        self.closed = self.psh;
    }

    fn can_take(&self, seg: &Seg, data: &[u8]) -> bool {
        let plen = data.len() - seg.hl;
        let h = &self.header;
        let t = self.ihl;
        let ip_same = if t == IPV6_HEADER {
            // IPv6: traffic class and flow label, hop limit.
            data[..4] == h[..4] && data[7] == h[7]
        } else {
            // IPv4: TOS, DF/MF and offset, TTL.
            data[1] == h[1] && data[6..9] == h[6..9]
        };
        !self.closed
            && seg.ihl == t
            && seg.hl == self.hl
            && seg.seq == self.next_seq
            && plen <= self.mss
            && self.pieces.len() < MAX_SEGMENTS
            && self.hl + self.payload + plen <= usize::from(u16::MAX)
            && ip_same
            // TCP: ACK number, data offset, window; flags but PSH.
            && data[t + 8..t + 13] == h[t + 8..t + 13]
            && (data[t + 13] & !PSH) == (h[t + 13] & !PSH)
            && data[t + 14..t + 16] == h[t + 14..t + 16]
            // TCP options (timestamps must match too, as in Linux's GRO).
            && data[t + 20..seg.hl] == h[t + 20..seg.hl]
    }

    fn take(&mut self, pkt: Pkt, seg: &Seg, data: &[u8]) {
        let plen = data.len() - seg.hl;
        self.pieces.push(Pkt { buf: pkt.buf, off: pkt.off + seg.hl as u32, len: plen as u32 });
        self.payload += plen;
        self.next_seq = self.next_seq.wrapping_add(plen as u32);
        if seg.flags & PSH != 0 {
            self.psh = true;
            self.closed = true;
        }
        if plen < self.mss {
            self.closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::gso::tests::{tcp_ok, tcp_packet};
    use crate::udp::gso::TcpSuper;

    /// Feeds packets (all in "buffer" i) and returns what was emitted, with
    /// merged packets rebuilt into plain bytes.
    fn run(packets: &[Vec<u8>]) -> Vec<(Option<VnetHdr>, Vec<u8>)> {
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        let mut emit = |e: Emit<'_>| match e {
            Emit::Single(p) => out.push((None, packets[p.buf as usize][p.off as usize..][..p.len as usize].to_vec())),
            Emit::Super { vnet, header, payloads } => {
                let mut b = header.to_vec();
                for p in payloads {
                    b.extend_from_slice(&packets[p.buf as usize][p.off as usize..][..p.len as usize]);
                }
                out.push((Some(VnetHdr::decode(&vnet)), b));
            }
        };
        for (i, p) in packets.iter().enumerate() {
            c.push(Pkt { buf: i as u16, off: 0, len: p.len() as u32 }, p, &mut emit);
        }
        c.flush(&mut emit);
        out
    }

    fn cut(payload: &[u8], mss: usize, flags: u8) -> Vec<Vec<u8>> {
        let sup = tcp_packet(5000, flags, payload);
        let t = TcpSuper::parse(&sup, mss).unwrap();
        (0..t.segments())
            .map(|i| {
                let mut h = [0u8; MAX_HEADERS];
                let r = t.segment(i, &mut h);
                let mut s = h[..t.header_len()].to_vec();
                s.extend_from_slice(&sup[r]);
                s
            })
            .collect()
    }

    #[test]
    fn merges_a_cut_super_packet_back() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
        let segs = cut(&payload, 1420, ACK | PSH);
        let out = run(&segs);
        assert_eq!(out.len(), 1);
        let (vnet, bytes) = &out[0];
        let vnet = vnet.unwrap();
        assert_eq!((vnet.gso_type, vnet.gso_size, vnet.hdr_len), (vnet::GSO_TCPV4, 1420, 52));
        assert_eq!(packet::total_len(bytes), bytes.len());
        assert!(packet::header_checksum_ok(bytes, 20));
        assert_eq!(&bytes[52..], &payload[..]);
        assert_eq!(bytes[33], ACK | PSH);
        // With the checksum done as the kernel will, it verifies.
        let mut done = bytes.clone();
        assert!(crate::udp::gso::complete_checksum(&mut done, 20, 16));
        assert!(tcp_ok(&done));
    }

    #[test]
    fn merges_ipv6_segments_into_a_tcpv6_super_packet() {
        use crate::udp::gso::tests::{tcp6_ok, tcp6_packet};
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        let sup = tcp6_packet(9000, ACK | PSH, &payload);
        let t = TcpSuper::parse(&sup, 1400).unwrap();
        let segs: Vec<Vec<u8>> = (0..t.segments())
            .map(|i| {
                let mut h = [0u8; MAX_HEADERS];
                let r = t.segment(i, &mut h);
                let mut s = h[..t.header_len()].to_vec();
                s.extend_from_slice(&sup[r]);
                s
            })
            .collect();
        // An IPv4 flow in between is a flow of its own.
        let mut mixed = segs.clone();
        mixed.insert(3, tcp_packet(1, ACK, &[5; 100]));
        let out = run(&mixed);
        assert_eq!(out.len(), 2, "{:?}", out.iter().map(|o| o.0).collect::<Vec<_>>());
        let (vnet, bytes) = out.iter().find(|o| o.1[0] >> 4 == 6).unwrap();
        let vnet = vnet.unwrap();
        assert_eq!((vnet.gso_type, vnet.gso_size, vnet.hdr_len), (vnet::GSO_TCPV6, 1400, 72));
        assert_eq!((vnet.csum_start, vnet.csum_offset), (40, 16));
        assert_eq!(usize::from(u16::from_be_bytes([bytes[4], bytes[5]])), bytes.len() - 40);
        assert_eq!(&bytes[72..], &payload[..]);
        assert_eq!(bytes[53], ACK | PSH);
        let mut done = bytes.clone();
        assert!(crate::udp::gso::complete_checksum(&mut done, 40, 16));
        assert!(tcp6_ok(&done));
        // Another hop limit is another merge.
        let mut other = segs.clone();
        other[2][7] = 63;
        assert_eq!(run(&other).len(), 3);
    }

    #[test]
    fn a_gap_or_another_flow_keeps_order() {
        let payload = vec![7u8; 1420 * 4];
        let mut segs = cut(&payload, 1420, ACK);
        segs.remove(2); // a lost segment: 0,1 then 3
        let out = run(&segs);
        assert_eq!(out.len(), 2);
        assert!(out[0].0.is_some());
        assert!(out[1].0.is_none(), "a lone segment goes out unchanged");
        assert_eq!(out[1].1, segs[2]);
    }

    #[test]
    fn control_segments_are_not_merged_and_flush_first() {
        let payload = vec![1u8; 1420 * 2];
        let mut segs = cut(&payload, 1420, ACK);
        let fin = tcp_packet(5000 + 2840, ACK | 0x01, &[]);
        segs.push(fin.clone());
        let out = run(&segs);
        assert_eq!(out.len(), 2);
        assert!(out[0].0.is_some());
        assert_eq!(out[1].1, fin);
    }

    #[test]
    fn a_short_segment_closes_the_merge() {
        let mut segs = cut(&[2u8; 1420 + 100], 1420, ACK);
        segs.extend(cut(&[3u8; 1420], 1420, ACK).into_iter().map(|mut s| {
            let seq = 5000u32 + 1520;
            s[24..28].copy_from_slice(&seq.to_be_bytes());
            s
        }));
        let out = run(&segs);
        assert_eq!(out.len(), 2, "1420+100, then a new merge");
    }
}
