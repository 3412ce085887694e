//! `kube-bench`: flanneld-rs's Kubernetes mode against its etcd mode, in the
//! same run, on the same machine, with the same peers.
//!
//! node0 runs `--kube-subnet-mgr` against a real kube-apiserver; node1 runs
//! in etcd mode against the etcd that the API server itself stores in. N
//! peers exist both as annotated Node objects and as etcd leases.
//! - Start-up: daemon start to every peer's route, neighbour and FDB entry in
//!   the kernel.
//! - Convergence: a new peer (a Node created through the API server, or a
//!   lease put into etcd) until its route is in the kernel, interleaved.
//! - Footprint: each daemon's RSS with N peers.
//! - Daemon work per new peer: from each daemon's `/metrics`, the time its
//!   reconcile runs took during the convergence part, per new peer, and how
//!   many runs were full and incremental (a daemon without those counters,
//!   an older build, shows the total only).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::kube::{KubeOverlay, PREFIX};
use e2e_tests::overlay::ETCD;
use e2e_tests::perf::pct;
use e2e_tests::perf::{in_ns, median, peer, stat_cpu, stat_user_system, NET};
use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;
use flanneld_rs::lease::{encode_value, BackendType, LeaseAttrs, VxlanData};
use flanneld_rs::subnet::etcd::subnet_key;
use futures_util::{stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use netns_fixtures::{wait_until, Netns};
use serde_json::json;

#[derive(Parser)]
#[command(about = "flanneld-rs: Kubernetes mode against etcd mode")]
struct Args {
    /// Peers present at start-up.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Cold starts of each mode (odd; the median is reported).
    #[arg(long, default_value_t = 5)]
    startup_rounds: usize,
    /// `FLANNELD_LOG` for both daemons (e.g. `debug`: the last round's
    /// lease, reconcile and ready lines are printed with their times).
    #[arg(long)]
    daemon_log: Option<String>,
    /// New peers for the convergence part (each mode).
    #[arg(long, default_value_t = 100)]
    new: usize,
}

fn peer_node(i: usize) -> Node {
    let (subnet, mac, public) = peer(i);
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("peer-{i}"),
            "annotations": {
                format!("{PREFIX}/kube-subnet-manager"): "true",
                format!("{PREFIX}/backend-type"): "vxlan",
                format!("{PREFIX}/backend-data"): format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
                format!("{PREFIX}/public-ip"): public.to_string(),
            }
        },
        "spec": { "podCIDR": subnet.to_string(), "podCIDRs": [subnet.to_string()] }
    }))
    .unwrap()
}

async fn put_lease(c: &mut etcd_client::Client, i: usize) {
    let (subnet, mac, public) = peer(i);
    let attrs = LeaseAttrs {
        public_ip: Some(public),
        backend: BackendType::Vxlan,
        vxlan: Some(VxlanData { vni: 1, vtep_mac: mac }),
        public_ipv6: None,
        vxlan6: None,
        wireguard: None,
        wireguard6: None,
    };
    c.put(subnet_key("/coreos.com/network", subnet), encode_value(&attrs), None).await.expect("put lease");
}

async fn nodes_api(kubeconfig: &std::path::Path) -> Api<Node> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    Api::all(kube::Client::try_from(cfg).unwrap())
}

