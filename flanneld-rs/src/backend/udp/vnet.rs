//! The `virtio_net_hdr` that prefixes every packet on a TUN opened with
//! `IFF_VNET_HDR` (`include/uapi/linux/virtio_net.h`): how the kernel hands us
//! a TCP super-packet with its checksum still to do, and how we hand it one.

/// Its size: we set it with `TUNSETVNETHDRSZ` (the device remembers the
/// size across opens, so we never rely on the default).
pub const LEN: usize = 10;

/// `flags`: the checksum from `csum_start` to the end is still to be
/// computed, and stored at `csum_start + csum_offset` (the field holds the
/// pseudo-header sum meanwhile).
pub const F_NEEDS_CSUM: u8 = 1;

/// `gso_type`: a single packet.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: an IPv4 TCP super-packet to be cut into `gso_size` payloads.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: an IPv6 TCP super-packet (the wireguard backend's
/// `flannel-wg-v6`).
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` flag: the sender uses ECN (we do not enable `TUN_F_TSO_ECN`,
/// so the kernel should never set it; we tolerate it).
pub const GSO_ECN: u8 = 0x80;

/// A decoded header. The TUN uses the host's byte order (the "legacy"
/// virtio layout, unless `TUNSETVNETLE`/`BE` were called, which we never do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` or 0.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (IP and TCP) of a super-packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-packet.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decodes a header (an array, so that a short read cannot reach here).
    pub fn decode(b: &[u8; LEN]) -> VnetHdr {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) }
    }

    /// Encodes into [`LEN`] bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VnetHdr { flags: 1, gso_type: 1, hdr_len: 52, gso_size: 1420, csum_start: 20, csum_offset: 16 };
        assert_eq!(VnetHdr::decode(&h.encode()), h);
    }
}
