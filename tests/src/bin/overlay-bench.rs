//! `overlay-bench`: flanneld-rs's control plane and data path, each beside a
//! reference measured in the same run on the same machine.
//!
//! - Start-up: with N peer leases in etcd, time from starting the daemon to
//!   every route, neighbour and FDB entry being in the kernel, against `ip
//!   -batch` programming the same entries into an identical device.
//! - Convergence: time from a new lease written to etcd until its route is in
//!   the kernel, over many leases.
//! - Footprint: the daemon's RSS with N peers, and its CPU use while idle.
//! - Data path: iperf3 and ping between pods on two nodes through the overlay,
//!   against the same topology with VXLAN programmed by hand; with `--ipv6`
//!   also over IPv6: pods on a dual-stack overlay through `flannel-v6.1` (a
//!   VXLAN over the IPv6 underlay) against the same device made by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::overlay::{Overlay, ETCD, NET_CONF_DUAL, VXLAN6_DEV};
use e2e_tests::perf::{in_ns, peer, NET};
use e2e_tests::perf::{iperf, median, pct, ping, stat_cpu};
use e2e_tests::workspace_bin;
use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;
use flanneld_rs::lease::{encode_value, BackendType, LeaseAttrs, VxlanData};
use flanneld_rs::subnet::etcd::subnet_key;
use netns_fixtures::{wait_until, Cluster, Netns};

#[derive(Parser)]
#[command(about = "flanneld-rs control-plane and data-path benchmarks")]
struct Args {
    /// Peer counts for the start-up benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    peers: Vec<usize>,
    /// Cold starts per peer count (odd; the median is reported).
    #[arg(long, default_value_t = 5)]
    startup_rounds: usize,
    /// New leases for the convergence benchmark.
    #[arg(long, default_value_t = 200)]
    leases: usize,
    /// iperf3 seconds per run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// iperf3 rounds per figure (odd; the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the data-path part.
    #[arg(long)]
    no_data_path: bool,
    /// Skip the start-up, convergence and footprint part.
    #[arg(long)]
    no_control_plane: bool,
    /// Backend of the data-path part: vxlan (against hand-programmed VXLAN)
    /// or host-gw (against hand-programmed routes).
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    backend: String,
    /// Also the data path over IPv6 (VXLAN only): pods of a dual-stack
    /// overlay through flannel-v6.1 against a flannel-v6.1 programmed by
    /// hand over the same IPv6 underlay.
    #[arg(long)]
    ipv6: bool,
    /// Only the IPv6 data path (implies --ipv6; skips the IPv4 one).
    #[arg(long)]
    ipv6_only: bool,
    /// An extra flag for every flanneld-rs of the data-path part (repeat
    /// it), e.g. `--daemon-flag=--iptables-forward-rules=false` to measure
    /// without flannel's FORWARD chain, which the hand-programmed reference
    /// does not have.
    #[arg(long = "daemon-flag", allow_hyphen_values = true)]
    daemon_flags: Vec<String>,
    /// `FLANNELD_LOG` for the start-up daemons (e.g. `debug`: the
    /// reconcile's phases are printed beside the start-up figure).
    #[arg(long)]
    daemon_log: Option<String>,
}

async fn etcd_client() -> etcd_client::Client {
    etcd_client::Client::connect([ETCD], None).await.expect("connect to etcd")
}

async fn put_peer(c: &mut etcd_client::Client, i: usize) {
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

/// Counts routes, neighbours and FDB entries on flannel.1 in `ns`.
fn counts(ns: &Netns) -> (usize, usize, usize) {
    in_ns(ns, async {
        let nl = Netlink::connect().unwrap();
        let Some(v) = nl.vxlan_by_name("flannel.1").await.unwrap() else { return (0, 0, 0) };
        let routes =
            nl.routes().await.unwrap().iter().filter(|r| r.oif == Some(v.index) && r.dst.addr().is_ipv4()).count();
        (routes, nl.neighs(v.index).await.unwrap().len(), nl.fdbs(v.index).await.unwrap().len())
    })
}

/// A process's resident memory (KiB) and CPU seconds so far.
fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    (rss_kib, stat_cpu(&format!("/proc/{pid}/stat")))
}

