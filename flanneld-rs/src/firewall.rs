//! Masquerade and forward rules, flannel's semantics.
//!
//! Masquerade lives in our own nftables table, built as data (the ruleset
//! text, golden-tested) and applied as one `nft -f` transaction that replaces
//! the whole table, so the rules are never half there.
//!
//! Forward accept cannot live there: in nftables every base chain on a hook
//! sees the packet, and an accept in one does not stop a drop in another. A
//! host whose forwarding is closed (Docker sets iptables' FORWARD policy to
//! DROP) would drop pod traffic whatever our table said, and on a host where
//! nothing drops an accept changes nothing. So, as flannel does with
//! iptables, the two accept rules go at the top of iptables' own FORWARD
//! chain (`table ip filter`, which iptables-nft keeps in nftables) when that
//! chain exists; they carry the comment [`FORWARD_COMMENT`], and are the
//! only thing the daemon writes outside its own table.

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
    out += "}\n";
    out
}

/// Applies the ruleset in one transaction, and the forward rules.
pub fn apply(s: &FirewallSpec) -> Result<(), String> {
    flannel_net::host::nft_apply(&ruleset(s))?;
    if let Some(script) = ensure_forward(s)? {
        log::info!("iptables' FORWARD chain: {}", script.trim().replace('\n', "; "));
    }
    Ok(())
}

/// The comment on our rules in iptables' FORWARD chain.
pub const FORWARD_COMMENT: &str = "flannel-rs forward";

/// One of our rules in iptables' FORWARD chain: its handle, and the field
/// (`saddr`, `daddr`) and prefix it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForwardRule {
    handle: u64,
    field: String,
    prefix: String,
}

/// iptables' FORWARD chain (`table ip filter`, iptables-nft's), if it
/// exists: our rules in it.
fn forward_chain() -> Result<Option<Vec<ForwardRule>>, String> {
    Ok(nft_list(&["chain", "ip", "filter", "FORWARD"])?.map(|v| parse_forward_rules(&v)))
}

/// `nft -j list <what>` as JSON; `None` when nft says it does not exist.
fn nft_list(what: &[&str]) -> Result<Option<serde_json::Value>, String> {
    let out = Command::new(flannel_net::host::nft_binary())
        .args(["-j", "list"])
        .args(what)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("run nft: {e}"))?;
    if !out.status.success() {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout).map(Some).map_err(|e| format!("nft -j output: {e}"))
}

fn parse_forward_rules(v: &serde_json::Value) -> Vec<ForwardRule> {
    let mut ours = Vec::new();
    for rule in v["nftables"].as_array().into_iter().flatten().filter_map(|o| o.get("rule")) {
        if rule["comment"].as_str() != Some(FORWARD_COMMENT) {
            continue;
        }
        let m = rule["expr"].as_array().and_then(|e| e.iter().find_map(|x| x.get("match")));
        let field = m.and_then(|m| m["left"]["payload"]["field"].as_str()).unwrap_or("?");
        let prefix = m
            .map(|m| match (&m["right"]["prefix"]["addr"], &m["right"]["prefix"]["len"]) {
                (serde_json::Value::String(a), serde_json::Value::Number(l)) => format!("{a}/{l}"),
                _ => m["right"].to_string(),
            })
            .unwrap_or_default();
        ours.push(ForwardRule { handle: rule["handle"].as_u64().unwrap_or(0), field: field.into(), prefix });
    }
    ours
}

/// The changes that bring our rules in iptables' FORWARD chain in line:
/// none when they are what `s` asks for, else delete ours and insert both
/// anew at the top (saddr first). One transaction.
fn forward_script(s: &FirewallSpec, have: &[ForwardRule]) -> Option<String> {
    let n = s.network.to_string();
    let want: Vec<(&str, &str)> = if s.forward { vec![("saddr", &n), ("daddr", &n)] } else { Vec::new() };
    let mut got: Vec<(&str, &str)> = have.iter().map(|r| (r.field.as_str(), r.prefix.as_str())).collect();
    got.sort();
    let mut sorted = want.clone();
    sorted.sort();
    if got == sorted {
        return None;
    }
    let mut script = String::new();
    for r in have {
        script += &format!("delete rule ip filter FORWARD handle {}\n", r.handle);
    }
    // `insert` puts a rule first: daddr, then saddr before it.
    for (field, prefix) in want.iter().rev() {
        script += &format!(
            "insert rule ip filter FORWARD ip {field} {prefix} counter accept comment \"{FORWARD_COMMENT}\"\n"
        );
    }
    Some(script)
}

