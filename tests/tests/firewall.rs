//! Masquerade and forward rules where flannel keeps them, read back inside
//! each node's namespace with iptables-save and nft: rule for rule what the
//! real flanneld v0.20.2 makes for the same configuration (iptables), or
//! what current flannel's source makes (`EnableNFTables`); masquerade
//! working in both settings; the resync repairing; a node where flannel ran
//! taken over in place, with no moment without masquerade, and handed back.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, Overlay, ETCD};
use e2e_tests::{echo_server, tcp_round_trip};
use flannel_net::netns::NetNs;
use flanneld_rs::firewall::{self, FirewallSpec, Ipv4Rules, Ipv6Rules};
use ipnet::Ipv4Net;
use netns_fixtures::{require_root, skip_or_fail, wait_until, Netns};

const NFT_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

/// flanneld v0.20.2: `$FLANNEL_RS_UPSTREAM_FLANNELD`, the cache that
/// upstream-flannel/build.sh fills, or that script's output.
fn upstream_flanneld() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLANNEL_RS_UPSTREAM_FLANNELD") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from("/var/cache/flannel-rs/upstream/flanneld-v0.20.2");
    if cached.exists() {
        return Some(cached);
    }
    let out = std::process::Command::new("bash").arg("/work/shared/upstream-flannel/build.sh").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("flanneld=").map(PathBuf::from))
}

/// Node `i` runs upstream's flanneld (with `--ip-masq`) instead of ours.
fn spawn_upstream(o: &mut Overlay, i: usize, bin: &PathBuf) {
    let mut cmd = o.cluster.node(i).ns.command(bin);
    cmd.args(["--etcd-endpoints", ETCD, "--ip-masq", "--iptables-resync", "1", "--subnet-file"])
        .arg(&o.daemons[i].subnet_file);
    o.spawn_command(i, cmd);
}

/// `iptables-save -t <table>` without its comment lines and counters.
fn save(ns: &Netns, table: &str) -> String {
    ns.run_ok("iptables-save", &["-t", table])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.replace("[0:0]", "").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What nft sees in iptables-nft's table, counters left out.
fn nft_table(ns: &Netns, family: &str, table: &str) -> String {
    let text = ns.run_ok("nft", &["list", "table", family, table]);
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with("# Warning")) {
        let words: Vec<&str> = line.split(' ').collect();
        let mut kept = Vec::new();
        let mut i = 0;
        while i < words.len() {
            if words[i] == "counter" && words.get(i + 1) == Some(&"packets") {
                i += 5;
                continue;
            }
            kept.push(words[i]);
            i += 1;
        }
        out.push(kept.join(" "));
    }
    out.join("\n")
}

