//! One module per CNI verb, and what they share.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

use std::io;

use flannel_net::netns::NetNs;
use flannel_net::subnet_env::{SubnetEnv, SubnetEnvError};
use ipnet::IpNet;

use crate::error::{code, CniError};
use crate::ipam::Range;

/// The host-side veth's name for an attachment: `veth` and 11 hex digits of a
/// hash of container ID and interface name. Deterministic, so DEL and GC find
/// it without a prevResult and without entering the pod's namespace.
pub fn veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: tiny, stable across releases, and well spread.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veth{:011x}", h >> 20)
}

/// Loads the lease. A missing file means the node's daemon has not written it
/// yet, which clears up by itself: code 11 so the runtime retries.
pub fn load_lease(path: &std::path::Path) -> Result<SubnetEnv, CniError> {
    SubnetEnv::load(path).map_err(|e| {
        let c = match &e {
            SubnetEnvError::Missing { .. } => code::TRY_AGAIN,
            SubnetEnvError::Io { .. } => code::IO,
            _ => code::INVALID_CONFIG,
        };
        CniError::new(c, e.to_string())
    })
}

/// The pod address ranges of the lease, IPv4 first, numbered as host-local
/// numbers the range sets flannel's plugin hands it (see
/// [`crate::delegate::build`]): IPv6 is set 1 beside IPv4, set 0 alone.
pub fn ranges(lease: &SubnetEnv) -> Vec<Range> {
    let v4 = lease.subnet.map(IpNet::V4);
    let v6 = lease.ipv6_subnet.map(IpNet::V6);
    v4.into_iter().chain(v6).enumerate().map(|(set, s)| Range::from_lease(s, set)).collect()
}

/// The cluster networks of the lease.
pub fn networks(lease: &SubnetEnv) -> Vec<IpNet> {
    let v4 = lease.networks.iter().map(|n| IpNet::V4(*n));
    let v6 = lease.ipv6_networks.iter().map(|n| IpNet::V6(*n));
    v4.chain(v6).collect()
}

/// Opens the pod's namespace. An absent one is "unknown container" (code 3).
pub fn open_netns(path: &str) -> Result<NetNs, CniError> {
    NetNs::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CniError::new(code::UNKNOWN_CONTAINER, format!("CNI_NETNS={path}: no such network namespace"))
        } else {
            CniError::new(code::IO, format!("CNI_NETNS={path}: open: {e}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_distinct_and_short() {
        let a = veth_name("abc", "eth0");
        assert_eq!(a, veth_name("abc", "eth0"));
        assert_ne!(a, veth_name("abc", "eth1"));
        assert_ne!(a, veth_name("abd", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veth"));
    }
}
