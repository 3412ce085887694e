//! `services-bench`: HTTP through a ClusterIP Service to a pod on another
//! node, flanneld-rs against a reference, the same kube-proxy in front of
//! both, in one run on one cluster of four nodes and one API server.
//!
//! - Ours: nodes 0 and 1, flanneld-rs in Kubernetes mode (vxlan,
//!   `--ip-masq`, as flannel's manifest runs it), pods plugged in by our
//!   plugin with the deploy bundle's delegate, pod network 10.244.0.0/16.
//! - Reference: nodes 2 and 3, Debian's `bridge` + `host-local` CNI plugins
//!   (containernetworking-plugins, with the configuration flannel's plugin
//!   would hand them) and `flannel.1` programmed by hand with `ip` and
//!   `bridge` (device, address, neighbour, route, FDB entry: the objects
//!   flanneld-rs makes), pod network 10.245.0.0/16.
//! - Every node runs the real kube-proxy (v1.20.2, iptables mode through
//!   iptables-nft), `--cluster-cidr` its pod network. One selector-less
//!   ClusterIP Service per side, its one endpoint nginx (one worker,
//!   `return 200`) in the pod on node 1 (3); the client is `wrk --latency`
//!   in the pod on node 0 (2), fixed connections, threads and duration.
//!
//! Rounds alternate which side goes first; the figures are medians, with the
//! median of the per-round ratios beside them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use e2e_tests::kube::KubeOverlay;
use e2e_tests::overlay::Proc;
use e2e_tests::services::{create_service, require_kube_proxy, wait_programmed, KubeProxies, Svc, SvcSpec, TCP_PORT};
use e2e_tests::{cni, cni_env, wait_until_or};
use netns_fixtures::Netns;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "HTTP through a ClusterIP Service across nodes: flanneld-rs against bridge + hand-programmed VXLAN")]
struct Args {
    /// Rounds (odd: the median is reported); each measures both sides once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// wrk's open connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// wrk's threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Directory holding the reference plugins (bridge, host-local).
    #[arg(long, default_value = "/usr/lib/cni")]
    reference_dir: std::path::PathBuf,
    /// An extra flag for both flanneld-rs (repeat it), e.g.
    /// `--daemon-flag=--iptables-forward-rules=false` to measure without
    /// flannel's FORWARD chain, which the hand-programmed reference lacks.
    #[arg(long = "daemon-flag", allow_hyphen_values = true)]
    daemon_flags: Vec<String>,
}

/// The reference's pod network, and kube-proxy's `--cluster-cidr` on its nodes.
const REF_CIDR: &str = "10.245.0.0/16";

/// nginx in a pod: one worker answering every request with a 3-byte body;
/// stopped (SIGTERM to the master, which stops its worker) on drop.
struct Nginx(Proc);

impl Nginx {
    fn start(pod: &Netns, dir: &Path, name: &str) -> Nginx {
        let prefix = dir.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&prefix).unwrap();
        let p = prefix.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  \
             fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  \
             server {{ listen {TCP_PORT}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
        );
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = pod
            .command("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (apt-get install nginx)");
        let n = Nginx(Proc(Some(child)));
        wait_until_or(
            Duration::from_secs(10),
            &|| pod.run_ok("ss", &["-Hltn", &format!("sport = :{TCP_PORT}")]).contains(&TCP_PORT.to_string()),
            &|| {
                format!(
                    "nginx in {name} to listen; {}",
                    std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
                )
            },
        );
        n
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `2.34ms`, `812.00us`, `1.02s` in ms.
fn duration_ms(text: &str) -> f64 {
    let (num, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        panic!("wrk duration {text:?}")
    };
    num.parse::<f64>().unwrap_or_else(|e| panic!("wrk duration {text:?}: {e}")) * factor
}

/// wrk from `client` against `url`; panics on any socket error or non-2xx
/// response (a broken path must not pass for a slow one).
fn wrk(client: &Netns, url: &str, args: &Args, seconds: u32) -> Run {
    let out = client
        .command("wrk")
        .args([
            "--latency",
            "-t",
            &args.threads.to_string(),
            "-c",
            &args.connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "5s",
            url,
        ])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("Socket errors") && !text.contains("Non-2xx"), "wrk {url}: errors in the run:\n{text}");
    let field = |line_start: &str| -> &str {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start:?} in wrk's output:\n{text}"))
            .split_whitespace()
            .next()
            .unwrap()
    };
    Run {
        rps: field("Requests/sec:").parse().unwrap(),
        p50_ms: duration_ms(field("50%")),
        p99_ms: duration_ms(field("99%")),
    }
}

