//! Helpers for the end-to-end tests in `tests/` and the benchmark harnesses in
//! `src/bin/`: finding the workspace's binaries, running CNI plugins inside a
//! node namespace, and moving bytes over TCP between namespaces.

pub mod bare_relay;
pub mod faults;
pub mod kube;
pub mod mixed;
pub mod netpol;
pub mod overlay;
pub mod perf;
pub mod services;
pub mod stream;

pub use netns_fixtures::{echo_server, tcp_round_trip};

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use netns_fixtures::Netns;
use serde_json::Value;

/// A binary of this workspace, built next to the running test or harness
/// (`target/<profile>/<name>`). `scripts/test.sh` builds them first.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> for tests, target/<profile>/<bin> for bins.
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// What a CNI plugin call returned.
#[derive(Debug)]
pub struct CniOutput {
    /// Exit status 0.
    pub ok: bool,
    /// Its stdout as JSON (`Null` when empty).
    pub json: Value,
    /// Its stderr.
    pub stderr: String,
}

/// Runs CNI plugin `plugin` inside `node` with `env` and `stdin`.
pub fn cni(node: &Netns, plugin: &std::path::Path, env: &[(&str, &str)], stdin: &str) -> CniOutput {
    let mut cmd = node.command(plugin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", plugin.display()));
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    CniOutput {
        ok: out.status.success(),
        json: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        },
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// The environment of a CNI call on an attachment.
pub fn cni_env<'a>(verb: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", verb),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// Runs `cmd` and returns stdout, panicking with everything on failure.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A plain HTTP/1.1 GET from inside `ns`; the whole response, head and body.
pub fn http_get(ns: &Netns, addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::Read;
    let mut s = flannel_net::netns::NetNs::open(ns.path())
        .unwrap()
        .run(move || std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the Prometheus sample `name` in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every pod reaches every other pod over TCP on `port_base + i * n + j`,
/// keeping its own source address (no masquerade between pods).
pub fn all_pods_talk(pods: &[(Netns, std::net::Ipv4Addr)], port_base: u16) {
    let n = pods.len();
    for (i, (from, _)) in pods.iter().enumerate() {
        for (j, (to, addr)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            let target = std::net::SocketAddr::new((*addr).into(), port_base + (i * n + j) as u16);
            let server = echo_server(to, target);
            assert_eq!(tcp_round_trip(from, target), "ping\n", "pod on node{i} -> pod on node{j}");
            assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(pods[i].1), "pod on node{i} -> node{j}");
        }
    }
}

/// Every pod reaches every other pod over TCP at each of its addresses
/// (`pods`: namespace and addresses, e.g. one IPv4 and one IPv6), port
/// `port_base + (i * n + j) * k + a` for the `a`-th address, keeping its own
/// source address of the same family (no masquerade between pods, no
/// family translation).
pub fn all_pods_talk_ips(pods: &[(&Netns, Vec<std::net::IpAddr>)], port_base: u16) {
    let n = pods.len();
    let k = pods.iter().map(|(_, a)| a.len()).max().unwrap_or(0);
    for (i, (from, from_addrs)) in pods.iter().enumerate() {
        for (j, (to, addrs)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            for (a, addr) in addrs.iter().enumerate() {
                let target = std::net::SocketAddr::new(*addr, port_base + ((i * n + j) * k + a) as u16);
                let server = echo_server(to, target);
                assert_eq!(tcp_round_trip(from, target), "ping\n", "pod on node{i} -> pod on node{j} at {target}");
                let seen = server.join().unwrap().ip();
                let own: Vec<std::net::IpAddr> =
                    from_addrs.iter().copied().filter(|s| s.is_ipv4() == addr.is_ipv4()).collect();
                assert!(own.contains(&seen), "pod on node{i} -> {target}: the server saw {seen}, not one of {own:?}");
            }
        }
    }
}

/// [`netns_fixtures::wait_until`], with a failure message built only when
/// the wait fails (`what()` may read logs).
pub fn wait_until_or(timeout: std::time::Duration, cond: &dyn Fn() -> bool, what: &dyn Fn() -> String) {
    let deadline = std::time::Instant::now() + timeout;
    let mut held = false;
    netns_fixtures::wait_until(timeout, "a condition", || {
        held = cond();
        held || std::time::Instant::now() >= deadline
    });
    assert!(held, "timed out after {timeout:?} waiting for {}", what());
}
