//! `udp-bench`: the udp backend's data path beside two references, on the
//! same two-node fixture in the same run:
//!
//! - flanneld-rs's `UdpDataPath` (overlay 10.244.0.0/16, `flannel0`, port 8285);
//! - kernel VXLAN programmed by hand (10.245.0.0/16, `flannel.1`, port 8472);
//! - a per-packet user-space relay, socat between a TUN and a UDP socket
//!   (10.246.0.0/16, `socat0`, port 8286): what flannel's udp mode is like.
//!
//! All three live side by side in the same node namespaces, each with its
//! own pod per node, so rounds can alternate between them. Figures: iperf3
//! pod to pod with 1 and 4 streams (median of the rounds), CPU seconds per
//! gigabit (the relay's own threads or processes, and the whole machine from
//! /proc/stat), ping p50/p99. `--stages` also measures our data path with
//! its speed-ups turned on one at a time.

use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::perf::ping;
use flanneld_rs::udp::{Tuning, UdpConfig, UdpDataPath};
use netns_fixtures::{wait_until, Cluster, Netns};

#[derive(Parser)]
#[command(about = "udp backend data path against kernel VXLAN and a socat relay")]
struct Args {
    /// iperf3 seconds per run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Rounds per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure our data path stage by stage (speed-ups added one at a time).
    #[arg(long)]
    stages: bool,
    /// Only the stages.
    #[arg(long)]
    stages_only: bool,
    /// Only our data path with everything on (quick iteration).
    #[arg(long)]
    ours_only: bool,
}

const UDP_MTU: u32 = 1500 - 28;
const VXLAN_MTU: u32 = 1500 - 50;

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// A pod of overlay `net` (10.<net>.0.0/16) on node `i`: a veth `<dev>` in
/// the node with `.1`, `eth0` in the pod with `.2`.
fn add_pod(c: &Cluster, i: usize, net: u8, dev: &str, mtu: u32) -> Netns {
    let node = c.node(i);
    let pod = node.add_pod_netns(dev).unwrap();
    let mtu = mtu.to_string();
    node.ns.run_ok(
        "ip",
        &["link", "add", dev, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu, "netns", pod.name()],
    );
    node.ns.run_ok("ip", &["addr", "add", &format!("10.{net}.{}.1/24", i + 1), "dev", dev]);
    node.ns.run_ok("ip", &["link", "set", dev, "up"]);
    pod.run_ok("ip", &["addr", "add", &format!("10.{net}.{}.2/24", i + 1), "dev", "eth0"]);
    pod.run_ok("ip", &["link", "set", "eth0", "up"]);
    pod.run_ok("ip", &["route", "add", "default", "via", &format!("10.{net}.{}.1", i + 1)]);
    node.ns.wait_oper_up(&[dev], Duration::from_secs(10)).unwrap();
    pod
}

fn start_ours(c: &Cluster, i: usize, tuning: Tuning) -> UdpDataPath {
    let cfg = UdpConfig {
        tun_name: "flannel0".into(),
        subnet: format!("10.244.{}.0/24", i + 1).parse().unwrap(),
        network: "10.244.0.0/16".parse().unwrap(),
        mtu: UDP_MTU,
        port: 8285,
        bind: underlay(i),
        queues: 0,
    };
    let dp = c.node(i).ns.in_thread(|| UdpDataPath::start_with(cfg, tuning)).unwrap();
    let peer = 1 - i;
    dp.set_peers(&[(format!("10.244.{}.0/24", peer + 1).parse().unwrap(), underlay(peer))]);
    dp
}

fn vxlan(c: &Cluster) {
    let macs = ["02:aa:00:00:00:01", "02:aa:00:00:00:02"];
    for i in 0..2usize {
        let (me, peer) = (i + 1, 2 - i);
        c.node(i)
            .ns
            .ip_batch(&[
                format!(
                    "link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
                    macs[i],
                    underlay(i)
                ),
                format!("link set flannel.1 mtu {VXLAN_MTU} up"),
                format!("addr add 10.245.{me}.0/32 dev flannel.1"),
                format!("neigh replace 10.245.{peer}.0 lladdr {} dev flannel.1 nud permanent", macs[1 - i]),
                format!("route replace 10.245.{peer}.0/24 via 10.245.{peer}.0 dev flannel.1 onlink"),
            ])
            .unwrap();
        c.node(i).ns.run_ok(
            "bridge",
            &[
                "fdb",
                "append",
                macs[1 - i],
                "dev",
                "flannel.1",
                "dst",
                &underlay(1 - i).to_string(),
                "self",
                "permanent",
            ],
        );
    }
}

