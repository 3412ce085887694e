//! A whole overlay in namespaces: a Cluster whose outside host runs a real
//! etcd, a real flanneld-rs per node, pods plugged in by the real plugin.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use netns_fixtures::{wait_until, Cluster, Netns};
use serde_json::{json, Value};

use crate::{cni, cni_env, workspace_bin};

/// The etcd endpoint every node uses (etcd runs on the outside host).
pub const ETCD: &str = "http://192.0.2.200:2379";
/// Default network configuration.
pub const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Default dual-stack network configuration ([`Overlay::dual_stack`]).
pub const NET_CONF_DUAL: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#;
/// The IPv6 Network of [`NET_CONF_DUAL`].
pub const NETWORK6: &str = "2001:db8:10::/56";

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Option<Child>);

/// Runs `cmd` (a daemon expected to exit by itself, e.g. refusing to start)
/// until it exits, at most `within`; its status and what it wrote to stderr.
/// The child is held by a [`Proc`] from its spawn, so a panic here (or a
/// daemon that does not exit) kills and reaps it.
pub fn run_to_exit(mut cmd: std::process::Command, within: Duration) -> (std::process::ExitStatus, String) {
    let err = tempfile::NamedTempFile::new().expect("a temporary file for stderr");
    let spawned = cmd
        .stdout(std::process::Stdio::null())
        .stderr(err.reopen().expect("reopen the stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut child = Proc(Some(spawned));
    let deadline = std::time::Instant::now() + within;
    let mut status = None;
    netns_fixtures::wait_until(within + Duration::from_secs(1), "the daemon to exit", || {
        status = child.0.as_mut().expect("running").try_wait().expect("try_wait");
        status.is_some() || std::time::Instant::now() >= deadline
    });
    let text = std::fs::read_to_string(err.path()).expect("read the stderr file");
    let Some(status) = status else {
        panic!("{cmd:?} still runs after {within:?}; it said:\n{text}");
    };
    child.0 = None;
    (status, text)
}

impl Proc {
    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real etcd on the outside host.
pub struct Etcd {
    proc: Proc,
    dir: tempfile::TempDir,
    /// More flags (e.g. a TLS listener beside [`ETCD`]).
    extra: Vec<String>,
}

impl Etcd {
    /// etcd's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.proc.0.as_ref().map(std::process::Child::id)
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.path();
        let mut client_urls = vec![ETCD.to_string()];
        let mut extra = self.extra.clone();
        if let Some(i) = extra.iter().position(|a| a == "--also-listen") {
            client_urls.push(extra.remove(i + 1));
            extra.remove(i);
        }
        let mut args = vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen-client-urls".into(),
            client_urls.join(","),
            "--advertise-client-urls".into(),
            client_urls.join(","),
            "--listen-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-cluster".into(),
            "default=http://127.0.0.1:2380".into(),
        ];
        args.extend(extra);
        args
    }

    /// Starts etcd in `ns` and waits until it answers.
    pub fn start(ns: &Netns) -> Etcd {
        let mut e = Etcd::stopped();
        e.restart(ns);
        e
    }

    /// An etcd not started yet: [`Etcd::restart`] starts it.
    pub fn stopped() -> Etcd {
        // On tmpfs when there is one: etcd fsyncs every write, and this disk's
        // fsync latency would otherwise dominate the control-plane figures.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new().prefix("flt-etcd").tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        Etcd { proc: Proc(None), dir, extra: Vec::new() }
    }

    /// From the next (re)start on, etcd also serves `url` (an `https://`
    /// one) with the server certificate `cert`/`key`, and requires clients
    /// there to present a certificate signed by `ca` (`--client-cert-auth`).
    /// [`ETCD`] stays plain http, for the harness's etcdctl.
    pub fn serve_tls(&mut self, url: &str, cert: &Path, key: &Path, ca: &Path) {
        let path = |p: &Path| p.display().to_string();
        self.extra = vec![
            "--also-listen".into(),
            url.into(),
            "--cert-file".into(),
            path(cert),
            "--key-file".into(),
            path(key),
            "--trusted-ca-file".into(),
            path(ca),
            "--client-cert-auth".into(),
        ];
    }

    /// (Re)starts etcd on the same data directory.
    pub fn restart(&mut self, ns: &Netns) {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = ns.command("etcd").args(self.args()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.proc = Proc(Some(child));
        wait_until(Duration::from_secs(20), "etcd to answer", || etcdctl(ns, &["endpoint", "health"]).status.success());
    }

    /// Stops etcd (SIGTERM).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Freezes etcd (SIGSTOP): its port still accepts connections, but no
    /// request is answered until [`Etcd::resume`]. Dropping a frozen etcd
    /// still kills it.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a frozen etcd go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.proc.0.as_ref().expect("etcd is running").id();
        // SAFETY: signalling our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "signal {sig} to etcd");
    }

    /// Kills etcd (SIGKILL): no goodbye to its clients, as in a crash.
    pub fn kill(&mut self) {
        drop(std::mem::replace(&mut self.proc, Proc(None)));
    }
}

/// etcd's current revision.
pub fn etcd_revision(ns: &Netns) -> i64 {
    let out = etcdctl_ok(ns, &["get", "/coreos.com/network/config", "--keys-only", "-w", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcdctl get -w json: {e}: {out}"));
    v["header"]["revision"].as_i64().unwrap_or_else(|| panic!("no revision in {v}"))
}

/// Compacts etcd's history up to its current revision: a watch resumed from
/// any earlier revision gets "compacted" and must list again. Returns the
/// revision.
pub fn etcd_compact(ns: &Netns) -> i64 {
    let rev = etcd_revision(ns);
    etcdctl_ok(ns, &["compact", &rev.to_string()]);
    rev
}

/// Runs `etcdctl` (v3 API) against [`ETCD`] from inside `ns`.
pub fn etcdctl(ns: &Netns, args: &[&str]) -> std::process::Output {
    ns.command("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", ETCD, "--dial-timeout", "2s", "--command-timeout", "3s"])
        .args(args)
        .output()
        .expect("run etcdctl (Debian package etcd-client)")
}

/// `etcdctl` that must succeed; returns stdout.
pub fn etcdctl_ok(ns: &Netns, args: &[&str]) -> String {
    let out = etcdctl(ns, args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The leases in etcd: key -> value.
pub fn leases(ns: &Netns) -> BTreeMap<String, Value> {
    let text = etcdctl_ok(ns, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), serde_json::from_str(c[1]).unwrap_or(Value::Null)))
        .collect()
}

/// One node's daemon and files.
pub struct Daemon {
    /// The running process, if any.
    pub proc: Proc,
    /// Its subnet.env.
    pub subnet_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    wrap: Vec<String>,
    /// "ready" lines in the log before the last start.
    ready_before: usize,
}

/// The overlay.
pub struct Overlay {
    /// Nodes, switch and the outside host (etcd).
    pub cluster: Cluster,
    /// etcd.
    pub etcd: Etcd,
    /// One per node.
    pub daemons: Vec<Daemon>,
    /// Files of this overlay.
    pub dir: tempfile::TempDir,
    /// `--etcd-endpoints` of the daemons.
    endpoint: String,
}

impl Overlay {
    /// `nodes` nodes and etcd with [`NET_CONF`]; daemons not started.
    pub fn new(nodes: usize) -> Overlay {
        Self::with_conf(nodes, NET_CONF)
    }

    /// With a given network configuration.
    pub fn with_conf(nodes: usize, conf: &str) -> Overlay {
        let cluster = Cluster::with_outside(nodes).unwrap();
        let etcd = Etcd::start(cluster.outside().unwrap());
        Self::with_etcd(cluster, etcd, Some(conf))
    }

    /// `nodes` nodes on a dual-stack underlay ([`Cluster::dual_stack`],
    /// etcd on the outside host, reached over IPv4) with network
    /// configuration `conf` (e.g. [`NET_CONF_DUAL`]); daemons not started.
    pub fn dual_stack(nodes: usize, conf: &str) -> Overlay {
        let cluster = Cluster::dual_stack(nodes, true).unwrap();
        let etcd = Etcd::start(cluster.outside().unwrap());
        Self::with_etcd(cluster, etcd, Some(conf))
    }

    /// On `cluster` with `etcd` (running, or not started yet when `conf` is
    /// `None`); `conf`, if given, is written as the network configuration.
    pub fn with_etcd(cluster: Cluster, etcd: Etcd, conf: Option<&str>) -> Overlay {
        if let Some(conf) = conf {
            etcdctl_ok(cluster.outside().unwrap(), &["put", "/coreos.com/network/config", conf]);
        }
        let dir = tempfile::tempdir().unwrap();
        let daemons = (0..cluster.nodes().len())
            .map(|i| Daemon {
                proc: Proc(None),
                subnet_file: dir.path().join(format!("subnet{i}.env")),
                log: dir.path().join(format!("flanneld{i}.log")),
                extra: Vec::new(),
                env: Vec::new(),
                wrap: Vec::new(),
                ready_before: 0,
            })
            .collect();
        Overlay { cluster, etcd, daemons, dir, endpoint: ETCD.to_string() }
    }

    /// The `--etcd-endpoints` daemons get (from their next start on);
    /// [`ETCD`] unless set.
    pub fn set_etcd_endpoint(&mut self, endpoint: &str) {
        self.endpoint = endpoint.to_string();
    }

    /// The outside host (where etcd runs).
    pub fn outside(&self) -> &Netns {
        self.cluster.outside().unwrap()
    }

    /// Extra daemon flags for node `i` (from its next start on).
    pub fn set_flags(&mut self, i: usize, flags: &[&str]) {
        self.daemons[i].extra = flags.iter().map(|s| s.to_string()).collect();
    }

    /// Node `i`'s extra daemon flags.
    pub fn flags(&self, i: usize) -> Vec<String> {
        self.daemons[i].extra.clone()
    }

    /// Node `i`'s extra daemon environment.
    pub fn env(&self, i: usize) -> Vec<(String, String)> {
        self.daemons[i].env.clone()
    }

    /// Extra environment of node `i`'s daemon (from its next start on).
    pub fn set_env(&mut self, i: usize, env: &[(&str, &str)]) {
        self.daemons[i].env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Runs node `i`'s daemon through `wrapper` (a program and its
    /// arguments, e.g. `setpriv` with fewer capabilities), from its next start on.
    pub fn set_wrapper(&mut self, i: usize, wrapper: &[&str]) {
        self.daemons[i].wrap = wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// Starts the daemon of node `i` and waits until it says it is ready.
    pub fn start(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Starts the daemon of node `i` (its flags and environment as set)
    /// without waiting for it.
    pub fn spawn(&mut self, i: usize) {
        let d = &self.daemons[i];
        let mut cmd = self.daemon_command(i);
        cmd.args(&d.extra).envs(d.env.iter().map(|(k, v)| (k, v)));
        self.spawn_command(i, cmd);
    }

    /// Runs `cmd` as node `i`'s daemon (see [`Overlay::bare_daemon_command`]),
    /// its stderr appended to node `i`'s log, without waiting for it.
    pub fn spawn_command(&mut self, i: usize, mut cmd: std::process::Command) {
        let logp = self.daemons[i].log.clone();
        self.daemons[i].ready_before = ready_lines(&std::fs::read_to_string(&logp).unwrap_or_default());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&logp).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemons[i].proc = Proc(Some(child));
    }

    /// Kills node `i`'s daemon with SIGKILL (and reaps it).
    pub fn kill(&mut self, i: usize) {
        drop(std::mem::replace(&mut self.daemons[i].proc, Proc(None)));
    }

    /// Waits until node `i`'s daemon, started since the last call of
    /// [`Overlay::spawn`], says it is ready; panics with the end of its log
    /// when it exits first or takes more than 20 s.
    pub fn wait_ready(&mut self, i: usize) {
        let logp = self.daemons[i].log.clone();
        let ready_before = self.daemons[i].ready_before;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ready_lines(&std::fs::read_to_string(&logp).unwrap_or_default()) <= ready_before {
            let exited = self.daemons[i].proc.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || std::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&logp).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("node{i}'s daemon is not ready ({exited:?}); its log ends:\n{}", tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts every daemon.
    pub fn start_all(&mut self) {
        for i in 0..self.daemons.len() {
            self.start(i);
        }
    }

    /// Stops node `i`'s daemon with SIGTERM.
    pub fn stop(&mut self, i: usize) {
        self.daemons[i].proc.stop();
    }

    /// Node `i`'s subnet (from its subnet.env).
    pub fn subnet(&self, i: usize) -> ipnet::Ipv4Net {
        let text = std::fs::read_to_string(&self.daemons[i].subnet_file).unwrap();
        let line = text.lines().find(|l| l.starts_with("FLANNEL_SUBNET=")).unwrap();
        line["FLANNEL_SUBNET=".len()..].parse::<ipnet::Ipv4Net>().unwrap().trunc()
    }

    /// The etcd key of node `i`'s lease: `.../10.244.1.0-24`, dual-stack
    /// `.../10.244.1.0-24&2001:db8:10:1::-64` (flannel's key for a lease
    /// with both subnets).
    pub fn lease_key(&self, i: usize) -> String {
        let s = self.subnet(i);
        let mut key = format!("/coreos.com/network/subnets/{}-{}", s.network(), s.prefix_len());
        if let Some(s6) = self.subnet6(i) {
            key += &format!("&{}-{}", s6.network(), s6.prefix_len());
        }
        key
    }

    /// Node `i`'s IPv6 subnet (`FLANNEL_IPV6_SUBNET` of its subnet.env),
    /// `None` when it has none.
    pub fn subnet6(&self, i: usize) -> Option<ipnet::Ipv6Net> {
        let text = std::fs::read_to_string(&self.daemons[i].subnet_file).unwrap();
        let value = text.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))?;
        let net: ipnet::Ipv6Net =
            value.parse().unwrap_or_else(|e| panic!("node{i}'s FLANNEL_IPV6_SUBNET={value}: {e}"));
        Some(net.trunc())
    }

    /// A value of node `i`'s subnet.env (`FLANNEL_MTU`), `None` when absent.
    pub fn subnet_env(&self, i: usize, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.daemons[i].subnet_file).unwrap();
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::to_string)
    }

    /// Node `i`'s daemon log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.daemons[i].log).unwrap_or_default()
    }

    /// Breaks something of node `i`'s with `inject`, waits until `repaired`
    /// (which must read the kernel, not the daemon) says it is back, and
    /// asserts that the repair came from the daemon's reaction to the
    /// kernel's notification.
    ///
    /// The 30-s wait only guards against a hang; it is no latency bound,
    /// and so cannot tell the notification from the 10-second safety-net
    /// timer, which repairs the same fault. Which of the two made the
    /// repair has no witness but the daemon's log ("reconcile (kernel
    /// change): ..." or "reconcile (periodic): ..." for each change). A
    /// periodic run that falls between the fault and the notification's
    /// 20-ms debounce repairs it first; then the fault is injected again,
    /// up to three times.
    pub fn assert_repaired_on_notification(
        &self,
        i: usize,
        what: &str,
        inject: impl Fn(),
        mut repaired: impl FnMut() -> bool,
    ) {
        let mut triggers = Vec::new();
        for _ in 0..3 {
            let log_before = self.log(i).len();
            inject();
            wait_until(Duration::from_secs(30), &format!("{what} to be repaired on node{i}"), &mut repaired);
            let log = self.log(i);
            let since = &log[log_before..];
            let trigger = ["kernel change", "periodic"]
                .into_iter()
                .find(|t| since.contains(&format!("reconcile ({t}): ")))
                .unwrap_or_else(|| panic!("node{i}'s log names no reconcile that repaired {what}:\n{since}"));
            triggers.push(trigger);
            if trigger == "kernel change" {
                return;
            }
        }
        panic!("{what} on node{i} was repaired by {triggers:?}, never on the kernel's notification");
    }

    /// Node `i`'s flannel.1 state: routes, neighbours, FDB entries, as sorted
    /// strings from `ip -j` and `bridge -j`.
    pub fn vtep_state(&self, i: usize) -> VtepState {
        let ns = &self.cluster.node(i).ns;
        let exists = ns.ip_json(&["link", "show"]).as_array().unwrap().iter().any(|l| l["ifname"] == "flannel.1");
        if !exists {
            return VtepState::default();
        }
        let mut routes: Vec<String> = ns
            .ip_json(&["route", "show", "dev", "flannel.1"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let onlink = r["flags"].as_array().is_some_and(|f| f.contains(&json!("onlink")));
                format!(
                    "{} via {}{}",
                    r["dst"].as_str().unwrap(),
                    r["gateway"].as_str().unwrap_or("-"),
                    if onlink { " onlink" } else { "" }
                )
            })
            .collect();
        routes.sort();
        let mut neighs: Vec<String> = ns
            .ip_json(&["neigh", "show", "dev", "flannel.1"])
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("{} {}", n["dst"].as_str().unwrap(), n["lladdr"].as_str().unwrap_or("-")))
            .collect();
        neighs.sort();
        let mut fdbs: Vec<String> = ns
            .bridge_json(&["fdb", "show", "dev", "flannel.1"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f.get("dst").is_some())
            .map(|f| format!("{} {}", f["mac"].as_str().unwrap(), f["dst"].as_str().unwrap()))
            .collect();
        fdbs.sort();
        VtepState { routes, neighs, fdbs }
    }

    /// What node `i`'s flannel.1 must hold given the leases in etcd.
    pub fn expected_state(&self, i: usize) -> VtepState {
        let peers = leases(self.outside()).into_iter().map(|(key, v)| {
            let (subnet, _) = parse_subnet_key(&key);
            let mac = v["BackendData"]["VtepMAC"].as_str().unwrap().to_string();
            (
                subnet.expect("an IPv4 subnet in the lease key").to_string(),
                mac,
                v["PublicIP"].as_str().unwrap().to_string(),
            )
        });
        self.expected_state_for(i, peers)
    }

    /// What node `i`'s flannel.1 must hold for these leases (subnet, VTEP
    /// MAC, public IP); node `i`'s own lease among them is skipped.
    pub fn expected_state_for(
        &self,
        i: usize,
        leases: impl IntoIterator<Item = (String, String, String)>,
    ) -> VtepState {
        let own = self.cluster.node(i).underlay_ip.to_string();
        let mut st = VtepState::default();
        for (subnet, mac, public_ip) in leases {
            if public_ip == own {
                continue;
            }
            let net = subnet.split('/').next().unwrap();
            st.routes.push(format!("{subnet} via {net} onlink"));
            st.neighs.push(format!("{net} {mac}"));
            st.fdbs.push(format!("{mac} {public_ip}"));
        }
        st.routes.sort();
        st.neighs.sort();
        st.fdbs.sort();
        st
    }

    /// Node `i`'s routes through the underlay to subnets of 10.0.0.0/8
    /// (host-gw's and DirectRouting's), as sorted `dst via gw`.
    pub fn underlay_routes(&self, i: usize) -> Vec<String> {
        let node = self.cluster.node(i);
        let mut v: Vec<String> = node
            .ns
            .ip_json(&["route", "show", "dev", &node.underlay_if])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dst"].as_str().is_some_and(|d| d.starts_with("10.")) && r["gateway"].is_string())
            .map(|r| format!("{} via {}", r["dst"].as_str().unwrap(), r["gateway"].as_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    /// What node `i`'s host-gw routes must be given the leases in etcd.
    pub fn expected_underlay_routes(&self, i: usize) -> Vec<String> {
        let own = self.cluster.node(i).underlay_ip.to_string();
        let mut v: Vec<String> = leases(self.outside())
            .into_iter()
            .filter(|(_, l)| l["PublicIP"] != own.as_str())
            .map(|(key, l)| {
                let (subnet, _) = parse_subnet_key(&key);
                format!("{} via {}", subnet.expect("an IPv4 subnet in the lease key"), l["PublicIP"].as_str().unwrap())
            })
            .collect();
        v.sort();
        v
    }

    /// Node `i`'s IPv6 VTEP state (`flannel-v6.1`): its routes (those
    /// the kernel did not add itself for an address: `proto kernel` ones
    /// are left out), neighbours and FDB entries, as [`Overlay::vtep_state`].
    /// Empty when the device does not exist.
    pub fn vtep6_state(&self, i: usize) -> VtepState {
        vtep_state_of(&self.cluster.node(i).ns, VXLAN6_DEV, "-6")
    }

    /// What node `i`'s `flannel-v6.1` must hold given the leases in etcd:
    /// for every other lease with an IPv6 subnet and an IPv6 VTEP, as
    /// [`Overlay::expected_state6_for`].
    pub fn expected_state6(&self, i: usize) -> VtepState {
        let own4 = self.cluster.node(i).underlay_ip.to_string();
        let peers = leases(self.outside()).into_iter().filter_map(|(key, v)| {
            let (_, subnet6) = parse_subnet_key(&key);
            if v["PublicIP"] == own4.as_str() {
                return None;
            }
            let (mac, public6) = (v["BackendV6Data"]["VtepMAC"].as_str()?, v["PublicIPv6"].as_str()?);
            Some((subnet6?.to_string(), mac.to_string(), public6.to_string()))
        });
        self.expected_state6_for(i, peers)
    }

    /// What node `i`'s `flannel-v6.1` must hold for these leases (IPv6
    /// subnet, IPv6 VTEP MAC, `PublicIPv6`): per lease,
    /// `<v6 subnet> via <its first address> onlink`, a neighbour for that
    /// address with the peer's IPv6 VTEP MAC, and an FDB entry sending that
    /// MAC to the peer's `PublicIPv6`. Node `i`'s own lease (its IPv6
    /// underlay address) among them is skipped.
    pub fn expected_state6_for(
        &self,
        i: usize,
        leases: impl IntoIterator<Item = (String, String, String)>,
    ) -> VtepState {
        let own = self.cluster.node(i).underlay_ipv6.map(|a| a.to_string());
        let mut st = VtepState::default();
        for (subnet6, mac, public6) in leases {
            if Some(&public6) == own.as_ref() {
                continue;
            }
            let subnet6: ipnet::Ipv6Net = subnet6.parse().unwrap_or_else(|e| panic!("IPv6 subnet {subnet6}: {e}"));
            let net = subnet6.network();
            st.routes.push(format!("{subnet6} via {net} onlink"));
            st.neighs.push(format!("{net} {mac}"));
            st.fdbs.push(format!("{mac} {public6}"));
        }
        st.routes.sort();
        st.neighs.sort();
        st.fdbs.sort();
        st
    }

    /// Waits until node `i`'s `flannel-v6.1` is exactly what etcd says.
    pub fn wait_converged6(&self, i: usize) {
        let mut last = (VtepState::default(), VtepState::default());
        let ok = wait_for(Duration::from_secs(10), || {
            last = (self.vtep6_state(i), self.expected_state6(i));
            last.0 == last.1
        });
        assert!(ok, "node{i}'s {VXLAN6_DEV} did not converge in 10 s: has {:?}, want {:?}", last.0, last.1);
    }

    /// Node `i`'s IPv6 routes through the underlay to subnets of
    /// [`NETWORK6`] (host-gw's and DirectRouting's), as sorted `dst via gw`.
    pub fn underlay_routes6(&self, i: usize) -> Vec<String> {
        let node = self.cluster.node(i);
        let network6: ipnet::Ipv6Net = NETWORK6.parse().unwrap();
        let mut v: Vec<String> = node
            .ns
            .ip_json(&["-6", "route", "show", "dev", &node.underlay_if])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["gateway"].is_string()
                    && r["dst"]
                        .as_str()
                        .and_then(|d| d.parse::<ipnet::Ipv6Net>().ok())
                        .is_some_and(|d| network6.contains(&d))
            })
            .map(|r| format!("{} via {}", r["dst"].as_str().unwrap(), r["gateway"].as_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    /// What node `i`'s IPv6 host-gw routes must be given the leases in
    /// etcd: `<peer v6 subnet> via <peer PublicIPv6>`.
    pub fn expected_underlay_routes6(&self, i: usize) -> Vec<String> {
        let own4 = self.cluster.node(i).underlay_ip.to_string();
        let mut v: Vec<String> = leases(self.outside())
            .into_iter()
            .filter(|(_, l)| l["PublicIP"] != own4.as_str())
            .filter_map(|(key, l)| Some(format!("{} via {}", parse_subnet_key(&key).1?, l["PublicIPv6"].as_str()?)))
            .collect();
        v.sort();
        v
    }

    /// Waits until node `i`'s kernel state is exactly what etcd says.
    pub fn wait_converged(&self, i: usize) {
        wait_until(Duration::from_secs(10), &format!("node{i} to converge"), || {
            self.vtep_state(i) == self.expected_state(i)
        });
    }

    /// A pod on node `i` plugged in by the real plugin; returns its namespace
    /// and address.
    pub fn add_pod(&self, i: usize, name: &str) -> (Netns, Ipv4Addr) {
        let (pod, ips) = self.add_pod_ips(i, name);
        let addr = ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .unwrap_or_else(|| panic!("ADD {name} on node{i} gave no IPv4 address: {ips:?}"));
        (pod, addr)
    }

    /// A dual-stack pod on node `i`, plugged in by the real plugin (which
    /// takes both families from the node's subnet.env, as flannel's does):
    /// its namespace, IPv4 and IPv6 address. Panics naming the result when
    /// the plugin did not give one address of each family.
    pub fn add_dual_pod(&self, i: usize, name: &str) -> (Netns, Ipv4Addr, Ipv6Addr) {
        let (pod, ips) = self.add_pod_ips(i, name);
        let v4 = ips.iter().find_map(|ip| if let IpAddr::V4(a) = ip { Some(*a) } else { None });
        let v6 = ips.iter().find_map(|ip| if let IpAddr::V6(a) = ip { Some(*a) } else { None });
        match (v4, v6) {
            (Some(v4), Some(v6)) => (pod, v4, v6),
            _ => panic!("ADD {name} on node{i}: want an IPv4 and an IPv6 address, got {ips:?}"),
        }
    }

    /// A pod on node `i` plugged in by the real plugin: its namespace and
    /// every address of the result's `ips`, in order.
    pub fn add_pod_ips(&self, i: usize, name: &str) -> (Netns, Vec<IpAddr>) {
        // The daemon decides about masquerading (--ip-masq); the plugin stays out of it.
        self.add_pod_with(i, name, json!({ "isDefaultGateway": true, "ipMasq": false }))
    }

    /// [`Overlay::add_pod_ips`] with the plugin's `delegate` given (e.g. the
    /// deploy bundle's, with `hairpinMode`).
    pub fn add_pod_with(&self, i: usize, name: &str, delegate: Value) -> (Netns, Vec<IpAddr>) {
        let node = self.cluster.node(i);
        let pod = node.add_pod_netns(name).unwrap();
        let conf = json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": self.daemons[i].subnet_file,
            "dataDir": self.dir.path().join(format!("cni{i}")),
            "delegate": delegate
        });
        let path = pod.path().display().to_string();
        let out = cni(&node.ns, &workspace_bin("flannel"), &cni_env("ADD", name, &path), &conf.to_string());
        assert!(out.ok, "ADD {name} on node{i}: {:?}", out);
        let ips = out.json["ips"]
            .as_array()
            .unwrap_or_else(|| panic!("ADD {name} on node{i}: no ips in {}", out.json))
            .iter()
            .map(|ip| {
                let text = ip["address"].as_str().unwrap_or_else(|| panic!("ADD {name}: address of {ip}"));
                text.split('/').next().unwrap().parse().unwrap_or_else(|e| panic!("ADD {name}: {text}: {e}"))
            })
            .collect();
        (pod, ips)
    }

    /// `flanneld-rs` inside node `i`, pointed at etcd and the node's subnet.env.
    pub fn daemon_command(&self, i: usize) -> std::process::Command {
        let mut cmd = self.bare_daemon_command(i);
        cmd.args(["--etcd-endpoints", &self.endpoint, "--subnet-file"]).arg(&self.daemons[i].subnet_file);
        cmd
    }

    /// `flanneld-rs` inside node `i` (through its wrapper, if set), without
    /// any flag or extra environment.
    pub fn bare_daemon_command(&self, i: usize) -> std::process::Command {
        let ns = &self.cluster.node(i).ns;
        match self.daemons[i].wrap.split_first() {
            None => ns.command(workspace_bin("flanneld-rs")),
            Some((program, args)) => {
                let mut c = ns.command(program);
                c.args(args).arg(workspace_bin("flanneld-rs"));
                c
            }
        }
    }

    /// Runs `flanneld-rs diagnose` on node `i` with the daemon's flags and
    /// environment (see [`Overlay::set_flags`]) and `extra` flags.
    pub fn diagnose(&self, i: usize, extra: &[&str]) -> (bool, Value) {
        let d = &self.daemons[i];
        let mut cmd = self.daemon_command(i);
        cmd.args(&d.extra).args(extra).envs(d.env.iter().map(|(k, v)| (k, v)));
        let out = cmd.args(["diagnose", "--json"]).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "diagnose printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v)
    }
}

impl VtepState {
    /// The state without entries mentioning any of `needles` (leases that
    /// must not be programmed).
    pub fn clone_without(&self, needles: &[&str]) -> VtepState {
        let keep = |v: &Vec<String>| v.iter().filter(|e| !needles.iter().any(|n| e.contains(n))).cloned().collect();
        VtepState { routes: keep(&self.routes), neighs: keep(&self.neighs), fdbs: keep(&self.fdbs) }
    }
}

/// Name of the IPv6 VXLAN device with VNI 1 (flannel's `flannel-v6.<VNI>`).
pub const VXLAN6_DEV: &str = "flannel-v6.1";

/// The subnets in a lease's etcd key (or its last path element): flannel's
/// `10.244.1.0-24` or, for a dual-stack lease, `10.244.1.0-24&2001:db8:10:1::-64`.
/// Panics on a key that is neither.
pub fn parse_subnet_key(key: &str) -> (Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>) {
    let tail = key.rsplit('/').next().unwrap();
    let net = |part: &str| -> Option<ipnet::IpNet> {
        let (addr, len) = part.rsplit_once('-')?;
        format!("{addr}/{len}").parse().ok()
    };
    let mut v4 = None;
    let mut v6 = None;
    for part in tail.split('&') {
        match net(part) {
            Some(ipnet::IpNet::V4(n)) if v4.is_none() => v4 = Some(n),
            Some(ipnet::IpNet::V6(n)) if v6.is_none() => v6 = Some(n),
            _ => panic!("lease key {key:?}: {part:?} is not a subnet (want 10.244.1.0-24[&2001:db8:10:1::-64])"),
        }
    }
    (v4, v6)
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut held = false;
    wait_until(timeout + Duration::from_secs(1), "a condition", || {
        held = cond();
        held || std::time::Instant::now() >= deadline
    });
    held
}

/// The routes (without the kernel's own, `proto kernel`), neighbours and FDB
/// entries (those with a `dst`) of VXLAN device `dev` in `ns`, for the
/// address family `family` (`-4` or `-6`), as sorted strings
/// (see [`VtepState`]). Empty when the device does not exist.
pub fn vtep_state_of(ns: &Netns, dev: &str, family: &str) -> VtepState {
    let exists = ns.ip_json(&["link", "show"]).as_array().unwrap().iter().any(|l| l["ifname"] == dev);
    if !exists {
        return VtepState::default();
    }
    let mut routes: Vec<String> = ns
        .ip_json(&[family, "route", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["protocol"] != "kernel")
        .map(|r| {
            let onlink = r["flags"].as_array().is_some_and(|f| f.contains(&json!("onlink")));
            format!(
                "{} via {}{}",
                r["dst"].as_str().unwrap(),
                r["gateway"].as_str().unwrap_or("-"),
                if onlink { " onlink" } else { "" }
            )
        })
        .collect();
    routes.sort();
    let mut neighs: Vec<String> = ns
        .ip_json(&[family, "neigh", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{} {}", n["dst"].as_str().unwrap(), n["lladdr"].as_str().unwrap_or("-")))
        .collect();
    neighs.sort();
    let mut fdbs: Vec<String> = ns
        .bridge_json(&["fdb", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.get("dst").is_some())
        .map(|f| format!("{} {}", f["mac"].as_str().unwrap(), f["dst"].as_str().unwrap()))
        .collect();
    fdbs.sort();
    VtepState { routes, neighs, fdbs }
}

/// Routes, neighbours and FDB entries of a node's flannel.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VtepState {
    /// `dst via gw onlink`.
    pub routes: Vec<String>,
    /// `ip mac`.
    pub neighs: Vec<String>,
    /// `mac dst`.
    pub fdbs: Vec<String>,
}

/// How many times a daemon log says the daemon is ready: its info line
/// `TIMESTAMP  INFO TARGET: ready: ...` (the target is left open so the line
/// may move between modules).
pub fn ready_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains(" INFO ") && l.contains(": ready: ")).count()
}

/// A second interface in node namespace `ns`, `ext1` with 198.51.100.10/24 (a
/// veth pair inside the node: no dummy module here), so that a test can tell
/// an interface chosen by flags from the default route's.
pub fn second_interface(ns: &Netns) {
    for cmd in [
        "link add ext1 type veth peer name ext1p",
        "addr add 198.51.100.10/24 dev ext1",
        "link set ext1 up",
        "link set ext1p up",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
}
