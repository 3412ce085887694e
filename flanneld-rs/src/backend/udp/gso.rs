//! Transmit side offload work: finishing a checksum the kernel left to us,
//! and cutting a TCP super-packet read from the TUN into MTU-sized IPv4/TCP
//! packets, the way a NIC's TSO would (IPv6/TCP too, for the wireguard
//! backend's `flannel-wg-v6`: a fixed 40-byte header, no extension headers).
//!
//! The udp backend lays the segments out back to back in the read buffer
//! ([`spread_in_place`]: each payload moves a few header lengths on, its
//! fresh header goes in front), so that a train of them is one iovec for
//! the kernel. Where the buffer has no room, each segment is a fresh header
//! in a caller's slot plus a range of the super-packet's payload: two
//! iovecs, nothing copied but headers ([`TcpSuper`]).

use std::ops::Range;

use super::checksum;
use super::packet::{self, Discard, IPV6_HEADER, PROTO_TCP, PROTO_UDP};
use super::vnet::{self, VnetHdr};

/// Largest IPv4 plus TCP header: both may carry 40 bytes of options.
pub const MAX_HEADERS: usize = 120;

/// TCP flags that belong on one segment only.
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

/// Computes the checksum that `F_NEEDS_CSUM` left undone: the one's
/// complement of the sum from `start` to the end of `pkt` (the field at
/// `start + offset` already holds the pseudo-header sum), stored at
/// `start + offset`. Returns false when the offsets do not fit the packet.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> bool {
    let at = start + offset;
    if at + 2 > pkt.len() {
        return false;
    }
    let mut c = checksum::finish(checksum::sum(&pkt[start..]));
    // In UDP a zero checksum means "none"; a computed zero is sent as ones.
    // `get`: the offsets come from the virtio header, not from a check that
    // `pkt` holds an IP header.
    let udp = match pkt.first().map(|b| b >> 4) {
        Some(6) => pkt.get(6) == Some(&PROTO_UDP),
        _ => pkt.get(9) == Some(&PROTO_UDP),
    };
    if c == 0 && offset == 6 && udp {
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// A packet read from the TUN, checked and ready to go to its peer.
#[derive(Debug)]
pub enum Outbound<'a> {
    /// One packet, trimmed to its total length, sent as it is.
    Single(&'a [u8]),
    /// A TCP super-packet, sent cut into segments.
    Super(TcpSuper<'a>),
}

/// Checks a packet read from the TUN (`pkt`, after its virtio header
/// `hdr`) and readies it for its peer: a single packet gets the checksum
/// the kernel left undone (`F_NEEDS_CSUM`) and its TTL decremented; a TCP
/// super-packet (`GSO_TCPV4`) its TTL decremented, and is cut by the
/// caller. A discarded packet may have been changed.
pub fn prepare_outbound(pkt: &mut [u8], hdr: VnetHdr) -> Result<Outbound<'_>, Discard> {
    let ihl = packet::ipv4_header_len(pkt).ok_or(Discard::Bad)?;
    match hdr.gso_type & !vnet::GSO_ECN {
        vnet::GSO_NONE => {
            let tot = packet::total_len(pkt);
            if tot < ihl || tot > pkt.len() {
                return Err(Discard::Bad);
            }
            let pkt = &mut pkt[..tot];
            if hdr.flags & vnet::F_NEEDS_CSUM != 0
                && !complete_checksum(pkt, usize::from(hdr.csum_start), usize::from(hdr.csum_offset))
            {
                return Err(Discard::Bad);
            }
            if !packet::decrement_ttl(pkt) {
                return Err(Discard::TtlExpired);
            }
            Ok(Outbound::Single(pkt))
        }
        vnet::GSO_TCPV4 => {
            if pkt[8] <= 1 {
                return Err(Discard::TtlExpired);
            }
            // The header checksum is left as it is: the cut takes the
            // header's sum (after this decrement) and writes each segment's.
            pkt[8] -= 1;
            TcpSuper::parse(pkt, usize::from(hdr.gso_size)).map(Outbound::Super).ok_or(Discard::Bad)
        }
        _ => Err(Discard::Bad),
    }
}

/// How a TCP super-packet (IPv4 or IPv6) is cut: its header lengths, the segment
/// size and how many segments it makes. Shared by the cut into separate
/// header slots ([`TcpSuper`]) and the cut in place ([`cut_in_place`]).
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    /// The IP header's length (40: IPv6).
    ihl: usize,
    v6: bool,
    hl: usize,
    mss: usize,
    segments: usize,
    /// IPv4: the folded sum of the header with its total length,
    /// identification and checksum zeroed; each segment's checksum adds
    /// its own two fields to it.
    ip_sum: u16,
}

