//! `wireguard-bench`: the wireguard backend as the daemon runs it, beside
//! our unencrypted udp backend and Debian's `wireguard-go`, in the same run:
//!
//! - ours: two `flanneld-rs` daemons with `{"Backend":{"Type":"wireguard"}}`
//!   (user-space path, `flannel-wg`, port 51820) in an [`Overlay`] (real
//!   etcd, pods plugged in by the real CNI plugin);
//! - our udp backend: two `flanneld-rs` daemons with the udp backend in a
//!   second [`Overlay`]: the same data path shape without encryption;
//! - `wireguard-go`: one per node of a plain two-node fixture, configured
//!   with `wg` (10.247.0.0/16, `wg0`, port 51830, MTU 1420 as ours), pods on
//!   plain veths. Each instance runs in its own mount namespace with a
//!   private tmpfs on `/run/wireguard` (its control sockets would otherwise
//!   be shared across network namespaces).
//!
//! Rounds rotate through the modes. Figures: iperf3 pod to pod with 1 and 4
//! streams (median of the rounds), CPU seconds per gigabit (the relays' own
//! processes, and the whole machine from /proc/stat), ping p50/p99, and the
//! ratios against the targets (ours >= 2x wireguard-go, >= 60 % of udp).
//! `--stages` also measures the wireguard data path started by hand with
//! its speed-ups turned on one at a time.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use e2e_tests::overlay::{Overlay, Proc};
use e2e_tests::perf::{daemon_pids, iperf_figure, median_figure, ping, veth_pod, Figure, Relay};
use e2e_tests::{http_get, metric};
use flanneld_rs::backend::wireguard::datapath::{Counters as WgCounters, Tuning as WgTuning, WgConfig, WgDataPath};
use flanneld_rs::backend::wireguard::keys::public_of;
use flanneld_rs::backend::{TunnelPeer, WireguardPeer};
use netns_fixtures::{wait_until, Cluster, Netns};

#[derive(Parser)]
#[command(about = "the wireguard backend through flanneld-rs against our udp backend and wireguard-go")]
struct Args {
    /// iperf3 seconds per run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Rounds per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure the data path stage by stage (speed-ups added one at a time).
    #[arg(long)]
    stages: bool,
    /// Only the stages.
    #[arg(long)]
    stages_only: bool,
    /// Only the wireguard daemons (quick iteration).
    #[arg(long)]
    ours_only: bool,
    /// Only our wireguard daemons on a dual-stack pair of nodes, pod to pod
    /// over IPv4 (flannel-wg) and over IPv6 (flannel-wg-v6).
    #[arg(long)]
    ipv6: bool,
}

const WG_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
const UDP_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const WG_DUAL_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"wireguard"}}"#;
const METRICS_PORT: u16 = 9105;
/// The cryptography's own cost, the floor under any WireGuard data path on
/// this machine: ChaCha20-Poly1305 from `ring` (what boringtun seals and
/// opens with) on one core, sealing then opening 1420-byte payloads (a full
/// segment at our MTU) in place for a second each. Every Gbit/s through a
/// tunnel costs one seal on the sender and one open on the receiver.
fn aead_floor() {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("a 32-byte key"));
    let nonce = |n: u64| {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_le_bytes());
        Nonce::assume_unique_for_key(b)
    };
    const LEN: usize = 1420;
    let run = |open: bool| -> f64 {
        let mut buf = vec![0x5au8; LEN];
        let tag = key.seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut buf).expect("seal");
        let sealed: Vec<u8> = buf.iter().copied().chain(tag.as_ref().iter().copied()).collect();
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            for _ in 0..256 {
                if open {
                    let mut b = sealed.clone();
                    key.open_in_place(nonce(0), Aad::empty(), &mut b).expect("open");
                } else {
                    let _ = key.seal_in_place_separate_tag(nonce(n + 1), Aad::empty(), &mut buf).expect("seal");
                }
                n += 1;
            }
        }
        (n as f64 * LEN as f64 * 8.0) / start.elapsed().as_secs_f64() / 1e9
    };
    let (seal, open) = (run(false), run(true));
    println!(
        "AEAD floor (ring ChaCha20-Poly1305, one core, {LEN}-byte payloads): seal {seal:.2} Gbit/s, open {open:.2} \
         Gbit/s (open includes a {LEN}-byte copy per packet); a tunnel's seal and open cost {:.3} CPU-seconds per \
         Gbit, before any packet moves",
        1.0 / seal + 1.0 / open
    );
}