/// `ip -batch` programming of the same entries into an identical device.
fn reference_startup(n: usize) -> Duration {
    let ns = Netns::new("ref").unwrap();
    ns.run_ok("ip", &["link", "add", "eth0", "type", "bridge"]);
    ns.run_ok("ip", &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    ns.run_ok("ip", &["link", "set", "eth0", "up"]);
    ns.run_ok(
        "ip",
        &[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "192.0.2.10",
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    );
    ns.run_ok("ip", &["link", "set", "flannel.1", "mtu", "1450", "up"]);
    let mut ip_batch = String::new();
    let mut fdb_batch = String::new();
    for i in 0..n {
        let (s, mac, public) = peer(i);
        ip_batch += &format!("neigh replace {} lladdr {mac} dev flannel.1 nud permanent\n", s.network());
        fdb_batch += &format!("fdb append {mac} dev flannel.1 dst {public} self permanent\n");
    }
    for i in 0..n {
        let (s, _, _) = peer(i);
        ip_batch += &format!("route replace {s} via {} dev flannel.1 onlink\n", s.network());
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ip"), &ip_batch).unwrap();
    std::fs::write(dir.path().join("fdb"), &fdb_batch).unwrap();
    let start = Instant::now();
    ns.run_ok("bridge", &["-batch", dir.path().join("fdb").to_str().unwrap()]);
    ns.run_ok("ip", &["-batch", dir.path().join("ip").to_str().unwrap()]);
    start.elapsed()
}

fn startup(n: usize, leases: usize, rounds: usize, daemon_log: Option<&str>) {
    let mut o = Overlay::with_conf(1, NET);
    if let Some(filter) = daemon_log {
        o.set_env(0, &[("FLANNELD_LOG", filter)]);
    }
    in_ns(o.outside(), async {
        let mut c = etcd_client().await;
        for i in 0..n {
            put_peer(&mut c, i).await;
        }
    });
    let node = o.cluster.node(0).ns.name().to_string();
    // Each round is a cold start (no flannel.1, so no entry in the kernel),
    // interleaved with the reference's.
    let (mut ours, mut reference) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            o.stop(0);
            o.cluster.node(0).ns.run_ok("ip", &["link", "del", "flannel.1"]);
        }
        let t0 = Instant::now();
        o.start(0);
        let ns = &o.cluster.node(0).ns;
        wait_until(Duration::from_secs(120), &format!("{n} routes on {node}"), || counts(ns).0 >= n);
        ours.push(t0.elapsed().as_secs_f64());
        let c = counts(ns);
        assert_eq!(c, (n, n, n), "routes, neighbours, FDB entries");
        reference.push(reference_startup(n).as_secs_f64());
    }
    let ratios: Vec<f64> = ours.iter().zip(&reference).map(|(a, b)| a / b).collect();
    println!(
        "start-up, {n} peers, median of {rounds} cold starts: flanneld-rs {:.3} s (daemon start to every entry in the kernel), ip -batch {:.3} s: ratio {:.2}x; per round flanneld-rs {ours:.3?}, ip -batch {reference:.3?}, ratios {ratios:.2?}",
        median(&ours),
        median(&reference),
        median(&ours) / median(&reference),
    );
    let ns = &o.cluster.node(0).ns;
    // The daemon's own account of its start-up phases (its "ready" line).
    // Of the last round: the log has every round's.
    let log = o.log(0);
    let lines: Vec<&str> = log.lines().collect();
    let readies: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].contains("ready: ")).collect();
    let from = if readies.len() >= 2 { readies[readies.len() - 2] + 1 } else { 0 };
    for line in lines[from..]
        .iter()
        .filter(|l| l.contains("ready: ") || l.contains("reconcile (start, ") || l.contains("apply: "))
    {
        println!("start-up, {n} peers, the daemon says: {line}");
    }
    let pid = o.daemons[0].proc.0.as_ref().unwrap().id();
    let (rss, cpu0) = proc_stat(pid);
    std::thread::sleep(Duration::from_secs(10));
    let (_, cpu1) = proc_stat(pid);
    println!(
        "footprint, {n} peers: RSS {:.1} MB, idle CPU {:.2}% over 10 s",
        rss as f64 / 1024.0,
        (cpu1 - cpu0) / 10.0 * 100.0
    );

    if leases > 0 {
        // Convergence: one new lease at a time, until its route is in the kernel.
        let mut lat = Vec::new();
        let index =
            in_ns(ns, async { Netlink::connect().unwrap().vxlan_by_name("flannel.1").await.unwrap().unwrap().index });
        let results: Vec<f64> = NetNs::open(ns.path())
            .unwrap()
            .run(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let mut c = etcd_client().await;
                    let nl = Netlink::connect().unwrap();
                    let mut out = Vec::new();
                    for k in 0..leases {
                        let i = n + k;
                        let (subnet, _, _) = peer(i);
                        let probe = IpAddr::V4(Ipv4Addr::from(u32::from(subnet.network()) + 5));
                        // From the moment etcd has committed the write.
                        put_peer(&mut c, i).await;
                        let start = Instant::now();
                        loop {
                            if let Ok(Some((oif, _))) = nl.route_get(probe).await {
                                if oif == index {
                                    break;
                                }
                            }
                            assert!(start.elapsed() < Duration::from_secs(10), "route for {subnet} never appeared");
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                        out.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                    out
                })
            })
            .unwrap();
        lat.extend(results);
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "convergence, {leases} new leases with {n} peers: etcd put to route in the kernel p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
}

