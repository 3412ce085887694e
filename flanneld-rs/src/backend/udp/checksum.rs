//! The Internet checksum (RFC 1071): the one's-complement sum of 16-bit
//! big-endian words.
//!
//! Sums are kept as folded, *not yet complemented* 16-bit values in network
//! word order, so that partial sums of a pseudo-header, a TCP header and a
//! payload slice can be added up with [`add`] and finished with [`finish`].
//! The bulk loop reads native-endian 32-bit words into 64-bit accumulators,
//! which the compiler vectorises; the one's-complement sum is independent of
//! byte order up to a final byte swap (RFC 1071, section 2(B)).

/// One's-complement sum of `data`, folded to 16 bits, in network word order.
/// An odd trailing byte counts as the high byte of a last word.
pub fn sum(data: &[u8]) -> u16 {
    let mut acc = [0u64; 4];
    let mut blocks = data.chunks_exact(16);
    for b in &mut blocks {
        acc[0] += u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        acc[1] += u64::from(u32::from_ne_bytes([b[4], b[5], b[6], b[7]]));
        acc[2] += u64::from(u32::from_ne_bytes([b[8], b[9], b[10], b[11]]));
        acc[3] += u64::from(u32::from_ne_bytes([b[12], b[13], b[14], b[15]]));
    }
    let mut total = acc[0] + acc[1] + acc[2] + acc[3];
    let mut words = blocks.remainder().chunks_exact(2);
    for w in &mut words {
        total += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        total += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    // Native order to network order: a no-op on big-endian machines.
    u16::from_be(fold(total))
}

/// Folds a wide one's-complement accumulator to 16 bits.
pub fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// One's-complement addition of two folded sums.
pub fn add(a: u16, b: u16) -> u16 {
    fold(u64::from(a) + u64::from(b))
}

/// The checksum field's value for a folded sum.
pub fn finish(s: u16) -> u16 {
    !s
}

/// Folded sum of the IPv4 pseudo-header of a transport segment: source,
/// destination, protocol and the segment's length (header and payload).
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u16 {
    let w = |b: [u8; 2]| u64::from(u16::from_be_bytes(b));
    fold(
        w([src[0], src[1]])
            + w([src[2], src[3]])
            + w([dst[0], dst[1]])
            + w([dst[2], dst[3]])
            + u64::from(proto)
            + u64::from(len),
    )
}

/// Folded sum of the IPv6 pseudo-header (RFC 8200, section 8.1): source,
/// destination, upper-layer length and next header.
pub fn pseudo_header6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> u16 {
    add(add(sum(&src), sum(&dst)), fold(u64::from(len >> 16) + u64::from(len & 0xffff) + u64::from(proto)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_pseudo_header_is_the_sum_of_its_fields() {
        let src: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        let dst: [u8; 16] = std::array::from_fn(|i| 255 - i as u8);
        let mut block = Vec::new();
        block.extend_from_slice(&src);
        block.extend_from_slice(&dst);
        block.extend_from_slice(&70_000u32.to_be_bytes());
        block.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(pseudo_header6(src, dst, 6, 70_000), reference(&block));
    }

    /// Straight from RFC 1071's definition, for comparison.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for w in data.chunks(2) {
            let hi = u64::from(w[0]) << 8;
            let lo = w.get(1).copied().map(u64::from).unwrap_or(0);
            s += hi | lo;
        }
        fold(s)
    }

    #[test]
    fn matches_the_definition_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for start in 0..4 {
            for len in 0..(data.len() - start) {
                let d = &data[start..start + len];
                assert_eq!(sum(d), reference(d), "start {start} len {len}");
            }
        }
    }

    #[test]
    fn partial_sums_add_up() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        // Split at even offsets only: words must not straddle the split.
        for cut in (0..data.len()).step_by(2) {
            assert_eq!(add(sum(&data[..cut]), sum(&data[cut..])), sum(&data));
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        assert_eq!(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    #[test]
    fn a_header_with_its_checksum_sums_to_all_ones() {
        let mut h = [0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2];
        let c = finish(sum(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(sum(&h), 0xffff);
    }
}
