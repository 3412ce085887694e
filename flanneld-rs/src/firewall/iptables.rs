//! flannel v0.20.2's iptables objects, as data: the lines `iptables-save`
//! prints for them, golden-tested, and the `iptables-restore --noflush`
//! payload that makes the node match them in one transaction.
//!
//! flannel v0.20.2 makes, for cluster network N and node subnet P:
//!
//! ```text
//! *nat
//! -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG      (inserted first)
//! -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG -s N -d N -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG -s N ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
//! -A FLANNEL-POSTRTG ! -s N -d P -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG ! -s N -d N -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
//! *filter
//! -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD            (inserted first)
//! -A FLANNEL-FWD -s N -m comment --comment "flanneld forward" -j ACCEPT
//! -A FLANNEL-FWD -d N -m comment --comment "flanneld forward" -j ACCEPT
//! ```
//!
//! flannel flushes its chain, then inserts the jump and appends the rules
//! in a second step (a moment without masquerade); here the flush (a
//! `:CHAIN` line, which under `--noflush` empties an existing chain), the
//! jump and the rules are one payload. flannel's resync only asks whether
//! each rule exists; ours compares the chain's whole content and order.
//!
//! With IPv6 (`EnableIPv6`), flannel v0.20.2 makes the same two chains in
//! ip6tables for the IPv6 network N6 and node subnet P6: the same rules with
//! the multicast exception `ff00::/8` instead of `224.0.0.0/4`
//! (`MasqIP6Rules`, and `ForwardRules` with N6). They go through
//! `ip6tables-restore --noflush`, in the same iptables variant as IPv4.
//! A family the configuration does not have gets no chains of ours, and
//! ours found there are removed.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use super::{FirewallSpec, Problem};

/// Our chain in table nat.
pub const POSTRTG: &str = "FLANNEL-POSTRTG";
/// Our chain in table filter.
pub const FWD: &str = "FLANNEL-FWD";
/// The comment on every masquerade rule (flannel's).
pub const MASQ_COMMENT: &str = "flanneld masq";
/// The comment on every forward rule (flannel's).
pub const FWD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark (flannel leaves marked packets to it).
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// The address family: iptables or ip6tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

/// Both, in the order they are handled.
pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

impl Family {
    /// The tool's name, as the problems name it.
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    /// Multicast, never masqueraded.
    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
    /// The cluster network and our subnet in this family, when the spec has it.
    fn nets(self, s: &FirewallSpec) -> Option<(String, String)> {
        match self {
            Family::V4 => s.ipv4.map(|r| (r.network.to_string(), r.subnet.to_string())),
            Family::V6 => s.ipv6.map(|r| (r.network.to_string(), r.subnet.to_string())),
        }
    }
    /// Why a chain of ours in this family is not wanted.
    fn why_not(self, s: &FirewallSpec, flag: &str) -> String {
        if s.nftables {
            "EnableNFTables is set".into()
        } else if self.nets(s).is_none() {
            format!("the network configuration has no {}", if self == Family::V4 { "IPv4" } else { "IPv6" })
        } else {
            format!("{flag} is off")
        }
    }
}

/// One of our chains, and the built-in chain whose top jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hook {
    table: &'static str,
    builtin: &'static str,
    chain: &'static str,
    comment: &'static str,
    /// The flag that asks for it.
    flag: &'static str,
}

const MASQ: Hook =
    Hook { table: "nat", builtin: "POSTROUTING", chain: POSTRTG, comment: MASQ_COMMENT, flag: "--ip-masq" };
const FORWARD: Hook =
    Hook { table: "filter", builtin: "FORWARD", chain: FWD, comment: FWD_COMMENT, flag: "--iptables-forward-rules" };

impl Hook {
    /// The jump's match and target (what follows `-A <builtin>`).
    fn jump_spec(&self) -> String {
        format!("-m comment --comment \"{}\" -j {}", self.comment, self.chain)
    }
    /// The jump as `iptables-save` prints it.
    fn jump(&self) -> String {
        format!("-A {} {}", self.builtin, self.jump_spec())
    }
    /// A rule of our chain as `iptables-save` prints it.
    fn rule(&self, matches: &str, target: &str) -> String {
        let sep = if matches.is_empty() { "" } else { " " };
        format!("-A {}{sep}{matches} -m comment --comment \"{}\" -j {target}", self.chain, self.comment)
    }
}

