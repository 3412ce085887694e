//! The udp backend's data path between real namespaces: nodes on an
//! underlay segment (192.0.2.0/24), each running a `UdpDataPath` and holding
//! one pod on a veth, with the overlay 10.244.0.0/16 (node i owns
//! 10.244.(i+1).0/24, its pod is .2). Traffic and kernel state are checked
//! with real sockets, `ping` and `ip -j`, not by asking the data path.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use flanneld_rs::udp::{packet, Tuning, UdpConfig, UdpDataPath};
use ipnet::Ipv4Net;
use netns_fixtures::{require_root, wait_until, Cluster, Netns};

const MTU: u32 = 1500 - 28;

fn subnet(i: usize) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, i as u8 + 1, 0), 24).unwrap()
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 2)
}

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// A cluster, a pod per node, and a data path per node.
struct Overlay {
    pods: Vec<Netns>,
    dps: Vec<Option<UdpDataPath>>,
    tunings: Vec<Tuning>,
    /// Workers per data path; 0 = one per CPU.
    queues: usize,
    cluster: Cluster,
}

impl Overlay {
    fn new(nodes: usize, tuning: Tuning, outside: bool) -> Overlay {
        Self::mixed(&vec![tuning; nodes], outside)
    }

    /// Node i runs with `tunings[i]`.
    fn mixed(tunings: &[Tuning], outside: bool) -> Overlay {
        Self::build(tunings, outside, 0)
    }

    fn build(tunings: &[Tuning], outside: bool, queues: usize) -> Overlay {
        let nodes = tunings.len();
        let cluster = if outside { Cluster::with_outside(nodes) } else { Cluster::new(nodes) }.unwrap();
        let mut pods = Vec::new();
        for i in 0..nodes {
            let node = cluster.node(i);
            let pod = node.add_pod_netns("pod").unwrap();
            let mtu = MTU.to_string();
            node.ns.run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    "vp0",
                    "mtu",
                    &mtu,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "mtu",
                    &mtu,
                    "netns",
                    pod.name(),
                ],
            );
            node.ns.run_ok("ip", &["addr", "add", &format!("10.244.{}.1/24", i + 1), "dev", "vp0"]);
            node.ns.run_ok("ip", &["link", "set", "vp0", "up"]);
            pod.run_ok("ip", &["addr", "add", &format!("{}/24", pod_ip(i)), "dev", "eth0"]);
            pod.run_ok("ip", &["link", "set", "eth0", "up"]);
            pod.run_ok("ip", &["route", "add", "default", "via", &format!("10.244.{}.1", i + 1)]);
            node.ns.wait_oper_up(&["vp0"], Duration::from_secs(10)).unwrap();
            pods.push(pod);
        }
        let mut o =
            Overlay { pods, dps: (0..nodes).map(|_| None).collect(), tunings: tunings.to_vec(), queues, cluster };
        for i in 0..nodes {
            o.start(i);
        }
        o.mesh();
        o
    }

    fn config(i: usize, queues: usize) -> UdpConfig {
        UdpConfig {
            tun_name: "flannel0".into(),
            subnet: subnet(i),
            network: "10.244.0.0/16".parse().unwrap(),
            mtu: MTU,
            port: 8285,
            bind: underlay(i),
            queues,
        }
    }

    /// Starts node i's data path inside its namespace.
    fn start(&mut self, i: usize) {
        let (tuning, queues) = (self.tunings[i], self.queues);
        let dp =
            self.cluster.node(i).ns.in_thread(|| UdpDataPath::start_with(Self::config(i, queues), tuning)).unwrap();
        self.dps[i] = Some(dp);
    }

    fn dp(&self, i: usize) -> &UdpDataPath {
        self.dps[i].as_ref().unwrap()
    }

    /// Every node knows every other.
    fn mesh(&self) {
        let n = self.dps.len();
        for (i, dp) in self.dps.iter().enumerate() {
            let peers: Vec<_> = (0..n).filter(|&j| j != i).map(|j| (subnet(j), underlay(j))).collect();
            if let Some(dp) = dp {
                dp.set_peers(&peers);
            }
        }
    }

    fn ping(&self, from: usize, to: Ipv4Addr, extra: &[&str]) -> std::process::Output {
        let to = to.to_string();
        let mut args = vec!["-c", "1", "-W", "2"];
        args.extend_from_slice(extra);
        args.push(&to);
        self.pods[from].run("ping", &args).unwrap()
    }

    fn ping_ok(&self, from: usize, to: Ipv4Addr, extra: &[&str]) -> bool {
        self.ping(from, to, extra).status.success()
    }
}