/// Runs `iptables -t <table> <rule>` with a line as iptables-save prints it
/// (`-A` turned into `op`), quoting as the shell does.
fn iptables_line(ns: &Netns, table: &str, op: &str, line: &str) {
    let cmd = format!("iptables -t {table} {op} {}", line.strip_prefix("-A ").unwrap());
    let out = ns.sh(&cmd);
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Node `i`'s namespace.
macro_rules! ns {
    ($o:expr, $i:expr) => {
        &$o.cluster.node($i).ns
    };
}

/// The rules of our chains (and the jumps to them) in `iptables-save` text.
fn flannel_lines(save: &str) -> Vec<String> {
    save.lines().filter(|l| l.contains("FLANNEL-")).map(str::to_string).collect()
}

fn wait_upstream_rules(o: &Overlay, i: usize) {
    let ns = &o.cluster.node(i).ns;
    wait_until(Duration::from_secs(30), &format!("flanneld v0.20.2's rules on node{i}"), || {
        let nat = flannel_lines(&save(ns, "nat"));
        let filter = flannel_lines(&save(ns, "filter"));
        nat.len() == 7 && filter.len() == 4
    });
}

#[test]
fn iptables_rules_are_flanneld_v0_20_2s_rule_for_rule() {
    if !require_root() {
        return;
    }
    let Some(up) = upstream_flanneld() else {
        skip_or_fail("flanneld v0.20.2 is not built (run upstream-flannel/build.sh)");
        return;
    };
    let mut o = Overlay::new(2);
    o.set_flags(0, &["--ip-masq"]);
    o.start(0);
    spawn_upstream(&mut o, 1, &up);
    wait_upstream_rules(&o, 1);
    let (s0, s1) = (o.subnet(0).to_string(), o.subnet(1).to_string());
    let (ours, theirs) = (&o.cluster.node(0).ns, &o.cluster.node(1).ns);
    for table in ["nat", "filter"] {
        let want = save(theirs, table).replace(&s1, &s0);
        assert_eq!(save(ours, table), want, "iptables-save -t {table}: ours (left) and flanneld v0.20.2's (right)");
        // The same kernel objects, as nft sees them (iptables-nft's tables).
        let want = nft_table(theirs, "ip", table).replace(&s1, &s0);
        assert_eq!(nft_table(ours, "ip", table), want, "nft list table ip {table}");
    }
    // What flannel's users grep for.
    let nat = ours.run_ok("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert!(nat.contains("-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"), "{nat}");
    let post = ours.run_ok("iptables", &["-t", "nat", "-S", "POSTROUTING"]);
    assert_eq!(post.lines().nth(1), Some("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"));
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v:#}");
}

/// Sends UDP datagrams from `pod`, each from a new socket (a new conntrack
/// entry, so each meets the NAT rules afresh), to `target` on the outside
/// host, which records every source address seen.
struct FreshFlows {
    stop: Arc<AtomicBool>,
    sources: Arc<Mutex<BTreeSet<IpAddr>>>,
    received: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FreshFlows {
    fn start(pod: &Netns, outside: &Netns, target: SocketAddr) -> FreshFlows {
        let stop = Arc::new(AtomicBool::new(false));
        let sources = Arc::new(Mutex::new(BTreeSet::new()));
        let received = Arc::new(AtomicUsize::new(0));
        let rx = NetNs::open(outside.path()).unwrap().run(move || UdpSocket::bind(target)).unwrap().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let receiver = {
            let (stop, sources, received) = (stop.clone(), sources.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = rx.recv_from(&mut buf) {
                        sources.lock().unwrap().insert(from.ip());
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let sender = {
            let stop = stop.clone();
            let ns = NetNs::open(pod.path()).unwrap();
            std::thread::spawn(move || {
                ns.run(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let any = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                        if let Ok(s) = UdpSocket::bind(any) {
                            let _ = s.send_to(b"x", target);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .unwrap();
            })
        };
        FreshFlows { stop, sources, received, threads: vec![receiver, sender] }
    }

    /// Waits until `n` more datagrams have arrived.
    fn wait_more(&self, n: usize) {
        let base = self.received.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), &format!("{n} more datagrams from the pod"), || {
            self.received.load(Ordering::Relaxed) >= base + n
        });
    }

    fn sources(&self) -> BTreeSet<IpAddr> {
        self.sources.lock().unwrap().clone()
    }

    fn stop(mut self) -> BTreeSet<IpAddr> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.sources()
    }
}

impl Drop for FreshFlows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Masquerade in both settings: a pod reaching the outside host is seen
/// with its node's address, a pod reaching a pod keeps its own.
fn masquerade_works(conf: &str) -> Overlay {
    let mut o = Overlay::with_conf(2, conf);
    o.set_flags(0, &["--ip-masq", "--iptables-resync", "1"]);
    o.set_flags(1, &["--ip-masq", "--iptables-resync", "1"]);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let (a, a_addr) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let out = SocketAddr::from(([192, 0, 2, 200], 9310));
    let server = echo_server(o.outside(), out);
    assert_eq!(tcp_round_trip(&a, out), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "192.0.2.10", "the outside host must see the node's address");
    let target = SocketAddr::new(b_addr.into(), 9311);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(a_addr), "pod to pod keeps the pod's address");
    o
}

#[test]
fn nftables_setting_makes_current_flannels_tables_and_masquerades() {
    if !require_root() {
        return;
    }
    let mut o = masquerade_works(NFT_CONF);
    let (n, p) = ("10.244.0.0/16", o.subnet(0).to_string());
    // Current flannel's tables (pkg/trafficmngr/nftables), nothing in iptables.
    let want = format!(
        "table ip flannel-ipv4 {{
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {{
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip saddr {p} ip daddr {n} return
\t\tip saddr {n} ip daddr {p} return
\t\tip saddr != {p} ip daddr {n} return
\t\tip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != {n} ip daddr {n} masquerade fully-random
\t}}

\tchain forward {{
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr {n} accept
\t\tip daddr {n} accept
\t}}
}}
"
    );
    assert_eq!(ns!(o, 0).run_ok("nft", &["list", "table", "ip", "flannel-ipv4"]), want);
    assert_eq!(
        ns!(o, 0).run_ok("nft", &["list", "table", "ip6", "flannel-ipv6"]),
        "table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}\n"
    );
    assert!(flannel_lines(&save(ns!(o, 0), "nat")).is_empty() && flannel_lines(&save(ns!(o, 0), "filter")).is_empty());
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v:#}");

    // A rule deleted by hand: diagnose names it while the daemon is down,
    // the resync puts it back while it runs.
    let handle = |ns: &Netns| -> String {
        let text = ns.run_ok("nft", &["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"]);
        let line = text.lines().find(|l| l.contains("224.0.0.0/4")).unwrap().to_string();
        line.rsplit(' ').next().unwrap().to_string()
    };
    o.stop(0);
    ns!(o, 0).run_ok("nft", &["delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", &handle(ns!(o, 0))]);
    let (ok, v) = o.diagnose(0, &[]);
    assert!(!ok);
    assert!(
        v["findings"].to_string().contains(&format!(
            "nftables table ip flannel-ipv4 lacks `ip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random`"
        )),
        "{v:#}"
    );
    o.start(0);
    ns!(o, 0).run_ok("nft", &["delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", &handle(ns!(o, 0))]);
    wait_until(Duration::from_secs(10), "the resync to rewrite flannel-ipv4 and say why", || {
        ns!(o, 0).run_ok("nft", &["list", "table", "ip", "flannel-ipv4"]) == want
            && o.log(0).contains("lacks `ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random`")
    });

    // Back to iptables (EnableNFTables removed): diagnose names what is
    // left and what is missing; the start removes flannel's tables and
    // makes its chains.
    o.stop(0);
    etcdctl_ok(o.outside(), &["put", "/coreos.com/network/config", e2e_tests::overlay::NET_CONF]);
    let (ok, v) = o.diagnose(0, &[]);
    let text = v["findings"].to_string();
    assert!(!ok, "{v:#}");
    for want in [
        "nftables table ip flannel-ipv4 is there, but EnableNFTables is not set",
        "iptables chain FLANNEL-POSTRTG (table nat) is missing",
        "iptables chain FLANNEL-FWD (table filter) is missing",
    ] {
        assert!(text.contains(want), "diagnose does not say {want:?}: {v:#}");
    }
    o.start(0);
    assert!(ns!(o, 0).run("nft", &["list", "table", "ip", "flannel-ipv4"]).map(|x| !x.status.success()).unwrap());
    assert!(ns!(o, 0).run("nft", &["list", "table", "ip6", "flannel-ipv6"]).map(|x| !x.status.success()).unwrap());
    assert_eq!(flannel_lines(&save(ns!(o, 0), "nat")).len(), 7);
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v:#}");
}

#[test]
fn iptables_setting_masquerades_and_the_resync_repairs_a_deleted_rule() {
    if !require_root() {
        return;
    }
    let mut o = masquerade_works(e2e_tests::overlay::NET_CONF);
    let before = save(ns!(o, 0), "nat");
    let rules = flannel_lines(&before);
    assert_eq!(rules.len(), 7, "{before}");
    let masq = rules.iter().find(|l| l.contains("224.0.0.0/4")).unwrap().clone();
    o.stop(0);
    iptables_line(ns!(o, 0), "nat", "-D", &masq);
    let (ok, v) = o.diagnose(0, &[]);
    assert!(!ok);
    assert!(v["findings"].to_string().contains("-j MASQUERADE --random-fully` (table nat) is missing"), "{v:#}");
    o.start(0);
    assert_eq!(save(ns!(o, 0), "nat"), before, "start-up rewrites the chain as it was");
    iptables_line(ns!(o, 0), "nat", "-D", &masq);
    wait_until(Duration::from_secs(10), "the resync to put the masquerade rule back and say why", || {
        save(ns!(o, 0), "nat") == before && o.log(0).contains("(table nat) is missing; rewritten")
    });
}

/// A node where flanneld v0.20.2 ran: ours takes its chains over in place
/// (the same nftables objects, one set of rules), new flows never leave
/// unmasqueraded meanwhile, and flannel started again afterwards finds its
/// chains as it left them.
#[test]
fn a_node_where_flannel_ran_is_taken_over_in_place_and_handed_back() {
    if !require_root() {
        return;
    }
    let Some(up) = upstream_flanneld() else {
        skip_or_fail("flanneld v0.20.2 is not built (run upstream-flannel/build.sh)");
        return;
    };
    let mut o = Overlay::new(1);
    // What an earlier flanneld-rs left: its own table and forward rules.
    ns!(o, 0).run_ok("nft", &["add", "table", "ip", "flannel-rs"]);
    spawn_upstream(&mut o, 0, &up);
    wait_upstream_rules(&o, 0);
    ns!(o, 0)
        .run_ok("nft", &["insert rule ip filter FORWARD ip saddr 10.244.0.0/16 accept comment \"flannel-rs forward\""]);
    let upstream_nat = save(ns!(o, 0), "nat");
    let upstream_filter = save(ns!(o, 0), "filter")
        .replace("-A FORWARD -s 10.244.0.0/16 -m comment --comment \"flannel-rs forward\" -j ACCEPT\n", "");
    let chain_handle = |ns: &Netns| -> String {
        let text = ns.run_ok("nft", &["-a", "list", "table", "ip", "nat"]);
        text.lines().find(|l| l.contains("chain FLANNEL-POSTRTG")).unwrap().trim().to_string()
    };
    let handle_before = chain_handle(ns!(o, 0));
    let (pod, _) = o.add_pod(0, "p");
    let flows = FreshFlows::start(&pod, o.outside(), SocketAddr::from(([192, 0, 2, 200], 9320)));
    flows.wait_more(50);

    // flannel stopped as its DaemonSet would be (its rules stay), ours started.
    o.stop(0);
    o.set_flags(0, &["--ip-masq"]);
    o.start(0);
    flows.wait_more(50);
    let seen = flows.sources();
    assert_eq!(seen, BTreeSet::from([IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))]), "a datagram left unmasqueraded");
    assert_eq!(save(ns!(o, 0), "nat"), upstream_nat, "our nat table differs from what flannel left");
    assert_eq!(save(ns!(o, 0), "filter"), upstream_filter);
    assert_eq!(chain_handle(ns!(o, 0)), handle_before, "FLANNEL-POSTRTG was made anew, not taken over");
    assert!(ns!(o, 0).run("nft", &["list", "table", "ip", "flannel-rs"]).map(|x| !x.status.success()).unwrap());

    let seen = flows.stop();
    assert_eq!(seen, BTreeSet::from([IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))]), "a datagram left unmasqueraded");

    // And back: flannel finds its chains and keeps one set of rules. (Its
    // own start empties FLANNEL-POSTRTG before it fills it again: new flows
    // may leave unmasqueraded meanwhile, as on any restart of flannel.)
    o.stop(0);
    spawn_upstream(&mut o, 0, &up);
    wait_until(Duration::from_secs(30), "flanneld v0.20.2 to start again", || {
        o.log(0).matches("bootstrap done").count() >= 4
    });
    assert_eq!(save(ns!(o, 0), "nat"), upstream_nat);
    assert_eq!(save(ns!(o, 0), "filter"), upstream_filter);
    let out = SocketAddr::from(([192, 0, 2, 200], 9321));
    let server = echo_server(o.outside(), out);
    assert_eq!(tcp_round_trip(&pod, out), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "192.0.2.10", "flannel masquerades again");
}