impl Cut {
    /// Checks `pkt` (an IPv4/TCP or IPv6/TCP packet, without virtio header) and the
    /// segment size; `None` when it is not something we can cut.
    fn of(pkt: &[u8], mss: usize) -> Option<Cut> {
        let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
        let (ihl, proto) = if v6 {
            (IPV6_HEADER, *pkt.get(6)?)
        } else {
            let ihl = packet::ipv4_header_len(pkt)?;
            (ihl, packet::protocol(pkt))
        };
        if proto != PROTO_TCP || mss == 0 || pkt.len() < ihl + 20 {
            return None;
        }
        let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
        let hl = ihl + thl;
        if thl < 20 || pkt.len() <= hl || hl > MAX_HEADERS {
            return None;
        }
        // A segment's length must fit the 16-bit total-length field. The
        // kernel's super-packets never come near, but a read may be longer
        // than 64 KB and the segment size is the virtio header's word.
        if hl + mss.min(pkt.len() - hl) > usize::from(u16::MAX) {
            return None;
        }
        let segments = (pkt.len() - hl).div_ceil(mss);
        let ip_sum = if v6 {
            0
        } else {
            let mut h = [0u8; 60];
            h[..ihl].copy_from_slice(&pkt[..ihl]);
            h[2..6].fill(0);
            h[10..12].fill(0);
            checksum::sum(&h[..ihl])
        };
        Some(Cut { ihl, v6, hl, mss, segments, ip_sum })
    }

    /// Segment `i`'s payload within a super-packet of `len` bytes.
    fn payload(&self, i: usize, len: usize) -> Range<usize> {
        let start = self.hl + i * self.mss;
        start..(start + self.mss).min(len)
    }

    /// Turns `h`, a copy of the super-packet's headers, into segment `i`'s,
    /// whose payload is `payload`. IP: total length, identification
    /// (incremented per segment, as Linux's TSO does) and checksum. TCP:
    /// sequence number, FIN and PSH on the last segment only, CWR on the
    /// first only, and the full checksum.
    fn fix_header(&self, i: usize, h: &mut [u8], payload: &[u8]) {
        let (ihl, hl) = (self.ihl, self.hl);
        let tcp_len = (hl - ihl + payload.len()) as u16;
        let pseudo = if self.v6 {
            // IPv6: the payload length; no identification, no checksum.
            h[4..6].copy_from_slice(&tcp_len.to_be_bytes());
            let src: [u8; 16] = h[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = h[24..40].try_into().expect("16 bytes");
            checksum::pseudo_header6(src, dst, PROTO_TCP, u32::from(tcp_len))
        } else {
            let src = [h[12], h[13], h[14], h[15]];
            let dst = [h[16], h[17], h[18], h[19]];
            let tot = (hl + payload.len()) as u16;
            h[2..4].copy_from_slice(&tot.to_be_bytes());
            let id = u16::from_be_bytes([h[4], h[5]]).wrapping_add(i as u16);
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let ip = checksum::add(self.ip_sum, checksum::fold(u64::from(tot) + u64::from(id)));
            h[10..12].copy_from_slice(&checksum::finish(ip).to_be_bytes());
            checksum::pseudo_header(src, dst, PROTO_TCP, tcp_len)
        };

        let tcp = &mut h[ihl..hl];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add((i * self.mss) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 != self.segments {
            tcp[13] &= !(FIN | PSH);
        }
        if i != 0 {
            tcp[13] &= !CWR;
        }
        tcp[16] = 0;
        tcp[17] = 0;
        let s = checksum::add(pseudo, checksum::add(checksum::sum(tcp), checksum::sum(payload)));
        tcp[16..18].copy_from_slice(&checksum::finish(s).to_be_bytes());
    }
}

/// A TCP super-packet (IPv4 or IPv6) and how to cut it.
#[derive(Debug)]
pub struct TcpSuper<'a> {
    pkt: &'a [u8],
    cut: Cut,
}

impl<'a> TcpSuper<'a> {
    /// Checks `pkt` (an IPv4/TCP or IPv6/TCP packet, without virtio header) and the
    /// segment size; `None` when it is not something we can cut.
    pub fn parse(pkt: &'a [u8], mss: usize) -> Option<TcpSuper<'a>> {
        Cut::of(pkt, mss).map(|cut| TcpSuper { pkt, cut })
    }

    /// How it is cut, apart from the packet (see [`Cut::spread`]).
    pub fn cut(&self) -> Cut {
        self.cut
    }

    /// The whole super-packet, which segments' payload ranges index.
    pub fn bytes(&self) -> &'a [u8] {
        self.pkt
    }