/// A pod on reference node `node` (2 or 3) plugged in by Debian's bridge +
/// host-local, subnet 10.245.(node - 1).0/24: its namespace and address.
fn reference_pod(ko: &KubeOverlay, node: usize, name: &str, args: &Args) -> (Netns, Ipv4Addr) {
    let k = node - 1;
    let n = ko.o.cluster.node(node);
    let pod = n.add_pod_netns(name).unwrap();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge",
        "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "hairpinMode": true,
        "ipMasq": false, "mtu": 1450,
        "ipam": {
            "type": "host-local", "dataDir": ko.o.dir.path().join(format!("reference{node}")),
            "ranges": [[{ "subnet": format!("10.245.{k}.0/24") }]],
            "routes": [{ "dst": REF_CIDR }]
        }
    });
    let path = pod.path().display().to_string();
    let reference_dir = args.reference_dir.display().to_string();
    let mut env = cni_env("ADD", name, &path);
    env.retain(|(k, _)| *k != "CNI_PATH");
    env.push(("CNI_PATH", &reference_dir));
    let out = cni(&n.ns, &args.reference_dir.join("bridge"), &env, &conf.to_string());
    assert!(out.ok, "bridge ADD {name} on node{node}: {out:?}");
    let ip = out.json["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("bridge ADD {name}: {}", out.json));
    (pod, ip.split('/').next().unwrap().parse().unwrap())
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        other => panic!("want an IPv4 address, got {other}"),
    }
}

/// (median, sorted values).
fn median(mut v: Vec<f64>) -> (f64, Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v)
}

