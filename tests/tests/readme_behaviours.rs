//! What the README promises of the daemon, end to end (issue 12): real
//! etcd, real daemons, real kernel, each observed from outside the daemon
//! (`etcdctl`, `ip -j`, `nft -j`, HTTP status codes, exit statuses).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use e2e_tests::overlay::{etcdctl_ok, leases, second_interface, Overlay, ETCD};
use netns_fixtures::{require_root, wait_until, Netns};
use serde_json::Value;

/// Waits for node `i`'s daemon to exit by itself and returns its status.
fn wait_exit(o: &mut Overlay, i: usize, timeout: Duration, what: &str) -> ExitStatus {
    let mut status = None;
    let child = o.daemons[i].proc.0.as_mut().expect("the daemon was started");
    wait_until(timeout, what, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    o.daemons[i].proc.0 = None;
    status.unwrap()
}

/// The etcd lease (its id) that `key` is bound to, from `etcdctl get -w json`.
fn etcd_lease_of(outside: &Netns, key: &str) -> i64 {
    let v: Value = serde_json::from_str(&etcdctl_ok(outside, &["get", key, "-w", "json"])).unwrap();
    v["kvs"][0]["lease"].as_i64().unwrap_or_else(|| panic!("{key} is not bound to an etcd lease: {v}"))
}

/// `etcdctl lease timetolive`: (remaining TTL, granted TTL) in seconds.
fn time_to_live(outside: &Netns, lease: i64) -> (i64, i64) {
    let v: Value =
        serde_json::from_str(&etcdctl_ok(outside, &["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]))
            .unwrap();
    (v["ttl"].as_i64().unwrap(), v["granted-ttl"].as_i64().unwrap())
}

/// `ip -j -d link show flannel.1` on node `i`.
fn vtep(o: &Overlay, i: usize) -> Value {
    o.cluster.node(i).ns.ip_json(&["-d", "link", "show", "flannel.1"])[0].clone()
}

/// The masquerade rules in flannel's chain FLANNEL-POSTRTG, from `iptables-save`.
fn masquerade_rules(ns: &Netns) -> Vec<String> {
    ns.run_ok("iptables-save", &["-t", "nat"])
        .lines()
        .filter(|l| l.starts_with("-A FLANNEL-POSTRTG ") && l.contains("-j MASQUERADE"))
        .map(str::to_string)
        .collect()
}

/// The status code of `GET path` on `addr` from inside `ns`; `None` when
/// nothing listens (yet).
fn http_status(ns: &Netns, addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = flannel_net::netns::NetNs::open(ns.path())
        .unwrap()
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap()
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// "If our key is deleted, the daemon says the lease was revoked and exits
/// non-zero."
#[test]
fn a_daemon_whose_lease_is_deleted_says_it_was_revoked_and_exits_non_zero() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    o.start(0);
    let key = o.lease_key(0);
    assert!(etcdctl_ok(o.outside(), &["get", &key]).contains(&key), "the daemon's key {key} is not in etcd");
    etcdctl_ok(o.outside(), &["del", &key]);
    let status = wait_exit(&mut o, 0, Duration::from_secs(10), "the daemon to exit after its key was deleted");
    assert!(!status.success() && status.code().is_some(), "exit status {status}; log:\n{}", o.log(0));
    let last = o.log(0).lines().last().unwrap_or_default().to_string();
    assert!(last.contains("ERROR") && last.contains(&key) && last.contains("revoked"), "last log line: {last}");
}

/// "bound to a 24 h etcd lease renewed `--subnet-lease-renew-margin`
/// minutes before expiry": with the largest margin the daemon accepts,
/// 1439 minutes, the renewal is due one minute after the grant. etcd's own
/// view of the lease shows it: its TTL counts down to 1439 minutes and then
/// jumps back to 24 h, on the same etcd lease.
#[test]
fn the_lease_is_renewed_margin_minutes_before_it_expires() {
    if !require_root() {
        return;
    }
    const TTL: i64 = 24 * 60 * 60;
    const MARGIN: i64 = 1439 * 60;
    let mut o = Overlay::new(1);
    o.set_flags(0, &["--subnet-lease-renew-margin", "1439"]);
    o.start(0);
    let key = o.lease_key(0);
    let lease = etcd_lease_of(o.outside(), &key);
    let (first, granted) = time_to_live(o.outside(), lease);
    assert_eq!(granted, TTL, "the etcd lease's granted TTL");
    // Poll etcd twice a second: the lowest TTL seen before it goes up again
    // is where the daemon renewed.
    let mut lowest = first;
    let mut last_poll = Instant::now();
    let mut now = first;
    wait_until(Duration::from_secs(120), "etcd's TTL of the lease to go back up", || {
        if last_poll.elapsed() < Duration::from_millis(500) {
            return false;
        }
        last_poll = Instant::now();
        now = time_to_live(o.outside(), lease).0;
        if now > lowest {
            return true;
        }
        lowest = now;
        false
    });
    // Renewed on schedule, not early: the TTL had come down to the margin
    // (give or take the half-second polling on a loaded machine) ...
    assert!(lowest <= MARGIN + 20, "renewed when the TTL was still {lowest} s (margin {MARGIN} s)");
    // ... and the renewal restored the full 24 h, on the same etcd lease.
    assert!(now >= TTL - 20, "TTL after the renewal: {now} s");
    assert_eq!(etcd_lease_of(o.outside(), &key), lease, "the key moved to another etcd lease");
    assert!(o.daemons[0].proc.0.as_mut().unwrap().try_wait().unwrap().is_none(), "the daemon died:\n{}", o.log(0));
}

/// "A device with incompatible attributes is recreated": a `flannel.1` made
/// by hand with another UDP port, another local address and learning on,
/// while the daemon is down, is replaced with the configured VTEP, and the
/// peers' entries and pod traffic come back.
#[test]
fn a_vtep_with_incompatible_attributes_is_recreated() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let pods = vec![o.add_pod(0, "a"), o.add_pod(1, "b")];
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("ip", &["link", "del", "flannel.1"]);
    ns.run_ok(
        "ip",
        &[
            "link",
            "add",
            "flannel.1",
            "mtu",
            "1400",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "4789",
            "dev",
            "eth0",
            "local",
            "192.0.2.99",
            "learning",
        ],
    );
    ns.run_ok("ip", &["link", "set", "flannel.1", "up"]);
    let by_hand = vtep(&o, 0);
    assert_eq!(by_hand["linkinfo"]["info_data"]["port"], 4789, "{by_hand}");
    assert_eq!(by_hand["linkinfo"]["info_data"]["learning"], true, "{by_hand}");

    o.start(0);
    let link = vtep(&o, 0);
    assert_ne!(link["ifindex"], by_hand["ifindex"], "flannel.1 was not recreated: {link}");
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1, "{link}");
    assert_eq!(info["port"], 8472, "{link}");
    assert_eq!(info["local"], "192.0.2.10", "{link}");
    assert_eq!(info["learning"], false, "{link}");
    assert_eq!(info["link"], "eth0", "{link}");
    assert_eq!(link["mtu"], 1450, "{link}");
    let addrs = o.cluster.node(0).ns.ip_json(&["-4", "addr", "show", "dev", "flannel.1"]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], o.subnet(0).network().to_string(), "{addrs}");
    // The MAC the device has is the one the lease advertises, so the peer's
    // FDB entry (checked by wait_converged against etcd) points at it.
    let lease = &leases(o.outside())[&o.lease_key(0)];
    assert_eq!(lease["BackendData"]["VtepMAC"], link["address"], "lease {lease} against device {link}");
    o.wait_converged(0);
    o.wait_converged(1);
    e2e_tests::all_pods_talk(&pods, 7600);
}

/// "each also from `FLANNELD_<FLAG>`": a daemon with no flag at all, only
/// FLANNELD_ETCD_ENDPOINTS, FLANNELD_SUBNET_FILE, FLANNELD_IP_MASQ and
/// FLANNELD_IFACE (naming a second interface, so that it is not what the
/// default route would pick), does what they say; then the same variables
/// with flags that say otherwise: the flags win.
#[test]
fn flanneld_environment_variables_take_effect_and_flags_win_over_them() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    let ns = &o.cluster.node(0).ns;
    second_interface(ns);
    let from_env = o.dir.path().join("from-env/subnet.env");
    let from_flag = o.dir.path().join("from-flag/subnet.env");
    std::fs::create_dir_all(from_env.parent().unwrap()).unwrap();
    std::fs::create_dir_all(from_flag.parent().unwrap()).unwrap();
    let env = |endpoints: &str| {
        vec![
            ("FLANNELD_ETCD_ENDPOINTS".to_string(), endpoints.to_string()),
            ("FLANNELD_SUBNET_FILE".to_string(), from_env.display().to_string()),
            ("FLANNELD_IP_MASQ".to_string(), "true".to_string()),
            ("FLANNELD_IFACE".to_string(), "ext1".to_string()),
        ]
    };
    // Only the environment (the default endpoints, 127.0.0.1, have no etcd).
    let mut cmd = o.bare_daemon_command(0);
    cmd.envs(env(ETCD));
    o.spawn_command(0, cmd);
    o.wait_ready(0);
    o.daemons[0].subnet_file = from_env.clone();
    let text = std::fs::read_to_string(&from_env).unwrap();
    assert!(text.contains("FLANNEL_IPMASQ=true") && text.contains("FLANNEL_NETWORK=10.244.0.0/16"), "{text}");
    let ns = &o.cluster.node(0).ns;
    let masq = masquerade_rules(ns);
    assert_eq!(masq.len(), 2, "{masq:?}");
    let lease = &leases(o.outside())[&o.lease_key(0)];
    assert_eq!(lease["PublicIP"], "198.51.100.10", "{lease}");
    let link = vtep(&o, 0);
    assert_eq!(link["linkinfo"]["info_data"]["local"], "198.51.100.10", "{link}");
    assert_eq!(link["linkinfo"]["info_data"]["link"], "ext1", "{link}");

    // The same variables (the endpoints one now pointing at nothing), and
    // flags that contradict each of them.
    o.stop(0);
    std::fs::remove_file(&from_env).unwrap();
    let mut cmd = o.bare_daemon_command(0);
    cmd.envs(env("http://192.0.2.201:2379"))
        .args(["--etcd-endpoints", ETCD, "--ip-masq=false", "--iface", "eth0", "--subnet-file"])
        .arg(&from_flag);
    o.spawn_command(0, cmd);
    o.wait_ready(0);
    o.daemons[0].subnet_file = from_flag.clone();
    assert!(!from_env.exists(), "subnet.env was written where FLANNELD_SUBNET_FILE says, not where --subnet-file says");
    let text = std::fs::read_to_string(&from_flag).unwrap();
    assert!(text.contains("FLANNEL_IPMASQ=false"), "{text}");
    let ns = &o.cluster.node(0).ns;
    let masq = masquerade_rules(ns);
    assert!(masq.is_empty(), "{masq:?}");
    let lease = &leases(o.outside())[&o.lease_key(0)];
    assert_eq!(lease["PublicIP"], "192.0.2.10", "{lease}");
    let link = vtep(&o, 0);
    assert_eq!(link["linkinfo"]["info_data"]["local"], "192.0.2.10", "{link}");
}