/// The rules of `FLANNEL-POSTRTG` in family `f`, in flannel's order (none
/// when the spec lacks the family).
pub fn masq_rules(s: &FirewallSpec, f: Family) -> Vec<String> {
    let Some((n, p)) = f.nets(s) else {
        return Vec::new();
    };
    let mc = f.multicast();
    let masq = if s.fully_random { "MASQUERADE --random-fully" } else { "MASQUERADE" };
    vec![
        // kube-proxy masquerades what it marked: no second NAT.
        MASQ.rule(&format!("-m mark --mark {KUBE_PROXY_MARK}"), "RETURN"),
        // Within the cluster network the source stays.
        MASQ.rule(&format!("-s {n} -d {n}"), "RETURN"),
        // Pods leaving the cluster network, except to multicast.
        MASQ.rule(&format!("-s {n} ! -d {mc}"), masq),
        // Outsiders reaching our own pods keep their address.
        MASQ.rule(&format!("! -s {n} -d {p}"), "RETURN"),
        // Anything else from outside the network into it (the host's own traffic).
        MASQ.rule(&format!("! -s {n} -d {n}"), masq),
    ]
}

/// The rules of `FLANNEL-FWD` in family `f`, in flannel's order (none when
/// the spec lacks the family).
pub fn forward_rules(s: &FirewallSpec, f: Family) -> Vec<String> {
    let Some((n, _)) = f.nets(s) else {
        return Vec::new();
    };
    vec![FORWARD.rule(&format!("-s {n}"), "ACCEPT"), FORWARD.rule(&format!("-d {n}"), "ACCEPT")]
}

/// The spec with both features off: every chain of ours is to go.
pub fn nothing(s: &FirewallSpec) -> FirewallSpec {
    FirewallSpec { masquerade: false, forward: false, ..*s }
}

/// One table as `iptables-save -t <table>` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Every chain declared (built-in and user-defined).
    pub chains: Vec<String>,
    /// Each chain's rules (`-A CHAIN ...` lines), in order.
    pub rules: BTreeMap<String, Vec<String>>,
}

/// Parses `iptables-save` output: table name -> its chains and rules.
pub fn parse_save(text: &str) -> BTreeMap<String, SavedTable> {
    let mut out: BTreeMap<String, SavedTable> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines().map(str::trim_end) {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            out.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default().to_string();
            out.entry(table.clone()).or_default().chains.push(name);
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default().to_string();
            out.entry(table.clone()).or_default().rules.entry(chain).or_default().push(line.to_string());
        }
    }
    out
}

/// What [`plan`] found and the payload that fixes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The differences.
    pub problems: Vec<Problem>,
    /// The `iptables-restore --noflush` input, when anything is to be written.
    pub restore: Option<String>,
}

/// Compares the node's tables of family `f` (`have`, from [`parse_save`])
/// with what `s` asks for; with `force` the payload rewrites the wanted
/// chains even when they are right (start-up, as flannel's bootstrap).
pub fn plan(s: &FirewallSpec, f: Family, have: &BTreeMap<String, SavedTable>, force: bool) -> Plan {
    let empty = SavedTable::default();
    let mut out = Plan::default();
    let mut payload = String::new();
    let here = f.nets(s).is_some();
    for (hook, want) in [
        (MASQ, (s.masquerade && here).then(|| masq_rules(s, f))),
        (FORWARD, (s.forward && here).then(|| forward_rules(s, f))),
    ] {
        let t = have.get(hook.table).unwrap_or(&empty);
        let problems = hook_problems(&hook, f, want.as_deref(), t, || f.why_not(s, hook.flag));
        let rewrite = !problems.is_empty() || (force && want.is_some());
        out.problems.extend(problems);
        if rewrite {
            payload += &hook_payload(&hook, want.as_deref(), t);
        }
    }
    if !payload.is_empty() {
        out.restore = Some(payload);
    }
    out
}