fn main() {
    let args = Args::parse();
    if args.rounds.is_multiple_of(2) {
        eprintln!("--rounds {}: give an odd number (the median is reported)", args.rounds);
        std::process::exit(2);
    }
    if !netns_fixtures::require_root() || !e2e_tests::kube::require_kube() || !require_kube_proxy() {
        std::process::exit(1);
    }
    for (tool, package) in [("wrk", "wrk"), ("nginx", "nginx")] {
        let there = std::process::Command::new(tool).arg("-v").output().is_ok();
        if !there {
            eprintln!("services-bench needs {tool} (Debian package {package})");
            std::process::exit(1);
        }
    }
    let _ = e2e_tests::workspace_bin("flanneld-rs");

    let mut ko = KubeOverlay::with_conf(4, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    for i in 0..2 {
        ko.create_node(i);
        let mut flags = ko.o.flags(i);
        flags.push("--ip-masq".into());
        flags.extend(args.daemon_flags.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ko.o.set_flags(i, &flags);
        ko.o.start(i);
    }
    ko.wait_converged(0);
    ko.wait_converged(1);
    e2e_tests::perf::vxlan_by_hand_on(&ko.o.cluster, [2, 3], 245);

    // Dropped (killed) before the cluster, in reverse order of declaration.
    let mut proxies = KubeProxies::new(&ko);
    proxies.start(&ko, 0);
    proxies.start(&ko, 1);
    proxies.start_with_cidr(&ko, 2, REF_CIDR);
    proxies.start_with_cidr(&ko, 3, REF_CIDR);

    let cm = ko.api.get_json(&["configmap", "kube-flannel-rs-cfg", "-n", "kube-flannel-rs"]);
    let cni_conf: Value = serde_json::from_str(cm["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
    let delegate = cni_conf["plugins"][0]["delegate"].clone();
    let (client, _) = ko.o.add_pod_with(0, "wrk", delegate.clone());
    let (server, ips) = ko.o.add_pod_with(1, "web", delegate);
    let server_ip = v4(ips[0]);
    let (ref_client, _) = reference_pod(&ko, 2, "wrk", &args);
    let (ref_server, ref_server_ip) = reference_pod(&ko, 3, "web", &args);

    let dir = ko.o.dir.path().to_path_buf();
    let _nginx = Nginx::start(&server, &dir, "ours");
    let _ref_nginx = Nginx::start(&ref_server, &dir, "reference");

    let spec = |ip: Ipv4Addr, node: &'static str| SvcSpec { endpoints: vec![(ip, node)], ..Default::default() };
    let ours: Svc = create_service(&ko, "bench-ours", &spec(server_ip, "node1"));
    let reference: Svc = create_service(&ko, "bench-ref", &spec(ref_server_ip, "node3"));
    wait_programmed(&ko, &ours);
    wait_programmed(&ko, &reference);
    let url = |svc: &Svc| format!("http://{}/", svc.cluster(e2e_tests::services::Proto::Tcp));
    let (ours_url, ref_url) = (url(&ours), url(&reference));
    println!(
        "services-bench: wrk {} connection(s), {} thread(s), {} s per run, {} rounds; ours {ours_url} -> {server_ip} (node1), reference {ref_url} -> {ref_server_ip} (node3); daemon flags {:?}",
        args.connections, args.threads, args.seconds, args.rounds, args.daemon_flags
    );
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    println!("load average before: {}", load());
    // Warm-up: the Service's first connections, caches, conntrack.
    wrk(&client, &ours_url, &args, 1);
    wrk(&ref_client, &ref_url, &args, 1);

    let (mut o, mut r) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let run_ours = || wrk(&client, &ours_url, &args, args.seconds);
        let run_ref = || wrk(&ref_client, &ref_url, &args, args.seconds);
        let (a, b) = if round % 2 == 0 {
            let a = run_ours();
            (a, run_ref())
        } else {
            let b = run_ref();
            (run_ours(), b)
        };
        println!(
            "round {}: flanneld-rs {:.0} req/s p50 {:.3} ms p99 {:.3} ms; reference {:.0} req/s p50 {:.3} ms p99 {:.3} ms",
            round + 1,
            a.rps,
            a.p50_ms,
            a.p99_ms,
            b.rps,
            b.p50_ms,
            b.p99_ms
        );
        o.push(a);
        r.push(b);
    }
    println!("load average after: {}", load());

    println!();
    println!("| HTTP through a ClusterIP Service to a pod on another node, median of {} | flanneld-rs | bridge + hand-programmed VXLAN | ratio (median of per-round ratios) |", args.rounds);
    println!("|---|---|---|---|");
    type Get = fn(&Run) -> f64;
    for (label, get, unit) in [
        ("requests per second", (|x: &Run| x.rps) as Get, ""),
        ("p50 latency", (|x: &Run| x.p50_ms) as Get, " ms"),
        ("p99 latency", (|x: &Run| x.p99_ms) as Get, " ms"),
    ] {
        let (mo, _) = median(o.iter().map(get).collect());
        let (mr, _) = median(r.iter().map(get).collect());
        let (per_round, _) = median(o.iter().zip(&r).map(|(a, b)| get(a) / get(b)).collect());
        let prec = if unit.is_empty() { 0 } else { 3 };
        println!("| {label} | {mo:.prec$}{unit} | {mr:.prec$}{unit} | {:.3} ({per_round:.3}) |", mo / mr);
    }
}