/// flannel's accounting: the underlay's 1500 less 80.
const WG_MTU: u32 = 1500 - 80;
const WG_GO_PORT: u16 = 51830;
const BY_HAND_PORT: u16 = 51840;

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// A WireGuard key pair from `wg genkey | wg pubkey`: (private, public) in
/// base64.
fn wg_keypair(ns: &Netns) -> (String, String) {
    let private = ns.run_ok("wg", &["genkey"]).trim().to_string();
    let out = ns
        .command("sh")
        .args(["-c", "printf '%s\\n' \"$1\" | wg pubkey", "sh", &private])
        .output()
        .expect("wg (apt-get install wireguard-tools)");
    assert!(out.status.success(), "wg pubkey: {}", String::from_utf8_lossy(&out.stderr));
    (private, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A shell holding a `wireguard-go`: SIGTERM (its trap stops wireguard-go
/// and waits for it), then reaped, on drop, so a benchmark that panics
/// (in a build that unwinds) leaves no wireguard-go behind. A SIGKILL, what
/// [`Proc`]'s own drop sends, would orphan it.
struct WgGoShell(Proc);

impl Drop for WgGoShell {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// `wireguard-go` on both nodes of `c`, configured with `wg` (overlay
/// 10.247.0.0/16, node `i` holding 10.247.(i+1).0/24 on `wg0`). Returns the
/// shells that hold them (stopped on drop) and wireguard-go's pids.
fn wireguard_go(c: &Cluster, dir: &std::path::Path) -> (Vec<WgGoShell>, Vec<u32>) {
    let keys = [wg_keypair(&c.node(0).ns), wg_keypair(&c.node(1).ns)];
    let mut kids = Vec::new();
    let mut pids = Vec::new();
    for i in 0..2usize {
        let peer = 1 - i;
        let key_file = dir.join(format!("wg-go-{i}.key"));
        std::fs::write(&key_file, format!("{}\n", keys[i].0)).unwrap();
        // The shell runs in its own mount namespace (unshare -m, private
        // propagation), so the tmpfs on /run/wireguard, where wireguard-go
        // puts its control socket, is this instance's alone.
        let script = format!(
            r#"set -e
mkdir -p /run/wireguard
mount -t tmpfs wg-bench /run/wireguard
WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f wg0 >/dev/null 2>&1 &
pid=$!
# wireguard-go goes with this shell however it ends (SIGTERM, a failed step).
trap 'kill $pid 2>/dev/null; wait $pid || true' EXIT
trap 'exit 0' TERM INT
echo $pid
n=0
while [ ! -S /run/wireguard/wg0.sock ]; do n=$((n+1)); [ $n -lt 200 ] || {{ echo 'no control socket'; exit 1; }}; sleep 0.05; done
wg set wg0 listen-port {port} private-key {key} peer {pub} allowed-ips 10.247.{pnet}.0/24 endpoint {pip}:{port}
ip link set wg0 mtu {mtu} up
ip addr add 10.247.{net}.0/32 dev wg0
ip route add 10.247.0.0/16 dev wg0
echo ready
wait $pid
"#,
            port = WG_GO_PORT,
            key = key_file.display(),
            pub = keys[peer].1,
            pnet = peer + 1,
            pip = underlay(peer),
            mtu = WG_MTU,
            net = i + 1,
        );
        let mut child = c
            .node(i)
            .ns
            .command("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare (util-linux)");
        let stdout = child.stdout.take().unwrap();
        // Held (and stopped on drop) before anything here can panic.
        kids.push(WgGoShell(Proc(Some(child))));
        let mut lines = BufReader::new(stdout).lines();
        let pid: u32 =
            lines.next().and_then(Result::ok).and_then(|l| l.trim().parse().ok()).expect("wireguard-go's pid");
        let ready = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(ready.trim(), "ready", "wireguard-go on node {i} did not come up");
        pids.push(pid);
    }
    (kids, pids)
}

/// Two flanneld-rs daemons with `conf` ([`start_daemons`]); a pod on each
/// node.
fn daemons(conf: &str, pod_prefix: &str) -> (Overlay, [(Netns, Ipv4Addr); 2]) {
    let o = start_daemons(Overlay::with_conf(2, conf), false);
    let pods = [o.add_pod(0, &format!("{pod_prefix}a")), o.add_pod(1, &format!("{pod_prefix}b"))];
    (o, pods)
}

/// Starts the two daemons of `o`, their metrics on 127.0.0.1:9105 in their
/// nodes, each with its own WireGuard key file, and waits until each knows
/// the other (in the IPv6 peer table too when `ipv6`).
fn start_daemons(mut o: Overlay, ipv6: bool) -> Overlay {
    for i in 0..2 {
        o.set_flags(i, &["--healthz-ip", "127.0.0.1", "--healthz-port", &METRICS_PORT.to_string()]);
        let key = o.dir.path().join(format!("node{i}/wgkey"));
        o.set_env(i, &[("WIREGUARD_KEY_FILE", key.to_str().unwrap())]);
    }
    o.start_all();
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i}'s peer tables"), || {
            let m = metrics(&o, i);
            metric(&m, "flannel_peers") == Some(1.0) && (!ipv6 || metric(&m, "flannel_peers_ipv6") == Some(1.0))
        });
    }
    o
}

