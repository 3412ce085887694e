//! `udp-bench`: the udp backend as the daemon runs it, beside our VXLAN and a
//! per-packet user-space relay, in the same run:
//!
//! - ours: two `flanneld-rs` daemons with `{"Backend":{"Type":"udp"}}`
//!   (`flannel0`, port 8285) in an [`Overlay`] (real etcd, pods plugged in by
//!   the real CNI plugin);
//! - our VXLAN: two `flanneld-rs` daemons with the vxlan backend in a second
//!   [`Overlay`], pods plugged in the same way;
//! - a per-packet relay, socat between a TUN and a UDP socket on each node
//!   (10.246.0.0/16, `socat0`, port 8286): what flannel's udp mode is like.
//!
//! Two more reference lines come from the socat fixture's nodes: the udp data
//! path started by hand (`UdpDataPath`, 10.244.0.0/16, pods on plain veths),
//! which shows what the daemon adds or loses, and kernel VXLAN programmed by
//! hand (10.245.0.0/16). A last line is the floor of any user-space relay
//! built from these system calls on this machine: the bare relay of
//! [`e2e_tests::bare_relay`] (10.247.0.0/16, `bare0`, port 8287), which reads,
//! sends, receives and writes the same bytes with one thread per CPU as the
//! backend does, but does no work per packet (not wire-compatible: a
//! measuring device); the figures say how much CPU per gigabit is ours above
//! it. The same relay with every segment's TCP checksum computed (10.248/16,
//! `bare1`, port 8288; [`Work::Checksums`]) is the floor of a relay of
//! flannel's wire format: the one pass over every byte such a relay cannot
//! leave out.
//!
//! Rounds rotate through the modes. Figures: iperf3 pod to pod with 1 and 4
//! streams (median of the rounds), CPU seconds per gigabit (the relay's own
//! processes or threads, the daemons' whole processes for ours, and the
//! whole machine from /proc/stat), ping p50/p99. Then node1's udp daemon is
//! restarted a few times under a steady probe stream (a numbered datagram
//! every millisecond each way between the pods): time from the start of the
//! new daemon to the first datagram through, and the gap in reception.
//! `--stages` also measures the data path with its speed-ups turned on one
//! at a time (started by hand with [`Tuning`]). `--gso-caps` measures the
//! udp daemons alone with and without a cap on the size of the TCP
//! super-packets (see [`gso_caps`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::bare_relay::{BareRelay, Work};
use e2e_tests::overlay::{Overlay, Proc};
use e2e_tests::perf::{daemon_pids, iperf_figure, median_figure, ping, veth_pod, Figure, Relay};
use e2e_tests::{http_get, metric};
use flannel_net::netns::NetNs;
use flanneld_rs::udp::{packet, steer, Tuning, UdpConfig, UdpDataPath};
use netns_fixtures::{wait_until, Cluster, Netns};

#[derive(Parser)]
#[command(about = "the udp backend through flanneld-rs against our VXLAN and a socat relay")]
struct Args {
    /// iperf3 seconds per run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Rounds per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Daemon restarts to measure.
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// Also measure the data path stage by stage (speed-ups added one at a time).
    #[arg(long)]
    stages: bool,
    /// Only the stages.
    #[arg(long)]
    stages_only: bool,
    /// Only the udp daemons, iperf3 and restarts (quick iteration).
    #[arg(long)]
    ours_only: bool,
    /// Only the udp daemons and our VXLAN daemons, round by round (many
    /// rounds quickly: how often the ratio falls, and on whose side).
    #[arg(long)]
    pair: bool,
    /// Only the udp daemons, interleaving no GSO cap, flannel0's capped and
    /// the pods' eth0 capped (so that a super-packet fits one UDP GSO train).
    #[arg(long)]
    gso_caps: bool,
}