/// Two nodes with one pod each, VXLAN (or host-gw routes) programmed by hand with `ip`.
fn hand_programmed(host_gw: bool) -> (Cluster, Netns, Netns, Ipv4Addr) {
    let c = Cluster::new(2).unwrap();
    let mut pods = Vec::new();
    let mtu = if host_gw { "1500" } else { "1450" };
    if !host_gw {
        e2e_tests::perf::vxlan_by_hand(&c, 244);
    }
    for i in 0..2usize {
        let ns = &c.node(i).ns;
        let me = 1 + i;
        let peer = 2 - i;
        let mut cmds = vec![
            format!("link add cni0 mtu {mtu} type bridge"),
            format!("addr add 10.244.{me}.1/24 dev cni0"),
            "link set cni0 up".to_string(),
        ];
        if host_gw {
            cmds.insert(0, format!("route replace 10.244.{peer}.0/24 via 192.0.2.{} dev eth0", 10 + 1 - i));
        }
        for cmd in cmds {
            let args: Vec<&str> = cmd.split(' ').collect();
            ns.run_ok("ip", &args);
        }
        let pod = c.node(i).add_pod_netns("hp").unwrap();
        ns.run_ok(
            "ip",
            &[
                "link",
                "add",
                "vh0",
                "mtu",
                mtu,
                "master",
                "cni0",
                "up",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                mtu,
                "netns",
                pod.name(),
            ],
        );
        pod.run_ok("ip", &["addr", "add", &format!("10.244.{me}.2/24"), "dev", "eth0"]);
        pod.run_ok("ip", &["link", "set", "eth0", "up"]);
        pod.run_ok("ip", &["route", "add", "default", "via", &format!("10.244.{me}.1")]);
        pods.push(pod);
    }
    let b = pods.pop().unwrap();
    let a = pods.pop().unwrap();
    (c, a, b, "10.244.2.2".parse().unwrap())
}

