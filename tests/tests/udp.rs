//! The udp backend end to end: real etcd, real daemons on three nodes, pods
//! plugged in by the real plugin, real traffic through `flannel0` and the
//! daemons' user-space data path.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use e2e_tests::overlay::{etcdctl_ok, Overlay};
use e2e_tests::stream::UdpStream;
use e2e_tests::{echo_server, http_get, metric, tcp_round_trip};
use flanneld_rs::udp::packet::build_udp;
use netns_fixtures::{require_root, wait_until, Netns};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const DAEMONSET_CAPS: &[&str] = &["setpriv", "--bounding-set=-all,+net_admin,+net_raw", "--"];
const HEALTH: &[&str] = &["--healthz-ip", "127.0.0.1", "--healthz-port", "9105"];

fn overlay(nodes: usize) -> Overlay {
    let mut o = Overlay::with_conf(nodes, UDP);
    for i in 0..nodes {
        o.set_flags(i, HEALTH);
    }
    o
}

/// A `/metrics` sample of node `i`'s daemon.
fn sample(o: &Overlay, i: usize, name: &str) -> f64 {
    let text = http_get(&o.cluster.node(i).ns, "127.0.0.1:9105".parse().unwrap(), "/metrics");
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in node{i}'s /metrics:\n{text}"))
}

/// flannel0 as `ip` sees it: IPv4 addresses, MTU, routes through it.
fn flannel0(ns: &Netns) -> (Vec<String>, u64, Vec<String>) {
    let link = ns.ip_json(&["-4", "addr", "show", "dev", "flannel0"]);
    let addrs = link[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    let routes = ns.ip_json(&["-4", "route", "show", "dev", "flannel0"]);
    let routes = routes.as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap().to_string()).collect();
    (addrs, link[0]["mtu"].as_u64().unwrap(), routes)
}

fn want_flannel0(o: &Overlay, i: usize) -> (Vec<String>, u64, Vec<String>) {
    (vec![format!("{}/32", o.subnet(i).network())], 1472, vec!["10.244.0.0/16".to_string()])
}

/// Every node's data path knows the other `n - 1` nodes.
fn wait_peers(o: &Overlay, n: usize) {
    for i in 0..n {
        wait_until(Duration::from_secs(10), &format!("node{i}'s udp peer table"), || {
            sample(o, i, "flannel_peers") == (n - 1) as f64
        });
    }
}

