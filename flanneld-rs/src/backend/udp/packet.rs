//! IPv4 header work on raw packets: the checks, the TTL decrement and the
//! ICMP error that flannel's udp mode performs, as small pure functions over
//! byte slices (no allocation, no copies beyond what is asked for).

use std::net::SocketAddrV4;

use super::checksum;

/// IP protocol numbers the data path looks at.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;

/// Length of an IPv4 header without options.
pub const IPV4_HEADER: usize = 20;

/// An IPv6 header without extension headers (the wireguard backend's
/// `flannel-wg-v6`; its payload length covers any that follow).
pub const IPV6_HEADER: usize = 40;

/// Largest ICMP error we build: IPv4 header, ICMP header, and the offender's
/// header with options (60) plus 8 bytes of its payload.
pub const ICMP_ERROR_MAX: usize = IPV4_HEADER + 8 + 60 + 8;

/// The header length of the IPv4 packet at the start of `pkt`, when it is
/// one: version 4, a header length of at least 20 bytes that fits in `pkt`.
pub fn ipv4_header_len(pkt: &[u8]) -> Option<usize> {
    let first = *pkt.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && ihl >= IPV4_HEADER && pkt.len() >= ihl).then_some(ihl)
}

/// Why a packet is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Malformed: not IPv4, a bad header, lengths that do not add up.
    Bad,
    /// Its TTL ran out here.
    TtlExpired,
}

/// Checks an inner packet that arrived from a peer (the bytes of one UDP
/// datagram, or of one segment of a GRO train) and decrements its TTL, as
/// flannel does on this side too. Returns its length: the datagram may
/// carry padding after the IP packet. A discarded packet is left unchanged.
pub fn check_inbound(p: &mut [u8]) -> Result<usize, Discard> {
    let ihl = ipv4_header_len(p).ok_or(Discard::Bad)?;
    let tot = total_len(p);
    if tot < ihl || tot > p.len() || !header_checksum_ok(p, ihl) {
        return Err(Discard::Bad);
    }
    if !decrement_ttl(p) {
        return Err(Discard::TtlExpired);
    }
    Ok(tot)
}

// The accessors below read fixed offsets of the IPv4 header: they need at
// least 20 bytes, which `ipv4_header_len` returning `Some` guarantees, and
// panic on less.

/// The total-length field.
pub fn total_len(pkt: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
}

/// The destination address, as a host-order integer.
pub fn dst(pkt: &[u8]) -> u32 {
    u32::from_be_bytes([pkt[16], pkt[17], pkt[18], pkt[19]])
}

/// The source address, as a host-order integer.
pub fn src(pkt: &[u8]) -> u32 {
    u32::from_be_bytes([pkt[12], pkt[13], pkt[14], pkt[15]])
}

/// The protocol field.
pub fn protocol(pkt: &[u8]) -> u8 {
    pkt[9]
}

/// Whether the packet is a fragment (more fragments follow, or it does not
/// start at offset 0).
pub fn is_fragment(pkt: &[u8]) -> bool {
    u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0
}

/// Whether the header checksum over the first `ihl` bytes is right
/// (`ihl` as `ipv4_header_len` returns it: within `pkt`).
pub fn header_checksum_ok(pkt: &[u8], ihl: usize) -> bool {
    checksum::sum(&pkt[..ihl]) == 0xffff
}

/// Recomputes the header checksum over the first `ihl` bytes.
pub fn set_header_checksum(hdr: &mut [u8], ihl: usize) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = checksum::finish(checksum::sum(&hdr[..ihl]));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Decrements the TTL as a router does, patching the header checksum
/// incrementally (RFC 1624). Returns false, leaving the packet unchanged,
/// when the TTL would reach zero: flannel discards such packets (both
/// directions) without an ICMP time-exceeded, and so do we. A TTL of 0 on
/// arrival (which flannel's C code would wrap to 255) is treated as expired.
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt[8] <= 1 {
        return false;
    }
    pkt[8] -= 1;
    // The 16-bit word holding TTL and protocol went down by 0x0100: in one's
    // complement, HC' = ~(~HC + ~m + m') = ~(~HC + 0xfeff).
    let old = u16::from_be_bytes([pkt[10], pkt[11]]);
    let new = !checksum::add(!old, 0xfeff);
    pkt[10..12].copy_from_slice(&new.to_be_bytes());
    true
}

