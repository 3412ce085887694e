//! [`Ruleset`] to `nft -f` text. The text is a function of the data only:
//! sets and chains come sorted, so equal inputs give byte-equal scripts and
//! the daemon can skip `nft -f` when nothing changed.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ir::{AddrRange, Addrs, Chain, Family, Match, NamedSet, NftRule, PortRange, Ruleset, Verdict};
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
    let kind = match set.family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    };
    let _ = writeln!(out, "  set {} {{\n    type {kind}", set.name);
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
        Match::Saddr(f, a) => format!("{} saddr {}", family_text(*f), addrs_text(a)),
        Match::Daddr(f, a) => format!("{} daddr {}", family_text(*f), addrs_text(a)),
        Match::NeighbourDiscovery => ND_TEXT.to_string(),
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

/// [`Match::NeighbourDiscovery`]: ICMPv6 types 133 to 137, hop limit 255.
const ND_TEXT: &str = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } ip6 hoplimit 255";

fn family_text(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addrs_text(a: &Addrs) -> String {
    match a {
        Addrs::Set(name) => format!("@{name}"),
        Addrs::Literal(ips) if ips.len() == 1 => ips[0].to_string(),
        Addrs::Literal(ips) => {
            let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
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

/// An address as a number, and the family's width in bits.
pub(super) fn addr_bits(a: IpAddr) -> (u128, u32) {
    match a {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The address `v` of the family `width` bits wide.
pub(super) fn addr_from_bits(v: u128, width: u32) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).expect("an IPv4 address")))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// `a`, `a/len` when the range is exactly one prefix, else `a-b`.
fn range_text(r: AddrRange) -> String {
    let ((first, width), (last, _)) = (addr_bits(r.first), addr_bits(r.last));
    if first == last {
        return r.first.to_string();
    }
    // A prefix: the span is all ones in its low bits (2^k - 1, which the
    // whole IPv6 space reaches, so no "+ 1"), and the start is aligned.
    let span = last - first;
    if span & span.wrapping_add(1) == 0 && first & span == 0 {
        let len = width - span.count_ones();
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
        assert_eq!(range_text(r("2001:db8::7", "2001:db8::7")), "2001:db8::7");
        assert_eq!(range_text(r("2001:db8::", "2001:db8::ffff:ffff:ffff:ffff")), "2001:db8::/64");
        assert_eq!(range_text(r("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")), "::/0");
        assert_eq!(range_text(r("2001:db8::1", "2001:db8::2")), "2001:db8::1-2001:db8::2");
    }

    #[test]
    fn policy_render_names_the_family() {
        let m = |f, ip: &str| Match::Saddr(f, Addrs::Literal(vec![ip.parse().unwrap()]));
        assert_eq!(match_text(&m(Family::V4, "10.0.0.1")), "ip saddr 10.0.0.1");
        assert_eq!(match_text(&m(Family::V6, "2001:db8::1")), "ip6 saddr 2001:db8::1");
        let set = NamedSet { name: "s6".into(), family: Family::V6, interval: true, elements: vec![] };
        let mut out = String::new();
        render_set(&mut out, &set);
        assert_eq!(out, "  set s6 {\n    type ipv6_addr\n    flags interval\n  }\n");
    }

    #[test]
    fn policy_teardown_deletes_our_table() {
        assert_eq!(teardown_script(), "table inet flannel-rs-policy {}\ndelete table inet flannel-rs-policy\n");
    }
}
