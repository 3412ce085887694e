//! Throw-away network topologies built from network namespaces, for tests,
//! benchmarks and the demo.
//!
//! Every namespace is named `flt-<tag>-<role>` so that leftovers of a killed
//! run can be found ([`cleanup_leftovers`]); every value removes what it
//! created when dropped, also while a test panics. Nothing is ever configured
//! in the root namespace: veth pairs are created with both ends directly
//! inside their target namespaces.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use serde_json::Value;

/// Prefix of every namespace this crate creates.
pub const PREFIX: &str = "flt-";

/// The underlay's prefix length and the node addresses' base: node `i` gets
/// `192.0.2.(10+i)/24` (TEST-NET-1, never routed anywhere).
pub const UNDERLAY_PREFIX: u8 = 24;
/// Address of the switch's bridge, the nodes' default gateway.
pub const UNDERLAY_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
/// Address of the outside host.
pub const OUTSIDE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 200);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A tag unique to this process and call: `<pid>x<n>`.
fn unique_tag() -> String {
    format!("{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// An owned network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    fd: OwnedFd,
    keep: bool,
}

impl Netns {
    /// A new namespace `flt-<unique>-<role>` with `lo` up.
    pub fn new(role: &str) -> io::Result<Netns> {
        Self::named(&format!("{PREFIX}{}-{role}", unique_tag()))
    }

    /// A new namespace with exactly this name, `lo` up.
    pub fn named(name: &str) -> io::Result<Netns> {
        ip(&["netns", "add", name])?;
        let fd = match File::open(format!("/run/netns/{name}")) {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                let _ = ip(&["netns", "delete", name]);
                return Err(e);
            }
        };
        let ns = Netns { name: name.to_string(), fd, keep: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Leaves the namespace in place when dropped (for the CLI's `up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// A command whose child runs inside this namespace. The switch happens in
    /// the child between fork and exec, so it costs one `setns` and nothing
    /// else (`ip netns exec` costs milliseconds, which benchmarks would see).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe, on
        // a descriptor that outlives the spawn (it belongs to self).
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        cmd
    }

    /// Runs `ip <args>` inside; an error carries stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `program args` inside and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program).args(args).stdin(Stdio::null()).output()
    }

    /// Runs `program args` inside, panicking with its output when it fails;
    /// returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args).unwrap_or_else(|e| panic!("{program} {args:?} in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{program} {} in {} failed: {}{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Runs `sh -c script` inside.
    pub fn sh(&self, script: &str) -> Output {
        self.run("sh", &["-c", script]).expect("spawn sh")
    }

    /// Spawns `program args` inside.
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<std::process::Child> {
        self.command(program).args(args).spawn()
    }

    fn json(&self, program: &str, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.run_ok(program, &full);
        if text.trim().is_empty() {
            Value::Array(Vec::new())
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{program} -j {args:?}: {e}: {text}"))
        }
    }

    /// `ip -j <args>` inside, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        self.json("ip", args)
    }

    /// `bridge -j <args>` inside, parsed.
    pub fn bridge_json(&self, args: &[&str]) -> Value {
        self.json("bridge", args)
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` ...).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let out = self.run("sysctl", &["-qw", &format!("{key}={value}")])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = ip(&["netns", "delete", &self.name]) {
                eprintln!("netns-fixtures: {e}");
            }
        }
    }
}

/// A node of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    /// The node's namespace.
    pub ns: Netns,
    /// Position in the cluster.
    pub index: usize,
    /// Address on the underlay.
    pub underlay_ip: std::net::Ipv4Addr,
    /// Underlay interface name inside the node (`eth0`).
    pub underlay_if: String,
    tag: String,
}

impl Node {
    /// A fresh, empty namespace for a pod of this node, named after it. The
    /// CNI plugin under test plugs it in; dropping it removes the pod end.
    pub fn add_pod_netns(&self, name: &str) -> io::Result<Netns> {
        Netns::named(&format!("{PREFIX}{}-n{}-{name}", self.tag, self.index))
    }
}

/// An underlay L2 segment (a bridge in a "switch" namespace), N nodes on it,
/// and optionally an outside host. Dropping it removes every namespace.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    outside: Option<Netns>,
    switch: Netns,
    tag: String,
}

impl Cluster {
    /// `nodes` nodes on a fresh underlay.
    pub fn new(nodes: usize) -> io::Result<Cluster> {
        Self::new_named(&unique_tag(), nodes, false)
    }

    /// `nodes` nodes and an outside host at [`OUTSIDE_IP`].
    pub fn with_outside(nodes: usize) -> io::Result<Cluster> {
        Self::new_named(&unique_tag(), nodes, true)
    }

    /// A cluster whose namespaces are `flt-<tag>-switch`, `flt-<tag>-node<i>`,
    /// `flt-<tag>-outside`.
    pub fn new_named(tag: &str, nodes: usize, outside: bool) -> io::Result<Cluster> {
        let switch = Netns::named(&format!("{PREFIX}{tag}-switch"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["addr", "add", &format!("{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX}"), "dev", "br0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster { nodes: Vec::new(), outside: None, switch, tag: tag.to_string() };
        for i in 0..nodes {
            let ns = Netns::named(&format!("{PREFIX}{tag}-node{i}"))?;
            let addr = std::net::Ipv4Addr::new(192, 0, 2, 10 + i as u8);
            cluster.attach(&ns, &format!("n{i}"), addr)?;
            ns.ip(&["route", "add", "default", "via", &UNDERLAY_GATEWAY.to_string()])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            cluster.nodes.push(Node {
                ns,
                index: i,
                underlay_ip: addr,
                underlay_if: "eth0".into(),
                tag: tag.to_string(),
            });
        }
        if outside {
            let ns = Netns::named(&format!("{PREFIX}{tag}-outside"))?;
            cluster.attach(&ns, "out", OUTSIDE_IP)?;
            cluster.outside = Some(ns);
        }
        Ok(cluster)
    }

    /// Connects `ns` to the switch: `eth0` inside with `addr`, the other end
    /// `p-<port>` on br0. Both ends are created directly in their namespaces.
    fn attach(&self, ns: &Netns, port: &str, addr: std::net::Ipv4Addr) -> io::Result<()> {
        let port = format!("p-{port}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "mtu",
            "1500",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.switch.name(),
        ])?;
        self.switch.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/{UNDERLAY_PREFIX}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The switch namespace (holds `br0`).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The outside host, if built.
    pub fn outside(&self) -> Option<&Netns> {
        self.outside.as_ref()
    }

    /// The tag in every namespace name.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Leaves everything in place (the CLI's `up`); `down --name TAG` removes it.
    pub fn keep(self) {
        for n in self.nodes {
            n.ns.keep();
        }
        if let Some(o) = self.outside {
            o.keep();
        }
        self.switch.keep();
    }
}

/// A lone node namespace (lo up, IPv4 forwarding on) without an underlay.
pub fn single_node() -> io::Result<Netns> {
    let ns = Netns::new("node")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}

fn list_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default()
}

fn delete_where(pred: impl Fn(&str) -> bool) -> usize {
    let mut n = 0;
    for name in list_namespaces().into_iter().filter(|n| n.starts_with(PREFIX) && pred(n)) {
        if ip(&["netns", "delete", &name]).is_ok() {
            n += 1;
        }
    }
    n
}

/// Deletes namespaces left by processes that no longer run (names made by
/// [`Netns::new`] and [`Cluster::new`] embed the creating pid). Returns how
/// many it removed.
pub fn cleanup_leftovers() -> usize {
    delete_where(|name| {
        let rest = &name[PREFIX.len()..];
        let pid = rest.split(['x', '-']).next().and_then(|p| p.parse::<u32>().ok());
        match pid {
            Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            None => false,
        }
    })
}

/// Deletes every namespace this crate could have made.
pub fn cleanup_all() -> usize {
    delete_where(|_| true)
}

/// Deletes the namespaces of tag `tag` (`flt-<tag>-*`).
pub fn cleanup_tag(tag: &str) -> usize {
    let prefix = format!("{PREFIX}{tag}-");
    delete_where(|name| name.starts_with(&prefix))
}

/// Whether root tests can run here. Outside CI a missing prerequisite skips
/// the test with a message; with `CI=true` it fails it.
pub fn require_root() -> bool {
    // SAFETY: geteuid cannot fail.
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if !std::path::Path::new("/proc/self/ns/net").exists() {
        Some("no network namespace support".to_string())
    } else if Command::new("ip").arg("-V").stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
        Some("the ip command (iproute2) is missing".to_string())
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true: tests need root and network namespaces: {p}")
        }
        Some(p) => {
            eprintln!("skipping: needs root and network namespaces ({p})");
            false
        }
    }
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
