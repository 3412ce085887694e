//! Current flannel's nftables objects (`"EnableNFTables": true`), as data:
//! the listing `nft list table` prints for them, golden-tested, and one
//! `nft -f` transaction that replaces both tables.
//!
//! flannel makes `table ip flannel-ipv4` and `table ip6 flannel-ipv6`, each
//! with the comment `rules for <name>`, whatever else is on; in the IPv4
//! one, with `--ip-masq`, the chain `postrtg` (nat, postrouting, srcnat)
//! and, with `--iptables-forward-rules`, the chain `forward` (filter,
//! forward, filter); the IPv6 one the same chains with the same rules for
//! the IPv6 network and subnet (`ip6 saddr`, multicast `ff00::/8`). A
//! family the configuration does not have keeps its empty table, as
//! flannel's. The rules are flannel's own, including its fourth masquerade
//! rule, which returns for any source outside the node's subnet (not, as
//! its iptables rule, outside the cluster network).

use super::{FirewallSpec, Problem};

/// The IPv4 table (family `ip`).
pub const TABLE4: &str = "flannel-ipv4";
/// The IPv6 table (family `ip6`).
pub const TABLE6: &str = "flannel-ipv6";

/// The tables: family, name, and their content as `nft list table` prints
/// it (tabs, as nft 1.0 indents).
pub fn listing(s: &FirewallSpec) -> [(&'static str, &'static str, String); 2] {
    let v4 = s.ipv4.map(|r| (r.network.to_string(), r.subnet.to_string()));
    let v6 = s.ipv6.map(|r| (r.network.to_string(), r.subnet.to_string()));
    [
        ("ip", TABLE4, table(s, "ip", TABLE4, "224.0.0.0/4", v4)),
        ("ip6", TABLE6, table(s, "ip6", TABLE6, "ff00::/8", v6)),
    ]
}

/// One table's listing: family `ip` or `ip6` (also the address match's
/// keyword), the network and subnet when the spec has that family.
fn table(s: &FirewallSpec, ip: &str, name: &str, multicast: &str, nets: Option<(String, String)>) -> String {
    let mut chains = Vec::new();
    let Some((n, p)) = nets else {
        return format!("table {ip} {name} {{\n\tcomment \"rules for {name}\"\n}}\n");
    };
    let masq = if s.fully_random { "masquerade fully-random" } else { "masquerade" };
    if s.masquerade {
        chains.push(format!(
            "\tchain postrtg {{\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x00004000 return\n\
             \t\t{ip} saddr {p} {ip} daddr {n} return\n\
             \t\t{ip} saddr {n} {ip} daddr {p} return\n\
             \t\t{ip} saddr != {p} {ip} daddr {n} return\n\
             \t\t{ip} saddr {n} {ip} daddr != {multicast} {masq}\n\
             \t\t{ip} saddr != {n} {ip} daddr {n} {masq}\n\
             \t}}\n"
        ));
    }
    if s.forward {
        chains.push(format!(
            "\tchain forward {{\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\t{ip} saddr {n} accept\n\
             \t\t{ip} daddr {n} accept\n\
             \t}}\n"
        ));
    }
    format!("table {ip} {name} {{\n\tcomment \"rules for {name}\"\n{}}}\n", chains.join("\n"))
}

/// The transaction: each table declared (so that deleting it cannot fail),
/// deleted and made anew with its listing (which nft reads back as input).
pub fn ruleset(s: &FirewallSpec) -> String {
    let mut out = String::new();
    for (family, name, text) in listing(s) {
        out += &format!("table {family} {name} {{}}\ndelete table {family} {name}\n{text}");
    }
    out
}

/// Writes both tables in one transaction.
pub fn apply(s: &FirewallSpec) -> Result<(), String> {
    flannel_net::host::nft_apply(&ruleset(s)).map_err(|e| format!("nftables tables {TABLE4}/{TABLE6}: {e}"))
}