/// A deterministic byte stream and a running digest of it.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn digest(d: &mut u64, buf: &[u8]) {
    for chunk in buf.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        *d = (*d ^ u64::from_le_bytes(w)).wrapping_mul(0x100_0000_01b3).rotate_left(5);
    }
}

/// Sends `bytes` from pod `a` to pod `b` over TCP; returns (sent digest,
/// received digest, bytes received). `during` runs while data flows.
fn transfer(o: &Overlay, a: usize, b: usize, bytes: usize, port: u16, during: impl FnOnce()) -> (u64, u64, usize) {
    let addr = SocketAddr::from((pod_ip(b), port));
    let listener = o.pods[b].in_thread(|| TcpListener::bind(addr)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (mut d, mut total) = (0u64, 0usize);
        let mut buf = vec![0u8; 1 << 16];
        // Digest whole 8-byte words only, carrying a partial tail over.
        let mut pending = Vec::new();
        loop {
            let n = s.read(&mut buf).expect("read: the stream broke");
            if n == 0 {
                break;
            }
            total += n;
            pending.extend_from_slice(&buf[..n]);
            let whole = pending.len() / 8 * 8;
            digest(&mut d, &pending[..whole]);
            pending.drain(..whole);
        }
        digest(&mut d, &pending);
        (d, total)
    });
    let mut s = o.pods[a].in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).unwrap();
    let writer = std::thread::spawn(move || {
        let (mut state, mut d) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut buf[..n], &mut state);
            digest(&mut d, &buf[..n]);
            s.write_all(&buf[..n]).expect("write: the stream broke");
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        d
    });
    during();
    let sent = writer.join().unwrap();
    let (got, total) = server.join().unwrap();
    (sent, got, total)
}

fn tcp_across_three_nodes(tuning: Tuning) {
    let o = Overlay::new(3, tuning, false);
    for (a, b) in [(0, 1), (2, 0), (1, 2)] {
        let bytes = 24 << 20;
        let (sent, got, total) = transfer(&o, a, b, bytes, 7000 + a as u16, || {});
        assert_eq!(total, bytes, "pod {a} -> pod {b}: bytes");
        assert_eq!(sent, got, "pod {a} -> pod {b}: digest");
    }
    let s = o.dp(0).stats();
    assert!(s.tx_packets > 1000 && s.rx_packets > 1000, "{s:?}");
    assert_eq!((s.dropped_bad, s.send_errors, s.tun_write_errors), (0, 0, 0), "{s:?}");
    // Flows were spread over the workers wherever asked and there are two.
    let f = o.dp(0).features();
    assert_eq!(f.steer, tuning.steer && f.queues > 1, "{f:?}");
    assert_eq!(f.balance, tuning.balance && f.steer, "{f:?}");
}

#[test]
fn tcp_across_three_nodes_with_every_offload() {
    if !require_root() {
        return;
    }
    tcp_across_three_nodes(Tuning::default());
}

#[test]
fn tcp_across_three_nodes_per_packet_fallback() {
    if !require_root() {
        return;
    }
    tcp_across_three_nodes(Tuning::per_packet());
}

/// A node that moves one packet per datagram and system call, exactly like
/// flannel's udp mode (and the kernel's view of a wire: no GSO trains, no
/// merged packets), talks to one with every offload, both ways.
#[test]
fn a_per_packet_node_and_an_offloading_node_interoperate() {
    if !require_root() {
        return;
    }
    let o = Overlay::mixed(&[Tuning::default(), Tuning::per_packet()], false);
    for (a, b) in [(0, 1), (1, 0)] {
        let bytes = 16 << 20;
        let (sent, got, total) = transfer(&o, a, b, bytes, 7300 + a as u16, || {});
        assert_eq!((total, sent), (bytes, got), "pod {a} -> pod {b}");
    }
    assert!(o.ping_ok(0, pod_ip(1), &["-M", "dont", "-s", "3000"]));
    for i in 0..2 {
        let s = o.dp(i).stats();
        assert_eq!((s.dropped_bad, s.send_errors, s.tun_write_errors), (0, 0, 0), "node {i}: {s:?}");
    }
}