/// Node `i`'s `/metrics` text.
fn metrics(o: &Overlay, i: usize) -> String {
    http_get(&o.cluster.node(i).ns, SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)), "/metrics")
}

/// One mode of the comparison.
struct Mode<'a> {
    name: &'static str,
    client: &'a Netns,
    server: &'a Netns,
    addr: IpAddr,
    relay: Relay<'a>,
}

fn wait_ping(md: &Mode) {
    wait_until(Duration::from_secs(15), &format!("{}: first ping", md.name), || {
        md.client
            .run("ping", &["-c", "1", "-W", "1", &md.addr.to_string()])
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
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
                runs[m].push(iperf_figure(md.client, md.server, md.addr, streams, seconds, &md.relay, &[]));
            }
        }
        let f: Vec<Figure> = runs.into_iter().map(median_figure).collect();
        for (m, md) in modes.iter().enumerate() {
            println!(
                "  {streams} stream(s)  {:<28} {:6.2} Gbit/s  CPU-s/Gbit: relay {:.3}, machine {:.3}",
                md.name, f[m].gbps, f[m].relay_cpu, f[m].machine_cpu
            );
        }
        if n >= 3 {
            println!(
                "  {streams} stream(s)  ours/wireguard-go {:.2}x  ours/udp {:.1}%  (targets: >= 2x, >= 60%)",
                f[0].gbps / f[2].gbps,
                f[0].gbps / f[1].gbps * 100.0,
            );
        }
    }
    println!("\nping pod to pod (200 x 5 ms):");
    for md in modes {
        let (p50, p99) = ping(md.client, md.addr);
        println!("  {:<28} p50 {p50:.3} ms  p99 {p99:.3} ms", md.name);
    }
}

/// The wireguard data path started by hand on node `i` of a hand-built
/// fixture (overlay 10.248.0.0/16, port 51840), with fixed keys.
fn start_by_hand(c: &Cluster, i: usize, tuning: WgTuning) -> WgDataPath {
    let secret = |i: usize| [i as u8 + 1; 32];
    let cfg = WgConfig {
        tun_name: "wgh0".into(),
        subnet: format!("10.248.{}.0/24", i + 1).parse().unwrap(),
        network: "10.248.0.0/16".parse().unwrap(),
        mtu: WG_MTU,
        port: BY_HAND_PORT,
        private_key: secret(i),
        psk: None,
        keepalive: 0,
        one_device: None,
    };
    let dp = c.node(i).ns.in_thread(|| WgDataPath::start_with(cfg, Arc::new(WgCounters::default()), tuning)).unwrap();
    let peer = 1 - i;
    dp.set_peers(&[(
        format!("10.248.{}.0/24", peer + 1).parse().unwrap(),
        TunnelPeer {
            ip: underlay(peer).into(),
            wireguard: Some(WireguardPeer { public_key: public_of(&secret(peer)), port: BY_HAND_PORT }),
        },
    )]);
    dp
}

fn stages(seconds: u32, rounds: usize) {
    let c = Cluster::new(2).unwrap();
    let pods = [veth_pod(&c, 0, 248, "vh0", WG_MTU), veth_pod(&c, 1, 248, "vh0", WG_MTU)];
    let list = flanneld_rs::backend::wireguard::datapath::stages();
    println!(
        "\nstages of the wireguard data path, started by hand (iperf3 pod to pod, median of {rounds}; CPU = its \
         threads, s/Gbit):"
    );
    let mut prev: Option<f64> = None;
    for (name, tuning) in list {
        let dps = [start_by_hand(&c, 0, tuning), start_by_hand(&c, 1, tuning)];
        wait_until(Duration::from_secs(10), "ping through the data path", || {
            pods[0].run("ping", &["-c", "1", "-W", "1", "10.248.2.2"]).map(|o| o.status.success()).unwrap_or(false)
        });
        let tids = || dps.iter().flat_map(WgDataPath::thread_ids).collect();
        let mut line = format!("  {name:<46}");
        for streams in [1, 4] {
            let to = Ipv4Addr::new(10, 248, 2, 2);
            let f = median_figure(
                (0..rounds)
                    .map(|_| iperf_figure(&pods[0], &pods[1], to, streams, seconds, &Relay::Threads(&tids), &[]))
                    .collect(),
            );
            line += &format!("  {streams}x: {:6.2} Gbit/s ({:.3} CPU-s/Gbit)", f.gbps, f.relay_cpu);
            if streams == 1 {
                if let Some(p) = prev {
                    line += &format!(" {:>5.2}x prev", f.gbps / p);
                }
                prev = Some(f.gbps);
            }
        }
        println!("{line}");
        drop(dps);
    }
}