/// Puts our accept rules at the top of iptables' FORWARD chain when it
/// exists and they are not there (or removes them when `--iptables-forward-rules`
/// is off); says what it did.
pub fn ensure_forward(s: &FirewallSpec) -> Result<Option<String>, String> {
    let Some(have) = forward_chain()? else { return Ok(None) };
    let Some(script) = forward_script(s, &have) else { return Ok(None) };
    flannel_net::host::nft_apply(&script).map_err(|e| format!("iptables' FORWARD chain (table ip filter): {e}"))?;
    Ok(Some(script))
}

/// Whether our table exists with the chains `s` asks for, and our rules are
/// in iptables' FORWARD chain if it exists (for diagnose).
pub fn present(s: &FirewallSpec) -> Result<bool, String> {
    let Some(v) = nft_list(&["table", "ip", TABLE])? else { return Ok(false) };
    let chains: Vec<String> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["chain"]["name"].as_str().map(str::to_string))
        .collect();
    let rules = v["nftables"].as_array().into_iter().flatten().filter(|o| o.get("rule").is_some()).count();
    let want_rules = usize::from(s.masquerade) * 6;
    let forward_ok = forward_chain()?.is_none_or(|have| forward_script(s, &have).is_none());
    Ok(chains.contains(&"postrouting".to_string()) == s.masquerade && rules == want_rules && forward_ok)
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
}
"
        );
        let plain = FirewallSpec { masquerade: false, forward: false, ..s };
        assert_eq!(ruleset(&plain), "table ip flannel-rs {}\ndelete table ip flannel-rs\ntable ip flannel-rs {\n}\n");
        let nr = FirewallSpec { fully_random: false, forward: false, ..s };
        assert!(ruleset(&nr).contains("masquerade\n"));
    }

    #[test]
    fn forward_rules_go_first_and_are_left_alone_when_right() {
        let s = FirewallSpec {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            masquerade: false,
            fully_random: true,
            forward: true,
        };
        let fresh = forward_script(&s, &[]).unwrap();
        assert_eq!(
            fresh,
            "insert rule ip filter FORWARD ip daddr 10.244.0.0/16 counter accept comment \"flannel-rs forward\"\n\
             insert rule ip filter FORWARD ip saddr 10.244.0.0/16 counter accept comment \"flannel-rs forward\"\n"
        );
        let rule =
            |handle, field: &str, prefix: &str| ForwardRule { handle, field: field.into(), prefix: prefix.into() };
        let right = [rule(3, "saddr", "10.244.0.0/16"), rule(2, "daddr", "10.244.0.0/16")];
        assert_eq!(forward_script(&s, &right), None);
        // An earlier Network's rules are replaced; with the flag off ours go.
        let old = [rule(3, "saddr", "10.9.0.0/16"), rule(2, "daddr", "10.244.0.0/16")];
        let script = forward_script(&s, &old).unwrap();
        assert!(script.starts_with("delete rule ip filter FORWARD handle 3\ndelete rule ip filter FORWARD handle 2\n"));
        let off = FirewallSpec { forward: false, ..s };
        assert_eq!(
            forward_script(&off, &right).unwrap(),
            "delete rule ip filter FORWARD handle 3\ndelete rule ip filter FORWARD handle 2\n"
        );
        assert_eq!(forward_script(&off, &[]), None);
        // nft's JSON, as `nft -j list chain ip filter FORWARD` prints it.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"chain":{"family":"ip","table":"filter","name":"FORWARD","policy":"drop"}},
            {"rule":{"handle":3,"comment":"flannel-rs forward","expr":[{"match":{"op":"==",
             "left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.244.0.0","len":16}}}},
             {"counter":{"packets":0,"bytes":0}},{"accept":null}]}},
            {"rule":{"handle":4,"expr":[{"accept":null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(parse_forward_rules(&v), [rule(3, "saddr", "10.244.0.0/16")]);
    }
}