fn hook_problems(
    h: &Hook,
    f: Family,
    want: Option<&[String]>,
    t: &SavedTable,
    why_not: impl FnOnce() -> String,
) -> Vec<Problem> {
    let tool = f.tool();
    let where_ = format!("(table {})", h.table);
    let exists = t.chains.iter().any(|c| c == h.chain);
    let jumps = t.rules.get(h.builtin).map(|r| r.iter().filter(|l| **l == h.jump()).count()).unwrap_or(0);
    let have: &[String] = t.rules.get(h.chain).map(Vec::as_slice).unwrap_or(&[]);
    let Some(want) = want else {
        return if exists {
            vec![Problem::stale(format!("{tool} chain {} {where_} is there, but {}", h.chain, why_not()))]
        } else {
            Vec::new()
        };
    };
    let mut out = Vec::new();
    if !exists {
        out.push(Problem::missing(format!("{tool} chain {} {where_} is missing", h.chain)));
    }
    match jumps {
        0 => out.push(Problem::missing(format!("{tool} rule `{}` {where_} is missing", h.jump()))),
        1 => {}
        n => out.push(Problem::wrong(format!("{tool} rule `{}` {where_} is there {n} times", h.jump()))),
    }
    let before = out.len();
    for w in want {
        if !have.contains(w) {
            out.push(Problem::missing(format!("{tool} rule `{w}` {where_} is missing")));
        }
    }
    for x in have {
        if !want.contains(x) {
            out.push(Problem::wrong(format!("{tool} rule `{x}` {where_} is not flannel's")));
        }
    }
    if out.len() == before && have != want {
        out.push(Problem::wrong(format!(
            "{tool} chain {} {where_} has flannel's rules out of order or repeated: {}",
            h.chain,
            have.join("; ")
        )));
    }
    out
}

fn hook_payload(h: &Hook, want: Option<&[String]>, t: &SavedTable) -> String {
    let exists = t.chains.iter().any(|c| c == h.chain);
    let jumps = t.rules.get(h.builtin).map(|r| r.iter().filter(|l| **l == h.jump()).count()).unwrap_or(0);
    if want.is_none() && !exists {
        return String::new();
    }
    let mut p = format!("*{}\n:{} - [0:0]\n", h.table, h.chain);
    for _ in 0..jumps {
        p += &format!("-D {} {}\n", h.builtin, h.jump_spec());
    }
    match want {
        Some(rules) => {
            p += &format!("-I {} 1 {}\n", h.builtin, h.jump_spec());
            for r in rules {
                p += r;
                p += "\n";
            }
        }
        None => p += &format!("-X {}\n", h.chain),
    }
    p += "COMMIT\n";
    p
}

/// Where a program of Debian's iptables package is: its usual places, else
/// whatever `PATH` finds.
fn binary(name: &str) -> String {
    find(name).unwrap_or_else(|| name.to_string())
}

fn find(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin"].iter().map(|d| format!("{d}/{name}")).find(|p| std::path::Path::new(p).exists())
}

/// Which iptables the node uses, decided once per process as flannel's
/// image decides it (its iptables-wrapper): kubelet's hint chain
/// (`KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` in table mangle) in
/// iptables-nft, else in iptables-legacy, else whichever holds more rules.
/// Without both variants installed, or without any sign either way, plain
/// `iptables-save`/`iptables-restore` (the host's choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `iptables-nft-save`/`-restore`.
    Nft,
    /// `iptables-legacy-save`/`-restore`.
    Legacy,
    /// `iptables-save`/`-restore`.
    Default,
}

impl Variant {
    fn suffix(self) -> &'static str {
        match self {
            Variant::Nft => "-nft",
            Variant::Legacy => "-legacy",
            Variant::Default => "",
        }
    }
    /// `iptables-nft-save`, `ip6tables-legacy-save`, ...
    fn save(self, f: Family) -> String {
        binary(&format!("{}{}-save", f.tool(), self.suffix()))
    }
    /// `iptables-nft-restore`, `ip6tables-legacy-restore`, ...
    fn restore(self, f: Family) -> String {
        binary(&format!("{}{}-restore", f.tool(), self.suffix()))
    }
}

/// The choice from the two variants' `iptables-save` output (IPv4 and IPv6
/// concatenated; `nft_mangle` is table mangle only).
pub fn choose(nft_mangle: &str, nft_all: &str, legacy_all: &str) -> Variant {
    let hint =
        |t: &str| t.lines().any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"));
    let rules = |t: &str| t.lines().filter(|l| l.starts_with('-')).count();
    if hint(nft_mangle) {
        Variant::Nft
    } else if hint(legacy_all) {
        Variant::Legacy
    } else {
        match rules(legacy_all).cmp(&rules(nft_all)) {
            std::cmp::Ordering::Greater => Variant::Legacy,
            std::cmp::Ordering::Less => Variant::Nft,
            std::cmp::Ordering::Equal => Variant::Default,
        }
    }
}