const UDP_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const METRICS_PORT: u16 = 9105;
const UDP_MTU: u32 = 1500 - 28;
const VXLAN_MTU: u32 = 1500 - 50;
/// The probe stream's port in the pods.
const PROBE_PORT: u16 = 9300;

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// The udp data path started by hand on node `i` of a hand-built fixture.
fn start_by_hand(c: &Cluster, i: usize, tuning: Tuning) -> UdpDataPath {
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

/// socat relaying between a TUN and a UDP socket on each node, one packet
/// per read and per write (`socat TUN:... UDP-DATAGRAM:peer:port,bind=...`);
/// killed on drop.
fn socat(c: &Cluster) -> Vec<Proc> {
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
        // Held (and killed on drop) before the wait can panic.
        kids.push(Proc(Some(child)));
        wait_until(Duration::from_secs(5), "socat0", || ns.ip(&["link", "show", "socat0"]).is_ok());
        ns.run_ok("ip", &["link", "set", "socat0", "mtu", &UDP_MTU.to_string()]);
    }
    kids
}

/// Two daemons with the udp backend, their metrics on 127.0.0.1:9105 in
/// their nodes, started and knowing each other; a pod on each node.
fn udp_overlay() -> (Overlay, [(Netns, Ipv4Addr); 2]) {
    let mut o = Overlay::with_conf(2, UDP_CONF);
    for i in 0..2 {
        o.set_flags(i, &["--healthz-ip", "127.0.0.1", "--healthz-port", &METRICS_PORT.to_string()]);
    }
    o.start_all();
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i}'s udp peer table"), || {
            metric(&metrics(&o, i), "flannel_peers") == Some(1.0)
        });
    }
    let pods = [o.add_pod(0, "ua"), o.add_pod(1, "ub")];
    (o, pods)
}

/// Two daemons with the vxlan backend, converged; a pod on each node.
fn vxlan_overlay() -> (Overlay, [(Netns, Ipv4Addr); 2]) {
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let pods = [o.add_pod(0, "xa"), o.add_pod(1, "xb")];
    (o, pods)
}

/// Node `i`'s `/metrics` text.
fn metrics(o: &Overlay, i: usize) -> String {
    http_get(&o.cluster.node(i).ns, SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)), "/metrics")
}

fn stages(c: &Cluster, pods: &[Netns], seconds: u32, rounds: usize) {
    let base = Tuning::per_packet();
    let list = [
        ("per packet (1 queue, read/sendto/recvfrom/write)", base),
        ("+ batching (recvmmsg/sendmmsg, 16)", Tuning { batch: 16, ..base }),
        ("+ multi-queue TUN, a worker per CPU", Tuning { batch: 16, multi_queue: true, ..base }),
        ("+ TUN TSO, segments cut in user space", Tuning { batch: 16, multi_queue: true, offload: true, ..base }),
        ("+ UDP GSO on send", Tuning { batch: 16, multi_queue: true, offload: true, udp_gso: true, ..base }),
        ("+ UDP GRO on receive", Tuning { coalesce: false, steer: false, balance: false, ..Tuning::default() }),
        ("+ TCP coalescing into the TUN", Tuning { steer: false, balance: false, ..Tuning::default() }),
        ("+ flows spread over the workers by hash", Tuning { balance: false, ..Tuning::default() }),
        ("+ flows balanced by load (all on)", Tuning::default()),
    ];
    println!("\nstages of the data path, started by hand (iperf3 pod to pod, median of {rounds}; CPU = its threads, s/Gbit):");
    let mut prev: Option<f64> = None;
    for (name, tuning) in list {
        let dps = [start_by_hand(c, 0, tuning), start_by_hand(c, 1, tuning)];
        wait_until(Duration::from_secs(5), "ping through the data path", || {
            pods[0].run("ping", &["-c", "1", "-W", "1", "10.244.2.2"]).map(|o| o.status.success()).unwrap_or(false)
        });
        let tids = || dps.iter().flat_map(UdpDataPath::thread_ids).collect();
        let mut line = format!("  {name:<52}");
        for streams in [1, 4] {
            let to = Ipv4Addr::new(10, 244, 2, 2);
            let f = median_figure(
                (0..rounds)
                    .map(|_| iperf_figure(&pods[0], &pods[1], to, streams, seconds, &Relay::Threads(&tids), &[]))
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
    unlucky(c, pods, seconds, rounds);
}

/// The first client port of four consecutive ones whose streams from pod
/// 0 to pod 1's iperf3 the hash alone puts on worker 0 of `workers`, in
/// four buckets.
fn unlucky_port(workers: u32) -> u16 {
    let table = steer::Table::spread(workers);
    let server = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 5201);
    let bucket = |port: u16| {
        let p = packet::build_udp(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), port), server, b"");
        steer::bucket(steer::flow_key(&p).expect("an IPv4 packet"))
    };
    (20_000..60_000)
        .find(|&first| {
            let b: Vec<usize> = (first..first + 4).map(bucket).collect();
            b.iter().all(|&b| table.get(b) == 0) && (1..4).all(|i| !b[..i].contains(&b[i]))
        })
        .expect("four such ports")
}