fn ping(pod: &Netns, to: Ipv4Addr, extra: &[&str]) -> (bool, String) {
    let out = pod.command("ping").args(["-c", "1", "-W", "2"]).args(extra).arg(to.to_string()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn udp_pods_talk_across_three_nodes_through_flannel0() {
    if !require_root() {
        return;
    }
    let mut o = overlay(3);
    // Node 0's daemon has only the capabilities the DaemonSet grants
    // (NET_ADMIN, NET_RAW): no setns, no CAP_SYS_ADMIN.
    o.set_wrapper(0, DAEMONSET_CAPS);
    o.start_all();
    wait_peers(&o, 3);
    for i in 0..3 {
        let ns = &o.cluster.node(i).ns;
        assert_eq!(flannel0(ns), want_flannel0(&o, i), "node{i}");
        let env = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1472\n"), "{env}");
        // flannel's udp mode has no VXLAN device and no per-peer routes.
        let links = ns.ip_json(&["link", "show"]);
        assert!(!links.as_array().unwrap().iter().any(|l| l["ifname"] == "flannel.1"), "{links}");
    }
    // The leases are flannel's: its udp backend writes neither a backend
    // type nor backend data.
    let lease = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(0)]);
    assert_eq!(lease.trim(), r#"{"PublicIP":"192.0.2.10","PublicIPv6":null}"#);

    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("u{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7300);
    let (a, b) = (&pods[0].0, pods[1].1);
    // The pod's MTU is the underlay's minus 28: the largest packet that does
    // not fragment crosses whole, one byte more is refused at the pod.
    assert!(a.run_ok("ip", &["link", "show", "eth0"]).contains("mtu 1472"));
    let (ok, text) = ping(a, b, &["-M", "do", "-s", "1444"]);
    assert!(ok, "1472-byte packet: {text}");
    let (ok, text) = ping(a, b, &["-M", "do", "-s", "1445"]);
    assert!(!ok && text.contains("message too long"), "1473-byte packet with DF: {text}");
    // Packets that need fragmentation go as fragments, and are reassembled.
    let (ok, text) = ping(a, b, &["-s", "4000"]);
    assert!(ok, "4028-byte packet: {text}");

    // A subnet no node owns: ICMP net unreachable at once, as flannel does.
    // (The nodes' subnets are the allocator's random picks: skip theirs.)
    let owned: Vec<_> = (0..3).map(|i| o.subnet(i)).collect();
    let free = (250..=254u8)
        .map(|x| Ipv4Addr::new(10, 244, x, 5))
        .find(|ip| !owned.iter().any(|s| s.contains(ip)))
        .expect("three nodes cannot own five subnets");
    let unreachable = sample(&o, 0, "flannel_udp_icmp_unreachable_total");
    let (ok, text) = ping(a, free, &[]);
    assert!(!ok && text.contains("Destination Net Unreachable"), "{text}");
    // Counted for this very ping (the worker publishes its counters after
    // the write: waited for, not sampled once).
    wait_until(Duration::from_secs(5), "the ICMP net unreachable to be counted", || {
        sample(&o, 0, "flannel_udp_icmp_unreachable_total") > unreachable
    });

    // A datagram forged by a host that is not a peer is dropped and counted;
    // the same datagram from a peer's address is delivered.
    let pod0 = pods[0].1;
    let listener = pods[0].0.in_thread(move || UdpSocket::bind((pod0, 9999))).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let forged = |what: &[u8]| build_udp(SocketAddrV4::new(b, 5555), SocketAddrV4::new(pod0, 9999), what);
    let node0 = SocketAddr::from(([192, 0, 2, 10], 8285));
    let before = sample(&o, 0, "flannel_udp_dropped_not_peer_total");
    let rogue = o.outside().in_thread(|| UdpSocket::bind("192.0.2.200:0")).unwrap();
    rogue.send_to(&forged(b"forged"), node0).unwrap();
    wait_until(Duration::from_secs(5), "the forged datagram to be counted", || {
        sample(&o, 0, "flannel_udp_dropped_not_peer_total") == before + 1.0
    });
    let peer = o.cluster.node(1).ns.in_thread(|| UdpSocket::bind("192.0.2.11:0")).unwrap();
    peer.send_to(&forged(b"genuine"), node0).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = listener.recv_from(&mut buf).expect("the peer's datagram is delivered");
    // The first datagram to arrive is the peer's: the forged one never did.
    assert_eq!(&buf[..n], b"genuine");

    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn udp_restart_device_loss_node_leaving_stale_sweep_and_diagnose() {
    if !require_root() {
        return;
    }
    let mut o = overlay(3);
    o.start_all();
    wait_peers(&o, 3);
    let (a, _) = o.add_pod(0, "ua");
    let (b, b_addr) = o.add_pod(1, "ub");
    let (_c, c_addr) = o.add_pod(2, "uc");

    // A daemon restart: traffic stops while the data path is down (nothing
    // reads the device) and resumes once it is back.
    let stream = UdpStream::start(&a, &b, SocketAddr::new(b_addr.into(), 9997));
    o.stop(1);
    let stopped = stream.received();
    let t0 = Instant::now();
    o.start(1);
    stream.wait_flowing("traffic to resume after node1's daemon restarted");
    eprintln!("restart: {} datagrams before, flowing again {:?} after the restart began", stopped, t0.elapsed());

    // The device deleted under a running daemon: the data path starts anew.
    o.cluster.node(1).ns.run_ok("ip", &["link", "del", "flannel0"]);
    stream.wait_flowing("traffic to resume after flannel0 was deleted");
    wait_until(Duration::from_secs(10), "node1's flannel0 to be back", || {
        o.cluster.node(1).ns.ip(&["link", "show", "flannel0"]).is_ok()
            && flannel0(&o.cluster.node(1).ns) == want_flannel0(&o, 1)
    });
    assert_eq!(sample(&o, 1, "flannel_udp_restarts_total"), 1.0);
    drop(stream);

    // Node 2 leaves while node 0's daemon is down.
    let key2 = o.lease_key(2);
    o.stop(2);
    o.stop(0);
    etcdctl_ok(o.outside(), &["del", &key2]);
    wait_until(Duration::from_secs(10), "node1 to forget node2", || sample(&o, 1, "flannel_peers") == 1.0);
    let (ok, text) = ping(&b, c_addr, &[]);
    assert!(!ok && text.contains("Destination Net Unreachable"), "{text}");

    // Stale state on the stopped node 0: an address of an earlier lease, a
    // wrong MTU, the Network route gone, a host-gw leftover on the underlay,
    // a next-hop route through flannel0, and the VXLAN backend's device with
    // a route (a node switched from vxlan). A route outside the Network is
    // not ours.
    let ns = &o.cluster.node(0).ns;
    for cmd in [
        "addr add 10.244.77.0/32 dev flannel0",
        "link set flannel0 mtu 1400",
        "route del 10.244.0.0/16 dev flannel0",
        "route add 10.244.99.0/24 via 192.0.2.50 dev eth0",
        "route add 172.31.0.0/24 via 192.0.2.50 dev eth0",
        "link add flannel.1 type vxlan id 1 dev eth0 dstport 8472",
        "addr add 10.244.55.0/32 dev flannel.1",
        "link set flannel.1 up",
        "route add 10.244.88.0/24 via 10.244.88.0 dev flannel.1 onlink",
        "route add 10.244.66.0/24 via 10.244.66.0 dev flannel0 onlink",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok, "{report}");
    let text = report.to_string();
    for want in [
        "10.244.77.0/32",
        "MTU 1400",
        "route 10.244.0.0/16 dev flannel0",
        "10.244.99.0/24",
        "10.244.66.0/24",
        "device flannel.1 is an earlier backend's",
    ] {
        assert!(text.contains(want), "diagnose does not mention {want}: {report}");
    }
    assert!(text.contains("nothing listens on UDP 192.0.2.10:8285"), "{report}");
    assert!(!text.contains("172.31.0.0/24"), "{report}");

    o.start(0);
    let ns = &o.cluster.node(0).ns;
    wait_until(Duration::from_secs(10), "node0's flannel0 to be repaired", || flannel0(ns) == want_flannel0(&o, 0));
    wait_until(Duration::from_secs(10), "node0's stale routes to go", || {
        let routes = ns.run_ok("ip", &["-4", "route", "show"]);
        !routes.contains("10.244.99.0/24") && !routes.contains("10.244.66.0/24")
    });
    // The VXLAN backend's device, with its routes, is gone.
    assert!(ns.ip(&["link", "show", "flannel.1"]).is_err(), "flannel.1 is left");
    assert!(!ns.run_ok("ip", &["-4", "route", "show"]).contains("10.244.88.0/24"));
    assert!(ns.run_ok("ip", &["route", "show", "172.31.0.0/24"]).contains("via 192.0.2.50"));
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
    // Node 0 came back without node 2's lease: it knows node 1 only.
    assert_eq!(sample(&o, 0, "flannel_peers"), 1.0);
    let (ok, text) = ping(&a, c_addr, &[]);
    assert!(!ok && text.contains("Destination Net Unreachable"), "{text}");
    let (ok, text) = ping(&a, b_addr, &[]);
    assert!(ok, "{text}");

    // The Network route deleted by hand under a running daemon comes back.
    ns.run_ok("ip", &["route", "del", "10.244.0.0/16", "dev", "flannel0"]);
    wait_until(Duration::from_secs(15), "node0's Network route to come back", || flannel0(ns) == want_flannel0(&o, 0));
}

#[test]
fn udp_refuses_a_taken_port_and_an_underlay_too_small() {
    if !require_root() {
        return;
    }
    let o = Overlay::with_conf(1, UDP);
    let ns = &o.cluster.node(0).ns;
    // Another program holds the port: a clear error, and nothing left behind.
    let holder = ns.in_thread(|| UdpSocket::bind("192.0.2.10:8285")).unwrap();
    let out = o.daemon_command(0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("udp data path") && err.contains("8285"), "{err}");
    drop(holder);
    assert!(ns.ip(&["link", "show", "flannel0"]).is_err(), "a refused start left flannel0 behind: {err}");
    // An underlay MTU that leaves no room for 28 bytes of encapsulation (on a
    // second interface: etcd stays reachable through eth0).
    for cmd in [
        "link add tiny0 mtu 90 type veth peer name tiny1 mtu 90",
        "addr add 198.51.100.1/24 dev tiny0",
        "link set tiny0 up",
        "link set tiny1 up",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let out = o.daemon_command(0).args(["--iface", "tiny0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("MTU 90") && err.contains("tiny0") && err.contains("udp"), "{err}");
    assert!(ns.ip(&["link", "show", "flannel0"]).is_err(), "a refused start left flannel0 behind");
}

#[test]
fn udp_in_kubernetes_mode() {
    if !require_root() || !e2e_tests::kube::require_kube() {
        return;
    }
    let mut ko = e2e_tests::kube::KubeOverlay::with_conf(2, UDP);
    for i in 0..2 {
        let mut flags = ko.o.flags(i);
        flags.extend(HEALTH.iter().map(|s| s.to_string()));
        ko.o.set_flags(i, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        ko.create_node(i);
    }
    ko.o.start_all();
    wait_peers(&ko.o, 2);
    // The Node carries flannel's udp annotations: no backend data.
    let node = ko.api.get_json(&["node", "node0"]);
    let a = &node["metadata"]["annotations"];
    let prefix = e2e_tests::kube::PREFIX;
    // flannel's udp backend sets no type: the annotation is empty.
    assert_eq!(a[format!("{prefix}/backend-type")], "", "{a}");
    assert_eq!(a[format!("{prefix}/backend-data")], "null", "{a}");
    assert_eq!(flannel0(&ko.o.cluster.node(1).ns), want_flannel0(&ko.o, 1));
    let (a, _) = ko.o.add_pod(0, "ka");
    let (b, b_addr) = ko.o.add_pod(1, "kb");
    let target = SocketAddr::new(b_addr.into(), 7400);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    server.join().unwrap();
    let (ok, report) = ko.o.diagnose(1, &[]);
    assert!(ok, "{report}");
}