#[test]
fn device_address_route_and_mtu_are_flannels_and_ensure_kernel_repairs_them() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(2, Tuning::default(), false);
    let ns = &o.cluster.node(0).ns;
    let check = || {
        let link = &ns.ip_json(&["-d", "link", "show", "flannel0"])[0];
        assert_eq!(link["mtu"], 1472);
        assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{link}");
        assert_eq!(link["linkinfo"]["info_kind"], "tun");
        assert_eq!(link["linkinfo"]["info_data"]["type"], "tun");
        assert_eq!(link["linkinfo"]["info_data"]["pi"], false);
        let addrs = &ns.ip_json(&["-4", "addr", "show", "dev", "flannel0"])[0]["addr_info"];
        let addrs: Vec<String> = addrs
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(addrs, ["10.244.1.0/32"]);
        let routes = ns.ip_json(&["-4", "route", "show", "dev", "flannel0"]);
        let dsts: Vec<&str> = routes.as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap()).collect();
        assert_eq!(dsts, ["10.244.0.0/16"]);
    };
    check();
    assert_eq!(o.dp(0).ensure_kernel().unwrap(), Vec::<String>::new(), "nothing to fix");
    ns.run_ok("ip", &["route", "del", "10.244.0.0/16", "dev", "flannel0"]);
    ns.run_ok("ip", &["addr", "del", "10.244.1.0/32", "dev", "flannel0"]);
    ns.run_ok("ip", &["addr", "add", "10.244.77.0/32", "dev", "flannel0"]);
    ns.run_ok("ip", &["link", "set", "flannel0", "mtu", "1300"]);
    assert!(!o.ping_ok(0, pod_ip(1), &[]), "broken on purpose");
    let fixed = o.dp(0).ensure_kernel().unwrap();
    assert_eq!(fixed.len(), 4, "{fixed:?}");
    check();
    assert!(o.ping_ok(0, pod_ip(1), &[]));
    ns.run_ok("ip", &["link", "set", "flannel0", "down"]);
    let fixed = o.dp(0).ensure_kernel().unwrap();
    // Down takes the route with it: both come back.
    assert!(fixed.iter().any(|f| f.contains("up")) && fixed.iter().any(|f| f.contains("route")), "{fixed:?}");
    check();
    wait_until(Duration::from_secs(5), "traffic after re-up", || o.ping_ok(0, pod_ip(1), &[]));
}

