//! The udp data path's handling of bytes from peers and from the TUN:
//! `check_inbound` (each datagram from a peer), the GRO `Coalescer` (what
//! passed it), `prepare_outbound` and `TcpSuper` (each TUN read, with its
//! `VnetHdr`), `net_unreachable` (the ICMP error about a TUN packet), and
//! the checksum code under all of them.
//!
//! Inputs: arbitrary bytes of every length up to 65,600 (the TUN read
//! buffer's size), and valid packets, mutated. Properties: no panic; the
//! same verdict as a plain reading of the rules; no allocation at all
//! (the workers allocate everything up front); and where a packet comes
//! out, its checksums verify by a straightforward RFC 1071 implementation.

use std::net::{Ipv4Addr, SocketAddrV4};

use flanneld_rs::udp::checksum;
use flanneld_rs::udp::gro::{Coalescer, Emit, Pkt, MAX_FLOWS, MAX_SEGMENTS};
use flanneld_rs::udp::gso::{self, Outbound, TcpSuper, MAX_HEADERS};
use flanneld_rs::udp::packet::{self, Discard, ICMP_ERROR_MAX, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use flanneld_rs::udp::vnet::{self, VnetHdr};
use proptest::prelude::*;
use proptest::sample::select;

use crate::alloc::{measure, Allocated};
use crate::support::check;

/// The largest TUN read (without the virtio header) the workers handle.
const MAX_READ: usize = 65_600;

const NONE: Allocated = Allocated { calls: 0, bytes: 0 };

// ------------------------------------------------------------- references

/// RFC 1071, word by word: the one's-complement sum of big-endian 16-bit
/// words, an odd last byte padded with zero, carries folded back in.
fn ref_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for w in bytes.chunks(2) {
        s += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The IPv4 header checksum verifies.
fn ref_ip_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 15) * 4;
    ref_sum(&[&p[..ihl]]) == 0xffff
}

/// The pseudo-header of a transport segment.
fn pseudo(p: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut ph = p[12..20].to_vec();
    ph.extend_from_slice(&[0, proto, (len >> 8) as u8, len as u8]);
    ph
}

/// The TCP or UDP checksum of the packet `p` (its whole length) verifies.
fn ref_transport_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 15) * 4;
    ref_sum(&[&pseudo(p, p[9], p.len() - ihl), &p[ihl..]]) == 0xffff
}

/// Stores the checksum of `p[ihl..]` (with its pseudo-header when `proto`
/// says so) at `ihl + field`.
fn ref_fill(p: &mut [u8], ihl: usize, field: usize, with_pseudo: bool) {
    p[ihl + field..ihl + field + 2].fill(0);
    let ph = if with_pseudo { pseudo(p, p[9], p.len() - ihl) } else { Vec::new() };
    let c = !ref_sum(&[&ph, &p[ihl..]]);
    p[ihl + field..ihl + field + 2].copy_from_slice(&c.to_be_bytes());
}

fn ref_fill_ip(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 15) * 4;
    p[10..12].fill(0);
    let c = !ref_sum(&[&p[..ihl]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The header length of an IPv4 packet, from RFC 791.
fn ref_ihl(p: &[u8]) -> Option<usize> {
    let b = *p.first()?;
    let ihl = usize::from(b & 15) * 4;
    (b >> 4 == 4 && ihl >= 20 && ihl <= p.len()).then_some(ihl)
}

fn be16(p: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([p[at], p[at + 1]]))
}

// --------------------------------------------------------------- packets

/// A packet to build: any IPv4 header (options included), and a TCP
/// header (options included), a UDP header or an ICMP message.
#[derive(Debug, Clone)]
struct Spec {
    proto: u8,
    ip_opt_words: usize,
    tos: u8,
    id: u16,
    frag: u16,
    ttl: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    tcp_opt_words: usize,
    tcp_flags: u8,
    window: u16,
    icmp_type: u8,
    payload: Vec<u8>,
}

/// The packet, with every checksum right.
fn build(s: &Spec) -> Vec<u8> {
    if s.proto == PROTO_UDP && s.ip_opt_words == 0 {
        // The helper tools use; it writes no UDP checksum, which we add.
        let mut p = packet::build_udp(
            SocketAddrV4::new(Ipv4Addr::from(s.src), s.ports.0),
            SocketAddrV4::new(Ipv4Addr::from(s.dst), s.ports.1),
            &s.payload,
        );
        assert!(ref_ip_ok(&p), "build_udp's header checksum");
        assert_eq!(be16(&p, 2), p.len(), "build_udp's total length");
        ref_fill(&mut p, 20, 6, true);
        return p;
    }
    let ihl = 20 + 4 * s.ip_opt_words;
    let mut p = vec![0x40 | (ihl / 4) as u8, s.tos, 0, 0];
    p.extend_from_slice(&s.id.to_be_bytes());
    p.extend_from_slice(&s.frag.to_be_bytes());
    p.extend_from_slice(&[s.ttl, s.proto, 0, 0]);
    p.extend_from_slice(&s.src);
    p.extend_from_slice(&s.dst);
    // No-op options, then end of list.
    p.extend(std::iter::repeat_n(1u8, 4 * s.ip_opt_words));
    if s.ip_opt_words > 0 {
        p[ihl - 1] = 0;
    }
    let field = match s.proto {
        PROTO_TCP => {
            p.extend_from_slice(&s.ports.0.to_be_bytes());
            p.extend_from_slice(&s.ports.1.to_be_bytes());
            p.extend_from_slice(&s.seq.to_be_bytes());
            p.extend_from_slice(&s.ack.to_be_bytes());
            p.extend_from_slice(&[((5 + s.tcp_opt_words) << 4) as u8, s.tcp_flags]);
            p.extend_from_slice(&s.window.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
            // Timestamps-like option bytes, varied by the sequence number.
            p.extend((0..4 * s.tcp_opt_words).map(|i| (s.seq as usize + i) as u8));
            16
        }
        PROTO_UDP => {
            p.extend_from_slice(&s.ports.0.to_be_bytes());
            p.extend_from_slice(&s.ports.1.to_be_bytes());
            p.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            6
        }
        _ => {
            p.extend_from_slice(&[s.icmp_type, 0, 0, 0, 0, 1, 0, 1]);
            2
        }
    };
    p.extend_from_slice(&s.payload);
    let tot = p.len() as u16;
    p[2..4].copy_from_slice(&tot.to_be_bytes());
    ref_fill_ip(&mut p);
    ref_fill(&mut p, ihl, field, s.proto != PROTO_ICMP);
    p
}

/// Fast filler for large buffers: proptest builds byte vectors one
/// element at a time, which is slow at 64 KB; this is a deterministic
/// stream from a seed, so shrinking the length keeps a prefix.
fn fill(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn payload(max: usize) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..=64),
        2 => (0..=1500usize, any::<u64>()).prop_map(|(n, s)| fill(n, s)),
        1 => (0..=max, any::<u64>()).prop_map(|(n, s)| fill(n, s)),
    ]
    .boxed()
}