/// The variant this process uses (see [`Variant`]).
pub fn variant() -> Variant {
    static CHOSEN: std::sync::OnceLock<Variant> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if find("iptables-nft-save").is_none() || find("iptables-legacy-save").is_none() {
            return Variant::Default;
        }
        let dump = |progs: &[&str], args: &[&str]| -> String {
            let mut text = String::new();
            for p in progs.iter().filter_map(|p| find(p)) {
                if let Ok(out) = Command::new(p).args(args).stderr(Stdio::null()).output() {
                    text += &String::from_utf8_lossy(&out.stdout);
                }
            }
            text
        };
        let nft = ["iptables-nft-save", "ip6tables-nft-save"];
        // Not `-t mangle` for legacy: that would make the kernel create the table.
        let v = choose(
            &dump(&nft, &["-t", "mangle"]),
            &dump(&nft, &[]),
            &dump(&["iptables-legacy-save", "ip6tables-legacy-save"], &[]),
        );
        log::info!(
            "iptables: using {} and {} (as flannel's iptables-wrapper would)",
            v.restore(Family::V4),
            v.restore(Family::V6)
        );
        v
    })
}

/// Tables nat and filter of family `f` as `iptables-save` (or
/// `ip6tables-save`) prints them. Without the iptables package: an error
/// when `required`, else nothing (no iptables tool can have made anything
/// of ours then).
pub fn observe(f: Family, required: bool) -> Result<BTreeMap<String, SavedTable>, String> {
    let mut text = String::new();
    let tool = f.tool();
    for table in ["nat", "filter"] {
        let out = match Command::new(variant().save(f)).args(["-t", table]).stderr(Stdio::piped()).output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(BTreeMap::new()),
            Err(e) => return Err(format!("run {tool}-save: {e} (is the iptables package installed?)")),
        };
        if !out.status.success() {
            return Err(format!("{tool}-save -t {table} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        text += &String::from_utf8_lossy(&out.stdout);
    }
    Ok(parse_save(&text))
}

/// Runs `iptables-restore --noflush` (or `ip6tables-restore`) with
/// `payload`: one transaction.
pub fn restore(f: Family, payload: &str) -> Result<(), String> {
    let mut cmd = Command::new(variant().restore(f));
    cmd.args(["--noflush", "--wait"]);
    let name = format!("{}-restore", f.tool());
    flannel_net::host::run_with_stdin(&mut cmd, payload, &name, "iptables").map_err(|e| {
        e.unwrap_or_else(|stderr| {
            format!("{name} --noflush failed: {stderr} (input: {})", payload.trim().replace('\n', "; "))
        })
    })
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
            nftables: false,
        }
    }

    /// flannel v0.20.2's objects as iptables-save prints them (what
    /// tests/tests/firewall.rs reads back from the real flanneld v0.20.2).
    const GOLDEN: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FORWARD -j DOCKER-USER
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"#;

    #[test]
    fn golden_rules_and_a_converged_node_needs_nothing() {
        let have = parse_save(GOLDEN);
        assert_eq!(have["nat"].rules["FLANNEL-POSTRTG"], masq_rules(&spec(), Family::V4));
        assert_eq!(have["filter"].rules["FLANNEL-FWD"], forward_rules(&spec(), Family::V4));
        assert_eq!(plan(&spec(), Family::V4, &have, false), Plan::default());
        // Without --random-fully.
        let plain = masq_rules(&FirewallSpec { fully_random: false, ..spec() }, Family::V4);
        assert!(plain[2].ends_with("-j MASQUERADE") && plain[4].ends_with("-j MASQUERADE"), "{plain:?}");
    }

    #[test]
    fn an_empty_node_gets_one_payload_per_table_with_the_jump_first() {
        let p = plan(&spec(), Family::V4, &BTreeMap::new(), false);
        assert_eq!(p.problems.len(), 2 * 2 + 5 + 2, "{:#?}", p.problems);
        assert_eq!(p.problems[0].what, "iptables chain FLANNEL-POSTRTG (table nat) is missing");
        assert_eq!(
            p.problems[1].what,
            "iptables rule `-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG` (table nat) is missing"
        );
        assert_eq!(
            p.restore.unwrap(),
            r#"*nat
:FLANNEL-POSTRTG - [0:0]
-I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
*filter
:FLANNEL-FWD - [0:0]
-I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"#
        );
    }

    #[test]
    fn start_up_rewrites_in_place_moving_the_jump_back_to_the_top() {
        let p = plan(&spec(), Family::V4, &parse_save(GOLDEN), true);
        assert!(p.problems.is_empty());
        let payload = p.restore.unwrap();
        // Existing jumps go (the chain declaration empties the chain), one comes back first.
        assert!(payload.starts_with(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
        ));
        assert!(payload.contains(
            "*filter\n:FLANNEL-FWD - [0:0]\n-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n"
        ));
    }

    #[test]
    fn each_difference_is_named_and_only_its_table_rewritten() {
        let rules = masq_rules(&spec(), Family::V4);
        // A rule deleted.
        let text = GOLDEN.replace(&format!("{}\n", rules[2]), "");
        let p = plan(&spec(), Family::V4, &parse_save(&text), false);
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].kind, "missing");
        assert!(p.problems[0].what.contains("-j MASQUERADE --random-fully` (table nat) is missing"), "{p:?}");
        assert!(p.restore.as_ref().unwrap().starts_with("*nat\n") && !p.restore.unwrap().contains("*filter"));
        // A rule of someone else's in our chain.
        let text = GOLDEN.replace("COMMIT\n*filter", "-A FLANNEL-POSTRTG -s 192.0.2.1/32 -j RETURN\nCOMMIT\n*filter");
        let p = plan(&spec(), Family::V4, &parse_save(&text), false);
        assert_eq!(
            p.problems[0].what,
            "iptables rule `-A FLANNEL-POSTRTG -s 192.0.2.1/32 -j RETURN` (table nat) is not flannel's"
        );
        // Two rules swapped.
        let text = GOLDEN.replace(&format!("{}\n{}\n", rules[0], rules[1]), &format!("{}\n{}\n", rules[1], rules[0]));
        let p = plan(&spec(), Family::V4, &parse_save(&text), false);
        assert_eq!(p.problems.len(), 1);
        assert!(p.problems[0].what.contains("out of order"), "{p:?}");
        // The jump deleted; the jump twice (both deleted, one inserted).
        let jump = "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n";
        let p = plan(&spec(), Family::V4, &parse_save(&GOLDEN.replace(jump, "")), false);
        assert_eq!(p.problems[0].what, format!("iptables rule `{}` (table filter) is missing", jump.trim()));
        let p = plan(&spec(), Family::V4, &parse_save(&GOLDEN.replace(jump, &format!("{jump}{jump}"))), false);
        assert!(p.problems[0].what.ends_with("is there 2 times"), "{p:?}");
        assert_eq!(p.restore.unwrap().matches("-D FORWARD").count(), 2);
        // Not first in FORWARD is no problem: flannel does not move it either.
        let text = GOLDEN
            .replace(jump, "")
            .replace("-A FORWARD -j DOCKER-USER\n", &format!("-A FORWARD -j DOCKER-USER\n{jump}"));
        assert_eq!(plan(&spec(), Family::V4, &parse_save(&text), false), Plan::default());
    }

    #[test]
    fn the_variant_is_chosen_as_flannels_iptables_wrapper_chooses() {
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let rules = "*filter\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j ACCEPT\nCOMMIT\n";
        assert_eq!(choose(hint, hint, rules), Variant::Nft);
        assert_eq!(choose("", rules, hint), Variant::Legacy);
        assert_eq!(choose("", "", rules), Variant::Legacy);
        assert_eq!(choose("", rules, ""), Variant::Nft);
        assert_eq!(choose("", "", ""), Variant::Default);
    }

    #[test]
    fn a_feature_turned_off_removes_its_chain_and_jump() {
        let s = FirewallSpec { forward: false, ..spec() };
        let p = plan(&s, Family::V4, &parse_save(GOLDEN), false);
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].kind, "stale");
        assert_eq!(
            p.restore.unwrap(),
            "*filter\n:FLANNEL-FWD - [0:0]\n-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-X FLANNEL-FWD\nCOMMIT\n"
        );
        assert_eq!(plan(&nothing(&s), Family::V4, &BTreeMap::new(), true), Plan::default());
    }

    fn spec6() -> FirewallSpec {
        FirewallSpec {
            ipv6: Some(crate::firewall::Ipv6Rules {
                network: "2001:db8:44::/56".parse().unwrap(),
                subnet: "2001:db8:44:1::/64".parse().unwrap(),
            }),
            ..spec()
        }
    }

    #[test]
    fn ipv6_rules_are_flannels_masq_ip6_rules_and_forward_rules() {
        let m = "-m comment --comment \"flanneld masq\"";
        let (n, p) = ("2001:db8:44::/56", "2001:db8:44:1::/64");
        assert_eq!(
            masq_rules(&spec6(), Family::V6),
            [
                format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
                format!("-A FLANNEL-POSTRTG -s {n} -d {n} {m} -j RETURN"),
                format!("-A FLANNEL-POSTRTG -s {n} ! -d ff00::/8 {m} -j MASQUERADE --random-fully"),
                format!("-A FLANNEL-POSTRTG ! -s {n} -d {p} {m} -j RETURN"),
                format!("-A FLANNEL-POSTRTG ! -s {n} -d {n} {m} -j MASQUERADE --random-fully"),
            ]
        );
        let f = "-m comment --comment \"flanneld forward\"";
        assert_eq!(
            forward_rules(&spec6(), Family::V6),
            [format!("-A FLANNEL-FWD -s {n} {f} -j ACCEPT"), format!("-A FLANNEL-FWD -d {n} {f} -j ACCEPT")]
        );
        // The IPv4 rules stay as they are; without IPv6 there is none.
        assert_eq!(masq_rules(&spec6(), Family::V4), masq_rules(&spec(), Family::V4));
        assert!(masq_rules(&spec(), Family::V6).is_empty() && forward_rules(&spec(), Family::V6).is_empty());
        // An empty ip6tables gets the same kind of payload as iptables.
        let p6 = plan(&spec6(), Family::V6, &BTreeMap::new(), false);
        assert_eq!(p6.problems[0].what, "ip6tables chain FLANNEL-POSTRTG (table nat) is missing");
        let payload = p6.restore.unwrap();
        assert!(payload.starts_with(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n-I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
        ));
        assert!(payload.contains("! -d ff00::/8 ") && payload.contains("*filter\n:FLANNEL-FWD - [0:0]\n"), "{payload}");
        // Converged: nothing to do.
        let converged = format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
             -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n{}\nCOMMIT\n\
             *filter\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n{}\nCOMMIT\n",
            masq_rules(&spec6(), Family::V6).join("\n"),
            forward_rules(&spec6(), Family::V6).join("\n")
        );
        assert_eq!(plan(&spec6(), Family::V6, &parse_save(&converged), false), Plan::default());
    }

    #[test]
    fn a_family_the_configuration_lacks_loses_our_chains() {
        // IPv6-only: what is ours in iptables (IPv4) goes.
        let only6 = FirewallSpec { ipv4: None, ..spec6() };
        let p = plan(&only6, Family::V4, &parse_save(GOLDEN), false);
        assert_eq!(
            p.problems.iter().map(|p| (p.kind, p.what.as_str())).collect::<Vec<_>>(),
            [
                (
                    "stale",
                    "iptables chain FLANNEL-POSTRTG (table nat) is there, but the network configuration has no IPv4"
                ),
                (
                    "stale",
                    "iptables chain FLANNEL-FWD (table filter) is there, but the network configuration has no IPv4"
                ),
            ]
        );
        let payload = p.restore.unwrap();
        assert!(payload.contains("-X FLANNEL-POSTRTG\n") && payload.contains("-X FLANNEL-FWD\n"), "{payload}");
        // IPv4 only: our chains in ip6tables go.
        let p = plan(&spec(), Family::V6, &parse_save(GOLDEN), false);
        assert!(p.problems.iter().all(|p| p.what.contains("ip6tables chain") && p.what.ends_with("has no IPv6")));
        assert_eq!(p.problems.len(), 2);
        // A flag off names the flag.
        let p = plan(&FirewallSpec { masquerade: false, ..spec6() }, Family::V6, &parse_save(GOLDEN), false);
        assert_eq!(p.problems[0].what, "ip6tables chain FLANNEL-POSTRTG (table nat) is there, but --ip-masq is off");
    }
}