/// The hash's bad luck, forced: four streams whose client ports (iperf3
/// `--cport` gives its streams consecutive ones) the hash puts on one
/// worker per node, with flows balanced by load and without.
fn unlucky(c: &Cluster, pods: &[Netns], seconds: u32, rounds: usize) {
    let list = [
        ("flows spread by hash only", Tuning { balance: false, ..Tuning::default() }),
        ("flows balanced by load (all on)", Tuning::default()),
    ];
    for (k, (name, tuning)) in list.into_iter().enumerate() {
        let dps = [start_by_hand(c, 0, tuning), start_by_hand(c, 1, tuning)];
        let cport = unlucky_port(dps[0].features().queues as u32);
        if k == 0 {
            println!(
                "\nfour streams the hash puts on one worker per node (client ports {cport}-{}), median of {rounds}:",
                cport + 3
            );
        }
        wait_until(Duration::from_secs(5), "ping through the data path", || {
            pods[0].run("ping", &["-c", "1", "-W", "1", "10.244.2.2"]).map(|o| o.status.success()).unwrap_or(false)
        });
        let tids = || dps.iter().flat_map(UdpDataPath::thread_ids).collect();
        let to = Ipv4Addr::new(10, 244, 2, 2);
        let port = cport.to_string();
        let runs: Vec<Figure> = (0..rounds)
            .map(|_| iperf_figure(&pods[0], &pods[1], to, 4, seconds, &Relay::Threads(&tids), &["--cport", &port]))
            .collect();
        let each: Vec<String> = runs.iter().map(|f| format!("{:.2}", f.gbps)).collect();
        let f = median_figure(runs);
        let moves: u64 = dps.iter().map(|d| d.stats().flow_moves).sum();
        println!(
            "  {name:<40} 4x: {:6.2} Gbit/s ({:.3} CPU-s/Gbit); runs {}; flows moved {moves}",
            f.gbps,
            f.relay_cpu,
            each.join(" ")
        );
        drop(dps);
    }
}

/// One mode of the comparison.
struct Mode<'a> {
    name: &'static str,
    client: &'a Netns,
    server: &'a Netns,
    addr: String,
    relay: Relay<'a>,
}