/// "`/healthz`, `/readyz` (ready once the rules are in place and
/// `subnet.env` is written)": a daemon whose etcd does not answer (frozen
/// with SIGSTOP: connections are accepted, requests hang) is alive and not
/// ready; once etcd goes on, it becomes ready.
#[test]
fn readyz_says_503_until_the_daemon_is_ready_while_healthz_says_200() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    o.set_flags(0, &["--healthz-ip", "127.0.0.1", "--healthz-port", "9104"]);
    let addr = SocketAddr::from(([127, 0, 0, 1], 9104));
    o.etcd.pause();
    o.spawn(0);
    let ns = &o.cluster.node(0).ns;
    wait_until(Duration::from_secs(10), "/healthz to answer", || http_status(ns, addr, "/healthz").is_some());
    assert_eq!(http_status(ns, addr, "/healthz"), Some(200));
    assert_eq!(http_status(ns, addr, "/readyz"), Some(503));
    let metrics = e2e_tests::http_get(ns, addr, "/metrics");
    assert!(metrics.contains("\nflannel_ready 0\n"), "{metrics}");
    assert!(!o.daemons[0].subnet_file.exists(), "subnet.env written before the daemon has a lease");
    assert!(o.daemons[0].proc.0.as_mut().unwrap().try_wait().unwrap().is_none(), "the daemon exited:\n{}", o.log(0));

    o.etcd.resume();
    let ns = &o.cluster.node(0).ns;
    wait_until(Duration::from_secs(20), "/readyz to say 200", || http_status(ns, addr, "/readyz") == Some(200));
    assert!(o.daemons[0].subnet_file.exists(), "ready without subnet.env");
    assert_eq!(masquerade_rules(ns).len(), 0);
    assert_eq!(http_status(ns, addr, "/healthz"), Some(200));
}