fn data_path(seconds: u32, rounds: usize, backend: &str, flags: &[String]) {
    let host_gw = backend == "host-gw";
    let mut o = if host_gw {
        Overlay::with_conf(2, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
    } else {
        Overlay::new(2)
    };
    set_daemon_flags(&mut o, flags);
    o.start_all();
    if host_gw {
        for i in 0..2 {
            wait_until(Duration::from_secs(10), "host-gw routes", || o.underlay_routes(i).len() == 1);
        }
    } else {
        o.wait_converged(0);
        o.wait_converged(1);
    }
    let (a, _) = o.add_pod(0, "ba");
    let (b, b_addr) = o.add_pod(1, "bb");
    let (hc, ha, hb, hb_addr) = hand_programmed(host_gw);
    let what = if host_gw { "hand-programmed routes" } else { "hand-programmed VXLAN" };
    let _ = &hc;
    compare(backend, what, seconds, rounds, (&a, &b, b_addr.into()), (&ha, &hb, hb_addr.into()));
}

/// `flags` for both daemons of a data-path overlay.
fn set_daemon_flags(o: &mut Overlay, flags: &[String]) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for i in 0..2 {
        o.set_flags(i, &flags);
    }
}

/// The IPv6 data path: two pods of a dual-stack VXLAN overlay (plugged in
/// by the real plugin) over flannel-v6.1, against two pods whose
/// flannel-v6.1, bridge and addresses are made by hand with the same MTUs.
fn data_path6(seconds: u32, rounds: usize, flags: &[String]) {
    let mut o = Overlay::dual_stack(2, NET_CONF_DUAL);
    set_daemon_flags(&mut o, flags);
    o.start_all();
    o.wait_converged6(0);
    o.wait_converged6(1);
    let (a, _, _) = o.add_dual_pod(0, "ba");
    let (b, _, b6) = o.add_dual_pod(1, "bb");
    let mtu_of = |ns: &Netns, dev: &str| ns.ip_json(&["link", "show", dev])[0]["mtu"].as_u64().unwrap() as u32;
    let (vtep_mtu, pod_mtu) = (mtu_of(&o.cluster.node(0).ns, VXLAN6_DEV), mtu_of(&a, "eth0"));
    println!("IPv6 data path: {VXLAN6_DEV} MTU {vtep_mtu}, pod MTU {pod_mtu} (both sides)");
    let (hc, ha, hb, hb6) = hand_programmed6(vtep_mtu, pod_mtu);
    let _ = &hc;
    compare(
        "vxlan over IPv6",
        "hand-programmed flannel-v6.1",
        seconds,
        rounds,
        (&a, &b, b6.into()),
        (&ha, &hb, hb6.into()),
    );
}

/// Two nodes of a dual-stack cluster with one pod each and flannel-v6.1
/// programmed by hand ([`e2e_tests::perf::vxlan6_by_hand`]); pods have only
/// an IPv6 address, 2001:db8:20:(i+1)::2/64 behind cni0's ::1.
fn hand_programmed6(vtep_mtu: u32, pod_mtu: u32) -> (Cluster, Netns, Netns, Ipv6Addr) {
    let c = Cluster::dual_stack(2, false).unwrap();
    e2e_tests::perf::vxlan6_by_hand(&c, 0x20, vtep_mtu);
    let mut pods = Vec::new();
    for i in 0..2usize {
        let ns = &c.node(i).ns;
        let me = i + 1;
        let pod = c.node(i).add_pod_netns("hp").unwrap();
        ns.ip_batch(&[
            format!("link add cni0 mtu {pod_mtu} type bridge"),
            format!("addr add 2001:db8:20:{me}::1/64 dev cni0 nodad"),
            "link set cni0 up".to_string(),
            format!(
                "link add vh0 mtu {pod_mtu} master cni0 up type veth peer name eth0 mtu {pod_mtu} netns {}",
                pod.name()
            ),
        ])
        .unwrap();
        pod.ip_batch(&[
            format!("addr add 2001:db8:20:{me}::2/64 dev eth0 nodad"),
            "link set eth0 up".to_string(),
            format!("route add ::/0 via 2001:db8:20:{me}::1"),
        ])
        .unwrap();
        pods.push(pod);
    }
    let b = pods.pop().unwrap();
    let a = pods.pop().unwrap();
    (c, a, b, "2001:db8:20:2::2".parse().unwrap())
}