fn addr() -> BoxedStrategy<[u8; 4]> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| [10, 244, a, b]),
        1 => select(vec![[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1], [239, 255, 255, 250], [127, 0, 0, 1]]),
        1 => any::<[u8; 4]>(),
    ]
    .boxed()
}

fn spec() -> impl Strategy<Value = Spec> {
    spec_with(payload(65_495 - 80))
}

fn spec_with(payload: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Spec> {
    let proto = prop_oneof![4 => Just(PROTO_TCP), 2 => Just(PROTO_UDP), 1 => Just(PROTO_ICMP)];
    let frag = prop_oneof![4 => Just(0x4000u16), 2 => Just(0), 1 => any::<u16>()];
    let ttl = prop_oneof![3 => Just(64u8), 1 => 0u8..=2, 1 => any::<u8>()];
    let opts = prop_oneof![4 => Just(0usize), 1 => 0usize..=10];
    let tcp_opts = prop_oneof![2 => Just(3usize), 2 => Just(0), 1 => 0usize..=10];
    let flags = prop_oneof![4 => Just(0x10u8), 2 => Just(0x18), 1 => any::<u8>()];
    let icmp = prop_oneof![Just(8u8), Just(0), Just(3), Just(11), any::<u8>()];
    (
        (proto, opts, any::<u8>(), any::<u16>(), frag, ttl, addr(), addr()),
        (any::<(u16, u16)>(), any::<u32>(), any::<u32>(), tcp_opts, flags, any::<u16>(), icmp, payload),
    )
        .prop_map(|((proto, ip_opt_words, tos, id, frag, ttl, src, dst), rest)| {
            let (ports, seq, ack, tcp_opt_words, tcp_flags, window, icmp_type, payload) = rest;
            Spec {
                proto,
                ip_opt_words,
                tos,
                id,
                frag,
                ttl,
                src,
                dst,
                ports,
                seq,
                ack,
                tcp_opt_words,
                tcp_flags,
                window,
                icmp_type,
                payload,
            }
        })
}

/// A change to a valid packet.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte (positions wrap around the length).
    Flip(usize, u8),
    /// Set a 16-bit header field (see [`FIELDS`]) to a value.
    Field(usize, u16),
    /// Keep only this many bytes (modulo the length plus one).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Fix the IPv4 header checksum, so that later checks are reached.
    FixIpChecksum,
}

/// Offsets of 16-bit fields: version/IHL and TOS, total length, fragment,
/// TTL and protocol, checksum, and (without IP options) TCP offset and
/// flags, window, checksum.
const FIELDS: [usize; 8] = [0, 2, 6, 8, 10, 32, 34, 36];

fn mutation() -> BoxedStrategy<Mutation> {
    let value = prop_oneof![
        Just(0u16),
        Just(1),
        Just(0xffff),
        Just(0x4500),
        Just(0x4f00),
        Just(0x4600),
        Just(0x0100),
        Just(0xf000),
        Just(0x5010),
        any::<u16>()
    ];
    prop_oneof![
        3 => (prop_oneof![0..64usize, any::<usize>()], 1..=255u8).prop_map(|(a, m)| Mutation::Flip(a, m)),
        3 => (0..FIELDS.len(), value).prop_map(|(f, v)| Mutation::Field(FIELDS[f], v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Extend),
        2 => Just(Mutation::FixIpChecksum),
    ]
    .boxed()
}

fn mutate(mut p: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(at, mask) if !p.is_empty() => {
                let n = p.len();
                p[at % n] ^= mask;
            }
            Mutation::Field(at, v) if at + 2 <= p.len() => p[*at..at + 2].copy_from_slice(&v.to_be_bytes()),
            Mutation::Truncate(n) => p.truncate(n % (p.len() + 1)),
            Mutation::Extend(b) => p.extend_from_slice(b),
            Mutation::FixIpChecksum => {
                if let Some(ihl) = ref_ihl(&p) {
                    p[10..12].fill(0);
                    let c = !ref_sum(&[&p[..ihl]]);
                    p[10..12].copy_from_slice(&c.to_be_bytes());
                }
            }
            _ => {}
        }
    }
    p
}