/// The README's first command, `scripts/demo.sh`, with the binaries this
/// test run built (`FLANNEL_RS_BIN`; the README's way builds release ones
/// first): exit status 0, what its output says it shows, and nothing left
/// behind (namespaces of its tag, processes, files, root namespace changes).
#[test]
fn the_demo_script_shows_pods_talking_across_nodes_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let bin = e2e_tests::workspace_bin("flanneld-rs").parent().unwrap().to_path_buf();
    for b in ["flannel", "netns-fixture"] {
        e2e_tests::workspace_bin(b);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let scratch = tempfile::tempdir().unwrap();
    let root_before = root_namespace_state();
    let out_path = scratch.path().join("demo.out");
    let out = std::fs::File::create(&out_path).unwrap();
    // Its own process group, so that stopping it reaches its background
    // processes (etcd, the daemons) too.
    let child = std::process::Command::new(&script)
        .process_group(0)
        .env("FLANNEL_RS_BIN", &bin)
        .env("TMPDIR", scratch.path())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut demo = Demo { tag: format!("demo{pid}"), pid, child: Some(child), bin: bin.clone() };
    let status = demo.wait(Duration::from_secs(180));
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.success(), "demo.sh: {status}; its output:\n{text}");

    let sections = sections(&text);
    let section = |title: &str| -> Vec<&str> {
        sections
            .iter()
            .find(|(t, _)| t.starts_with(title))
            .unwrap_or_else(|| panic!("no section {title:?} in:\n{text}"))
            .1
            .clone()
    };
    let subnets: Vec<ipnet::Ipv4Net> = section("flanneld-rs on every node")
        .iter()
        .filter_map(|l| l.split_once(": FLANNEL_SUBNET=")?.1.parse().ok())
        .collect();
    assert_eq!(subnets.len(), 3, "{text}");
    let pods: Vec<(usize, std::net::Ipv4Addr)> = section("two pods per node")
        .iter()
        .filter_map(|l| {
            let (who, addr) = l.split_once(": ")?;
            Some((who.strip_prefix("node")?.get(..1)?.parse().ok()?, addr.parse().ok()?))
        })
        .collect();
    assert_eq!(pods.len(), 6, "{text}");
    for (node, addr) in &pods {
        assert!(subnets[*node].trunc().contains(addr), "node{node}'s pod {addr} is outside {}", subnets[*node]);
    }
    let pings = section("every pod pings a pod on every other node");
    assert_eq!(pings.len(), 12, "{text}");
    assert!(pings.iter().all(|l| l.contains(" time=") && !l.contains("FAILED")), "{text}");
    assert!(section("TCP across nodes").contains(&"hello from node2"), "{text}");
    for title in ["node0: ip route show dev flannel.1", "node0: ip neigh show dev flannel.1"] {
        assert_eq!(section(title).len(), 2, "{title}:\n{text}");
    }
    assert_eq!(section("node0: bridge fdb show dev flannel.1").iter().filter(|l| l.contains(" dst ")).count(), 2);
    assert_eq!(section("node0: a route deleted by hand comes back").len(), 2, "{text}");
    // (Its log lines on stderr come first.)
    let diagnose = section("node0: flanneld-rs diagnose");
    assert_eq!(diagnose.last(), Some(&"converged: the kernel matches every lease"), "{text}");

    // Nothing left: no namespace of its tag, no process of it, no file.
    let leftover: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("flt-{}-", demo.tag)))
        .collect();
    assert!(leftover.is_empty(), "namespaces left behind: {leftover:?}");
    let scratch_path = scratch.path().display().to_string();
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&scratch_path))
        .collect();
    assert!(procs.is_empty(), "processes left behind: {procs:?}");
    let files: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    assert_eq!(files, [out_path], "files left behind");
    assert_eq!(root_namespace_state(), root_before, "the root namespace changed");
}