fn compare(modes: &[Mode], seconds: u32, rounds: usize) {
    println!(
        "\niperf3 pod to pod across two nodes, {seconds} s per run, median of {rounds} (rounds rotate the order):"
    );
    let n = modes.len();
    for streams in [1u32, 4] {
        let mut runs: Vec<Vec<Figure>> = vec![Vec::new(); n];
        for round in 0..rounds {
            for k in 0..n {
                let m = (k + round) % n;
                let md = &modes[m];
                let addr: Ipv4Addr = md.addr.parse().expect("an IPv4 address");
                runs[m].push(iperf_figure(md.client, md.server, addr, streams, seconds, &md.relay, &[]));
            }
        }
        // The issue's target holds "in every round": each round's ratio,
        // from runs of the same round (the order rotates, so neighbours).
        let per_round: Vec<f64> =
            if n >= 2 { (0..rounds).map(|r| runs[0][r].gbps / runs[1][r].gbps * 100.0).collect() } else { Vec::new() };
        let gbps_per_round: Vec<String> = if n >= 2 {
            (0..rounds).map(|r| format!("{:.2}/{:.2}", runs[0][r].gbps, runs[1][r].gbps)).collect()
        } else {
            Vec::new()
        };
        let f: Vec<Figure> = runs.into_iter().map(median_figure).collect();
        for (m, md) in modes.iter().enumerate() {
            let relay = match md.relay {
                Relay::Kernel => "    -    ".to_string(),
                _ => format!("{:.3}", f[m].relay_cpu),
            };
            println!(
                "  {streams} stream(s)  {:<26} {:6.2} Gbit/s  CPU-s/Gbit: relay {relay:>9}, machine {:.3}",
                md.name, f[m].gbps, f[m].machine_cpu
            );
        }
        if n >= 3 {
            println!(
                "  {streams} stream(s)  ours/our VXLAN {:.1}%  ours/socat {:.1}x  (targets: >= 50%, >= 10x)",
                f[0].gbps / f[1].gbps * 100.0,
                f[0].gbps / f[2].gbps
            );
        }
        if !per_round.is_empty() {
            let each: Vec<String> = per_round.iter().map(|r| format!("{r:.1}%")).collect();
            let low = per_round.iter().copied().fold(f64::INFINITY, f64::min);
            println!("  {streams} stream(s)  ours/our VXLAN round by round: {} (lowest {low:.1}%)", each.join(" "));
            println!("  {streams} stream(s)  Gbit/s ours/our VXLAN round by round: {}", gbps_per_round.join(" "));
        }
        if n >= 4 {
            println!("  {streams} stream(s)  ours/udp data path by hand {:.1}%", f[0].gbps / f[3].gbps * 100.0);
        }
        // The floors (see e2e_tests::bare_relay): the bare relay, of any
        // user-space relay with these system calls on this machine; with
        // the checksum pass, of a relay of flannel's wire format.
        for (m, floor) in [(5, "floor (bare relay)"), (6, "wire-compatible floor (bare + checksums)")] {
            if n > m {
                println!(
                    "  {streams} stream(s)  {floor}/our VXLAN {:.1}%; CPU-s/Gbit ours - it: relay {:+.3}, machine {:+.3}",
                    f[m].gbps / f[1].gbps * 100.0,
                    f[0].relay_cpu - f[m].relay_cpu,
                    f[0].machine_cpu - f[m].machine_cpu
                );
            }
        }
    }
    println!("\nping pod to pod (200 x 5 ms):");
    let mut lat = Vec::new();
    for md in modes {
        let (p50, p99) = ping(md.client, &md.addr);
        println!("  {:<26} p50 {p50:.3} ms  p99 {p99:.3} ms", md.name);
        lat.push(p50);
    }
    if n >= 3 {
        println!("  p50 ours/our VXLAN {:.2}x, ours/socat {:.2}x", lat[0] / lat[1], lat[0] / lat[2]);
    }
}

/// A numbered datagram every millisecond from one pod to another; every
/// arrival goes to a channel with its time.
struct Probe {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<()>,
    receiver: JoinHandle<()>,
    arrivals: Receiver<(u32, Instant)>,
}

impl Probe {
    fn start(from: &Netns, to: &Netns, target: SocketAddr) -> Probe {
        let rx = NetNs::open(to.path()).unwrap().run(move || UdpSocket::bind(target)).unwrap().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let tx = NetNs::open(from.path()).unwrap().run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut seq: u32 = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Errors (an ICMP error reported on the socket) only mean
                    // this datagram is lost, which is what is measured.
                    let _ = tx.send_to(&seq.to_be_bytes(), target);
                    seq += 1;
                    next += Duration::from_millis(1);
                    // The stream's pace, not a wait for a condition.
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
        };
        let (arrived, arrivals) = channel();
        let receiver = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(4) = rx.recv(&mut buf) {
                        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                        if arrived.send((seq, Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            })
        };
        Probe { stop, sender, receiver, arrivals }
    }

    /// Waits for `n` arrivals in a row, none more than `timeout` apart;
    /// returns the last (`None` when the stream stalled).
    fn flowing(&self, n: usize, timeout: Duration) -> Option<(u32, Instant)> {
        let mut last = None;
        for _ in 0..n {
            last = Some(self.arrivals.recv_timeout(timeout).ok()?);
        }
        last
    }

    /// The last arrival so far (`None` when nothing is queued).
    fn drain(&self) -> Option<(u32, Instant)> {
        self.arrivals.try_iter().last()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.join().unwrap();
        self.receiver.join().unwrap();
    }
}