/// iperf3 with 1 and 4 streams and ping, ours (`a` to `b` at its address)
/// against the reference, in alternating order, medians of `rounds`.
fn compare(
    backend: &str,
    what: &str,
    seconds: u32,
    rounds: usize,
    (a, b, b_addr): (&Netns, &Netns, IpAddr),
    (ha, hb, hb_addr): (&Netns, &Netns, IpAddr),
) {
    for streams in [1, 4] {
        // Rounds alternate which side goes first: on two cores the second of
        // two back-to-back runs is measurably faster, and the alternation
        // cancels that out. Medians are reported.
        let (mut ours, mut hand) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                ours.push(iperf(a, b, b_addr, streams, seconds));
                hand.push(iperf(ha, hb, hb_addr, streams, seconds));
            } else {
                hand.push(iperf(ha, hb, hb_addr, streams, seconds));
                ours.push(iperf(a, b, b_addr, streams, seconds));
            }
        }
        // Also per round (the two runs of a round are back to back, so they
        // share the machine's state): the median of those ratios.
        let mut paired: Vec<f64> = ours.iter().zip(&hand).map(|(o, h)| o / h * 100.0).collect();
        paired.sort_by(|x, y| x.partial_cmp(y).unwrap());
        ours.sort_by(|x, y| x.partial_cmp(y).unwrap());
        hand.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let (o, h) = (ours[rounds / 2], hand[rounds / 2]);
        println!(
            "iperf3 pod to pod across nodes, {backend}, {streams} stream(s), median of {rounds}: flanneld-rs {o:.2} Gbit/s {ours:.2?}, {what} {h:.2} Gbit/s {hand:.2?}: {:.1}%; per-round ratios {paired:.1?}, median {:.1}%",
            o / h * 100.0,
            paired[rounds / 2]
        );
    }
    let (p50, p99) = ping(a, b_addr);
    let (h50, h99) = ping(ha, hb_addr);
    println!("ping pod to pod across nodes, {backend}: flanneld-rs p50 {p50:.3} ms p99 {p99:.3} ms, {what} p50 {h50:.3} ms p99 {h99:.3} ms: p50 ratio {:.2}", p50 / h50);
}

fn main() {
    let args = Args::parse();
    if (args.ipv6 || args.ipv6_only) && args.backend != "vxlan" {
        eprintln!("--ipv6 measures the VXLAN backend only, not --backend {}", args.backend);
        std::process::exit(2);
    }
    if !netns_fixtures::require_root() {
        std::process::exit(1);
    }
    let _ = workspace_bin("flanneld-rs");
    if args.startup_rounds % 2 == 0 {
        eprintln!("--startup-rounds {}: give an odd number (the median is reported)", args.startup_rounds);
        std::process::exit(2);
    }
    if !args.no_control_plane {
        for (k, n) in args.peers.iter().enumerate() {
            // Convergence is measured once, on the first size.
            startup(*n, if k == 0 { args.leases } else { 0 }, args.startup_rounds, args.daemon_log.as_deref());
        }
    }
    if !args.no_data_path {
        if args.rounds % 2 == 0 {
            eprintln!("--rounds {}: give an odd number (the median is reported)", args.rounds);
            std::process::exit(2);
        }
        if !args.ipv6_only {
            data_path(args.seconds, args.rounds, &args.backend, &args.daemon_flags);
        }
        if args.ipv6 || args.ipv6_only {
            data_path6(args.seconds, args.rounds, &args.daemon_flags);
        }
    }
}