/// ICMP types that are error messages: no error is ever sent about them
/// (RFC 1122, 3.2.2), which also rules out loops between two routers.
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Builds into `out` the ICMP "destination net unreachable" (type 3, code 0)
/// that flannel's udp mode writes back into the TUN for a packet no peer
/// owns: from `from` to the offender's source, quoting the offender's IP
/// header and first 8 bytes of payload.
/// Returns its length, or `None` when no error may be sent about `offender`:
/// a non-first fragment (as flannel), an ICMP error message, a packet from
/// 0.0.0.0, multicast or broadcast, or to multicast or broadcast (RFC 1122).
///
/// flannel also stays silent about ICMP *queries* such as echo requests, so
/// `ping` to an unknown subnet just times out there; we answer them as the
/// kernel does (RFC 1122 allows it), so `ping` reports "Destination Net
/// Unreachable". The TTL is 64 (the kernel's default; flannel uses 8).
pub fn net_unreachable(offender: &[u8], from: [u8; 4], out: &mut [u8; ICMP_ERROR_MAX]) -> Option<usize> {
    let ihl = ipv4_header_len(offender)?;
    let (s, d) = (src(offender), dst(offender));
    let special = |a: u32| a == 0 || a == u32::MAX || (a >> 28) == 0xe;
    if special(s) || special(d) {
        return None;
    }
    if u16::from_be_bytes([offender[6], offender[7]]) & 0x1fff != 0 {
        return None;
    }
    if protocol(offender) == PROTO_ICMP && offender.get(ihl).is_none_or(|t| is_icmp_error(*t)) {
        return None;
    }
    let quoted = offender.len().min(ihl + 8);
    let len = IPV4_HEADER + 8 + quoted;
    out[..len].fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&from);
    out[16..20].copy_from_slice(&offender[12..16]);
    set_header_checksum(out, IPV4_HEADER);
    let icmp = &mut out[IPV4_HEADER..len];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 0; // net unreachable
    icmp[8..].copy_from_slice(&offender[..quoted]);
    let c = checksum::finish(checksum::sum(icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// An IPv4/UDP packet from `src:sport` to `dst:dport` carrying `payload`
/// (TTL 64, no UDP checksum): for tests and tools that forge traffic.
pub fn build_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, PROTO_UDP, 0, 0];
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(len - 20).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    set_header_checksum(&mut p, 20);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0xab, 0xcd, 0x40, 0, ttl, proto, 0, 0, 10, 244, 1, 2, 10, 99, 0, 5];
        p.extend_from_slice(payload);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        set_header_checksum(&mut p, 20);
        p
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_right() {
        for ttl in 2..=255u8 {
            let mut p = packet(PROTO_TCP, ttl, &[1, 2, 3, 4]);
            assert!(decrement_ttl(&mut p));
            assert_eq!(p[8], ttl - 1);
            assert!(header_checksum_ok(&p, 20), "ttl {ttl}");
        }
    }

    #[test]
    fn ttl_one_or_zero_is_expired_and_untouched() {
        for ttl in [0u8, 1] {
            let mut p = packet(PROTO_UDP, ttl, &[]);
            let before = p.clone();
            assert!(!decrement_ttl(&mut p));
            assert_eq!(p, before);
        }
    }

    #[test]
    fn net_unreachable_quotes_the_offender() {
        let p = packet(PROTO_TCP, 63, &[0, 80, 0x1f, 0x90, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut out = [0u8; ICMP_ERROR_MAX];
        let n = net_unreachable(&p, [10, 244, 1, 0], &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let icmp = &out[..n];
        assert!(header_checksum_ok(icmp, 20));
        assert_eq!(&icmp[12..16], &[10, 244, 1, 0]);
        assert_eq!(&icmp[16..20], &[10, 244, 1, 2]);
        assert_eq!((icmp[20], icmp[21]), (3, 0));
        assert_eq!(checksum::sum(&icmp[20..]), 0xffff);
        assert_eq!(&icmp[28..], &p[..28]);
    }

    #[test]
    fn no_error_about_errors_fragments_or_broadcasts() {
        let mut out = [0u8; ICMP_ERROR_MAX];
        let err = packet(PROTO_ICMP, 64, &[3, 1, 0, 0, 0, 0, 0, 0]);
        assert!(net_unreachable(&err, [10, 244, 1, 0], &mut out).is_none());
        let echo = packet(PROTO_ICMP, 64, &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert!(net_unreachable(&echo, [10, 244, 1, 0], &mut out).is_some());
        let mut frag = packet(PROTO_UDP, 64, &[0; 8]);
        frag[6..8].copy_from_slice(&185u16.to_be_bytes());
        assert!(net_unreachable(&frag, [10, 244, 1, 0], &mut out).is_none());
        let mut bcast = packet(PROTO_UDP, 64, &[0; 8]);
        bcast[16..20].copy_from_slice(&[255; 4]);
        assert!(net_unreachable(&bcast, [10, 244, 1, 0], &mut out).is_none());
    }
}