fn routes(ns: &Netns) -> usize {
    in_ns(ns, async {
        let nl = Netlink::connect().unwrap();
        let Some(v) = nl.vxlan_by_name("flannel.1").await.unwrap() else { return 0 };
        nl.routes().await.unwrap().iter().filter(|r| r.oif == Some(v.index) && r.dst.addr().is_ipv4()).count()
    })
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Polls until `ns` routes `probe` through flannel.1; returns the wait.
async fn route_appears(nl: &Netlink, index: u32, probe: IpAddr, start: Instant) -> f64 {
    loop {
        if let Ok(Some((oif, _))) = nl.route_get(probe).await {
            if oif == index {
                return start.elapsed().as_secs_f64() * 1000.0;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "route to {probe} never appeared");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn main() {
    let args = Args::parse();
    assert!(netns_fixtures::require_root(), "kube-bench needs root");
    assert!(e2e_tests::kube::require_kube(), "kube-bench needs kube-apiserver and kubectl");
    let n = args.peers;
    assert!(
        args.startup_rounds % 2 == 1,
        "--startup-rounds {}: give an odd number (the median is reported)",
        args.startup_rounds
    );
    let mut ko = KubeOverlay::with_conf(2, NET);
    // node1 runs in etcd mode.
    ko.o.set_flags(1, &[]);
    for i in 0..2 {
        if let Some(filter) = &args.daemon_log {
            let mut env = ko.o.env(i);
            env.push(("FLANNELD_LOG".into(), filter.clone()));
            ko.o.set_env(i, &env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        }
        let mut f = ko.o.flags(i);
        f.extend(HEALTH.iter().map(|s| s.to_string()));
        ko.o.set_flags(i, &f.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let admin = ko.api.admin.clone();
    let t = Instant::now();
    in_ns(ko.o.outside(), async {
        let api = nodes_api(&admin).await;
        stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move { api.create(&PostParams::default(), &peer_node(i)).await.expect("create Node") }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let mut c = etcd_client::Client::connect([ETCD], None).await.unwrap();
        for i in 0..n {
            put_lease(&mut c, i).await;
        }
    });
    println!("setup: {n} Nodes and {n} etcd leases written in {:.1} s", t.elapsed().as_secs_f64());
    // A reference for what one list of every Node costs a client: the API
    // server's answer from its watch cache (resourceVersion=0, as flannel's
    // informers ask; the daemon reads pages from etcd instead, and its debug
    // line "node watch: listed" times them), and that answer parsed into
    // full Node objects.
    let (fetch, parse) = in_ns(ko.o.outside(), async {
        let api = nodes_api(&admin).await;
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            let req = api.resource_url().to_string() + "?resourceVersion=0";
            let body = kube::Client::from(api.clone())
                .request_text(http::Request::get(req).body(Vec::new()).unwrap())
                .await
                .expect("list Nodes");
            let fetched = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let list: k8s_openapi::List<Node> = serde_json::from_str(&body).expect("parse the Node list");
            assert!(list.items.len() >= n, "every Node listed");
            best = (best.0.min(fetched), best.1.min(t.elapsed().as_secs_f64()));
        }
        best
    });
    println!(
        "list of every Node from the watch cache, best of 3: the API server's answer {:.0} ms, parsing it into full Nodes {:.0} ms",
        fetch * 1000.0,
        parse * 1000.0
    );
    ko.api.create_node("node0", Some("10.0.0.0/24"), &[]);

    // Cold starts (no flannel.1, so no entry in the kernel), the two modes
    // one after the other, which goes first alternating by round, both on
    // node0: how fast a namespace takes 10,000 routes differs between the
    // namespaces of one run (node0 took them ~14 % slower than node1 in
    // etcd mode on both), so a mode per node would measure the node.
    let rounds = args.startup_rounds;
    let flags = [ko.o.flags(0), ko.o.flags(1)];
    let set_mode = |ko: &mut KubeOverlay, mode: usize| {
        ko.o.set_flags(0, &flags[mode].iter().map(String::as_str).collect::<Vec<_>>());
    };
    let mut startup = [Vec::new(), Vec::new()];
    // The lines each mode's last start-up wrote to the log.
    let mut said = [String::new(), String::new()];
    // CPU seconds of the API server and of etcd during each mode's start-ups:
    // on this machine they run beside the daemon.
    let servers = [ko.api.pid().expect("the API server runs"), ko.o.etcd.pid().expect("etcd runs")];
    let server_cpu = || servers.map(|pid| stat_cpu(&format!("/proc/{pid}/stat")));
    let mut servers_used = [[0.0; 2]; 2];
    let mut running = false;
    // node0's subnet in etcd mode: its lease stays in etcd.
    let mut etcd_subnet0 = None;
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for mode in order {
            if running {
                ko.o.stop(0);
                ko.o.cluster.node(0).ns.run_ok("ip", &["link", "del", "flannel.1"]);
            }
            set_mode(&mut ko, mode);
            let logged = ko.o.log(0).len();
            let cpu0 = server_cpu();
            let t0 = Instant::now();
            ko.o.start(0);
            running = true;
            let ns = &ko.o.cluster.node(0).ns;
            wait_until(Duration::from_secs(120), &format!("{n} routes on node0"), || routes(ns) >= n);
            startup[mode].push(t0.elapsed().as_secs_f64());
            let cpu1 = server_cpu();
            for s in 0..2 {
                servers_used[mode][s] += (cpu1[s] - cpu0[s]) / rounds as f64;
            }
            said[mode] = ko.o.log(0)[logged..].to_string();
            if mode == 1 {
                etcd_subnet0 = Some(ko.o.subnet(0));
            }
        }
    }
    let ratios: Vec<f64> = startup[0].iter().zip(&startup[1]).map(|(k, e)| k / e).collect();
    println!(
        "start-up, {n} peers, median of {rounds} cold starts on one node: kube mode {:.3} s, etcd mode {:.3} s (daemon start to every route in the kernel): ratio {:.2}x; per round kube {:.3?}, etcd {:.3?}, ratios {ratios:.2?}",
        median(&startup[0]),
        median(&startup[1]),
        median(&startup[0]) / median(&startup[1]),
        startup[0],
        startup[1],
    );
    for (i, mode) in ["kube mode", "etcd mode"].iter().enumerate() {
        println!(
            "servers' CPU per start-up, {mode} (mean of {rounds}): API server {:.0} ms, etcd {:.0} ms",
            servers_used[i][0] * 1000.0,
            servers_used[i][1] * 1000.0
        );
    }
    // Each mode's own account of its last start-up's phases (its ready line).
    for (i, mode) in ["kube mode", "etcd mode"].iter().enumerate() {
        let ready = said[i].lines().rfind(|l| l.contains("ready: ")).unwrap_or("(no ready line)");
        let phases = ready.split_once("ready: ").map_or(ready, |(_, r)| r);
        println!("start-up phases, {mode}: {phases}");
        if args.daemon_log.is_some() {
            let shown = ["lease ", "node watch: listed", "reconcile (start", "apply: ", "ready: "];
            for line in said[i].lines().filter(|l| shown.iter().any(|w| l.contains(w))) {
                println!("start-up, {mode}, the daemon says: {line}");
            }
        }
    }
    // From here on node0 runs kube mode and node1 etcd mode.
    // (The last round, an even one as rounds are odd, ended with etcd mode.)
    {
        ko.o.stop(0);
        ko.o.cluster.node(0).ns.run_ok("ip", &["link", "del", "flannel.1"]);
        set_mode(&mut ko, 0);
        ko.o.start(0);
    }
    ko.o.start(1);
    for i in 0..2 {
        let ns = &ko.o.cluster.node(i).ns;
        wait_until(Duration::from_secs(120), &format!("{n} routes on node{i}"), || routes(ns) >= n);
    }
    let rss: Vec<f64> = (0..2).map(|i| rss_mb(ko.o.daemons[i].proc.0.as_ref().unwrap().id())).collect();
    println!("footprint, {n} peers: RSS kube mode {:.1} MB, etcd mode {:.1} MB", rss[0], rss[1]);

    // Convergence, interleaved: a Node through the API server to node0's
    // kernel; a lease into etcd to node1's kernel. Timed from the moment the
    // write returned (API server / etcd committed it).
    let work_before: Vec<Work> = (0..2).map(|i| Work::of(&ko.o.cluster.node(i).ns)).collect();
    let daemon_stat = |i: usize| format!("/proc/{}/stat", ko.o.daemons[i].proc.0.as_ref().unwrap().id());
    let cpu_before: Vec<(f64, f64)> = (0..2).map(|i| stat_user_system(&daemon_stat(i))).collect();
    let (ns0, ns1) = (ko.o.cluster.node(0).ns.path(), ko.o.cluster.node(1).ns.path());
    let outside = ko.o.outside().path();
    let new = args.new;
    // The etcd-mode node took a free subnet, which is often the first one
    // after the peers' block, where the new peers go: skip the subnets the
    // two nodes hold.
    let held = [Some(ko.o.subnet(0)), Some(ko.o.subnet(1)), etcd_subnet0];
    let (kube_lat, etcd_lat) = NetNs::open(&outside)
        .unwrap()
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let api = nodes_api(&admin).await;
                let mut c = etcd_client::Client::connect([ETCD], None).await.unwrap();
                // Netlink sockets inside each node.
                let (nl0, idx0) = node_netlink(&ns0).await;
                let (nl1, idx1) = node_netlink(&ns1).await;
                let (mut k, mut e) = (Vec::new(), Vec::new());
                for i in (n..).filter(|i| !held.contains(&Some(peer(*i).0))).take(new) {
                    let probe = IpAddr::V4(Ipv4Addr::from(u32::from(peer(i).0.network()) + 5));
                    api.create(&PostParams::default(), &peer_node(i)).await.expect("create Node");
                    k.push(route_appears(&nl0, idx0, probe, Instant::now()).await);
                    put_lease(&mut c, i).await;
                    e.push(route_appears(&nl1, idx1, probe, Instant::now()).await);
                }
                (k, e)
            })
        })
        .unwrap();
    let report = |name: &str, mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "convergence, {new} new peers with {n} present, {name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(&v, 0.5),
            pct(&v, 0.99),
            v[v.len() - 1]
        );
        pct(&v, 0.5)
    };
    let k50 = report("kube mode (Node created -> route)", kube_lat);
    let e50 = report("etcd mode (lease put -> route)", etcd_lat);
    println!("convergence p50 ratio kube/etcd: {:.2}x", k50 / e50);
    for (i, mode) in ["kube mode", "etcd mode"].iter().enumerate() {
        let w = Work::of(&ko.o.cluster.node(i).ns).since(&work_before[i]);
        let (user, system) = stat_user_system(&daemon_stat(i));
        println!(
            "daemon CPU, {new} new peers with {n} present, {mode}: {:.0} us in its own code and {:.0} us in the kernel per new peer (from clock ticks: coarse below --new 100)",
            (user - cpu_before[i].0) * 1e6 / new as f64,
            (system - cpu_before[i].1) * 1e6 / new as f64
        );
        let split = match (w.full, w.incremental, w.incremental_s) {
            (Some(f), Some(inc), Some(inc_s)) => format!(
                "; {f} full runs, {inc} incremental runs, {:.0} us per incremental run",
                inc_s * 1e6 / inc.max(1) as f64
            ),
            _ => String::new(),
        };
        println!(
            "daemon work, {new} new peers with {n} present, {mode}: {:.0} us of reconcile per new peer ({} runs{split})",
            w.seconds * 1e6 / new as f64,
            w.runs
        );
    }
}