/// Arbitrary bytes: short ones byte by byte (they shrink well), long ones
/// filled from a seed, up to the largest TUN read.
fn any_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..=80),
        2 => prop::collection::vec(any::<u8>(), 0..=1600),
        1 => (0..=MAX_READ, any::<u64>()).prop_map(|(n, s)| fill(n, s)),
    ]
    .boxed()
}

/// Arbitrary bytes, valid packets, and valid packets mutated.
fn input() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => any_bytes(),
        2 => spec().prop_map(|s| build(&s)),
        3 => (spec(), prop::collection::vec(mutation(), 1..4)).prop_map(|(s, m)| mutate(build(&s), &m)),
    ]
    .boxed()
}

// ------------------------------------------------------------ properties

#[test]
fn checksum_sum_is_rfc1071() {
    let data = (any_bytes(), 0usize..8, any::<usize>());
    check("udp_checksum_sum", data, |(b, skew, cut)| {
        let b = &b[skew.min(b.len())..];
        let (s, a) = measure(|| checksum::sum(b));
        prop_assert_eq!(a, NONE);
        prop_assert_eq!(s, ref_sum(&[b]));
        // Partial sums add up when the cut falls between words.
        let cut = (cut % (b.len() + 1)) & !1;
        prop_assert_eq!(checksum::add(checksum::sum(&b[..cut]), checksum::sum(&b[cut..])), s);
        Ok(())
    });
}

#[test]
fn inbound_check_follows_the_rules() {
    check("udp_check_inbound", input(), |orig| {
        let mut p = orig.clone();
        let (verdict, a) = measure(|| packet::check_inbound(&mut p));
        prop_assert_eq!(a, NONE);
        prop_assert_eq!(packet::ipv4_header_len(&orig), ref_ihl(&orig));
        let want = match ref_ihl(&orig) {
            None => Err(Discard::Bad),
            Some(ihl) => {
                let tot = be16(&orig, 2);
                if tot < ihl || tot > orig.len() || ref_sum(&[&orig[..ihl]]) != 0xffff {
                    Err(Discard::Bad)
                } else if orig[8] <= 1 {
                    Err(Discard::TtlExpired)
                } else {
                    Ok(tot)
                }
            }
        };
        prop_assert_eq!(verdict, want);
        match verdict {
            Ok(_) => {
                prop_assert_eq!(p[8], orig[8] - 1);
                prop_assert!(ref_ip_ok(&p), "header checksum after the TTL decrement");
                let untouched = |i: usize| i != 8 && i != 10 && i != 11;
                prop_assert!((0..p.len()).filter(|i| untouched(*i)).all(|i| p[i] == orig[i]));
            }
            Err(_) => prop_assert!(p == orig, "a discarded packet was changed"),
        }
        Ok(())
    });
}

#[test]
fn net_unreachable_follows_the_rules() {
    check("udp_net_unreachable", (input(), any::<[u8; 4]>()), |(p, from)| {
        let mut out = [0u8; ICMP_ERROR_MAX];
        let (n, a) = measure(|| packet::net_unreachable(&p, from, &mut out));
        prop_assert_eq!(a, NONE);
        // RFC 1122 3.2.2: not about ICMP errors, non-first fragments, or
        // packets from or to no single host.
        let want = ref_ihl(&p).filter(|&ihl| {
            let special = |a: &[u8]| a == [0; 4] || a == [255; 4] || a[0] >> 4 == 0xe;
            let icmp_error = p[9] == PROTO_ICMP && p.get(ihl).is_none_or(|t| [3, 4, 5, 11, 12].contains(t));
            !special(&p[12..16]) && !special(&p[16..20]) && be16(&p, 6) & 0x1fff == 0 && !icmp_error
        });
        prop_assert_eq!(n.is_some(), want.is_some());
        if let (Some(n), Some(ihl)) = (n, want) {
            let quoted = p.len().min(ihl + 8);
            prop_assert_eq!(n, 28 + quoted);
            let e = &out[..n];
            prop_assert_eq!(&e[..2], &[0x45, 0][..]);
            prop_assert_eq!(be16(e, 2), n);
            prop_assert_eq!((e[8], e[9]), (64, PROTO_ICMP));
            prop_assert_eq!(&e[12..16], &from[..]);
            prop_assert_eq!(&e[16..20], &p[12..16]);
            prop_assert!(ref_ip_ok(e));
            prop_assert_eq!((e[20], e[21]), (3, 0));
            prop_assert_eq!(ref_sum(&[&e[20..]]), 0xffff, "ICMP checksum");
            prop_assert_eq!(&e[28..], &p[..quoted]);
        }
        Ok(())
    });
}