/// The demo's output as (section title, its non-empty lines).
fn sections(text: &str) -> Vec<(String, Vec<&str>)> {
    let mut out: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(title) = line.strip_prefix("\x1b[1m== ") {
            out.push((title.trim_end_matches("\x1b[0m").to_string(), Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            if !line.trim().is_empty() {
                lines.push(line);
            }
        }
    }
    out
}

/// The root namespace's addresses, routes and nftables ruleset.
fn root_namespace_state() -> (String, String, String) {
    let run = |program: &str, args: &[&str]| e2e_tests::run_ok(std::process::Command::new(program).args(args));
    (run("ip", &["-br", "addr"]), run("ip", &["route", "show", "table", "all"]), run("nft", &["list", "ruleset"]))
}

/// A `scripts/demo.sh` run: stopped (SIGTERM, which runs its teardown) if
/// the test ends first, and whatever it left behind removed.
struct Demo {
    child: Option<std::process::Child>,
    pid: u32,
    tag: String,
    bin: std::path::PathBuf,
}

impl Demo {
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_until(timeout, "scripts/demo.sh to finish", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        self.child = None;
        status.unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The script leads its own process group (etcd and the daemons are in
        // it too); the pid of a group with members is not reused.
        let group = -(self.pid as i32);
        if let Some(mut c) = self.child.take() {
            // Its trap tears down what it made.
            // SAFETY: signalling our own child's process group.
            unsafe { libc::kill(group, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever of it is still running, and its namespaces, also when the
        // script ended by itself and left them behind.
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = std::process::Command::new(self.bin.join("netns-fixture"))
            .args(["down", "--name", &self.tag])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