#[test]
fn mtu_sized_packets_and_packets_that_need_fragmentation() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(2, Tuning::default(), false);
    // The largest packet that fits the TUN MTU, DF set: 1472 - 28 bytes of ICMP payload.
    assert!(o.ping_ok(0, pod_ip(1), &["-M", "do", "-s", "1444"]));
    // One byte more with DF set cannot leave the pod (its MTU is 1472 too).
    assert!(!o.ping_ok(0, pod_ip(1), &["-M", "do", "-s", "1445"]));
    // DF unset: fragmented by the sender, each fragment relayed, reassembled by the pod.
    assert!(o.ping_ok(0, pod_ip(1), &["-M", "dont", "-s", "3000"]));
    assert!(o.ping_ok(1, pod_ip(0), &["-M", "dont", "-s", "8000"]));
    // From the node itself (its route to the Network goes through flannel0).
    let node = &o.cluster.node(0).ns;
    assert!(node
        .run("ping", &["-c", "1", "-W", "2", "-M", "do", "-s", "1444", "10.244.2.2"])
        .unwrap()
        .status
        .success());
    assert!(node
        .run("ping", &["-c", "1", "-W", "2", "-M", "dont", "-s", "3000", "10.244.2.2"])
        .unwrap()
        .status
        .success());
    // UDP datagrams of every size around the MTU cross intact.
    let rx = o.pods[1].in_thread(|| UdpSocket::bind((pod_ip(1), 9000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = o.pods[0].in_thread(|| UdpSocket::bind((pod_ip(0), 0))).unwrap();
    let mut buf = vec![0u8; 70_000];
    for len in [1, 1400, 1443, 1444, 1445, 2000, 9000, 60_000] {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        tx.send_to(&msg, (pod_ip(1), 9000)).unwrap();
        let (n, _) = rx.recv_from(&mut buf).unwrap_or_else(|e| panic!("{len}-byte datagram: {e}"));
        assert_eq!(&buf[..n], &msg[..], "{len}-byte datagram");
    }
    let s = o.dp(0).stats();
    assert_eq!((s.dropped_bad, s.send_errors), (0, 0), "{s:?}");
}

#[test]
fn unknown_subnet_gets_icmp_net_unreachable() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(2, Tuning::default(), false);
    let out = o.ping(0, Ipv4Addr::new(10, 244, 99, 5), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("Destination Net Unreachable"), "{text}");
    // From the Network's address (see `icmp_source` for why not <subnet>.0).
    assert!(text.contains("From 10.244.0.0"), "{text}");
    // A TCP connect fails with "network unreachable" (the ICMP error
    // reached the socket) rather than running into its timeout.
    let err = o.pods[0]
        .in_thread(|| TcpStream::connect_timeout(&SocketAddr::from(([10, 244, 99, 5], 80)), Duration::from_secs(5)))
        .unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)), "{err:?}");
    // Workers publish their counters once per round: wait for the round
    // that carried the second packet.
    wait_until(Duration::from_secs(10), "both drops and ICMP errors counted", || {
        let s = o.dp(0).stats();
        s.dropped_no_peer >= 2 && s.icmp_unreachable_sent >= 2
    });
}

/// An IPv4/UDP packet from `src`:5555 to `dst`:9999 carrying `payload`.
fn inner_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    packet::build_udp(SocketAddrV4::new(src, 5555), SocketAddrV4::new(dst, 9999), payload)
}

#[test]
fn forged_datagram_from_a_non_peer_is_dropped_and_counted() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(2, Tuning::default(), true);
    let listener = o.pods[0].in_thread(|| UdpSocket::bind((pod_ip(0), 9999))).unwrap();
    listener.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let forged = inner_udp(pod_ip(1), pod_ip(0), b"forged");
    let node0 = SocketAddr::from((underlay(0), 8285));
    // From the outside host, which is on the underlay but no peer.
    let rogue = o.cluster.outside().unwrap().in_thread(|| UdpSocket::bind("192.0.2.200:0")).unwrap();
    for _ in 0..3 {
        rogue.send_to(&forged, node0).unwrap();
    }
    let mut buf = [0u8; 64];
    assert!(listener.recv_from(&mut buf).is_err(), "a non-peer's packet reached the pod");
    wait_until(Duration::from_secs(2), "dropped_not_peer", || o.dp(0).stats().dropped_not_peer == 3);
    // The same datagram from a peer's address is delivered: only the source differs.
    let peer = o.cluster.node(1).ns.in_thread(|| UdpSocket::bind((underlay(1), 0))).unwrap();
    peer.send_to(&inner_udp(pod_ip(1), pod_ip(0), b"genuine"), node0).unwrap();
    let (n, from) = listener.recv_from(&mut buf).expect("a peer's packet is delivered");
    assert_eq!(&buf[..n], b"genuine");
    assert_eq!(from, SocketAddr::from((pod_ip(1), 5555)));
    assert_eq!(o.dp(0).stats().dropped_not_peer, 3);
}