#[test]
fn vnet_header_round_trips() {
    check("udp_vnet_header", any::<[u8; vnet::LEN]>(), |b| {
        let (h, a) = measure(|| VnetHdr::decode(&b));
        prop_assert_eq!(a, NONE);
        prop_assert_eq!(h.encode(), b);
        prop_assert_eq!(VnetHdr::decode(&h.encode()), h);
        Ok(())
    });
}

/// Cuts `pkt` as the worker does and checks every segment: lengths,
/// checksums (by the reference), sequence numbers, the payload covered
/// once and in order, and no allocation.
fn check_cut(pkt: &[u8], mss: usize) -> Result<(), TestCaseError> {
    let (cut, a) = measure(|| TcpSuper::parse(pkt, mss));
    prop_assert_eq!(a, NONE);
    let want = ref_ihl(pkt).and_then(|ihl| {
        if pkt[9] != PROTO_TCP || mss == 0 || pkt.len() < ihl + 20 {
            return None;
        }
        let hl = ihl + usize::from(pkt[ihl + 12] >> 4) * 4;
        (hl >= ihl + 20 && hl < pkt.len() && hl <= MAX_HEADERS).then_some((ihl, hl))
    });
    let (cut, (ihl, hl)) = match (cut, want) {
        (Some(cut), Some(want)) => (cut, want),
        // Refusing what fits the rules is right only when a segment could
        // not be an IPv4 packet (over 65,535 bytes).
        (None, Some((_, hl))) => {
            prop_assert!(hl + mss.min(pkt.len() - hl) > 65_535, "refused a valid cut");
            return check_spread(pkt, mss, None);
        }
        (Some(_), None) => return Err(TestCaseError::fail("accepted what the rules refuse")),
        (None, None) => return check_spread(pkt, mss, None),
    };
    let mut segs = Vec::with_capacity(cut.segments());
    prop_assert_eq!(cut.header_len(), hl);
    prop_assert_eq!(cut.segments(), (pkt.len() - hl).div_ceil(mss));
    prop_assert!(cut.segment_len() <= 65_535);
    let seq0 = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let mut next = hl;
    let mut hdr = [0u8; MAX_HEADERS];
    for i in 0..cut.segments() {
        let (r, a) = measure(|| cut.segment(i, &mut hdr));
        prop_assert_eq!(a, NONE);
        prop_assert_eq!(r.start, next);
        prop_assert!(r.end > r.start && r.end - r.start <= mss && r.end <= pkt.len());
        next = r.end;
        let seg = [&hdr[..hl], &pkt[r.clone()]].concat();
        segs.push(seg.clone());
        prop_assert_eq!(be16(&seg, 2), seg.len(), "segment {} total length", i);
        prop_assert!(ref_ip_ok(&seg), "segment {} IP checksum", i);
        prop_assert!(ref_transport_ok(&seg), "segment {} TCP checksum", i);
        let seq = u32::from_be_bytes([seg[ihl + 4], seg[ihl + 5], seg[ihl + 6], seg[ihl + 7]]);
        prop_assert_eq!(seq, seq0.wrapping_add((i * mss) as u32));
        prop_assert_eq!(be16(&seg, 4), (be16(pkt, 4) + i) % 65_536, "segment {} IP identification", i);
        // FIN and PSH on the last segment only, CWR on the first only.
        let mut flags = pkt[ihl + 13];
        if i + 1 != cut.segments() {
            flags &= !0x09;
        }
        if i != 0 {
            flags &= !0x80;
        }
        prop_assert_eq!(seg[ihl + 13], flags, "segment {} flags", i);
        // Everything else of the headers is the super-packet's.
        let same = |j: usize| ![2, 3, 4, 5, 10, 11].contains(&j) && !(ihl + 4..ihl + 8).contains(&j);
        let flags = ihl + 13;
        let tcp_csum = ihl + 16..ihl + 18;
        prop_assert!((0..hl).filter(|&j| same(j) && j != flags && !tcp_csum.contains(&j)).all(|j| seg[j] == pkt[j]));
    }
    prop_assert_eq!(next, pkt.len());
    check_spread(pkt, mss, Some(&segs))
}

/// `gso::spread_in_place` lays out, back to back, exactly the segments
/// [`TcpSuper`] cuts (`want`; `None` when it refuses), given exactly the
/// room they need and without allocating; it refuses, changing nothing,
/// what `TcpSuper` refuses and a buffer one byte short.
fn check_spread(pkt: &[u8], mss: usize, want: Option<&[Vec<u8>]>) -> Result<(), TestCaseError> {
    let need = want.map_or(pkt.len(), |w| w.iter().map(Vec::len).sum());
    let mut buf = pkt.to_vec();
    buf.resize(need, 0xa5);
    let before = buf.clone();
    let (train, a) = measure(|| gso::spread_in_place(&mut buf, pkt.len(), mss));
    prop_assert_eq!(a, NONE);
    match (train, want) {
        (None, None) => prop_assert!(buf == before, "a refused spread changed the buffer"),
        (Some(t), Some(w)) => {
            prop_assert_eq!((t.segments, t.len), (w.len(), need));
            for (i, seg) in w.iter().enumerate() {
                prop_assert!(buf[t.segment(i)] == seg[..], "spread segment {} differs from the cut", i);
            }
            if w.len() > 1 {
                let mut short = pkt.to_vec();
                short.resize(need - 1, 0);
                let before = short.clone();
                prop_assert!(gso::spread_in_place(&mut short, pkt.len(), mss).is_none(), "spread without room");
                prop_assert!(short == before, "a spread without room changed the buffer");
            }
        }
        (t, w) => {
            let msg = format!("spread {} where the cut {}", t.is_some(), w.is_some());
            return Err(TestCaseError::fail(msg));
        }
    }
    Ok(())
}