/// flannel's nftables objects made the way its source makes them (knftables'
/// `add table`, `add chain`, `flush chain`, `add rule` commands, one
/// transaction per table as it runs them) for this node's lease: they list
/// exactly as ours do, and ours take them over with no fresh flow leaving
/// unmasqueraded and no second set.
#[test]
fn nftables_tables_as_flannel_makes_them_are_ours_and_taken_over_without_a_gap() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(1, NFT_CONF);
    o.set_flags(0, &["--ip-masq"]);
    o.start(0);
    let ours = ns!(o, 0).run_ok("nft", &["list", "ruleset"]);
    o.stop(0);
    let (n, p) = ("10.244.0.0/16", o.subnet(0).to_string());
    ns!(o, 0).run_ok("nft", &["delete table ip flannel-ipv4; delete table ip6 flannel-ipv6"]);
    for tx in [
        "add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }".to_string(),
        "add table ip6 flannel-ipv6 { comment \"rules for flannel-ipv6\" ; }".to_string(),
        format!(
            "add chain ip flannel-ipv4 postrtg {{ type nat hook postrouting priority srcnat ; comment \"chain to manage traffic masquerading by flannel\" ; }}
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr {p} ip daddr {n} return
add rule ip flannel-ipv4 postrtg ip saddr {n} ip daddr {p} return
add rule ip flannel-ipv4 postrtg ip saddr != {p} ip daddr {n} return
add rule ip flannel-ipv4 postrtg ip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != {n} ip daddr {n} masquerade fully-random"
        ),
        format!(
            "add chain ip flannel-ipv4 forward {{ type filter hook forward priority filter ; comment \"chain to accept flannel traffic\" ; }}
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr {n} accept
add rule ip flannel-ipv4 forward ip daddr {n} accept"
        ),
    ] {
        let mut child = ns!(o, 0)
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(tx.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "{tx}");
    }
    assert_eq!(ns!(o, 0).run_ok("nft", &["list", "ruleset"]), ours, "flannel's commands (right) list otherwise");

    let (pod, _) = o.add_pod(0, "p");
    let flows = FreshFlows::start(&pod, o.outside(), SocketAddr::from(([192, 0, 2, 200], 9330)));
    flows.wait_more(50);
    o.start(0);
    flows.wait_more(50);
    assert_eq!(
        flows.stop(),
        BTreeSet::from([IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))]),
        "a datagram left unmasqueraded"
    );
    assert_eq!(ns!(o, 0).run_ok("nft", &["list", "ruleset"]), ours);
}