/// `nft list table family name`, or `None` when it does not exist.
fn list(family: &str, name: &str) -> Result<Option<String>, String> {
    let out = std::process::Command::new(flannel_net::host::nft_binary())
        .args(["list", "table", family, name])
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| format!("run nft: {e} (is the nftables package installed?)"))?;
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
        Ok(None)
    } else {
        Err(format!("nft list table {family} {name}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The differences between a table's listing and the wanted one, line by
/// line (indentation and blank lines aside).
pub fn diff(family: &str, name: &str, want: &str, have: &str) -> Vec<Problem> {
    let lines = |t: &str| -> Vec<String> {
        t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect::<Vec<_>>()
    };
    let (want, have) = (lines(want), lines(have));
    let mut out = Vec::new();
    for w in &want {
        if !have.contains(w) {
            out.push(Problem::missing(format!("nftables table {family} {name} lacks `{w}`")));
        }
    }
    for h in &have {
        if !want.contains(h) {
            out.push(Problem::wrong(format!("nftables table {family} {name} has `{h}`, which is not flannel's")));
        }
    }
    if out.is_empty() && want != have {
        out.push(Problem::wrong(format!("nftables table {family} {name} has flannel's lines out of order")));
    }
    out
}

/// The differences between the node's tables and the spec's.
pub fn check(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    let mut out = Vec::new();
    for (family, name, want) in listing(s) {
        match list(family, name)? {
            None => out.push(Problem::missing(format!("nftables table {family} {name} is missing"))),
            Some(have) => out.extend(diff(family, name, &want, &have)),
        }
    }
    Ok(out)
}

/// flannel's nftables tables that exist (as leftovers in iptables mode).
pub fn find_tables() -> Result<Vec<Problem>, String> {
    let mut out = Vec::new();
    for (family, name) in [("ip", TABLE4), ("ip6", TABLE6)] {
        if list(family, name)?.is_some() {
            out.push(Problem::stale(format!(
                "nftables table {family} {name} is there, but EnableNFTables is not set in the network configuration"
            )));
        }
    }
    Ok(out)
}

/// Deletes flannel's nftables tables, if there (one transaction).
pub fn remove_tables() -> Result<(), String> {
    let mut script = String::new();
    for (family, name) in [("ip", TABLE4), ("ip6", TABLE6)] {
        script += &format!("table {family} {name} {{}}\ndelete table {family} {name}\n");
    }
    flannel_net::host::nft_apply(&script).map_err(|e| format!("delete nftables tables {TABLE4}/{TABLE6}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Ipv4Rules;

    fn spec() -> FirewallSpec {
        FirewallSpec {
            ipv4: Some(Ipv4Rules {
                network: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.1.0/24".parse().unwrap(),
            }),
            ipv6: None,
            masquerade: true,
            fully_random: true,
            forward: true,
            nftables: true,
        }
    }

    #[test]
    fn golden_listing_as_current_flannel_makes_it() {
        let [(_, _, v4), (_, _, v6)] = listing(&spec());
        assert_eq!(
            v4,
            "table ip flannel-ipv4 {
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}

\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}
}
"
        );
        assert_eq!(v6, "table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}\n");
        let off = FirewallSpec { masquerade: false, forward: false, ..spec() };
        assert_eq!(listing(&off)[0].2, "table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n}\n");
        assert!(listing(&FirewallSpec { fully_random: false, ..spec() })[0].2.contains("224.0.0.0/4 masquerade\n"));
        assert!(ruleset(&spec())
            .starts_with("table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {\n"));
    }

    #[test]
    fn diff_names_the_missing_and_the_foreign_line() {
        let [(_, _, want), _] = listing(&spec());
        assert!(diff("ip", TABLE4, &want, &want.replace('\t', "  ")).is_empty());
        let have = want.replace("\t\tip daddr 10.244.0.0/16 accept\n", "\t\tip daddr 10.9.0.0/16 accept\n");
        let d = diff("ip", TABLE4, &want, &have);
        assert_eq!(d[0].what, "nftables table ip flannel-ipv4 lacks `ip daddr 10.244.0.0/16 accept`");
        assert_eq!(
            d[1].what,
            "nftables table ip flannel-ipv4 has `ip daddr 10.9.0.0/16 accept`, which is not flannel's"
        );
        let swapped = want.replace(
            "\t\tip saddr 10.244.0.0/16 accept\n\t\tip daddr 10.244.0.0/16 accept\n",
            "\t\tip daddr 10.244.0.0/16 accept\n\t\tip saddr 10.244.0.0/16 accept\n",
        );
        assert!(diff("ip", TABLE4, &want, &swapped)[0].what.contains("out of order"));
    }

    #[test]
    fn golden_ipv6_listing_as_current_flannel_makes_it() {
        let v6 = crate::firewall::Ipv6Rules {
            network: "2001:db8:44::/56".parse().unwrap(),
            subnet: "2001:db8:44:1::/64".parse().unwrap(),
        };
        let dual = FirewallSpec { ipv6: Some(v6), ..spec() };
        let [(_, _, v4), (family, name, t6)] = listing(&dual);
        assert_eq!(v4, listing(&spec())[0].2, "the IPv4 table does not change with IPv6");
        assert_eq!((family, name), ("ip6", "flannel-ipv6"));
        assert_eq!(
            t6,
            "table ip6 flannel-ipv6 {
\tcomment \"rules for flannel-ipv6\"
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip6 saddr 2001:db8:44:1::/64 ip6 daddr 2001:db8:44::/56 return
\t\tip6 saddr 2001:db8:44::/56 ip6 daddr 2001:db8:44:1::/64 return
\t\tip6 saddr != 2001:db8:44:1::/64 ip6 daddr 2001:db8:44::/56 return
\t\tip6 saddr 2001:db8:44::/56 ip6 daddr != ff00::/8 masquerade fully-random
\t\tip6 saddr != 2001:db8:44::/56 ip6 daddr 2001:db8:44::/56 masquerade fully-random
\t}

\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip6 saddr 2001:db8:44::/56 accept
\t\tip6 daddr 2001:db8:44::/56 accept
\t}
}
"
        );
        // IPv6-only: the IPv4 table is there, empty, as flannel's.
        let only6 = FirewallSpec { ipv4: None, ..dual };
        assert_eq!(listing(&only6)[0].2, "table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n}\n");
        assert_eq!(listing(&only6)[1].2, t6);
    }
}