/// Sizes a TUN's super-packet is cut to: small, usual, and the extremes.
fn mss() -> BoxedStrategy<usize> {
    prop_oneof![
        2 => 1usize..=64,
        3 => select(vec![536usize, 1380, 1420, 1448, 8948]),
        2 => 0usize..=65_535,
        1 => select(vec![0usize, 65_415, 65_535]),
    ]
    .boxed()
}

#[test]
fn super_packets_cut_into_valid_segments() {
    let tcp = spec()
        .prop_map(|mut s| {
            s.proto = PROTO_TCP;
            build(&s)
        })
        .boxed();
    // Reads longer than an IPv4 packet can be: the TUN buffer has room.
    let oversized =
        (spec_with((60_000..=65_415usize, any::<u64>()).prop_map(|(n, s)| fill(n, s)).boxed()), 0..=100usize).prop_map(
            |(mut s, extra)| {
                s.proto = PROTO_TCP;
                let mut p = build(&s);
                p.extend(fill((MAX_READ - p.len()).min(extra * 656), extra as u64));
                p
            },
        );
    let pkt = prop_oneof![
        3 => tcp.clone(),
        2 => (tcp, prop::collection::vec(mutation(), 1..4)).prop_map(|(p, m)| mutate(p, &m)),
        1 => oversized,
        1 => input(),
    ];
    check("udp_tcp_super_cut", (pkt, mss()), |(p, mss)| check_cut(&p, mss));
}

/// A virtio header as the kernel writes them, and arbitrary ones.
fn vnet_hdr() -> BoxedStrategy<VnetHdr> {
    let kernel = (0u8..3, mss(), prop_oneof![Just(0u8), Just(vnet::GSO_ECN)]).prop_map(|(k, mss, ecn)| match k {
        0 => VnetHdr::default(),
        1 => VnetHdr { flags: vnet::F_NEEDS_CSUM, ..VnetHdr::default() },
        _ => VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV4 | ecn,
            gso_size: mss as u16,
            ..VnetHdr::default()
        },
    });
    prop_oneof![3 => kernel, 1 => any::<[u8; vnet::LEN]>().prop_map(|b| VnetHdr::decode(&b))].boxed()
}

