//! The host-gw backend end to end: real etcd, real daemons on three nodes that
//! share one L2 underlay, pods plugged in by the real plugin, real traffic.
//! Per peer one route `<subnet> via <public IP> dev eth0`; nothing else.

use std::net::SocketAddr;
use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, Overlay};
use e2e_tests::stream::UdpStream;
use netns_fixtures::{require_root, wait_until};

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn wait_routes(o: &Overlay, i: usize) {
    wait_until(Duration::from_secs(10), &format!("node{i}'s host-gw routes to match etcd"), || {
        o.underlay_routes(i) == o.expected_underlay_routes(i)
    });
}

#[test]
fn host_gw_pods_talk_across_nodes_with_one_route_per_peer() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(3, HOST_GW);
    o.start_all();
    for i in 0..3 {
        wait_routes(&o, i);
        assert_eq!(o.underlay_routes(i).len(), 2, "node{i}");
        // No tunnel device, and the pods' MTU is the underlay's.
        let links = o.cluster.node(i).ns.ip_json(&["link", "show"]);
        assert!(!links.as_array().unwrap().iter().any(|l| l["ifname"] == "flannel.1"), "{links}");
        let env = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1500\n"), "{env}");
    }
    // The leases say host-gw with no backend data, as flannel writes them.
    let lease = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(0)]);
    let v: serde_json::Value = serde_json::from_str(lease.trim()).unwrap();
    assert_eq!((v["BackendType"].as_str(), &v["BackendData"]), (Some("host-gw"), &serde_json::Value::Null));

    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("h{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7200);
    // No encapsulation: the packet crosses the underlay with pod addresses.
    let route = o.cluster.node(0).ns.run_ok("ip", &["route", "get", &pods[1].1.to_string()]);
    assert!(route.contains("via 192.0.2.11 dev eth0"), "{route}");

    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn host_gw_node_leaving_stale_sweep_restart_and_diagnose() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(3, HOST_GW);
    o.start_all();
    for i in 0..3 {
        wait_routes(&o, i);
    }
    let (a, _) = o.add_pod(0, "tx");
    let (b, b_addr) = o.add_pod(1, "rx");

    // A restart of both daemons loses no datagram (the routes stay).
    let stream = UdpStream::start(&a, &b, SocketAddr::new(b_addr.into(), 9998));
    for _ in 0..2 {
        o.stop(0);
        o.stop(1);
        o.start(0);
        o.start(1);
        wait_routes(&o, 0);
    }
    stream.wait_flowing("traffic to keep flowing after the restarts");
    stream.stop_and_check_none_lost("across host-gw restarts");

    // Node 2 leaves while node 0's daemon is down; node 0 sweeps its route
    // when it comes back, and a route of ours that no lease explains too.
    let key2 = o.lease_key(2);
    o.stop(2);
    o.stop(0);
    etcdctl_ok(o.outside(), &["del", &key2]);
    wait_until(Duration::from_secs(10), "node1 to drop node2's route", || o.underlay_routes(1).len() == 1);
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("ip", &["route", "add", "10.244.99.0/24", "via", "192.0.2.50", "dev", "eth0"]);
    // Outside the cluster network: not ours, left alone.
    ns.run_ok("ip", &["route", "add", "172.31.0.0/24", "via", "192.0.2.50", "dev", "eth0"]);
    // The udp backend's device from a run before the switch to host-gw.
    for cmd in ["tuntap add flannel0 mode tun", "addr add 10.244.55.0/32 dev flannel0", "link set flannel0 up"] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    // diagnose on the stopped node names both stale routes.
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok);
    let text = report.to_string();
    assert!(text.contains("10.244.99.0/24") && text.contains(&format!("{}", o.subnet(2))), "{report}");
    assert!(text.contains("device flannel0 is an earlier backend's"), "{report}");
    o.start(0);
    wait_routes(&o, 0);
    assert_eq!(o.underlay_routes(0).len(), 1);
    let ns = &o.cluster.node(0).ns;
    assert!(ns.run_ok("ip", &["route", "show", "172.31.0.0/24"]).contains("via 192.0.2.50"));
    assert!(ns.ip(&["link", "show", "flannel0"]).is_err(), "flannel0 is left");
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");

    // A route deleted by hand comes back.
    let peer = o.expected_underlay_routes(0)[0].clone();
    let dst = peer.split(' ').next().unwrap().to_string();
    ns.run_ok("ip", &["route", "del", &dst]);
    wait_routes(&o, 0);
}

#[test]
fn host_gw_refuses_a_public_ip_off_the_interface_and_skips_peers_off_the_segment() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(2, HOST_GW);
    // A public IP the interface does not hold: a clear error at start.
    // (Without --iface flannel stops earlier: no interface holds it.)
    let out = o.daemon_command(0).args(["--public-ip", "203.0.113.5", "--iface", "eth0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host-gw") && err.contains("203.0.113.5") && err.contains("eth0"), "{err}");

    // A peer lease whose public IP is on another segment: reported, not programmed.
    let far = r#"{"PublicIP":"198.51.100.7","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#;
    etcdctl_ok(o.outside(), &["put", "/coreos.com/network/subnets/10.244.77.0-24", far]);
    o.start_all();
    wait_until(Duration::from_secs(10), "node0 to route to node1 only", || {
        o.underlay_routes(0) == [format!("{} via 192.0.2.11", o.subnet(1))]
    });
    let log = o.log(0);
    assert!(log.contains("198.51.100.7 is not on our segment 192.0.2.0/24"), "{log}");
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "a rejected lease is a note, not a fault: {report}");
    assert!(report.to_string().contains("not on our segment"), "{report}");
}