#[test]
fn ttl_is_decremented_on_both_sides_and_expiry_drops() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(2, Tuning::default(), false);
    // pod -> node 0 (kernel: -1) -> our TUN side (-1) -> node 1's receive
    // side (-1) -> node 1's kernel forwarding to the pod (-1, needs > 1).
    assert!(o.ping_ok(0, pod_ip(1), &["-t", "5"]));
    assert!(!o.ping_ok(0, pod_ip(1), &["-t", "2"]));
    wait_until(Duration::from_secs(2), "TTL drop on send", || o.dp(0).stats().dropped_ttl == 1);
    assert!(!o.ping_ok(0, pod_ip(1), &["-t", "3"]));
    wait_until(Duration::from_secs(2), "TTL drop on receive", || o.dp(1).stats().dropped_ttl == 1);
}

#[test]
fn peer_table_updates_do_not_disturb_an_established_stream() {
    if !require_root() {
        return;
    }
    let o = Overlay::new(3, Tuning::default(), false);
    let dp0 = o.dp(0);
    let real: Vec<(Ipv4Net, Ipv4Addr)> = vec![(subnet(1), underlay(1)), (subnet(2), underlay(2))];
    let (sent, got, total) = transfer(&o, 0, 1, 48 << 20, 7100, || {
        // Swap in tables of growing size, always holding the real peers.
        for round in 0..200usize {
            let mut peers = real.clone();
            for k in 0..(round * 10) {
                let net = Ipv4Net::new(Ipv4Addr::new(10, 244, 10 + (k / 256) as u8, (k % 256) as u8), 32).unwrap();
                peers.push((net, Ipv4Addr::new(198, 51, 100, (k % 250) as u8 + 1)));
            }
            dp0.set_peers(&peers);
            std::thread::sleep(Duration::from_millis(2));
        }
        dp0.set_peers(&real);
    });
    assert_eq!((total, sent), (48 << 20, got));
    assert_eq!(dp0.stats().dropped_no_peer, 0);
    // Without node 1 in the table its subnet is unknown...
    dp0.set_peers(&real[1..]);
    let out = o.ping(0, pod_ip(1), &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Destination Net Unreachable"));
    // ... and node 1 drops what node 0 still sends it once node 0 is gone
    // from its own table.
    o.dp(1).set_peers(&[(subnet(2), underlay(2))]);
    let before = o.dp(1).stats().dropped_not_peer;
    o.mesh();
    o.dp(1).set_peers(&[(subnet(2), underlay(2))]);
    assert!(!o.ping_ok(0, pod_ip(1), &[]));
    assert!(o.dp(1).stats().dropped_not_peer > before);
    o.mesh();
    assert!(o.ping_ok(0, pod_ip(1), &[]));
}

#[test]
fn restart_adopts_the_device_and_traffic_resumes() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2, Tuning::default(), false);
    // An established connection from pod 0 to pod 1.
    let addr = SocketAddr::from((pod_ip(1), 7200));
    let listener = o.pods[1].in_thread(|| TcpListener::bind(addr)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        for _ in 0..2 {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    let mut c = o.pods[0].in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 5];
    c.write_all(b"hello").unwrap();
    c.read_exact(&mut buf).unwrap();

    // Stop node 1's data path: the device stays with address and route.
    o.dps[1] = None;
    let ns1 = &o.cluster.node(1).ns;
    let routes = ns1.ip_json(&["-4", "route", "show", "dev", "flannel0"]);
    assert_eq!(routes[0]["dst"], "10.244.0.0/16", "{routes}");
    assert!(!o.ping_ok(0, pod_ip(1), &["-W", "1"]));

    let t0 = Instant::now();
    o.start(1);
    o.mesh();
    wait_until(Duration::from_secs(10), "ping after restart", || o.ping_ok(0, pod_ip(1), &["-W", "1"]));
    // How long is for the benchmark to measure (scripts/bench/udp.sh); a
    // test only says that it resumes.
    eprintln!("traffic resumed {:?} after the restart began", t0.elapsed());
    // The connection survived.
    c.write_all(b"again").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
    server.join().unwrap();
    // The device was adopted, not recreated: still one, same settings.
    assert_eq!(o.dp(1).ensure_kernel().unwrap(), Vec::<String>::new());
}