/// One direction of one restart.
#[derive(Clone, Copy)]
struct Resume {
    /// From the start of the new daemon to the first datagram through.
    after_start: Duration,
    /// From the last datagram before to the first after.
    gap: Duration,
    /// Datagrams sent in between that never arrived.
    lost: u32,
}

/// The probe's arrivals around a restart that began (o.start) at `t0`; the
/// last arrival before it was `before`. `None` when nothing came through
/// within 10 s.
fn resumed(p: &Probe, before: Option<(u32, Instant)>, t0: Instant) -> Option<Resume> {
    let mut last = before;
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let (seq, at) = p.arrivals.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()?;
        if at < t0 {
            last = Some((seq, at));
            continue;
        }
        let (last_seq, last_at) = last.unwrap_or((seq, at));
        return Some(Resume {
            after_start: at - t0,
            gap: at - last_at,
            lost: seq.saturating_sub(last_seq).saturating_sub(1),
        });
    }
}

fn restarts(o: &mut Overlay, pods: &[(Netns, Ipv4Addr); 2], n: usize) {
    if n == 0 {
        return;
    }
    println!(
        "\ndaemon restart, {n} times: node1's flanneld-rs stopped (SIGTERM) and started again under a \
         probe stream (a datagram every 1 ms each way between the pods):"
    );
    let names = ["node0 pod -> node1 pod", "node1 pod -> node0 pod"];
    let probes = [
        Probe::start(&pods[0].0, &pods[1].0, SocketAddr::new(pods[1].1.into(), PROBE_PORT)),
        Probe::start(&pods[1].0, &pods[0].0, SocketAddr::new(pods[0].1.into(), PROBE_PORT)),
    ];
    let mut ready = Vec::new();
    let mut got: [Vec<Resume>; 2] = [Vec::new(), Vec::new()];
    let mut failed = 0;
    for _ in 0..n {
        let flowing: Vec<_> = probes.iter().map(|p| p.flowing(200, Duration::from_secs(2))).collect();
        if flowing.iter().any(Option::is_none) {
            println!("  the probe stream is not flowing before the restart; giving up");
            failed += 1;
            break;
        }
        o.stop(1);
        let before: Vec<_> = probes.iter().zip(flowing).map(|(p, f)| p.drain().or(f)).collect();
        let t0 = Instant::now();
        o.start(1);
        ready.push(t0.elapsed());
        for d in 0..2 {
            match resumed(&probes[d], before[d], t0) {
                Some(r) => got[d].push(r),
                None => {
                    println!("  {}: nothing came through within 10 s of the start", names[d]);
                    failed += 1;
                }
            }
        }
    }
    for p in probes {
        p.stop();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let med_max = |mut v: Vec<f64>| -> (f64, f64) {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v.get(v.len() / 2).copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN))
    };
    let (r50, rmax) = med_max(ready.iter().map(|d| ms(*d)).collect());
    println!("  start to \"ready\" log line:          median {r50:7.1} ms  max {rmax:7.1} ms");
    let mut worst = 0.0f64;
    for d in 0..2 {
        let (a50, amax) = med_max(got[d].iter().map(|r| ms(r.after_start)).collect());
        let (g50, gmax) = med_max(got[d].iter().map(|r| ms(r.gap)).collect());
        let (l50, lmax) = med_max(got[d].iter().map(|r| f64::from(r.lost)).collect());
        println!(
            "  {}: first datagram after the start median {a50:7.1} ms  max {amax:7.1} ms; \
             gap in reception median {g50:7.1} ms  max {gmax:7.1} ms; lost median {l50:.0}  max {lmax:.0}",
            names[d]
        );
        worst = worst.max(amax);
    }
    let verdict = if failed == 0 && worst < 1000.0 { "met" } else { "NOT met" };
    println!("  target: traffic resumes within 1 s of the start: {verdict} (worst {worst:.1} ms, {failed} failure(s))");
}

/// The udp counters of node `i`'s daemon that are not zero.
fn udp_counters(o: &Overlay, i: usize) -> String {
    let text = metrics(o, i);
    let v: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("flannel_udp_") && !l.ends_with(" 0"))
        .map(|l| l.trim_start_matches("flannel_udp_").to_string())
        .collect();
    v.join(", ")
}