    /// How many packets it makes.
    pub fn segments(&self) -> usize {
        self.cut.segments
    }

    /// Length of every segment's headers.
    pub fn header_len(&self) -> usize {
        self.cut.hl
    }

    /// Length of the largest segment (headers and payload).
    pub fn segment_len(&self) -> usize {
        self.cut.hl + self.cut.mss.min(self.pkt.len() - self.cut.hl)
    }

    /// Writes segment `i`'s headers into `out[..header_len()]` and returns
    /// the range of the super-packet that is its payload (see
    /// `Cut::fix_header` for what changes from segment to segment).
    ///
    /// Panics unless `i < segments()` and `out` holds `header_len()` bytes.
    pub fn segment(&self, i: usize, out: &mut [u8]) -> Range<usize> {
        let r = self.cut.payload(i, self.pkt.len());
        let h = &mut out[..self.cut.hl];
        h.copy_from_slice(&self.pkt[..self.cut.hl]);
        self.cut.fix_header(i, h, &self.pkt[r.clone()]);
        r
    }
}

/// Cuts a TCP super-packet (IPv4 or IPv6) into packets of `mss` payload bytes as
/// [`TcpSuper`] does, but hands each to `each` as one contiguous slice (for
/// an encryption that takes whole packets): segment `i`'s header is written
/// over the end of segment `i - 1`'s payload, which `each` has consumed by
/// then. Returns false (nothing handed) when the packet is not something we
/// can cut, or its segments are shorter than their headers (which would
/// overwrite one another).
pub fn cut_in_place(pkt: &mut [u8], mss: usize, each: &mut impl FnMut(&[u8])) -> bool {
    let Some(cut) = Cut::of(pkt, mss) else { return false };
    let hl = cut.hl;
    if mss < hl && pkt.len() - hl > mss {
        return false;
    }
    let mut tmpl = [0u8; MAX_HEADERS];
    tmpl[..hl].copy_from_slice(&pkt[..hl]);
    for i in 0..cut.segments {
        let r = cut.payload(i, pkt.len());
        let (before, rest) = pkt.split_at_mut(r.start);
        let h = &mut before[r.start - hl..];
        h.copy_from_slice(&tmpl[..hl]);
        cut.fix_header(i, h, &rest[..r.len()]);
        each(&pkt[r.start - hl..r.end]);
    }
    true
}

/// A TCP super-packet laid out by [`spread_in_place`]: its segments back
/// to back, each its headers then its payload.
#[derive(Debug, Clone, Copy)]
pub struct Train {
    /// How many segments.
    pub segments: usize,
    /// Length of every segment but the last (which may be shorter).
    pub seg_len: usize,
    /// Length of them all.
    pub len: usize,
}

impl Train {
    /// Segment `i`'s bytes in the buffer.
    pub fn segment(&self, i: usize) -> Range<usize> {
        let start = i * self.seg_len;
        start..(start + self.seg_len).min(self.len)
    }
}

/// Cuts the TCP super-packet in `buf[..len]` (IPv4 or IPv6) into packets of
/// `mss` payload bytes as [`TcpSuper`] does, in place, and lays them out
/// back to back: segment `i`'s payload moves `i` header lengths further on
/// and its own headers go in front of it, so one train of segments is one
/// contiguous run of bytes (one iovec for the kernel rather than two per
/// segment). Payloads move from the last to the first, each before its
/// header is written, so nothing is overwritten before it has moved; the
/// first segment's headers, the template, are written last. Returns `None`
/// (nothing changed) when the packet is not something we can cut, or `buf`
/// has no room for the extra headers.
pub fn spread_in_place(buf: &mut [u8], len: usize, mss: usize) -> Option<Train> {
    Cut::of(buf.get(..len)?, mss)?.spread(buf, len)
}

impl Cut {
    /// [`spread_in_place`] of the super-packet in `buf[..len]` that this
    /// cut was parsed from (by [`TcpSuper::parse`]), without parsing it
    /// again.
    pub fn spread(self, buf: &mut [u8], len: usize) -> Option<Train> {
        let hl = self.hl;
        let seg_len = hl + self.mss.min(len - hl);
        let total = len + (self.segments - 1) * hl;
        if total > buf.len() {
            return None;
        }
        let train = Train { segments: self.segments, seg_len, len: total };
        for i in (0..self.segments).rev() {
            let from = self.payload(i, len);
            let at = train.segment(i);
            if i > 0 {
                buf.copy_within(from, at.start + hl);
                buf.copy_within(..hl, at.start);
            }
            let (h, payload) = buf[at].split_at_mut(hl);
            self.fix_header(i, h, payload);
        }
        Some(train)
    }

