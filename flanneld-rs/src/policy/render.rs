//! [`Ruleset`] to `nft -f` text. The text is a function of the data only:
//! sets and chains come sorted, so equal inputs give byte-equal scripts and
//! the daemon can skip `nft -f` when nothing changed.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::ir::{AddrRange, Addrs, Chain, Match, NamedSet, NftRule, PortRange, Ruleset, Verdict};
use super::TABLE;

impl Ruleset {
    /// The transaction for `nft -f`: declare each of our tables (so that
    /// deleting it cannot fail), delete it, and create it anew. nft applies
    /// the file atomically: packets see the old rules or the new, never
    /// none; conntrack entries, hence established flows, are untouched.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "table inet {TABLE} {{}}\ndelete table inet {TABLE}");
        let body = self.render_body();
        let _ = write!(out, "table inet {TABLE} {{\n{body}}}\n");
        out
    }

    fn render_body(&self) -> String {
        let mut out = String::new();
        for set in &self.sets {
            render_set(&mut out, set);
        }
        for chain in &self.chains {
            render_chain(&mut out, chain);
        }
        out
    }
}

/// The script that removes our tables (`--network-policy` turned off).
pub fn teardown_script() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

fn render_set(out: &mut String, set: &NamedSet) {
    let _ = writeln!(out, "  set {} {{\n    type ipv4_addr", set.name);
    if set.interval {
        out.push_str("    flags interval\n");
    }
    if !set.elements.is_empty() {
        let elems: Vec<String> = set.elements.iter().map(|r| range_text(*r)).collect();
        let _ = writeln!(out, "    elements = {{ {} }}", elems.join(", "));
    }
    out.push_str("  }\n");
}

fn render_chain(out: &mut String, chain: &Chain) {
    let _ = writeln!(out, "  chain {} {{", chain.name);
    if let Some(offset) = chain.base_priority {
        let prio = match offset {
            0 => "filter".to_string(),
            o if o > 0 => format!("filter + {o}"),
            o => format!("filter - {}", -o),
        };
        let _ = writeln!(out, "    type filter hook forward priority {prio}; policy accept;");
    }
    for rule in &chain.rules {
        let _ = writeln!(out, "    {}", rule_text(rule));
    }
    out.push_str("  }\n");
}

fn rule_text(rule: &NftRule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
    parts.push(match &rule.verdict {
        Verdict::Accept => "accept".to_string(),
        Verdict::Drop => "drop".to_string(),
        Verdict::Jump(c) => format!("jump {c}"),
    });
    parts.join(" ")
}

fn match_text(m: &Match) -> String {
    match m {
        Match::Established => "ct state established,related".to_string(),
        Match::Saddr(a) => format!("ip saddr {}", addrs_text(a)),
        Match::Daddr(a) => format!("ip daddr {}", addrs_text(a)),
        Match::L4 { protocol, ports } if ports.is_empty() => format!("meta l4proto {}", protocol.nft()),
        Match::L4 { protocol, ports } => {
            let list: Vec<String> = ports.iter().map(|r| port_text(*r)).collect();
            match list.as_slice() {
                [one] => format!("{} dport {one}", protocol.nft()),
                _ => format!("{} dport {{ {} }}", protocol.nft(), list.join(", ")),
            }
        }
    }
}

fn addrs_text(a: &Addrs) -> String {
    match a {
        Addrs::Set(name) => format!("@{name}"),
        Addrs::Literal(ips) if ips.len() == 1 => ips[0].to_string(),
        Addrs::Literal(ips) => {
            let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        }
    }
}

fn port_text(r: PortRange) -> String {
    if r.first == r.last {
        r.first.to_string()
    } else {
        format!("{}-{}", r.first, r.last)
    }
}

/// `a`, `a/len` when the range is exactly one prefix, else `a-b`.
fn range_text(r: AddrRange) -> String {
    let (first, last) = (u32::from(r.first), u32::from(r.last));
    if first == last {
        return r.first.to_string();
    }
    let size = u64::from(last - first) + 1;
    if size.is_power_of_two() && u64::from(first) % size == 0 {
        let len = 32 - size.trailing_zeros();
        return format!("{}/{len}", r.first);
    }
    format!("{}-{}", r.first, r.last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_render_ranges_as_prefixes_when_aligned() {
        let r = |a: &str, b: &str| AddrRange { first: a.parse().unwrap(), last: b.parse().unwrap() };
        assert_eq!(range_text(r("10.0.0.1", "10.0.0.1")), "10.0.0.1");
        assert_eq!(range_text(r("10.0.0.0", "10.0.0.255")), "10.0.0.0/24");
        assert_eq!(range_text(r("0.0.0.0", "255.255.255.255")), "0.0.0.0/0");
        assert_eq!(range_text(r("10.0.0.0", "10.0.0.1")), "10.0.0.0/31");
        assert_eq!(range_text(r("10.0.0.1", "10.0.0.2")), "10.0.0.1-10.0.0.2");
        assert_eq!(range_text(r("10.0.0.0", "10.0.0.2")), "10.0.0.0-10.0.0.2");
    }

    #[test]
    fn policy_teardown_deletes_our_table() {
        assert_eq!(teardown_script(), "table inet flannel-rs-policy {}\ndelete table inet flannel-rs-policy\n");
    }
}
