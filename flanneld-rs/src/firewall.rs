//! Masquerade and forward rules, flannel's semantics, in our own nftables
//! table. Built as data (the ruleset text, golden-tested) and applied as one
//! `nft -f` transaction that replaces the whole table, so the rules are never
//! half there.

use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

/// Our table (family `ip`).
pub const TABLE: &str = "flannel-rs";

/// What the rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallSpec {
    /// The cluster network N.
    pub network: Ipv4Net,
    /// This node's subnet P.
    pub subnet: Ipv4Net,
    /// `--ip-masq`.
    pub masquerade: bool,
    /// Not `--ip-masq-fully-random-disable`.
    pub fully_random: bool,
    /// `--iptables-forward-rules`.
    pub forward: bool,
}

impl FirewallSpec {
    /// The rules the flags ask for, for cluster network `network` and our `subnet`.
    pub fn from_opts(opts: &crate::flags::Opts, network: Ipv4Net, subnet: Ipv4Net) -> FirewallSpec {
        FirewallSpec {
            network,
            subnet,
            masquerade: opts.ip_masq,
            fully_random: !opts.ip_masq_fully_random_disable,
            forward: opts.iptables_forward_rules,
        }
    }
}

/// The transaction: declare the table (so that deleting it cannot fail),
/// delete it, and create it with the chains we want.
pub fn ruleset(s: &FirewallSpec) -> String {
    let (n, p) = (s.network, s.subnet);
    let random = if s.fully_random { " fully-random" } else { "" };
    let mut out = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    if s.masquerade {
        out += "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n";
        // kube-proxy marks what it wants masqueraded and does it itself.
        out += "    meta mark & 0x00004000 == 0x00004000 return\n";
        // Pod to pod, and anything to our pods, keeps its source.
        out += &format!("    ip saddr {p} ip daddr {n} return\n");
        out += &format!("    ip saddr {n} ip daddr {p} return\n");
        out += &format!("    ip saddr != {n} ip daddr {p} return\n");
        // Pods leaving the cluster, and outsiders entering it, are masqueraded.
        out += &format!("    ip saddr {n} ip daddr != 224.0.0.0/4 ip daddr != {n} masquerade{random}\n");
        out += &format!("    ip saddr != {n} ip daddr {n} masquerade{random}\n");
        out += "  }\n";
    }
    if s.forward {
        out += "  chain forward {\n    type filter hook forward priority filter; policy accept;\n";
        out += &format!("    ip saddr {n} accept\n    ip daddr {n} accept\n  }}\n");
    }
    out += "}\n";
    out
}

/// Applies the ruleset in one transaction.
pub fn apply(s: &FirewallSpec) -> Result<(), String> {
    flannel_net::host::nft_apply(&ruleset(s))
}

/// Whether our table exists with the chains `s` asks for (for diagnose).
pub fn present(s: &FirewallSpec) -> Result<bool, String> {
    let out = Command::new(flannel_net::host::nft_binary())
        .args(["-j", "list", "table", "ip", TABLE])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("run nft: {e}"))?;
    if !out.status.success() {
        return Ok(false);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j output: {e}"))?;
    let chains: Vec<String> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["chain"]["name"].as_str().map(str::to_string))
        .collect();
    let rules = v["nftables"].as_array().into_iter().flatten().filter(|o| o.get("rule").is_some()).count();
    let want_rules = usize::from(s.masquerade) * 6 + usize::from(s.forward) * 2;
    Ok(chains.contains(&"postrouting".to_string()) == s.masquerade
        && chains.contains(&"forward".to_string()) == s.forward
        && rules == want_rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_ruleset() {
        let s = FirewallSpec {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            masquerade: true,
            fully_random: true,
            forward: true,
        };
        assert_eq!(
            ruleset(&s),
            "table ip flannel-rs {}
delete table ip flannel-rs
table ip flannel-rs {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x00004000 == 0x00004000 return
    ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
    ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
    ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
    ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 ip daddr != 10.244.0.0/16 masquerade fully-random
    ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    ip saddr 10.244.0.0/16 accept
    ip daddr 10.244.0.0/16 accept
  }
}
"
        );
        let plain = FirewallSpec { masquerade: false, forward: false, ..s };
        assert_eq!(ruleset(&plain), "table ip flannel-rs {}\ndelete table ip flannel-rs\ntable ip flannel-rs {\n}\n");
        let nr = FirewallSpec { fully_random: false, forward: false, ..s };
        assert!(ruleset(&nr).contains("masquerade\n"));
    }
}