const HEALTH: &[&str] = &["--healthz-ip", "127.0.0.1", "--healthz-port", "9108"];

/// A daemon's reconcile counters.
#[derive(Debug, Clone, Copy)]
struct Work {
    runs: u64,
    seconds: f64,
    full: Option<u64>,
    incremental: Option<u64>,
    incremental_s: Option<f64>,
}

impl Work {
    fn of(ns: &Netns) -> Work {
        let text = e2e_tests::http_get(ns, "127.0.0.1:9108".parse().unwrap(), "/metrics");
        let m = |name: &str| e2e_tests::metric(&text, name);
        Work {
            runs: m("flannel_reconcile_runs_total").expect("flannel_reconcile_runs_total") as u64,
            seconds: m("flannel_reconcile_duration_seconds_total").expect("flannel_reconcile_duration_seconds_total"),
            full: m("flannel_reconcile_full_runs_total").map(|v| v as u64),
            incremental: m("flannel_reconcile_incremental_runs_total").map(|v| v as u64),
            incremental_s: m("flannel_reconcile_incremental_duration_seconds_total"),
        }
    }

    fn since(&self, before: &Work) -> Work {
        let sub = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a - b);
        Work {
            runs: self.runs - before.runs,
            seconds: self.seconds - before.seconds,
            full: sub(self.full, before.full),
            incremental: sub(self.incremental, before.incremental),
            incremental_s: self.incremental_s.zip(before.incremental_s).map(|(a, b)| a - b),
        }
    }
}

/// A netlink connection inside the node at `path`, and its flannel.1 index.
async fn node_netlink(path: &std::path::Path) -> (Netlink, u32) {
    let nl = Netlink::connect_in(&NetNs::open(path).unwrap()).unwrap();
    let idx = nl.vxlan_by_name("flannel.1").await.unwrap().expect("flannel.1").index;
    (nl, idx)
}
