//! Per-pod masquerade (`delegate.ipMasq`), in our own nftables table.
//!
//! The table holds one rule per family: traffic from a pod in the `pods` set to
//! anywhere outside the cluster networks (and not multicast) is masqueraded.
//! ADD adds the pod's address to the set and DEL removes it, so the rule never
//! changes per pod and each change is one atomic `nft -f` transaction. This only
//! runs when the daemon does not masquerade (`FLANNEL_IPMASQ=false`) or the
//! configuration asks for it: flannel's default setup never pays for the exec.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::{code, CniError};

/// Our nftables table (one per family: `ip` and `ip6`).
pub const TABLE: &str = "flannel-rs-cni";

fn family(v4: bool) -> (&'static str, &'static str, &'static str) {
    if v4 {
        ("ip", "ipv4_addr", "224.0.0.0/4")
    } else {
        ("ip6", "ipv6_addr", "ff00::/8")
    }
}

/// The transaction that (re)declares the table and adds `ips` to the set.
pub fn add_script(ips: &[IpAddr], networks: &[IpNet]) -> String {
    let mut s = String::new();
    for v4 in [true, false] {
        let pods: Vec<String> = ips.iter().filter(|i| i.is_ipv4() == v4).map(|i| i.to_string()).collect();
        if pods.is_empty() {
            continue;
        }
        let nets: Vec<String> = networks.iter().filter(|n| n.addr().is_ipv4() == v4).map(|n| n.to_string()).collect();
        let (fam, ty, mcast) = family(v4);
        s += &format!(
            "table {fam} {TABLE} {{\n  set pods {{ type {ty}; }}\n  set cluster {{ type {ty}; flags interval; }}\n  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n}}\n"
        );
        s += &format!("flush chain {fam} {TABLE} postrouting\nflush set {fam} {TABLE} cluster\n");
        if !nets.is_empty() {
            s += &format!("add element {fam} {TABLE} cluster {{ {} }}\n", nets.join(", "));
        }
        s += &format!(
            "add rule {fam} {TABLE} postrouting {fam} saddr @pods {fam} daddr != @cluster {fam} daddr != {mcast} masquerade\n"
        );
        s += &format!("add element {fam} {TABLE} pods {{ {} }}\n", pods.join(", "));
    }
    s
}

/// The transaction that removes `ips` from the set. Adding before deleting
/// makes it succeed whether or not the element (or table) was there: DEL is
/// idempotent.
pub fn remove_script(ips: &[IpAddr]) -> String {
    let mut s = String::new();
    for v4 in [true, false] {
        let pods: Vec<String> = ips.iter().filter(|i| i.is_ipv4() == v4).map(|i| i.to_string()).collect();
        if pods.is_empty() {
            continue;
        }
        let (fam, ty, _) = family(v4);
        let list = pods.join(", ");
        s += &format!("table {fam} {TABLE} {{\n  set pods {{ type {ty}; }}\n}}\n");
        s += &format!("add element {fam} {TABLE} pods {{ {list} }}\ndelete element {fam} {TABLE} pods {{ {list} }}\n");
    }
    s
}

/// Applies `script` with `nft -f -` (one transaction). `nft` dies with the
/// plugin: a plugin the runtime killed commits nothing after its death.
pub fn apply(script: &str) -> Result<(), CniError> {
    if script.is_empty() {
        return Ok(());
    }
    flannel_net::host::nft_apply_dying_with_caller(script).map_err(|why| {
        CniError::new(code::INTERNAL, format!("nftables table {TABLE}: {why}")).with_details(script.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_scripts() {
        let ips: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap()];
        let nets: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        assert_eq!(
            add_script(&ips, &nets),
            "table ip flannel-rs-cni {\n  set pods { type ipv4_addr; }\n  set cluster { type ipv4_addr; flags interval; }\n  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n}\n\
flush chain ip flannel-rs-cni postrouting\nflush set ip flannel-rs-cni cluster\n\
add element ip flannel-rs-cni cluster { 10.244.0.0/16 }\n\
add rule ip flannel-rs-cni postrouting ip saddr @pods ip daddr != @cluster ip daddr != 224.0.0.0/4 masquerade\n\
add element ip flannel-rs-cni pods { 10.244.1.5 }\n"
        );
        assert_eq!(
            remove_script(&ips),
            "table ip flannel-rs-cni {\n  set pods { type ipv4_addr; }\n}\nadd element ip flannel-rs-cni pods { 10.244.1.5 }\ndelete element ip flannel-rs-cni pods { 10.244.1.5 }\n"
        );
        assert_eq!(remove_script(&[]), "");
    }
}