/// socat relaying between a TUN and a UDP socket on each node, one packet
/// per read and per write (`socat TUN:... UDP-DATAGRAM:peer:port,bind=...`).
fn socat(c: &Cluster) -> Vec<Child> {
    let mut kids = Vec::new();
    for i in 0..2usize {
        let ns = &c.node(i).ns;
        let tun = format!("TUN:10.246.{}.0/16,tun-name=socat0,tun-type=tun,iff-no-pi,iff-up", i + 1);
        // UDP-DATAGRAM (unconnected): a connected socket would die of the
        // "connection refused" the peer answers before its socat is up.
        let udp = format!("UDP-DATAGRAM:{}:8286,bind={}:8286", underlay(1 - i), underlay(i));
        let child = ns
            .command("socat")
            .args(["-b", "65536", &tun, &udp])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)");
        wait_until(Duration::from_secs(5), "socat0", || ns.ip(&["link", "show", "socat0"]).is_ok());
        ns.run_ok("ip", &["link", "set", "socat0", "mtu", &UDP_MTU.to_string()]);
        kids.push(child);
    }
    kids
}

/// Busy CPU seconds of the whole machine so far (/proc/stat: all but idle
/// and iowait).
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    busy / hz()
}

fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a /proc/.../stat file, in seconds.
fn stat_cpu(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let Some(rest) = stat.rsplit(')').next() else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 13 {
        return 0.0;
    }
    (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / hz()
}

/// Who to charge the relay's CPU to.
enum Relay<'a> {
    Ours(&'a [UdpDataPath]),
    Procs(&'a [Child]),
    Kernel,
}

impl Relay<'_> {
    fn cpu(&self) -> f64 {
        match self {
            Relay::Ours(dps) => dps
                .iter()
                .flat_map(|d| d.thread_ids())
                .map(|tid| stat_cpu(&format!("/proc/self/task/{tid}/stat")))
                .sum(),
            Relay::Procs(kids) => kids.iter().map(|k| stat_cpu(&format!("/proc/{}/stat", k.id()))).sum(),
            Relay::Kernel => 0.0,
        }
    }
}

/// One iperf3 run: Gbit/s, relay CPU s/Gbit, machine CPU s/Gbit.
fn iperf(client: &Netns, server: &Netns, addr: &str, streams: u32, seconds: u32, relay: &Relay) -> (f64, f64, f64) {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (apt-get install iperf3)");
    wait_until(Duration::from_secs(5), "iperf3 server", || {
        server.run_ok("ss", &["-Hltn", "sport = :5201"]).contains("5201")
    });
    let (r0, m0) = (relay.cpu(), machine_cpu());
    let out = client
        .run("iperf3", &["-c", addr, "-p", "5201", "-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"])
        .unwrap();
    let (r1, m1) = (relay.cpu(), machine_cpu());
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    let gbit = (gbps * f64::from(seconds)).max(1e-9);
    (gbps, (r1 - r0) / gbit, (m1 - m0) / gbit)
}

#[derive(Clone, Copy, Default)]
struct Figure {
    gbps: f64,
    relay_cpu: f64,
    machine_cpu: f64,
}

/// Median (by throughput) of runs.
fn median(mut v: Vec<Figure>) -> Figure {
    v.sort_by(|a, b| a.gbps.partial_cmp(&b.gbps).unwrap());
    v[v.len() / 2]
}

fn stages(c: &Cluster, pods: &[Netns], seconds: u32, rounds: usize) {
    let base = Tuning::per_packet();
    let list = [
        ("per packet (1 queue, read/sendto/recvfrom/write)", base),
        ("+ batching (recvmmsg/sendmmsg, 16)", Tuning { batch: 16, ..base }),
        ("+ multi-queue TUN, a worker per CPU", Tuning { batch: 16, multi_queue: true, ..base }),
        ("+ TUN TSO, segments cut in user space", Tuning { batch: 16, multi_queue: true, offload: true, ..base }),
        ("+ UDP GSO on send", Tuning { batch: 16, multi_queue: true, offload: true, udp_gso: true, ..base }),
        (
            "+ UDP GRO on receive",
            Tuning { batch: 16, multi_queue: true, offload: true, udp_gso: true, udp_gro: true, coalesce: false },
        ),
        ("+ TCP coalescing into the TUN (all on)", Tuning::default()),
    ];
    println!("\nstages of our data path (iperf3 pod to pod, median of {rounds}; CPU = our threads, s/Gbit):");
    let mut prev: Option<f64> = None;
    for (name, tuning) in list {
        let dps = [start_ours(c, 0, tuning), start_ours(c, 1, tuning)];
        wait_until(Duration::from_secs(5), "ping through our data path", || {
            pods[0].run("ping", &["-c", "1", "-W", "1", "10.244.2.2"]).map(|o| o.status.success()).unwrap_or(false)
        });
        let mut line = format!("  {name:<52}");
        for streams in [1, 4] {
            let f = median(
                (0..rounds)
                    .map(|_| {
                        let (gbps, relay_cpu, machine_cpu) =
                            iperf(&pods[0], &pods[1], "10.244.2.2", streams, seconds, &Relay::Ours(&dps));
                        Figure { gbps, relay_cpu, machine_cpu }
                    })
                    .collect(),
            );
            line += &format!("  {streams}x: {:6.2} Gbit/s ({:.3} CPU-s/Gbit)", f.gbps, f.relay_cpu);
            if streams == 1 {
                if let Some(p) = prev {
                    line += &format!(" {:>5.1}x prev", f.gbps / p);
                }
                prev = Some(f.gbps);
            }
        }
        println!("{line}");
        drop(dps);
    }
}

fn main() {
    let args = Args::parse();
    if !netns_fixtures::require_root() {
        std::process::exit(1);
    }
    let c = Cluster::new(2).unwrap();
    let ours_pods = [add_pod(&c, 0, 244, "vu0", UDP_MTU), add_pod(&c, 1, 244, "vu0", UDP_MTU)];
    if args.ours_only {
        let dps = [start_ours(&c, 0, Tuning::default()), start_ours(&c, 1, Tuning::default())];
        for streams in [1, 4] {
            let runs: Vec<f64> = (0..args.rounds)
                .map(|_| iperf(&ours_pods[0], &ours_pods[1], "10.244.2.2", streams, args.seconds, &Relay::Ours(&dps)).0)
                .collect();
            println!("ours, {streams} stream(s): {runs:.2?} Gbit/s");
        }
        return;
    }
    if args.stages || args.stages_only {
        stages(&c, &ours_pods, args.seconds, args.rounds);
        if args.stages_only {
            return;
        }
    }
    let dps = vec![start_ours(&c, 0, Tuning::default()), start_ours(&c, 1, Tuning::default())];
    println!("\nour data path uses: {:?}", dps[0].features());
    let vx_pods = [add_pod(&c, 0, 245, "vx0", VXLAN_MTU), add_pod(&c, 1, 245, "vx0", VXLAN_MTU)];
    vxlan(&c);
    let so_pods = [add_pod(&c, 0, 246, "vs0", UDP_MTU), add_pod(&c, 1, 246, "vs0", UDP_MTU)];
    let kids = socat(&c);
    let modes: [(&str, &[Netns; 2], &str, Relay); 3] = [
        ("flanneld-rs udp", &ours_pods, "10.244.2.2", Relay::Ours(&dps)),
        ("kernel VXLAN", &vx_pods, "10.245.2.2", Relay::Kernel),
        ("socat relay", &so_pods, "10.246.2.2", Relay::Procs(&kids)),
    ];
    for (name, pods, addr, _) in &modes {
        let t0 = Instant::now();
        wait_until(Duration::from_secs(10), &format!("{name}: first ping"), || {
            pods[0].run("ping", &["-c", "1", "-W", "1", addr]).map(|o| o.status.success()).unwrap_or(false)
        });
        let _ = t0;
    }
    println!(
        "\niperf3 pod to pod across two nodes, {} s per run, median of {} (rounds rotate the order):",
        args.seconds, args.rounds
    );
    for streams in [1u32, 4] {
        let mut runs: Vec<Vec<Figure>> = vec![Vec::new(); modes.len()];
        for round in 0..args.rounds {
            for k in 0..modes.len() {
                let m = (k + round) % modes.len();
                let (_, pods, addr, relay) = &modes[m];
                let (gbps, relay_cpu, machine_cpu) = iperf(&pods[0], &pods[1], addr, streams, args.seconds, relay);
                runs[m].push(Figure { gbps, relay_cpu, machine_cpu });
            }
        }
        let f: Vec<Figure> = runs.into_iter().map(median).collect();
        for (m, (name, ..)) in modes.iter().enumerate() {
            let relay = if m == 1 { "    -    ".to_string() } else { format!("{:.3}", f[m].relay_cpu) };
            println!(
                "  {streams} stream(s)  {name:<16} {:6.2} Gbit/s  CPU-s/Gbit: relay {relay:>9}, machine {:.3}",
                f[m].gbps, f[m].machine_cpu
            );
        }
        println!(
            "  {streams} stream(s)  ours/VXLAN {:.1}%  ours/socat {:.1}x  (targets: >= 50%, >= 10x)",
            f[0].gbps / f[1].gbps * 100.0,
            f[0].gbps / f[2].gbps
        );
    }
    println!("\nping pod to pod (200 x 5 ms):");
    let mut lat = Vec::new();
    for (name, pods, addr, _) in &modes {
        let (p50, p99) = ping(&pods[0], addr);
        println!("  {name:<16} p50 {p50:.3} ms  p99 {p99:.3} ms");
        lat.push(p50);
    }
    println!("  p50 ours/VXLAN {:.2}x, ours/socat {:.2}x", lat[0] / lat[1], lat[0] / lat[2]);
    let s = dps[0].stats();
    println!("\nnode 0 counters: {s:?}");
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
}