/// The wireguard counters of node `i`'s daemon that are not zero.
fn wg_counters(o: &Overlay, i: usize) -> String {
    let text = metrics(o, i);
    let v: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("flannel_wireguard_") && !l.ends_with(" 0"))
        .map(|l| l.trim_start_matches("flannel_wireguard_").to_string())
        .collect();
    v.join(", ")
}

/// What the daemon's data path uses, from its log.
fn daemon_features(o: &Overlay, i: usize) -> String {
    let log = o.log(i);
    let line = log.lines().rev().find(|l| l.contains("user-space data path on")).unwrap_or("(not in the log)");
    line.split("data path on ").nth(1).unwrap_or(line).to_string()
}

/// Our wireguard daemons on two dual-stack nodes: the same pods over IPv4
/// and over IPv6.
fn ipv6(seconds: u32, rounds: usize) {
    let o = start_daemons(Overlay::dual_stack(2, WG_DUAL_CONF), true);
    let (a, _, _) = o.add_dual_pod(0, "6a");
    let (b, b4, b6) = o.add_dual_pod(1, "6b");
    println!("\nthe wireguard daemons' data paths: {}", daemon_features(&o, 0));
    let modes = [
        Mode {
            name: "ours over IPv4 (flannel-wg)",
            client: &a,
            server: &b,
            addr: b4.into(),
            relay: Relay::Procs(daemon_pids(&o)),
        },
        Mode {
            name: "ours over IPv6 (flannel-wg-v6)",
            client: &a,
            server: &b,
            addr: b6.into(),
            relay: Relay::Procs(daemon_pids(&o)),
        },
    ];
    for md in &modes {
        wait_ping(md);
    }
    compare(&modes, seconds, rounds);
    println!("\nwireguard counters (non-zero): node0: {}", wg_counters(&o, 0));
}

fn main() {
    let args = Args::parse();
    if !netns_fixtures::require_root() {
        std::process::exit(1);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    aead_floor();
    if args.stages || args.stages_only {
        stages(args.seconds, args.rounds);
        if args.stages_only {
            return;
        }
    }
    if args.ipv6 {
        ipv6(args.seconds, args.rounds);
        return;
    }
    let (wg, wpods) = daemons(WG_CONF, "w");
    println!("\nthe wireguard daemons' data path: {}", daemon_features(&wg, 0));
    if args.ours_only {
        let modes = [Mode {
            name: "ours (wireguard daemons)",
            client: &wpods[0].0,
            server: &wpods[1].0,
            addr: wpods[1].1.into(),
            relay: Relay::Procs(daemon_pids(&wg)),
        }];
        wait_ping(&modes[0]);
        compare(&modes, args.seconds, args.rounds);
        println!("\nwireguard counters (non-zero): node0: {}", wg_counters(&wg, 0));
        return;
    }
    let (udp, upods) = daemons(UDP_CONF, "u");
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(2).unwrap();
    let gpods = [veth_pod(&c, 0, 247, "vg0", WG_MTU), veth_pod(&c, 1, 247, "vg0", WG_MTU)];
    let (kids, go_pids) = wireguard_go(&c, dir.path());
    {
        let modes = [
            Mode {
                name: "ours (wireguard daemons)",
                client: &wpods[0].0,
                server: &wpods[1].0,
                addr: wpods[1].1.into(),
                relay: Relay::Procs(daemon_pids(&wg)),
            },
            Mode {
                name: "our udp (udp daemons)",
                client: &upods[0].0,
                server: &upods[1].0,
                addr: upods[1].1.into(),
                relay: Relay::Procs(daemon_pids(&udp)),
            },
            Mode {
                name: "wireguard-go",
                client: &gpods[0],
                server: &gpods[1],
                addr: Ipv4Addr::new(10, 247, 2, 2).into(),
                relay: Relay::Procs(go_pids),
            },
        ];
        for md in &modes {
            wait_ping(md);
        }
        println!("(CPU relay column: the two daemons' or the two wireguard-go processes, all threads)");
        compare(&modes, args.seconds, args.rounds);
    }
    println!("\nwireguard daemons' counters (non-zero): node0: {}", wg_counters(&wg, 0));
    println!("                                        node1: {}", wg_counters(&wg, 1));
    drop(kids);
    drop(udp);
    drop(wg);
}