/// Which of `socks` each payload lands on, sent one at a time from `peer`
/// (node 1's port 8285) to node 0's port 8285 (the way a peer sends).
fn landings(peer: &UdpSocket, socks: &[flanneld_rs::udp::sock::UdpSocket], payloads: &[Vec<u8>]) -> Vec<usize> {
    let to = SocketAddr::from((underlay(0), 8285));
    let mut got = Vec::new();
    for p in payloads {
        peer.send_to(p, to).unwrap();
        let mut at = None;
        wait_until(Duration::from_secs(5), "the datagram on one of the sockets", || {
            for (i, s) in socks.iter().enumerate() {
                let mut buf = [0u8; 2048];
                // SAFETY: receives into a local buffer of its length.
                let n = unsafe { libc::recv(s.raw(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n >= 0 {
                    assert_eq!(&buf[..n as usize], &p[..], "another datagram than the one sent");
                    at = Some(i);
                    return true;
                }
            }
            false
        });
        got.push(at.unwrap());
    }
    got
}

/// Both directions of a flow: (there, back).
fn flow_pair(proto: u8, k: u16) -> (Vec<u8>, Vec<u8>) {
    let a = SocketAddrV4::new(pod_ip(0), 40_000 + 2 * k);
    let b = SocketAddrV4::new(pod_ip(1), 5201);
    let mut there = packet::build_udp(a, b, b"there");
    let mut back = packet::build_udp(b, a, b"back");
    for p in [&mut there, &mut back] {
        p[9] = proto;
    }
    (there, back)
}

#[test]
fn received_datagrams_spread_over_the_workers_by_inner_flow() {
    if !require_root() {
        return;
    }
    use flanneld_rs::udp::{sock, steer};
    let c = Cluster::new(2).unwrap();
    // One socket for the whole test: a socket closed while another test's
    // thread forks is held open by the child until it execs, so binding
    // the port again at once could fail.
    let peer = c.node(1).ns.in_thread(|| UdpSocket::bind((underlay(1), 8285))).unwrap();
    let socks: Vec<sock::UdpSocket> =
        c.node(0).ns.in_thread(|| (0..4).map(|_| sock::UdpSocket::bind(underlay(0), 8285).unwrap()).collect());
    let mut flows = Vec::new();
    for k in 0..24 {
        flows.push(flow_pair(libc::IPPROTO_TCP as u8, k));
        // Other ports than the TCP flows': the protocol is not hashed.
        flows.push(flow_pair(libc::IPPROTO_UDP as u8, k + 24));
    }
    let there: Vec<Vec<u8>> = flows.iter().map(|f| f.0.clone()).collect();
    let back: Vec<Vec<u8>> = flows.iter().map(|f| f.1.clone()).collect();
    // The kernel alone: one peer, one port, so one socket for everything.
    let plain = landings(&peer, &socks, &there);
    assert!(plain.iter().all(|&s| s == plain[0]), "without the program one peer spread: {plain:?}");

    steer::attach(socks[0].raw(), &steer::Table::spread(4), 0).unwrap();
    let (t, b) = (landings(&peer, &socks, &there), landings(&peer, &socks, &back));
    assert_eq!(t, b, "a flow's two directions landed on different sockets");
    for s in 0..4 {
        assert!(t.contains(&s), "socket {s} got none of 48 flows: {t:?}");
    }

    // A packet's fragments stay together: the first (MF, with the ports)
    // and a later one (an offset; what stands where the ports were is data).
    let (mut first, _) = flow_pair(libc::IPPROTO_UDP as u8, 3);
    first[6] = 0x20;
    let mut later = first.clone();
    later[6..8].copy_from_slice(&[0, 185]);
    later[20..24].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let frags = landings(&peer, &socks, &[first, later]);
    assert_eq!(frags[0], frags[1], "a packet's fragments landed on different sockets");

    // What is not IPv4 (or too short to say) is still delivered.
    landings(&peer, &socks, &[vec![0x60, 0, 0, 0, 0, 8, 17, 64], vec![0x45]]);

    // A new table takes over the running group at once: every bucket but
    // the first flow's to socket 2, that one to socket 1.
    let mut table = steer::Table::spread(4);
    let first = steer::bucket(steer::flow_key(&there[0]).unwrap());
    for b in 0..steer::BUCKETS {
        table.set(b, if b == first { 1 } else { 2 });
    }
    steer::attach(socks[0].raw(), &table, 0).unwrap();
    let t = landings(&peer, &socks, &there);
    let want: Vec<usize> =
        there.iter().map(|p| if steer::bucket(steer::flow_key(p).unwrap()) == first { 1 } else { 2 }).collect();
    assert_eq!(t, want);
}

/// A sink in node 1's pod: reads and drops whatever arrives on every
/// stream to `port`, until dropped.
struct Sink {
    addr: SocketAddr,
    /// Shared with the accepting thread, so that its descriptor stays
    /// valid until the drop shuts it down.
    listener: std::sync::Arc<TcpListener>,
    from: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn new(o: &Overlay, port: u16) -> Sink {
        let addr = SocketAddr::from((pod_ip(1), port));
        let listener = std::sync::Arc::new(o.pods[1].in_thread(|| TcpListener::bind(addr)).unwrap());
        let accepting = listener.clone();
        let from = std::thread::spawn(move || {
            // Ends when the listener is shut down (accept fails).
            while let Ok((mut s, _)) = accepting.accept() {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while s.read(&mut buf).is_ok_and(|n| n > 0) {}
                });
            }
        });
        Sink { addr, listener, from: Some(from) }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: our listener's descriptor, open while `self` holds it.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.from.take() {
            let _ = t.join();
        }
    }
}