/// A node whose kubelet uses iptables-legacy (its hint chain is there, as
/// kubelet makes it): the rules go where flannel's image would put them,
/// into iptables-legacy, and masquerade works.
#[test]
fn a_node_on_iptables_legacy_gets_the_rules_in_iptables_legacy() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    ns!(o, 0).run_ok("iptables-legacy", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    o.set_flags(0, &["--ip-masq"]);
    o.start(0);
    let legacy = |table: &str| -> String {
        ns!(o, 0)
            .run_ok("iptables-legacy-save", &["-t", table])
            .lines()
            .filter(|l| l.contains("FLANNEL-"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (nat, filter) = (legacy("nat"), legacy("filter"));
    assert_eq!(nat.lines().count(), 7, "{nat}");
    assert!(nat.contains("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"), "{nat}");
    assert_eq!(filter.lines().count(), 4, "{filter}");
    assert!(!ns!(o, 0).run_ok("iptables-nft-save", &[]).contains("FLANNEL-"), "rules in iptables-nft too");
    assert!(o.log(0).contains("using /usr/sbin/iptables-legacy-restore"), "{}", o.log(0));
    let (pod, _) = o.add_pod(0, "p");
    let out = SocketAddr::from(([192, 0, 2, 200], 9340));
    let server = echo_server(o.outside(), out);
    assert_eq!(tcp_round_trip(&pod, out), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "192.0.2.10");
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v:#}");
}

// ---------------------------------------------------------------- IPv6 --

/// The IPv6 cluster network of these tests and the node's subnet in it.
const N6: &str = "2001:db8:44::/56";
const P6: &str = "2001:db8:44:1::/64";
/// The node's and the outside host's IPv6 underlay addresses.
const NODE6: &str = "2001:db8::10";
const OUTSIDE6: &str = "2001:db8::c8";

/// The spec for the IPv6 network `n6` and subnet `p6`, with the IPv4 part
/// given (dual-stack) or not (IPv6-only).
fn spec6(v4: Option<(&str, Ipv4Net)>, n6: &str, p6: &str, nftables: bool) -> FirewallSpec {
    FirewallSpec {
        ipv4: v4.map(|(n, p)| Ipv4Rules { network: n.parse().unwrap(), subnet: p }),
        ipv6: Some(Ipv6Rules { network: n6.parse().unwrap(), subnet: p6.parse().unwrap() }),
        masquerade: true,
        fully_random: true,
        forward: true,
        nftables,
    }
}

/// `ip6tables-save -t <table>` without its comment lines and counters.
fn save6(ns: &Netns, table: &str) -> String {
    ns.run_ok("ip6tables-save", &["-t", table])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.replace("[0:0]", "").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Gives the node and the outside host their IPv6 underlay addresses
/// (2001:db8::/64 on eth0) and the outside host a route to the IPv6
/// network via the node.
fn ipv6_underlay(node: &Netns, outside: &Netns) {
    node.ip_batch(&[format!("addr add {NODE6}/64 dev eth0 nodad")]).unwrap();
    outside
        .ip_batch(&[format!("addr add {OUTSIDE6}/64 dev eth0 nodad"), format!("route add {N6} via {NODE6}")])
        .unwrap();
    node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
}

/// A namespace behind the node on a veth (`link` on the node side): its
/// `eth0` has `addr`/64, the node's side `gw`/64 (both without DAD), and
/// its default route goes via `gw`.
fn ipv6_host_behind(node: &netns_fixtures::Node, name: &str, link: &str, addr: &str, gw: &str) -> Netns {
    let ns = node.add_pod_netns(name).unwrap();
    node.ns
        .ip_batch(&[
            format!("link add {link} type veth peer name eth0 netns {}", ns.name()),
            format!("addr add {gw}/64 dev {link} nodad"),
            format!("link set {link} up"),
        ])
        .unwrap();
    ns.ip_batch(&[
        format!("addr add {addr}/64 dev eth0 nodad"),
        "link set eth0 up".into(),
        "link set lo up".into(),
        format!("route add default via {gw}"),
    ])
    .unwrap();
    node.ns.wait_oper_up(&[link], Duration::from_secs(10)).unwrap();
    ns.wait_oper_up(&["eth0"], Duration::from_secs(10)).unwrap();
    ns
}

/// The source address `to`'s echo server sees for a TCP round trip from `from`.
fn seen_from(from: &Netns, to: &Netns, addr: &str, port: u16) -> IpAddr {
    let target = SocketAddr::new(addr.parse().unwrap(), port);
    let server = echo_server(to, target);
    assert_eq!(tcp_round_trip(from, target), "ping\n");
    server.join().unwrap().ip()
}

/// IPv6 masquerade on the real kernel, the rules written by our writers
/// inside the node's namespace: a pod reaching the outside host is seen
/// with the node's IPv6 address; a pod reaching a pod of
/// another node's subnet keeps its address; the outside host reaching our
/// pod keeps its address; the host reaching a pod of another subnet through
/// the node is masqueraded (iptables, upstream's last rule) or not
/// (nftables, current flannel's fourth rule returns first); traffic the
/// kube-proxy marked is left alone. Then the same with the nftables tables,
/// and IPv6-only.
#[test]
fn ipv6_masquerade_on_the_kernel_as_flannels_rules_say() {
    if !require_root() {
        return;
    }
    let cluster = netns_fixtures::Cluster::with_outside(1).unwrap();
    let (node, outside) = (cluster.node(0), cluster.outside().unwrap());
    ipv6_underlay(&node.ns, outside);
    // A pod of ours (in P6) and a pod of another node's subnet (reached
    // here through a second link, as through flannel.1).
    let pod = ipv6_host_behind(node, "p6", "vpod", "2001:db8:44:1::2", "2001:db8:44:1::1");
    let peer = ipv6_host_behind(node, "q6", "vpeer", "2001:db8:44:2::2", "2001:db8:44:2::1");
    let node6: IpAddr = NODE6.parse().unwrap();
    let pod6: IpAddr = "2001:db8:44:1::2".parse().unwrap();
    let out6: IpAddr = OUTSIDE6.parse().unwrap();
    // Before any rule: nothing is masqueraded (so each check below can fail).
    assert_eq!(seen_from(&pod, outside, OUTSIDE6, 9400), pod6);

    let v4 = Some(("10.244.0.0/16", "10.244.1.0/24".parse().unwrap()));
    for (mode, spec) in [
        ("iptables", spec6(v4, N6, P6, false)),
        ("iptables, IPv6-only", spec6(None, N6, P6, false)),
        ("nftables", spec6(v4, N6, P6, true)),
        ("nftables, IPv6-only", spec6(None, N6, P6, true)),
    ] {
        let done = node.ns.in_thread(|| firewall::setup(&spec)).unwrap();
        assert!(node.ns.in_thread(|| firewall::check(&spec)).unwrap().is_empty(), "{mode}: {done:?}");
        assert_eq!(seen_from(&pod, outside, OUTSIDE6, 9401), node6, "{mode}: pod -> outside is masqueraded");
        assert_eq!(seen_from(&pod, &peer, "2001:db8:44:2::2", 9402), pod6, "{mode}: pod -> pod keeps its address");
        assert_eq!(seen_from(outside, &pod, "2001:db8:44:1::2", 9403), out6, "{mode}: outside -> our pod keeps it");
        let host_to_other = seen_from(outside, &peer, "2001:db8:44:2::2", 9404);
        if spec.nftables {
            assert_eq!(host_to_other, out6, "{mode}: flannel's nftables rule 4 returns for sources outside P");
        } else {
            let route = node.ns.run_ok("ip", &["-6", "route", "get", "2001:db8:44:2::2"]);
            let src: IpAddr = route.split_whitespace().skip_while(|w| *w != "src").nth(1).unwrap().parse().unwrap();
            assert_eq!(host_to_other, src, "{mode}: outside -> other subnet is masqueraded (upstream's last rule)");
        }
        // The kube-proxy's mark: flannel leaves such packets alone.
        node.ns.run_ok("ip6tables", &["-t", "mangle", "-A", "FORWARD", "-j", "MARK", "--set-mark", "0x4000/0x4000"]);
        assert_eq!(seen_from(&pod, outside, OUTSIDE6, 9405), pod6, "{mode}: marked traffic is not masqueraded here");
        node.ns.run_ok("ip6tables", &["-t", "mangle", "-D", "FORWARD", "-j", "MARK", "--set-mark", "0x4000/0x4000"]);
        let ours4 = flannel_lines(&save(&node.ns, "nat")).len() + flannel_lines(&save(&node.ns, "filter")).len();
        let ours6 = flannel_lines(&save6(&node.ns, "nat")).len() + flannel_lines(&save6(&node.ns, "filter")).len();
        match (spec.nftables, spec.ipv4.is_some()) {
            (false, true) => assert_eq!((ours4, ours6), (11, 11), "{mode}"),
            (false, false) => {
                // What was ours for IPv4 (the dual-stack round's) is gone.
                assert_eq!((ours4, ours6), (0, 11), "{mode}");
                assert!(done.iter().any(|d| d.contains("iptables chain FLANNEL-POSTRTG (table nat) is there, but the network configuration has no IPv4")), "{done:?}");
            }
            (true, v4) => {
                assert_eq!((ours4, ours6), (0, 0), "{mode}: flannel's iptables chains left");
                let t4 = node.ns.run_ok("nft", &["list", "table", "ip", "flannel-ipv4"]);
                assert_eq!(t4.contains("chain postrtg"), v4, "{mode}: {t4}");
            }
        }
    }
}

const DUAL_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:44::/56","Backend":{"Type":"vxlan"}}"#;

/// Node `i`'s IPv6 subnet from the subnet.env upstream's flanneld wrote.
fn subnet6(o: &Overlay, i: usize) -> ipnet::Ipv6Net {
    let text = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET=")).unwrap();
    line.parse::<ipnet::Ipv6Net>().unwrap().trunc()
}

/// flanneld v0.20.2 dual-stack (etcd mode, vxlan) on node 0, until its
/// IPv4 and IPv6 chains are all there.
fn spawn_upstream_dual(o: &mut Overlay, bin: &PathBuf) {
    let mut cmd = o.cluster.node(0).ns.command(bin);
    cmd.args(["--etcd-endpoints", ETCD, "--ip-masq", "--iptables-resync", "1", "--iface", "eth0", "--subnet-file"])
        .arg(&o.daemons[0].subnet_file);
    o.spawn_command(0, cmd);
    let ns = &o.cluster.node(0).ns;
    wait_until(Duration::from_secs(30), "flanneld v0.20.2's IPv4 and IPv6 rules on node0", || {
        let count = |t: String| flannel_lines(&t).len();
        count(save(ns, "nat")) == 7
            && count(save(ns, "filter")) == 4
            && count(save6(ns, "nat")) == 7
            && count(save6(ns, "filter")) == 4
    });
}

/// flanneld v0.20.2 with `EnableIPv6`: its ip6tables chains are, rule for
/// rule, what ours write; ours take them over in place (the same kernel
/// chain, one set of rules), the resync repairs a deleted IPv6 rule after
/// the check has named it, and flannel started again finds its chains as
/// it left them.
#[test]
fn ip6tables_rules_are_flanneld_v0_20_2s_and_taken_over_both_ways() {
    if !require_root() {
        return;
    }
    let Some(up) = upstream_flanneld() else {
        skip_or_fail("flanneld v0.20.2 is not built (run upstream-flannel/build.sh)");
        return;
    };
    let mut o = Overlay::with_conf(1, DUAL_CONF);
    ipv6_underlay(ns!(o, 0), o.outside());
    spawn_upstream_dual(&mut o, &up);
    let (nat6, filter6) = (save6(ns!(o, 0), "nat"), save6(ns!(o, 0), "filter"));
    let (nat4, filter4) = (save(ns!(o, 0), "nat"), save(ns!(o, 0), "filter"));
    let p6 = subnet6(&o, 0);
    let spec = FirewallSpec {
        ipv4: Some(Ipv4Rules { network: "10.244.0.0/16".parse().unwrap(), subnet: o.subnet(0) }),
        ipv6: Some(Ipv6Rules { network: N6.parse().unwrap(), subnet: p6 }),
        masquerade: true,
        fully_random: true,
        forward: true,
        nftables: false,
    };
    // What flannel wrote is exactly what ours want (both families).
    let theirs = flannel_lines(&nat6);
    assert!(theirs.contains(&format!("-A FLANNEL-POSTRTG -s {N6} ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully")), "{nat6}");
    assert!(
        theirs.contains(&format!(
            "-A FLANNEL-POSTRTG ! -s {N6} -d {p6} -m comment --comment \"flanneld masq\" -j RETURN"
        )),
        "{nat6}"
    );
    assert_eq!(ns!(o, 0).in_thread(|| firewall::check(&spec)).unwrap(), vec![], "ours (left) differ from flannel's");
    let chain_handle = |ns: &Netns| -> String {
        let text = ns.run_ok("nft", &["-a", "list", "table", "ip6", "nat"]);
        text.lines().find(|l| l.contains("chain FLANNEL-POSTRTG")).unwrap().trim().to_string()
    };
    let handle_before = chain_handle(ns!(o, 0));

    // A pod of flannel's subnet sending fresh flows to the outside host
    // all along: none may leave unmasqueraded.
    let (pod6, gw6) = (format!("{}2", p6.network()), format!("{}1", p6.network()));
    let pod = ipv6_host_behind(o.cluster.node(0), "p6", "vpod", &pod6, &gw6);
    let flows = FreshFlows::start(&pod, o.outside(), SocketAddr::new(OUTSIDE6.parse().unwrap(), 9420));
    flows.wait_more(50);
    let node6 = BTreeSet::from([NODE6.parse::<IpAddr>().unwrap()]);
    assert_eq!(flows.sources(), node6, "flannel masquerades");

    // Ours take over (flannel stopped, its rules stay).
    o.stop(0);
    let done = ns!(o, 0).in_thread(|| firewall::setup(&spec)).unwrap();
    flows.wait_more(50);
    assert_eq!(flows.stop(), node6, "a datagram left unmasqueraded");
    assert_eq!(done, ["iptables and ip6tables chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) written"]);
    assert_eq!(save6(ns!(o, 0), "nat"), nat6, "ip6tables-save -t nat: ours (left) and flannel's (right)");
    assert_eq!(save6(ns!(o, 0), "filter"), filter6, "ip6tables-save -t filter");
    assert_eq!((save(ns!(o, 0), "nat"), save(ns!(o, 0), "filter")), (nat4, filter4));
    assert_eq!(chain_handle(ns!(o, 0)), handle_before, "FLANNEL-POSTRTG (ip6) was made anew, not taken over");

    // A deleted IPv6 rule: the check names it, the resync puts it back.
    let masq = theirs.iter().find(|l| l.contains("ff00::/8")).unwrap().clone();
    let cmd = format!("ip6tables -t nat -D {}", masq.strip_prefix("-A ").unwrap());
    assert!(ns!(o, 0).sh(&cmd).status.success(), "{cmd}");
    let problems = ns!(o, 0).in_thread(|| firewall::check(&spec)).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].kind, problems[0].what.as_str()),
        ("missing", &*format!("ip6tables rule `{masq}` (table nat) is missing"))
    );
    assert_eq!(ns!(o, 0).in_thread(|| firewall::ensure(&spec)).unwrap(), problems);
    assert_eq!(save6(ns!(o, 0), "nat"), nat6, "the resync rewrote the chain as flannel has it");
    assert!(ns!(o, 0).in_thread(|| firewall::ensure(&spec)).unwrap().is_empty());

    // And back: flannel finds its chains and keeps one set of rules.
    let starts = o.log(0).matches("bootstrap done").count();
    spawn_upstream_dual(&mut o, &up);
    wait_until(Duration::from_secs(30), "flanneld v0.20.2 to bootstrap its four chains again", || {
        o.log(0).matches("bootstrap done").count() >= 2 * starts
    });
    assert_eq!((save6(ns!(o, 0), "nat"), save6(ns!(o, 0), "filter")), (nat6, filter6));
    assert_eq!(chain_handle(ns!(o, 0)), handle_before);
}

/// Runs `tx` with `nft -f -` in `ns` (one transaction).
fn nft_tx(ns: &Netns, tx: &str) {
    use std::io::Write;
    let mut child = ns.command("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(tx.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{tx}");
}

/// `EnableNFTables` with IPv6: the `ip6 flannel-ipv6` table made the way
/// current flannel's source makes it (knftables' commands, one transaction
/// per table and chain, `ip6` matches and `ff00::/8`) lists exactly as
/// ours; ours take it over with no fresh IPv6 flow leaving unmasqueraded;
/// a deleted rule is named by the check and rewritten by the resync.
#[test]
fn ipv6_nftables_table_as_flannel_makes_it_is_ours_and_taken_over_without_a_gap() {
    if !require_root() {
        return;
    }
    let cluster = netns_fixtures::Cluster::with_outside(1).unwrap();
    let (node, outside) = (cluster.node(0), cluster.outside().unwrap());
    ipv6_underlay(&node.ns, outside);
    let pod = ipv6_host_behind(node, "p6", "vpod", "2001:db8:44:1::2", "2001:db8:44:1::1");
    let p4: Ipv4Net = "10.244.1.0/24".parse().unwrap();
    let spec = spec6(Some(("10.244.0.0/16", p4)), N6, P6, true);
    let (n, p) = ("10.244.0.0/16", p4);
    let m = "masquerade fully-random";
    for tx in [
        "add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }".to_string(),
        "add table ip6 flannel-ipv6 { comment \"rules for flannel-ipv6\" ; }".to_string(),
        format!(
            "add chain ip flannel-ipv4 postrtg {{ type nat hook postrouting priority srcnat ; comment \"chain to manage traffic masquerading by flannel\" ; }}
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr {p} ip daddr {n} return
add rule ip flannel-ipv4 postrtg ip saddr {n} ip daddr {p} return
add rule ip flannel-ipv4 postrtg ip saddr != {p} ip daddr {n} return
add rule ip flannel-ipv4 postrtg ip saddr {n} ip daddr != 224.0.0.0/4 {m}
add rule ip flannel-ipv4 postrtg ip saddr != {n} ip daddr {n} {m}"
        ),
        format!(
            "add chain ip6 flannel-ipv6 postrtg {{ type nat hook postrouting priority srcnat ; comment \"chain to manage traffic masquerading by flannel\" ; }}
flush chain ip6 flannel-ipv6 postrtg
add rule ip6 flannel-ipv6 postrtg meta mark 0x4000 return
add rule ip6 flannel-ipv6 postrtg ip6 saddr {P6} ip6 daddr {N6} return
add rule ip6 flannel-ipv6 postrtg ip6 saddr {N6} ip6 daddr {P6} return
add rule ip6 flannel-ipv6 postrtg ip6 saddr != {P6} ip6 daddr {N6} return
add rule ip6 flannel-ipv6 postrtg ip6 saddr {N6} ip6 daddr != ff00::/8 {m}
add rule ip6 flannel-ipv6 postrtg ip6 saddr != {N6} ip6 daddr {N6} {m}"
        ),
        format!(
            "add chain ip flannel-ipv4 forward {{ type filter hook forward priority filter ; comment \"chain to accept flannel traffic\" ; }}
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr {n} accept
add rule ip flannel-ipv4 forward ip daddr {n} accept"
        ),
        format!(
            "add chain ip6 flannel-ipv6 forward {{ type filter hook forward priority filter ; comment \"chain to accept flannel traffic\" ; }}
flush chain ip6 flannel-ipv6 forward
add rule ip6 flannel-ipv6 forward ip6 saddr {N6} accept
add rule ip6 flannel-ipv6 forward ip6 daddr {N6} accept"
        ),
    ] {
        nft_tx(&node.ns, &tx);
    }
    let theirs = node.ns.run_ok("nft", &["list", "ruleset"]);
    assert_eq!(node.ns.in_thread(|| firewall::check(&spec)).unwrap(), vec![], "ours (left) differ from flannel's");
    assert_eq!(
        node.ns.run_ok("nft", &["list", "table", "ip6", "flannel-ipv6"]),
        format!(
            "table ip6 flannel-ipv6 {{
\tcomment \"rules for flannel-ipv6\"
\tchain postrtg {{
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip6 saddr {P6} ip6 daddr {N6} return
\t\tip6 saddr {N6} ip6 daddr {P6} return
\t\tip6 saddr != {P6} ip6 daddr {N6} return
\t\tip6 saddr {N6} ip6 daddr != ff00::/8 {m}
\t\tip6 saddr != {N6} ip6 daddr {N6} {m}
\t}}

\tchain forward {{
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip6 saddr {N6} accept
\t\tip6 daddr {N6} accept
\t}}
}}
"
        )
    );

    let flows = FreshFlows::start(&pod, outside, SocketAddr::new(OUTSIDE6.parse().unwrap(), 9430));
    flows.wait_more(50);
    node.ns.in_thread(|| firewall::setup(&spec)).unwrap();
    flows.wait_more(50);
    assert_eq!(flows.stop(), BTreeSet::from([NODE6.parse::<IpAddr>().unwrap()]), "a datagram left unmasqueraded");
    assert_eq!(node.ns.run_ok("nft", &["list", "ruleset"]), theirs);

    // A deleted IPv6 rule: named, then rewritten.
    let text = node.ns.run_ok("nft", &["-a", "list", "chain", "ip6", "flannel-ipv6", "postrtg"]);
    let line = text.lines().find(|l| l.contains("ff00::/8")).unwrap();
    let handle = line.rsplit(' ').next().unwrap();
    node.ns.run_ok("nft", &["delete", "rule", "ip6", "flannel-ipv6", "postrtg", "handle", handle]);
    let problems = node.ns.in_thread(|| firewall::check(&spec)).unwrap();
    assert_eq!(
        problems.iter().map(|p| (p.kind, p.what.as_str())).collect::<Vec<_>>(),
        [("missing", &*format!("nftables table ip6 flannel-ipv6 lacks `ip6 saddr {N6} ip6 daddr != ff00::/8 {m}`"))]
    );
    assert_eq!(node.ns.in_thread(|| firewall::ensure(&spec)).unwrap(), problems);
    assert_eq!(node.ns.run_ok("nft", &["list", "ruleset"]), theirs);
}