#[test]
fn tun_reads_are_prepared_by_the_rules() {
    let read = (input(), vnet_hdr(), any::<bool>()).prop_map(|(mut p, mut h, kernel_csum)| {
        // As the kernel leaves it with F_NEEDS_CSUM: the offsets of the
        // transport checksum, which holds the pseudo-header sum.
        if kernel_csum && h.flags & vnet::F_NEEDS_CSUM != 0 {
            if let Some(ihl) = ref_ihl(&p) {
                let field = if p[9] == PROTO_UDP { 6 } else { 16 };
                let tot = be16(&p, 2);
                if ihl + field + 2 <= tot.min(p.len()) && tot >= ihl {
                    let ps = ref_sum(&[&pseudo(&p, p[9], tot - ihl)]);
                    p[ihl + field..ihl + field + 2].copy_from_slice(&ps.to_be_bytes());
                    (h.csum_start, h.csum_offset) = (ihl as u16, field as u16);
                }
            }
        }
        (p, h)
    });
    check("udp_prepare_outbound", read, |(orig, h)| {
        let mut p = orig.clone();
        let (out, a) = measure(|| {
            gso::prepare_outbound(&mut p, h).map(|o| match o {
                Outbound::Single(s) => Ok(s.len()),
                Outbound::Super(c) => Err((c.header_len(), c.segments())),
            })
        });
        prop_assert_eq!(a, NONE);
        let Some(ihl) = ref_ihl(&orig) else {
            prop_assert_eq!(out, Err(Discard::Bad));
            return Ok(());
        };
        match h.gso_type & !vnet::GSO_ECN {
            vnet::GSO_NONE => {
                let tot = be16(&orig, 2);
                let (start, offset) = (usize::from(h.csum_start), usize::from(h.csum_offset));
                let needs = h.flags & vnet::F_NEEDS_CSUM != 0;
                if tot < ihl || tot > orig.len() || (needs && start + offset + 2 > tot) {
                    prop_assert_eq!(out, Err(Discard::Bad));
                    return Ok(());
                }
                // What it should be: the checksum completed (it may even
                // land on the TTL: the offsets come from outside), then
                // the TTL decremented.
                let mut want = orig[..tot].to_vec();
                if needs {
                    let c = !ref_sum(&[&want[start..]]);
                    let c = if c == 0 && offset == 6 && want[9] == PROTO_UDP { 0xffff } else { c };
                    want[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
                }
                if want[8] <= 1 {
                    prop_assert_eq!(out, Err(Discard::TtlExpired));
                    return Ok(());
                }
                prop_assert_eq!(out, Ok(Ok(tot)));
                prop_assert_eq!(p[8], want[8] - 1);
                prop_assert!((0..tot).filter(|i| ![8, 10, 11].contains(i)).all(|i| p[i] == want[i]));
                // The IP header checksum is patched, not recomputed: it
                // verifies after if it did before. (`ihl` as read first:
                // the completed checksum may even land on the IHL.)
                let ip_ok = |b: &[u8]| ref_sum(&[&b[..ihl]]) == 0xffff;
                prop_assert_eq!(ip_ok(&p), ip_ok(&want));
                // Asked as the kernel asks (from the transport header, the
                // field holding the pseudo-header sum), it verifies.
                let transport = (offset == 16 && orig[9] == PROTO_TCP) || (offset == 6 && orig[9] == PROTO_UDP);
                let kernel = needs
                    && transport
                    && start == ihl
                    && be16(&orig, start + offset) == usize::from(ref_sum(&[&pseudo(&orig, orig[9], tot - ihl)]));
                if kernel {
                    prop_assert!(ref_transport_ok(&p[..tot]), "completed checksum does not verify");
                }
            }
            vnet::GSO_TCPV4 => {
                if orig[8] <= 1 {
                    prop_assert_eq!(out, Err(Discard::TtlExpired));
                    return Ok(());
                }
                prop_assert_eq!(p[8], orig[8] - 1);
                check_cut(&p, usize::from(h.gso_size))?;
                match TcpSuper::parse(&p, usize::from(h.gso_size)) {
                    Some(c) => prop_assert_eq!(out, Ok(Err((c.header_len(), c.segments())))),
                    None => prop_assert_eq!(out, Err(Discard::Bad)),
                }
            }
            _ => prop_assert_eq!(out, Err(Discard::Bad)),
        }
        Ok(())
    });
}

/// `complete_checksum` with any offsets (the virtio header's, which the
/// kernel writes but which a parser must not trust) on any bytes.
#[test]
fn completing_a_checksum_stays_in_the_packet() {
    // Often with the field set so that the sum comes out zero: the case a
    // UDP checksum is special in.
    // Offsets mostly as the kernel sets them (TCP's 16, UDP's 6), and as
    // often on packets shorter than an IP header as on longer ones.
    let bytes = prop_oneof![prop::collection::vec(any::<u8>(), 0..=24), any_bytes()];
    let start = prop_oneof![0u16..=2, 20u16..=24, any::<u16>()];
    let offset = prop_oneof![Just(6usize), Just(16), 0usize..24];
    let input = (bytes, start, offset, any::<bool>()).prop_map(|(mut b, start, offset, zero)| {
        let start = usize::from(start) % (b.len() + 3);
        let at = start + offset;
        if zero && at + 2 <= b.len() {
            b[at..at + 2].fill(0);
            let c = !ref_sum(&[&b[start..]]);
            b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        (b, start, offset)
    });
    check("udp_complete_checksum", input, |(orig, start, offset)| {
        let mut p = orig.clone();
        let (done, a) = measure(|| gso::complete_checksum(&mut p, start, offset));
        prop_assert_eq!(a, NONE);
        let at = start + offset;
        prop_assert_eq!(done, at + 2 <= orig.len());
        if !done {
            prop_assert!(p == orig, "refused, yet changed the packet");
            return Ok(());
        }
        prop_assert!(
            (0..p.len()).filter(|i| *i != at && *i != at + 1).all(|i| p[i] == orig[i]),
            "changed beyond the field"
        );
        // The complement of the sum from `start` (the field holding what
        // the kernel left there); in UDP a zero is sent as all ones.
        let want = !ref_sum(&[&orig[start..]]);
        let udp_zero = want == 0 && offset == 6 && orig.get(9) == Some(&PROTO_UDP);
        prop_assert_eq!(be16(&p, at), if udp_zero { 0xffff } else { usize::from(want) });
        Ok(())
    });
}

// -------------------------------------------------------------- coalescer

/// A packet the coalescer put out: the virtio header of a merged one, and
/// its bytes.
type Emitted = (Option<VnetHdr>, Vec<u8>);

/// An emit as recorded: a merged packet's virtio header, its IP and TCP
/// header, and the pieces.
type Recorded = (Option<[u8; vnet::LEN]>, Vec<u8>, Vec<Pkt>);

/// Feeds `packets` (each its own buffer) to a coalescer and returns what
/// came out, merged packets rebuilt as bytes with their virtio header.
/// Checks on the way that nothing allocates and every input comes out
/// exactly once.
fn coalesce(packets: &[Vec<u8>]) -> Result<Vec<Emitted>, TestCaseError> {
    let mut c = Coalescer::new();
    // Room for every emit, so that recording them does not allocate.
    let mut emitted: Vec<Recorded> = Vec::with_capacity(packets.len() + MAX_FLOWS);
    let mut spare: Vec<(Vec<u8>, Vec<Pkt>)> = (0..packets.len() + MAX_FLOWS)
        .map(|_| (Vec::with_capacity(MAX_HEADERS), Vec::with_capacity(MAX_SEGMENTS)))
        .collect();
    let mut record = |e: Emit<'_>| {
        let (mut h, mut pieces) = spare.pop().expect("one spare per emit");
        match e {
            Emit::Single(p) => {
                pieces.push(p);
                emitted.push((None, h, pieces));
            }
            Emit::Super { vnet, header, payloads } => {
                h.extend_from_slice(header);
                pieces.extend_from_slice(payloads);
                emitted.push((Some(vnet), h, pieces));
            }
        }
    };
    let ((), a) = measure(|| {
        for (i, p) in packets.iter().enumerate() {
            c.push(Pkt { buf: i as u16, off: 0, len: p.len() as u32 }, p, &mut record);
        }
        c.flush(&mut record);
    });
    prop_assert_eq!(a, NONE, "the coalescer allocated");
    let mut seen = vec![0; packets.len()];
    let mut out = Vec::new();
    for (vnet, header, pieces) in emitted {
        let bytes = |p: &Pkt| &packets[usize::from(p.buf)][p.off as usize..][..p.len as usize];
        for p in &pieces {
            prop_assert!(p.off as usize + p.len as usize <= packets[usize::from(p.buf)].len());
            seen[usize::from(p.buf)] += 1;
        }
        match vnet {
            None => {
                prop_assert_eq!(pieces.len(), 1);
                let whole = packets[usize::from(pieces[0].buf)].len();
                prop_assert_eq!((pieces[0].off, pieces[0].len as usize), (0, whole), "a single packet is whole");
                out.push((None, bytes(&pieces[0]).to_vec()));
            }
            Some(v) => {
                prop_assert!(pieces.len() >= 2 && pieces.len() <= MAX_SEGMENTS);
                let mut b = header;
                for p in &pieces {
                    b.extend_from_slice(bytes(p));
                }
                out.push((Some(VnetHdr::decode(&v)), b));
            }
        }
    }
    prop_assert!(seen.iter().all(|n| *n == 1), "inputs out other than once: {seen:?}");
    Ok(out)
}

#[test]
fn coalescer_takes_anything() {
    check("udp_gro_any_input", prop::collection::vec(input(), 0..24), |packets| {
        let packets: Vec<Vec<u8>> = packets
            .into_iter()
            .map(|mut p| {
                p.truncate(65_535);
                p
            })
            .collect();
        coalesce(&packets).map(drop)
    });
}

/// A TCP flow's segments as the sender's TSO cut them.
#[derive(Debug, Clone)]
struct Flow {
    spec: Spec,
    mss: usize,
    /// Payload bytes of each super-packet the sender wrote.
    writes: Vec<(usize, u8)>,
}

fn flow() -> impl Strategy<Value = Flow> {
    // ACK, ACK|PSH, ACK|FIN, ACK|CWR, SYN|ACK.
    let flags = prop_oneof![Just(0x10u8), Just(0x18), Just(0x11), Just(0x90), Just(0x12)];
    let writes = prop::collection::vec((1usize..=20_000, flags), 1..4);
    let mss = prop_oneof![Just(1448usize), Just(1420), 64usize..=2000];
    (spec_with(Just(Vec::new()).boxed()), mss, writes).prop_map(|(mut spec, mss, writes)| {
        spec.proto = PROTO_TCP;
        spec.ip_opt_words = 0;
        spec.frag = 0x4000;
        spec.ttl = spec.ttl.max(2);
        Flow { spec, mss, writes }
    })
}

/// The segments of a flow, in order.
fn segments(f: &Flow) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seq = f.spec.seq;
    for (n, (len, flags)) in f.writes.iter().enumerate() {
        let mut s = f.spec.clone();
        s.seq = seq;
        s.tcp_flags = *flags;
        s.id = f.spec.id.wrapping_add(n as u16 * 100);
        s.payload = fill(*len, u64::from(seq));
        let sup = build(&s);
        let cut = TcpSuper::parse(&sup, f.mss).expect("a valid super-packet");
        for i in 0..cut.segments() {
            let mut h = [0u8; MAX_HEADERS];
            let r = cut.segment(i, &mut h);
            out.push([&h[..cut.header_len()], &sup[r]].concat());
        }
        seq = seq.wrapping_add(*len as u32);
    }
    out
}