/// What the daemon's data path uses, from its log.
fn daemon_features(o: &Overlay, i: usize) -> String {
    let log = o.log(i);
    let line = log.lines().rev().find(|l| l.contains("udp backend on flannel0:")).unwrap_or("(not in the log)");
    line.split("flannel0: ").nth(1).unwrap_or(line).to_string()
}

fn main() {
    let args = Args::parse();
    if !netns_fixtures::require_root() {
        std::process::exit(1);
    }
    if args.stages || args.stages_only {
        let c = Cluster::new(2).unwrap();
        let pods = [veth_pod(&c, 0, 244, "vu0", UDP_MTU), veth_pod(&c, 1, 244, "vu0", UDP_MTU)];
        stages(&c, &pods, args.seconds, args.rounds);
        if args.stages_only {
            return;
        }
    }

    let (mut udp, upods) = udp_overlay();
    println!("\nthe udp daemons' data path uses: {}", daemon_features(&udp, 0));
    if args.gso_caps {
        gso_caps(&udp, &upods, args.seconds, args.rounds);
        return;
    }
    if args.ours_only {
        let modes = [Mode {
            name: "ours (udp daemon)",
            client: &upods[0].0,
            server: &upods[1].0,
            addr: upods[1].1.to_string(),
            relay: Relay::Procs(daemon_pids(&udp)),
        }];
        compare(&modes, args.seconds, args.rounds);
        restarts(&mut udp, &upods, args.restarts);
        return;
    }
    let (vx, xpods) = vxlan_overlay();
    // The two modes the target compares, first in every comparison.
    let ours = || Mode {
        name: "ours (udp daemon)",
        client: &upods[0].0,
        server: &upods[1].0,
        addr: upods[1].1.to_string(),
        relay: Relay::Procs(daemon_pids(&udp)),
    };
    let vxlan = || Mode {
        name: "our VXLAN (vxlan daemon)",
        client: &xpods[0].0,
        server: &xpods[1].0,
        addr: xpods[1].1.to_string(),
        relay: Relay::Kernel,
    };
    if args.pair {
        let modes = [ours(), vxlan()];
        compare(&modes, args.seconds, args.rounds);
        println!("\nudp daemons' counters (non-zero): node0: {}", udp_counters(&udp, 0));
        drop(vx);
        return;
    }
    // The references by hand and socat share one plain two-node fixture.
    let c = Cluster::new(2).unwrap();
    let hpods = [veth_pod(&c, 0, 244, "vu0", UDP_MTU), veth_pod(&c, 1, 244, "vu0", UDP_MTU)];
    let dps = [start_by_hand(&c, 0, Tuning::default()), start_by_hand(&c, 1, Tuning::default())];
    let by_hand_tids = || dps.iter().flat_map(UdpDataPath::thread_ids).collect();
    let kpods = [veth_pod(&c, 0, 245, "vx0", VXLAN_MTU), veth_pod(&c, 1, 245, "vx0", VXLAN_MTU)];
    e2e_tests::perf::vxlan_by_hand(&c, 245);
    let spods = [veth_pod(&c, 0, 246, "vs0", UDP_MTU), veth_pod(&c, 1, 246, "vs0", UDP_MTU)];
    let kids = socat(&c);
    let bpods = [veth_pod(&c, 0, 247, "vb0", UDP_MTU), veth_pod(&c, 1, 247, "vb0", UDP_MTU)];
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let nodes = [&c.node(0).ns, &c.node(1).ns];
    let bare = BareRelay::start(nodes, [underlay(0), underlay(1)], "bare0", 247, UDP_MTU, 8287, cpus, Work::None);
    let bare_tids = || bare.thread_ids();
    let cpods = [veth_pod(&c, 0, 248, "vc0", UDP_MTU), veth_pod(&c, 1, 248, "vc0", UDP_MTU)];
    let summing =
        BareRelay::start(nodes, [underlay(0), underlay(1)], "bare1", 248, UDP_MTU, 8288, cpus, Work::Checksums);
    let summing_tids = || summing.thread_ids();
    let socat_pids = kids.iter().map(|k| k.0.as_ref().expect("socat running").id()).collect();
    {
        let modes = [
            ours(),
            vxlan(),
            Mode {
                name: "socat relay",
                client: &spods[0],
                server: &spods[1],
                addr: "10.246.2.2".into(),
                relay: Relay::Procs(socat_pids),
            },
            Mode {
                name: "udp data path, by hand",
                client: &hpods[0],
                server: &hpods[1],
                addr: "10.244.2.2".into(),
                relay: Relay::Threads(&by_hand_tids),
            },
            Mode {
                name: "kernel VXLAN, by hand",
                client: &kpods[0],
                server: &kpods[1],
                addr: "10.245.2.2".into(),
                relay: Relay::Kernel,
            },
            Mode {
                name: "floor: bare relay",
                client: &bpods[0],
                server: &bpods[1],
                addr: "10.247.2.2".into(),
                relay: Relay::Threads(&bare_tids),
            },
            Mode {
                name: "floor: bare + checksums",
                client: &cpods[0],
                server: &cpods[1],
                addr: "10.248.2.2".into(),
                relay: Relay::Threads(&summing_tids),
            },
        ];
        for md in &modes {
            wait_until(Duration::from_secs(10), &format!("{}: first ping", md.name), || {
                md.client.run("ping", &["-c", "1", "-W", "1", &md.addr]).map(|o| o.status.success()).unwrap_or(false)
            });
        }
        println!(
            "(CPU relay column: ours = both flanneld-rs processes, socat = both socat processes, \
             by hand and bare relay = their threads; VXLAN: the kernel, machine-wide only)"
        );
        compare(&modes, args.seconds, args.rounds);
    }
    println!("\nudp daemons' counters (non-zero): node0: {}", udp_counters(&udp, 0));
    println!("                                  node1: {}", udp_counters(&udp, 1));
    println!("udp data path by hand, node 0: {:?}", dps[0].stats());
    for (name, relay) in [("bare relay", &bare), ("bare relay + checksums", &summing)] {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "{name}: {} packet(s) dropped (should be 0), {} bucket(s) of flows moved between its threads",
            g(&relay.dropped),
            g(&relay.flow_moves)
        );
    }
    restarts(&mut udp, &upods, args.restarts);
    drop(kids);
    drop(vx);
}