/// Node 0's pod opens TCP streams to `sink` until it has `n` whose flows
/// sit in different buckets that `Table::spread(2)` gives worker 0.
fn streams_on_worker_zero(o: &Overlay, n: usize, sink: &Sink) -> Vec<TcpStream> {
    use flanneld_rs::udp::steer;
    let table = steer::Table::spread(2);
    let (mut kept, mut buckets) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let s = o.pods[0].in_thread(|| TcpStream::connect_timeout(&sink.addr, Duration::from_secs(5))).unwrap();
        let (SocketAddr::V4(local), SocketAddr::V4(remote)) = (s.local_addr().unwrap(), sink.addr) else {
            unreachable!()
        };
        let key = steer::flow_key(&packet::build_udp(local, remote, b"")).unwrap();
        let b = steer::bucket(key);
        if table.get(b) == 0 && !buckets.contains(&b) {
            buckets.push(b);
            kept.push(s);
            if kept.len() == n {
                return kept;
            }
        }
    }
    panic!("no {n} streams on worker 0 in 1000 tries");
}

#[test]
fn a_busy_worker_hands_flows_to_an_idle_one_both_ways() {
    if !require_root() {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    // Two workers per node, and four TCP streams that the hash alone puts
    // on worker 0 of both nodes (their two directions hash alike).
    let o = Overlay::build(&[Tuning::default(); 2], false, 2);
    assert!(o.dp(0).features().balance, "{:?}", o.dp(0).features());
    let sink = Sink::new(&o, 7400);
    let streams = streams_on_worker_zero(&o, 4, &sink);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let stop = stop.clone();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 1 << 16];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf).expect("write: the stream stalled or broke");
                }
            })
        })
        .collect();
    // The balancers move two of the four to worker 1: node 1's receives
    // them there, and node 0's sends them from there (its TUN follows the
    // queue that writes the streams' acknowledgements).
    let received = || o.dp(1).worker_stats().iter().map(|s| s.rx_bytes).collect::<Vec<_>>();
    let sent = || o.dp(0).worker_stats().iter().map(|s| s.tx_bytes).collect::<Vec<_>>();
    let (rx0, tx0) = (received(), sent());
    wait_until(Duration::from_secs(30), "worker 1 of both nodes to carry streams", || {
        received()[1] > rx0[1] + (32 << 20) && sent()[1] > tx0[1] + (32 << 20)
    });
    // From then on the two workers share the four streams: each side of
    // each node carries at least a quarter of the next 256 MB.
    let (rx1, tx1) = (received(), sent());
    wait_until(Duration::from_secs(60), "256 MB more", || {
        received().iter().sum::<u64>() > rx1.iter().sum::<u64>() + (256 << 20)
    });
    let (rx2, tx2) = (received(), sent());
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("a writer failed");
    }
    for (what, a, b) in [("node 1 received", &rx1, &rx2), ("node 0 sent", &tx1, &tx2)] {
        let d: Vec<u64> = (0..2).map(|w| b[w] - a[w]).collect();
        let total: u64 = d.iter().sum();
        assert!(d.iter().all(|&x| x >= total / 4), "{what} per worker: {d:?}");
    }
    for i in 0..2 {
        let s = o.dp(i).stats();
        assert!(s.flow_moves >= 1, "node {i}: {s:?}");
        assert_eq!((s.dropped_bad, s.send_errors, s.tun_write_errors), (0, 0, 0), "node {i}: {s:?}");
    }
    drop(sink);
}