/// A packet's bytes, but for the fields a merge and a re-cut may change:
/// the IP identification and both checksums.
fn comparable(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    p[4..6].fill(0);
    p[10..12].fill(0);
    p[36..38].fill(0);
    p
}

#[test]
fn coalescing_then_cutting_gives_back_each_flow() {
    // Flows (more than it merges at once), how their segments interleave,
    // and segments lost or repeated on the way.
    let run = (
        prop::collection::vec(flow(), 1..=MAX_FLOWS + 2),
        prop::collection::vec(any::<usize>(), 0..400),
        prop::collection::vec((any::<usize>(), any::<bool>()), 0..4),
    );
    check("udp_gro_round_trip", run, |(flows, order, faults)| {
        let mut queues: Vec<std::collections::VecDeque<Vec<u8>>> = flows.iter().map(|f| segments(f).into()).collect();
        // Ports tell flows apart.
        for (i, q) in queues.iter_mut().enumerate() {
            for p in q.iter_mut() {
                p[20..22].copy_from_slice(&(i as u16).to_be_bytes());
                ref_fill(p, 20, 16, true);
            }
        }
        let mut wire = Vec::new();
        let mut pick = order.into_iter();
        while queues.iter().any(|q| !q.is_empty()) {
            let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
            let i = live[pick.next().unwrap_or(0) % live.len()];
            wire.push(queues[i].pop_front().unwrap());
        }
        for (at, repeat) in faults {
            let at = at % wire.len();
            if repeat {
                let p = wire[at].clone();
                wire.insert(at, p);
            } else if wire.len() > 1 {
                wire.remove(at);
            }
        }
        wire.truncate(4000);
        // What the worker hands the coalescer: checked, TTL decremented.
        let mut sent = Vec::new();
        for mut p in wire {
            let tot = packet::check_inbound(&mut p).map_err(|d| TestCaseError::fail(format!("{d:?}")))?;
            p.truncate(tot);
            sent.push(p);
        }
        let flow_of = |p: &[u8]| be16(p, 20);
        let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); flows.len()];
        for (vnet, bytes) in coalesce(&sent)? {
            prop_assert_eq!(be16(&bytes, 2), bytes.len(), "total length");
            prop_assert!(ref_ip_ok(&bytes));
            match vnet {
                None => got[flow_of(&bytes)].push(bytes),
                Some(v) => {
                    prop_assert_eq!(v.flags, vnet::F_NEEDS_CSUM);
                    prop_assert_eq!(v.gso_type, vnet::GSO_TCPV4);
                    prop_assert_eq!((v.csum_start, v.csum_offset), (20, 16));
                    let hl = usize::from(v.hdr_len);
                    prop_assert_eq!(hl, 20 + usize::from(bytes[32] >> 4) * 4);
                    // What the kernel does with it: finish the checksum...
                    let mut done = bytes.clone();
                    prop_assert!(gso::complete_checksum(&mut done, 20, 16));
                    prop_assert!(ref_transport_ok(&done), "merged packet's checksum");
                    // ... and cut it again at gso_size.
                    let cut = TcpSuper::parse(&done, usize::from(v.gso_size));
                    prop_assert!(cut.is_some(), "kernel could not cut {:?}", v);
                    let cut = cut.unwrap();
                    for i in 0..cut.segments() {
                        let mut h = [0u8; MAX_HEADERS];
                        let r = cut.segment(i, &mut h);
                        got[flow_of(&bytes)].push([&h[..hl], &done[r]].concat());
                    }
                }
            }
        }
        for (i, got) in got.iter().enumerate() {
            let want: Vec<Vec<u8>> = sent.iter().filter(|p| flow_of(p) == i).map(|p| comparable(p)).collect();
            let got: Vec<Vec<u8>> = got.iter().map(|p| comparable(p)).collect();
            prop_assert!(got == want, "flow {} differs: {} packets out, {} in", i, got.len(), want.len());
        }
        Ok(())
    });
}