    /// This cut of `pkt`, the bytes it was parsed from, unchanged since.
    pub fn of_parsed(self, pkt: &[u8]) -> TcpSuper<'_> {
        debug_assert!(pkt.len() > self.hl, "not the packet this cut was parsed from");
        TcpSuper { pkt, cut: self }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP/IPv4 packet with timestamps, valid checksums, and `payload`.
    pub(crate) fn tcp_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0x10, 0x00, 0x40, 0, 64, PROTO_TCP, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2];
        let mut tcp = vec![0x9c, 0x40, 0x14, 0x51];
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&7u32.to_be_bytes());
        tcp.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p.extend_from_slice(&tcp);
        p.extend_from_slice(payload);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        packet::set_header_checksum(&mut p, 20);
        let s = checksum::add(
            checksum::pseudo_header([10, 244, 1, 2], [10, 244, 2, 2], PROTO_TCP, (len - 20) as u16),
            checksum::sum(&p[20..]),
        );
        p[36..38].copy_from_slice(&checksum::finish(s).to_be_bytes());
        p
    }

    /// Whether `p`'s IP and TCP checksums verify.
    pub(crate) fn tcp_ok(p: &[u8]) -> bool {
        let tcp_len = (p.len() - 20) as u16;
        packet::header_checksum_ok(p, 20)
            && checksum::add(
                checksum::pseudo_header([p[12], p[13], p[14], p[15]], [p[16], p[17], p[18], p[19]], PROTO_TCP, tcp_len),
                checksum::sum(&p[20..]),
            ) == 0xffff
    }

    #[test]
    fn cuts_like_tso() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let sup = tcp_packet(1000, 0x18 | FIN, &payload);
        let cut = TcpSuper::parse(&sup, 1400).unwrap();
        assert_eq!(cut.segments(), 8);
        assert_eq!(cut.header_len(), 52);
        let mut joined = Vec::new();
        for i in 0..cut.segments() {
            let mut hdr = [0u8; MAX_HEADERS];
            let r = cut.segment(i, &mut hdr);
            let mut seg = hdr[..52].to_vec();
            seg.extend_from_slice(&sup[r.clone()]);
            assert_eq!(packet::total_len(&seg), seg.len());
            assert!(tcp_ok(&seg), "segment {i}");
            assert_eq!(u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]), 1000 + (i * 1400) as u32);
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1000 + i as u16);
            let last = i + 1 == cut.segments();
            assert_eq!(seg[33] & (FIN | PSH) != 0, last, "segment {i} flags {:#x}", seg[33]);
            assert!(seg[33] & 0x10 != 0, "ACK stays");
            joined.extend_from_slice(&seg[52..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn completes_a_partial_checksum() {
        let mut p = tcp_packet(1, 0x10, b"hello, world!");
        let want = [p[36], p[37]];
        // What the kernel hands over with F_NEEDS_CSUM: the pseudo-header sum.
        let ph = checksum::pseudo_header([10, 244, 1, 2], [10, 244, 2, 2], PROTO_TCP, (p.len() - 20) as u16);
        p[36..38].copy_from_slice(&ph.to_be_bytes());
        assert!(complete_checksum(&mut p, 20, 16));
        assert_eq!([p[36], p[37]], want);
        assert!(!complete_checksum(&mut p, 20, 100));
    }

    /// Found by tests/prop_parsers (udp_complete_checksum): a computed zero
    /// at the UDP offset looked up the IP protocol past the end of a short
    /// packet.
    #[test]
    fn a_short_packet_with_a_zero_checksum_is_no_panic() {
        let mut p = [0, 0, 0, 0, 0, 0, 0xff, 0xff];
        assert!(complete_checksum(&mut p, 0, 6));
        assert_eq!(p[6..], [0, 0]);
    }

    /// Found by tests/prop_parsers (udp_tcp_super_cut): a segment size near
    /// 64 KB on a longer read made segments whose total length wrapped.
    #[test]
    fn refuses_segments_longer_than_an_ipv4_packet() {
        let mut sup = tcp_packet(1, 0x10, &vec![7; 65_535 - 52]);
        sup.extend_from_slice(&[0; 65]);
        assert!(TcpSuper::parse(&sup, 65_535).is_none());
        let cut = TcpSuper::parse(&sup, 65_535 - 52).unwrap();
        assert_eq!(cut.segment_len(), 65_535);
        assert_eq!(cut.segments(), 2);
    }

    #[test]
    fn refuses_what_it_cannot_cut() {
        assert!(TcpSuper::parse(&[0x45; 10], 1400).is_none());
        let mut udp = tcp_packet(1, 0x10, &[0; 100]);
        udp[9] = PROTO_UDP;
        assert!(TcpSuper::parse(&udp, 1400).is_none());
        assert!(TcpSuper::parse(&tcp_packet(1, 0x10, &[0; 100]), 0).is_none());
    }

    /// Cutting in place gives, byte for byte, the cut into header slots.
    #[test]
    fn cuts_in_place_like_the_udp_backend() {
        for (size, mss) in [(10_000usize, 1368usize), (1368 * 3, 1368), (100, 1368), (65_000, 1368), (500, 60)] {
            let payload: Vec<u8> = (0..size as u32).map(|i| (i * 31 + 7) as u8).collect();
            let sup = tcp_packet(1000, 0x18 | FIN | CWR, &payload);
            let reference = TcpSuper::parse(&sup, mss).unwrap();
            let mut want = Vec::new();
            for i in 0..reference.segments() {
                let mut h = [0u8; MAX_HEADERS];
                let r = reference.segment(i, &mut h);
                let mut s = h[..reference.header_len()].to_vec();
                s.extend_from_slice(&sup[r]);
                want.push(s);
            }
            let mut got = Vec::new();
            let mut copy = sup.clone();
            assert!(cut_in_place(&mut copy, mss, &mut |s: &[u8]| got.push(s.to_vec())));
            assert_eq!(got, want, "size {size} mss {mss}");
        }
    }

    /// A TCP/IPv6 packet with timestamps, a valid checksum, and `payload`.
    pub(crate) fn tcp6_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = (ip6("2001:db8:10:1::2"), ip6("2001:db8:10:2::2"));
        let mut p = vec![0x60, 0, 0, 0, 0, 0, PROTO_TCP, 64];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&tcp_packet(seq, flags, payload)[20..]);
        let len = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p[56..58].copy_from_slice(&[0, 0]);
        let s = checksum::add(checksum::pseudo_header6(src, dst, PROTO_TCP, len.into()), checksum::sum(&p[40..]));
        p[56..58].copy_from_slice(&checksum::finish(s).to_be_bytes());
        p
    }

    fn ip6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    pub(crate) fn tcp6_ok(p: &[u8]) -> bool {
        let src: [u8; 16] = p[8..24].try_into().unwrap();
        let dst: [u8; 16] = p[24..40].try_into().unwrap();
        usize::from(u16::from_be_bytes([p[4], p[5]])) == p.len() - 40
            && checksum::add(
                checksum::pseudo_header6(src, dst, PROTO_TCP, (p.len() - 40) as u32),
                checksum::sum(&p[40..]),
            ) == 0xffff
    }

    #[test]
    fn cuts_ipv6_like_tso6() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let sup = tcp6_packet(1000, 0x18 | FIN | CWR, &payload);
        assert!(tcp6_ok(&sup), "the test packet itself");
        let mut segs = Vec::new();
        let mut copy = sup.clone();
        assert!(cut_in_place(&mut copy, 1348, &mut |s: &[u8]| segs.push(s.to_vec())));
        assert_eq!(segs.len(), 8);
        let mut joined = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            assert!(tcp6_ok(seg), "segment {i}");
            assert_eq!(seg[..4], sup[..4], "version, class and flow label kept");
            assert_eq!(seg[6..40], sup[6..40], "next header, hop limit and addresses kept");
            assert_eq!(u32::from_be_bytes([seg[44], seg[45], seg[46], seg[47]]), 1000 + (i * 1348) as u32);
            let last = i + 1 == segs.len();
            assert_eq!(seg[53] & (FIN | PSH) != 0, last, "segment {i} flags {:#x}", seg[53]);
            assert_eq!(seg[53] & CWR != 0, i == 0, "segment {i} flags {:#x}", seg[53]);
            joined.extend_from_slice(&seg[72..]);
        }
        assert_eq!(joined, payload);
        // The cut into header slots agrees.
        let reference = TcpSuper::parse(&sup, 1348).unwrap();
        assert_eq!(reference.header_len(), 72);
        let mut h = [0u8; MAX_HEADERS];
        let r = reference.segment(3, &mut h);
        let mut s3 = h[..72].to_vec();
        s3.extend_from_slice(&sup[r]);
        assert_eq!(s3, segs[3]);
        // Not TCP: refused.
        let mut udp = tcp6_packet(1, 0x10, &[0; 100]);
        udp[6] = PROTO_UDP;
        assert!(TcpSuper::parse(&udp, 1348).is_none());
    }

    #[test]
    fn completes_an_ipv6_udp_checksum_of_zero_as_ones() {
        // An IPv6/UDP packet whose checksum comes out zero is sent with
        // 0xffff (zero is not allowed over IPv6).
        let mut p = vec![0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64];
        p.extend_from_slice(&[0; 32]);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0, 0, 0]);
        assert!(complete_checksum(&mut p, 40, 6));
        assert_eq!(p[46..48], [0xff, 0xff]);
    }

    #[test]
    fn cut_in_place_refuses_what_it_cannot_cut() {
        let mut none = |_: &[u8]| panic!("nothing to hand");
        assert!(!cut_in_place(&mut [0x45; 10], 1400, &mut none));
        let mut p = tcp_packet(1, 0x10, &[0; 100]);
        assert!(!cut_in_place(&mut p.clone(), 0, &mut none));
        p[9] = 17;
        assert!(!cut_in_place(&mut p, 1400, &mut none));
        // Segments shorter than the header would overwrite one another.
        assert!(!cut_in_place(&mut tcp_packet(1, 0x10, &[0; 100]), 20, &mut none));
    }

    /// The segments [`TcpSuper`] makes, each its headers then its payload.
    fn cut_with_slots(sup: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let cut = TcpSuper::parse(sup, mss).unwrap();
        let hl = cut.header_len();
        (0..cut.segments())
            .map(|i| {
                let mut hdr = [0u8; MAX_HEADERS];
                let r = cut.segment(i, &mut hdr);
                let mut seg = hdr[..hl].to_vec();
                seg.extend_from_slice(&sup[r]);
                seg
            })
            .collect()
    }

    #[test]
    fn spreads_segments_back_to_back_as_tso_cuts_them() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 13 + 5) as u8).collect();
        // IPv4 with timestamps (52-byte headers) and IPv6 (72): a short
        // last segment, an exact multiple, one segment, and segments
        // shorter than their headers (each header is then written over
        // where its own and later payloads lay, which must have moved
        // already).
        for sup in [tcp_packet(7, 0x18 | FIN, &payload), tcp6_packet(7, 0x18 | FIN, &payload)] {
            for mss in [1400, 1000, 10_000, 30, 1] {
                let want = cut_with_slots(&sup, mss);
                let room: usize = want.iter().map(Vec::len).sum();
                let mut buf = sup.clone();
                buf.resize(room + 9, 0xee);
                let train = spread_in_place(&mut buf, sup.len(), mss).unwrap();
                assert_eq!((train.segments, train.len), (want.len(), room), "mss {mss}");
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(&buf[train.segment(i)], &w[..], "mss {mss}, segment {i}");
                }
                assert_eq!(buf[room..], [0xee; 9], "nothing written past the train");
                if sup[0] >> 4 == 4 {
                    assert!(want.iter().all(|w| tcp_ok(w)));
                } else {
                    assert!(want.iter().all(|w| tcp6_ok(w)));
                }
            }
        }
    }

    #[test]
    fn spreads_nothing_without_room() {
        let sup = tcp_packet(1, 0x10, &[9; 5000]);
        // Four segments of 1400: three more headers than the packet has.
        let mut buf = sup.clone();
        buf.resize(sup.len() + 3 * 52 - 1, 0);
        let before = buf.clone();
        assert!(spread_in_place(&mut buf, sup.len(), 1400).is_none());
        assert_eq!(buf, before, "nothing changed");
        buf.push(0);
        assert!(spread_in_place(&mut buf, sup.len(), 1400).is_some());
        // Not cuttable: refused, unchanged.
        let mut udp = tcp_packet(1, 0x10, &[0; 100]);
        udp[9] = PROTO_UDP;
        udp.resize(1000, 0);
        assert!(spread_in_place(&mut udp, 152, 50).is_none());
        assert!(spread_in_place(&mut [0; 10], 20, 1400).is_none());
    }
}