/// Where `--gso-caps` puts a cap on the TCP super-packets.
#[derive(Clone, Copy, PartialEq)]
enum Cap {
    None,
    /// `gso_max_segs` of `flannel0` on both nodes.
    Flannel0,
    /// `gso_max_segs` of `eth0` in both pods, where the TCP stack sizes them.
    Pods,
}

/// Segments of one inner packet each (UDP_MTU bytes) that fit one UDP
/// message, whose payload is at most 65,507 bytes: 44.
const SEGS_PER_TRAIN: u32 = 65_507 / UDP_MTU;

fn set_cap(o: &Overlay, pods: &[(Netns, Ipv4Addr); 2], cap: Cap) {
    let (tun, pod) = match cap {
        Cap::None => (65_535, 65_535),
        Cap::Flannel0 => (SEGS_PER_TRAIN, 65_535),
        Cap::Pods => (65_535, SEGS_PER_TRAIN),
    };
    for (i, (pod_ns, _)) in pods.iter().enumerate() {
        o.cluster.node(i).ns.run_ok("ip", &["link", "set", "dev", "flannel0", "gso_max_segs", &tun.to_string()]);
        pod_ns.run_ok("ip", &["link", "set", "dev", "eth0", "gso_max_segs", &pod.to_string()]);
    }
}

/// Node `i`'s flannel0 counters and UDP messages sent so far.
#[derive(Clone, Copy)]
struct Counts {
    /// Packets the kernel handed the TUN (our reads) and their bytes.
    tun_reads: u64,
    tun_read_bytes: u64,
    /// Packets written to the TUN (our writes) and their bytes.
    tun_writes: u64,
    tun_write_bytes: u64,
    /// UDP messages sent (`Udp: OutDatagrams`: one per GSO train).
    udp_out: u64,
}