// ------------------------------------------------------- every length

/// Every length from 0 to the largest TUN read, of a TCP packet whose
/// length fields say that length: each parser on each, without copies.
#[test]
fn every_length_up_to_the_largest_read() {
    let s = Spec {
        proto: PROTO_TCP,
        ip_opt_words: 0,
        tos: 0,
        id: 7,
        frag: 0x4000,
        ttl: 64,
        src: [10, 244, 1, 2],
        dst: [10, 244, 2, 3],
        ports: (40000, 5201),
        seq: 1,
        ack: 2,
        tcp_opt_words: 3,
        tcp_flags: 0x10,
        window: 500,
        icmp_type: 0,
        payload: fill(MAX_READ - 52, 9),
    };
    let mut buf = build(&s);
    let mut out = [0u8; ICMP_ERROR_MAX];
    let mut coalescer = Coalescer::new();
    let mut hdr = [0u8; MAX_HEADERS];
    for len in 0..=MAX_READ {
        if len >= 4 {
            buf[2..4].copy_from_slice(&(len.min(65_535) as u16).to_be_bytes());
        }
        if len >= 20 {
            ref_fill_ip(&mut buf[..20]);
        }
        let p = &mut buf[..len];
        let ((), a) = measure(|| {
            // The length field says `len` (65,535 beyond: padding follows).
            assert_eq!(packet::check_inbound(p).is_ok(), len >= 20, "length {len}");
            let _ = packet::net_unreachable(p, [10, 244, 0, 0], &mut out);
            let cut = TcpSuper::parse(p, 1448);
            assert_eq!(cut.is_some(), len > 52, "length {len}");
            if let Some(cut) = cut {
                cut.segment(0, &mut hdr);
                cut.segment(cut.segments() - 1, &mut hdr);
            }
            let gso = VnetHdr { gso_type: vnet::GSO_TCPV4, gso_size: 1448, ..VnetHdr::default() };
            let _ = gso::prepare_outbound(p, gso);
            coalescer.push(Pkt { buf: 0, off: 0, len: len as u32 }, p, &mut |_: Emit<'_>| {});
        });
        assert_eq!(a, NONE, "length {len}");
        if len > 8 {
            // The TTL back to where it was; the checksum is redone above.
            buf[8] = 64;
        }
    }
    coalescer.flush(&mut |_: Emit<'_>| {});
}
