//! Measuring helpers the benchmark harnesses share: percentiles, iperf3 and
//! ping between two namespaces, CPU seconds per gigabit, pods on plain veths.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;
use std::time::Duration;

use flannel_net::netns::NetNs;
use flannel_net::MacAddr;
use ipnet::Ipv4Net;
use netns_fixtures::{wait_until, Netns};

use crate::overlay::Proc;

/// The benchmarks' network: room for thousands of /24 peers.
pub const NET: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// Benchmark peer `i`: subnet, VTEP MAC, public IP (TEST-NET-2/3; nothing is
/// ever sent there).
pub fn peer(i: usize) -> (Ipv4Net, MacAddr, Ipv4Addr) {
    let n = i + 256; // skip 10.0.x.0
    let subnet = Ipv4Net::new(Ipv4Addr::new(10, (n >> 8) as u8, (n & 0xff) as u8, 0), 24).unwrap();
    let mac = MacAddr([0x02, 0xbe, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    let public = if i.is_multiple_of(2) {
        Ipv4Addr::new(198, 51, 100, (i / 2 % 250 + 1) as u8)
    } else {
        Ipv4Addr::new(203, 0, 113, (i / 2 % 250 + 1) as u8)
    };
    (subnet, mac, public)
}

/// Runs `f` on a runtime whose sockets live in `ns`.
pub fn in_ns<T: Send>(ns: &Netns, f: impl std::future::Future<Output = T> + Send) -> T {
    NetNs::open(ns.path())
        .unwrap()
        .run(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f))
        .unwrap()
}

/// The `p` quantile (0..=1) of an ascending slice (NaN when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The middle value of a sample (the upper middle for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Sorts and returns (p50, p99, max).
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&v, 0.5), pct(&v, 0.99), v[v.len() - 1])
}

/// iperf3 from `client` to a one-shot server in `server` listening on
/// `addr`:5201 (IPv4 or IPv6), `streams` parallel streams: Gbit/s received.
pub fn iperf(client: &Netns, server: &Netns, addr: impl Into<IpAddr>, streams: u32, seconds: u32) -> f64 {
    iperf_sampled(client, server, addr, streams, seconds, &[], || ()).0
}