fn counts(o: &Overlay, i: usize) -> Counts {
    let ns = &o.cluster.node(i).ns;
    let dev = ns.run_ok("cat", &["/proc/net/dev"]);
    let line = dev.lines().find(|l| l.trim_start().starts_with("flannel0:")).expect("flannel0 in /proc/net/dev");
    let f: Vec<u64> =
        line.split(':').nth(1).unwrap().split_whitespace().map(|x| x.parse().expect("a counter")).collect();
    let snmp = ns.run_ok("cat", &["/proc/net/snmp"]);
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let names: Vec<&str> = udp[0].split_whitespace().collect();
    let vals: Vec<&str> = udp[1].split_whitespace().collect();
    let k = names.iter().position(|n| *n == "OutDatagrams").expect("Udp OutDatagrams");
    Counts {
        tun_reads: f[9],
        tun_read_bytes: f[8],
        tun_writes: f[1],
        tun_write_bytes: f[0],
        udp_out: vals[k].parse().expect("a counter"),
    }
}

/// A 64 KB TCP super-packet cut into MTU-sized packets is ~46 segments,
/// more than one UDP GSO train holds (44 of 1472 bytes), so the daemon sends
/// it as two messages. This measures, interleaved in one session, the udp
/// daemons with no cap, with `flannel0`'s `gso_max_segs` at 44 (the kernel
/// then cuts forwarded super-packets itself before the TUN, since a device
/// takes none with more segments than its cap), and with the pods' `eth0`
/// capped (the TCP stack then builds super-packets that fit one train).
/// Per run: node0's TUN reads (bytes per read, UDP messages per read) and
/// node1's TUN writes (bytes per write).
fn gso_caps(o: &Overlay, pods: &[(Netns, Ipv4Addr); 2], seconds: u32, rounds: usize) {
    let caps = [(Cap::None, "no cap"), (Cap::Flannel0, "flannel0 capped"), (Cap::Pods, "pods' eth0 capped")];
    let relay = Relay::Procs(daemon_pids(o));
    println!("\niperf3 pod to pod, {seconds} s per run, {rounds} rounds rotating the order; cap: gso_max_segs {SEGS_PER_TRAIN}");
    for streams in [1u32, 4] {
        let mut runs: Vec<Vec<Figure>> = vec![Vec::new(); caps.len()];
        for round in 0..rounds {
            for k in 0..caps.len() {
                let m = (k + round) % caps.len();
                set_cap(o, pods, caps[m].0);
                let (a0, b0) = (counts(o, 0), counts(o, 1));
                let f = iperf_figure(&pods[0].0, &pods[1].0, pods[1].1, streams, seconds, &relay, &[]);
                let (a1, b1) = (counts(o, 0), counts(o, 1));
                let reads = (a1.tun_reads - a0.tun_reads).max(1) as f64;
                let writes = (b1.tun_writes - b0.tun_writes).max(1) as f64;
                println!(
                    "  {streams} stream(s) {:<18} {:6.2} Gbit/s  CPU-s/Gbit relay {:.3} machine {:.3}  \
                     node0: {:.0} B/read, {:.2} UDP messages/read; node1: {:.0} B/write, {:.2} writes/read",
                    caps[m].1,
                    f.gbps,
                    f.relay_cpu,
                    f.machine_cpu,
                    (a1.tun_read_bytes - a0.tun_read_bytes) as f64 / reads,
                    (a1.udp_out - a0.udp_out) as f64 / reads,
                    (b1.tun_write_bytes - b0.tun_write_bytes) as f64 / writes,
                    writes / reads
                );
                runs[m].push(f);
            }
        }
        for (m, (_, name)) in caps.iter().enumerate() {
            let spread = |get: fn(&Figure) -> f64| {
                let mut v: Vec<f64> = runs[m].iter().map(get).collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (g, g0, g1) = spread(|f| f.gbps);
            let (r, r0, r1) = spread(|f| f.relay_cpu);
            let (c, c0, c1) = spread(|f| f.machine_cpu);
            println!(
                "{streams} stream(s) {name:<18} median {g:.2} Gbit/s ({g0:.2}-{g1:.2}); CPU-s/Gbit relay {r:.3} \
                 ({r0:.3}-{r1:.3}), machine {c:.3} ({c0:.3}-{c1:.3})"
            );
        }
    }
    set_cap(o, pods, Cap::None);
}