/// Sends, through a [`TxBatch`], one GSO train of six segments (five of
/// 1000 bytes, then 300; each a 40-byte header from the batch's slot and
/// its payload), a packet as it is and five segments back to back in one
/// buffer (four of 1000 bytes, then 500), from node 0's port 9001 to node
/// 1's 9002; returns what was sent, the datagrams that arrived and what
/// the batch says about GSO.
fn send_train(
    tx_sock: &flanneld_rs::udp::sock::UdpSocket,
    rx: &UdpSocket,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Option<std::io::Error>) {
    use flanneld_rs::udp::sock::TxBatch;
    let to = u32::from(underlay(1));
    let mut tx = TxBatch::new(9002, true);
    let payloads: Vec<Vec<u8>> = [960, 960, 960, 960, 960, 260]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 37 + j) as u8).collect())
        .collect();
    let mut want = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        tx.reserve(tx_sock);
        let h = &mut tx.header()[..40];
        h.fill(i as u8);
        want.push([&h[..], &p[..]].concat());
        // SAFETY: `payloads` outlives the flush below.
        unsafe { tx.push(to, 40, p) };
    }
    let own = vec![0xabu8; 700];
    tx.reserve(tx_sock);
    // SAFETY: as above.
    unsafe { tx.push(to, 0, &own) };
    want.push(own.clone());
    // Segments back to back in one buffer (as gso::spread_in_place lays
    // them out): joined into one iovec per message, received as the same
    // datagrams. A new flow after two segments starts a second message
    // right where the first ends in memory; the two must stay apart.
    let run: Vec<u8> = (0..4500u32).map(|j| (j * 7 + 3) as u8).collect();
    for (k, seg) in run.chunks(1000).enumerate() {
        tx.set_flow(if k < 2 { 1 } else { 2 });
        tx.reserve(tx_sock);
        // SAFETY: as above.
        unsafe { tx.push(to, 0, seg) };
        want.push(seg.to_vec());
    }
    tx.flush(tx_sock);
    assert_eq!((tx.sent.packets, tx.sent.errors), (12, 0));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..want.len() {
        let n = rx.recv(&mut buf).expect("every datagram arrives");
        got.push(buf[..n].to_vec());
    }
    (want, got, tx.gso_failed.take())
}

#[test]
fn a_gso_train_goes_out_as_queued_and_one_by_one_when_refused() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(2).unwrap();
    // The sockets once for both sends: a socket closed while another
    // test's thread forks is held open by the child until it execs, so
    // binding the port again at once could fail.
    let rx = c.node(1).ns.in_thread(|| UdpSocket::bind((underlay(1), 9002))).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = c.node(0).ns.in_thread(|| flanneld_rs::udp::sock::UdpSocket::bind(underlay(0), 9001)).unwrap();
    let (want, got, failed) = send_train(&tx, &rx);
    assert!(failed.is_none(), "GSO refused: {failed:?}");
    assert_eq!(got, want);
    // With a segment larger than the path MTU the kernel refuses GSO
    // (EMSGSIZE): the train goes out datagram by datagram, each as it was
    // queued (and fragmented on the way).
    c.node(0).ns.run_ok("ip", &["link", "set", &c.node(0).underlay_if, "mtu", "900"]);
    let (want, got, failed) = send_train(&tx, &rx);
    assert!(failed.is_some(), "GSO was not refused with segments over the MTU");
    assert_eq!(got, want);
}