/// [`iperf`], with `extra` arguments for the client and `sample` taken
/// right before and right after the client runs (CPU counters, for CPU
/// seconds per gigabit): Gbit/s, before, after.
#[allow(clippy::too_many_arguments)]
pub fn iperf_sampled<T>(
    client: &Netns,
    server: &Netns,
    addr: impl Into<IpAddr>,
    streams: u32,
    seconds: u32,
    extra: &[&str],
    sample: impl Fn() -> T,
) -> (f64, T, T) {
    // Killed on drop: a one-shot server whose client never came (the
    // wait or the client panicked) would otherwise wait on forever.
    let srv = Proc(Some(
        server
            .command("iperf3")
            .args(["-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)"),
    ));
    wait_until(Duration::from_secs(5), "iperf3 server", || {
        server.run_ok("ss", &["-Hltn", "sport = :5201"]).contains("5201")
    });
    let addr: IpAddr = addr.into();
    let before = sample();
    let (addr_s, seconds_s, streams_s) = (addr.to_string(), seconds.to_string(), streams.to_string());
    let mut args = vec!["-c", &addr_s, "-p", "5201", "-t", &seconds_s, "-P", &streams_s, "-J"];
    args.extend_from_slice(extra);
    let out = client.run_ok("iperf3", &args);
    let after = sample();
    // The client has the figures (the server's included): the one-shot
    // server, done or about to be, is killed and reaped (a wait for it to
    // exit by itself would have no deadline), freeing port 5201.
    drop(srv);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9;
    (gbps, before, after)
}

/// Busy CPU seconds of the whole machine so far (/proc/stat: all but idle
/// and iowait).
pub fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    busy / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a /proc/.../stat file, in seconds (a process's file
/// counts all its threads). Panics when the thread or process is gone or
/// the file cannot be read: a 0 in its place would print a CPU figure
/// (negative, or too low) that was not measured.
pub fn stat_cpu(path: &str) -> f64 {
    let (user, system) = stat_user_system(path);
    user + system
}

/// utime and stime of a /proc/.../stat file, in seconds: the time in the
/// program's own code and in the kernel on its behalf (panics as
/// [`stat_cpu`]).
pub fn stat_user_system(path: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (the relay's thread or process is gone: its CPU cannot be measured)"));
    // The fields after the command name, which is in parentheses.
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| -> f64 {
        f.get(i).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{path}: no CPU ticks in {stat:?}"))
    };
    (ticks(11) / clock_ticks(), ticks(12) / clock_ticks())
}

/// Who a benchmark charges a relay's CPU to.
pub enum Relay<'a> {
    /// Threads of this process (a data path started by hand), listed anew
    /// at each sample: its workers register as they start.
    Threads(&'a dyn Fn() -> Vec<i32>),
    /// Whole processes: daemons, wireguard-go, socat.
    Procs(Vec<u32>),
    /// The kernel does the work: only the machine-wide figure applies.
    Kernel,
}

impl Relay<'_> {
    /// CPU seconds so far.
    pub fn cpu(&self) -> f64 {
        match self {
            Relay::Threads(tids) => tids().iter().map(|tid| stat_cpu(&format!("/proc/self/task/{tid}/stat"))).sum(),
            Relay::Procs(pids) => pids.iter().map(|p| stat_cpu(&format!("/proc/{p}/stat"))).sum(),
            Relay::Kernel => 0.0,
        }
    }
}

/// One iperf3 run's figures.
#[derive(Clone, Copy, Default, Debug)]
pub struct Figure {
    /// Gbit/s received.
    pub gbps: f64,
    /// The relay's CPU seconds per gigabit.
    pub relay_cpu: f64,
    /// The whole machine's CPU seconds per gigabit.
    pub machine_cpu: f64,
}

/// [`iperf`] with the relay's and the machine's CPU per gigabit, and
/// `extra` arguments for the client.
#[allow(clippy::too_many_arguments)]
pub fn iperf_figure(
    client: &Netns,
    server: &Netns,
    addr: impl Into<IpAddr>,
    streams: u32,
    seconds: u32,
    relay: &Relay,
    extra: &[&str],
) -> Figure {
    let sample = || (relay.cpu(), machine_cpu());
    let (gbps, (r0, m0), (r1, m1)) = iperf_sampled(client, server, addr, streams, seconds, extra, sample);
    let gbit = (gbps * f64::from(seconds)).max(1e-9);
    Figure { gbps, relay_cpu: (r1 - r0) / gbit, machine_cpu: (m1 - m0) / gbit }
}

/// The median run (by throughput).
pub fn median_figure(mut v: Vec<Figure>) -> Figure {
    v.sort_by(|a, b| a.gbps.partial_cmp(&b.gbps).unwrap());
    v[v.len() / 2]
}

/// The pids of `o`'s running daemons.
pub fn daemon_pids(o: &crate::overlay::Overlay) -> Vec<u32> {
    o.daemons.iter().map(|d| d.proc.0.as_ref().expect("daemon running").id()).collect()
}

/// A pod of overlay `net` (10.<net>.0.0/16) on node `i` of a hand-built
/// fixture: a veth `<dev>` in the node with `.1`, `eth0` in the pod with
/// `.2`, both of MTU `mtu`, the pod's default route via the node's end.
pub fn veth_pod(c: &netns_fixtures::Cluster, i: usize, net: u8, dev: &str, mtu: u32) -> Netns {
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

/// Round-trip times of 200 pings, p50 and p99 in ms (NaN when none came back).
pub fn ping(client: &Netns, addr: impl std::fmt::Display) -> (f64, f64) {
    let out = client.run("ping", &["-c", "200", "-i", "0.005", "-W", "1", &addr.to_string()]).unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let mut rtt: Vec<f64> =
        out.lines().filter_map(|l| l.split("time=").nth(1)).filter_map(|t| t.split(' ').next()?.parse().ok()).collect();
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&rtt, 0.5), pct(&rtt, 0.99))
}

/// The reference the benchmarks measure our VXLAN against: kernel VXLAN
/// between nodes 0 and 1 of `c` programmed by hand with `ip` and `bridge`,
/// the objects flanneld-rs would make. Overlay 10.`net`.0.0/16; node `i`
/// holds 10.`net`.(i+1).0/24 on `flannel.1` (MTU 1450, VNI 1, port 8472).
pub fn vxlan_by_hand(c: &netns_fixtures::Cluster, net: u8) {
    vxlan_by_hand_on(c, [0, 1], net);
}

/// [`vxlan_by_hand`] between nodes `nodes[0]` and `nodes[1]` of `c`, which
/// hold 10.`net`.1.0/24 and 10.`net`.2.0/24.
pub fn vxlan_by_hand_on(c: &netns_fixtures::Cluster, nodes: [usize; 2], net: u8) {
    let macs = ["02:aa:00:00:00:01", "02:aa:00:00:00:02"];
    let underlay = |i: usize| c.node(nodes[i]).underlay_ip;
    for i in 0..2usize {
        let (me, peer) = (i + 1, 2 - i);
        let ns = &c.node(nodes[i]).ns;
        ns.ip_batch(&[
            format!(
                "link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
                macs[i],
                underlay(i)
            ),
            "link set flannel.1 mtu 1450 up".to_string(),
            format!("addr add 10.{net}.{me}.0/32 dev flannel.1"),
            format!("neigh replace 10.{net}.{peer}.0 lladdr {} dev flannel.1 nud permanent", macs[1 - i]),
            format!("route replace 10.{net}.{peer}.0/24 via 10.{net}.{peer}.0 dev flannel.1 onlink"),
        ])
        .unwrap();
        let dst = underlay(1 - i).to_string();
        ns.run_ok("bridge", &["fdb", "append", macs[1 - i], "dev", "flannel.1", "dst", &dst, "self", "permanent"]);
    }
}

/// The IPv6 counterpart of [`vxlan_by_hand`], between nodes 0 and 1 of the
/// dual-stack cluster `c`: kernel VXLAN over the IPv6 underlay programmed by
/// hand, the objects flanneld-rs makes for `flannel-v6.1`. Overlay
/// 2001:db8:`net`::/56; node `i` holds 2001:db8:`net`:(i+1)::/64 on
/// `flannel-v6.1` (VNI 1, port 8472, MTU `mtu`), with the subnet's first
/// address as /128, a permanent neighbour and FDB entry for the peer and
/// the route `<peer subnet> via <its first address> onlink`.
pub fn vxlan6_by_hand(c: &netns_fixtures::Cluster, net: u16, mtu: u32) {
    let macs = ["02:aa:00:00:06:01", "02:aa:00:00:06:02"];
    let underlay = |i: usize| c.node(i).underlay_ipv6.expect("a dual-stack cluster");
    let first = |i: usize| Ipv6Addr::new(0x2001, 0xdb8, net, i as u16 + 1, 0, 0, 0, 0);
    for i in 0..2usize {
        let (me, peer) = (first(i), first(1 - i));
        let ns = &c.node(i).ns;
        ns.ip_batch(&[
            format!(
                "link add flannel-v6.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
                macs[i],
                underlay(i)
            ),
            format!("link set flannel-v6.1 mtu {mtu} up"),
            format!("addr add {me}/128 dev flannel-v6.1 nodad"),
            format!("neigh replace {peer} lladdr {} dev flannel-v6.1 nud permanent", macs[1 - i]),
            format!("route replace {peer}/64 via {peer} dev flannel-v6.1 onlink"),
        ])
        .unwrap();
        let dst = underlay(1 - i).to_string();
        ns.run_ok("bridge", &["fdb", "append", macs[1 - i], "dev", "flannel-v6.1", "dst", &dst, "self", "permanent"]);
    }
}
