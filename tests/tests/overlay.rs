//! The overlay end to end: a real etcd, real flanneld-rs daemons on three
//! nodes in namespaces, pods plugged in by the real plugin, real traffic.

use std::net::SocketAddr;
use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, leases, Overlay};
use e2e_tests::stream::UdpStream;
use e2e_tests::{echo_server, http_get, tcp_round_trip};
use netns_fixtures::{require_root, wait_until};
use serde_json::Value;

#[test]
fn pods_on_every_node_reach_pods_on_every_other_node_and_state_is_exact() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(3);
    o.start_all();
    for i in 0..3 {
        o.wait_converged(i);
        assert_eq!(o.vtep_state(i).routes.len(), 2, "node{i}: {:?}", o.vtep_state(i));
    }
    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("p{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7000);
    // Each node's flannel.1 in detail: address, MTU, VNI, port, learning off.
    let link = &o.cluster.node(0).ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
    assert_eq!(link["mtu"], 1450);
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["learning"], false);
    assert_eq!(info["local"], "192.0.2.10");
    let addrs = o.cluster.node(0).ns.ip_json(&["-4", "addr", "show", "dev", "flannel.1"]);
    let s0 = o.subnet(0);
    assert_eq!(addrs[0]["addr_info"][0]["local"], s0.network().to_string());
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);
}

#[test]
fn a_leaving_node_is_removed_and_stale_entries_are_swept_on_restart() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(3);
    o.start_all();
    for i in 0..3 {
        o.wait_converged(i);
    }
    // Node 2 leaves: daemon stopped, lease deleted. Node 1 sees it go.
    let key2 = o.lease_key(2);
    o.stop(2);
    // Meanwhile node 0's daemon is down too: it must not miss the delete.
    o.stop(0);
    etcdctl_ok(o.outside(), &["del", &key2]);
    wait_until(Duration::from_secs(10), "node1 to drop node2's entries", || o.vtep_state(1).routes.len() == 1);
    o.wait_converged(1);
    // flannel leaks these; we sweep them when the daemon comes back.
    assert_eq!(o.vtep_state(0).routes.len(), 2, "node0's kernel changed while its daemon was down");
    o.start(0);
    o.wait_converged(0);
    assert_eq!(o.vtep_state(0).routes.len(), 1);
}

#[test]
fn a_daemon_restart_loses_no_packet() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let (a, _) = o.add_pod(0, "tx");
    let (b, b_addr) = o.add_pod(1, "rx");
    let stream = UdpStream::start(&a, &b, SocketAddr::new(b_addr.into(), 9999));
    // What a restart must keep, read from the kernel and from etcd: each
    // node's flannel.1 (its interface index), and its lease (the etcd key,
    // never deleted and created again: its create revision).
    let kept = |o: &Overlay| -> Vec<(Value, String, Value)> {
        (0..2)
            .map(|i| {
                let link = o.cluster.node(i).ns.ip_json(&["link", "show", "flannel.1"]);
                let public_ip = format!("192.0.2.{}", 10 + i);
                let (key, _) = leases(o.outside())
                    .into_iter()
                    .find(|(_, v)| v["PublicIP"] == public_ip.as_str())
                    .unwrap_or_else(|| panic!("no lease in etcd for {public_ip}"));
                let kv: Value = serde_json::from_str(&etcdctl_ok(o.outside(), &["get", &key, "-w", "json"])).unwrap();
                (link[0]["ifindex"].clone(), key, kv["kvs"][0]["create_revision"].clone())
            })
            .collect()
    };
    let before = kept(&o);
    for _ in 0..2 {
        o.stop(0);
        o.stop(1);
        o.start(0);
        o.start(1);
        o.wait_converged(0);
    }
    // The restarts adopted the kernel state and the leases instead of
    // rebuilding them.
    assert_eq!(kept(&o), before, "(flannel.1's ifindex, lease key, its create revision) of node0 and node1");
    stream.wait_flowing("traffic to keep flowing after the restarts");
    stream.stop_and_check_none_lost("across restarts");
    // And the daemon says so.
    assert!(o.log(0).contains("reusing lease"), "{}", o.log(0));
}

#[test]
fn entries_and_the_device_deleted_by_hand_come_back_and_traffic_resumes() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let (a, _) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let ns = &o.cluster.node(0).ns;
    let s1 = o.subnet(1);
    let state = o.vtep_state(0);
    let mac = state.fdbs[0].split(' ').next().unwrap().to_string();
    let faults: Vec<Vec<String>> = vec![
        vec!["ip".into(), "route".into(), "del".into(), s1.to_string()],
        vec!["ip".into(), "neigh".into(), "del".into(), s1.network().to_string(), "dev".into(), "flannel.1".into()],
        vec![
            "bridge".into(),
            "fdb".into(),
            "del".into(),
            mac.clone(),
            "dev".into(),
            "flannel.1".into(),
            "dst".into(),
            "192.0.2.11".into(),
        ],
        vec!["ip".into(), "link".into(), "del".into(), "flannel.1".into()],
    ];
    for (n, fault) in faults.iter().enumerate() {
        let args: Vec<&str> = fault[1..].iter().map(String::as_str).collect();
        // Read back from the kernel (`ip -j`, `bridge -j`), then shown with traffic.
        o.assert_repaired_on_notification(
            0,
            &format!("{fault:?}"),
            || {
                ns.run_ok(&fault[0], &args);
            },
            || o.vtep_state(0) == o.expected_state(0),
        );
        let port = 8100 + n as u16;
        let target = SocketAddr::new(b_addr.into(), port);
        let server = echo_server(&b, target);
        assert_eq!(tcp_round_trip(&a, target), "ping\n", "after {fault:?}");
        server.join().unwrap();
    }
}

#[test]
fn a_peer_whose_vtep_mac_changes_gets_its_old_fdb_entry_removed() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    let (a, _) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let old = o.vtep_state(0).fdbs.clone();
    // Node 1 loses its VTEP and its lease (as after a reinstall): it comes
    // back with a new MAC, in the same subnet (from its subnet.env).
    let subnet_before = o.subnet(1);
    let key = o.lease_key(1);
    let env = std::fs::read(&o.daemons[1].subnet_file).unwrap();
    o.stop(1);
    o.cluster.node(1).ns.run_ok("ip", &["link", "del", "flannel.1"]);
    etcdctl_ok(o.outside(), &["del", &key]);
    // Keep the old subnet.env so the node asks for the same subnet again.
    let keep = o.dir.path().join("keep.env");
    std::fs::write(&keep, &env).unwrap();
    o.daemons[1].subnet_file = keep;
    o.start(1);
    assert_eq!(o.subnet(1), subnet_before);
    o.wait_converged(0);
    let new = o.vtep_state(0).fdbs.clone();
    assert_eq!(new.len(), 1);
    assert_ne!(new, old, "the MAC did not change");
    let target = SocketAddr::new(b_addr.into(), 8200);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    server.join().unwrap();
}

#[test]
fn masquerade_hides_pods_from_the_outside_but_not_from_each_other() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.set_flags(0, &["--ip-masq"]);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let (a, a_addr) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let out = SocketAddr::from(([192, 0, 2, 200], 9300));
    let server = echo_server(o.outside(), out);
    assert_eq!(tcp_round_trip(&a, out), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "192.0.2.10", "the outside host must see the node's address");
    let target = SocketAddr::new(b_addr.into(), 9301);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    assert_eq!(
        server.join().unwrap().ip(),
        std::net::IpAddr::V4(a_addr),
        "pod-to-pod traffic must keep the pod's address"
    );
    // The rules live in flannel's chain, and subnet.env says the daemon masquerades.
    let chain = o.cluster.node(0).ns.run_ok("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert!(chain.contains("-j MASQUERADE --random-fully"), "{chain}");
    let env = std::fs::read_to_string(&o.daemons[0].subnet_file).unwrap();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
}

#[test]
fn twenty_daemons_racing_for_leases_get_twenty_distinct_subnets() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(
        20,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMax":"10.244.40.0","Backend":{"Type":"vxlan"}}"#,
    );
    // Start all at once, then wait for each.
    for i in 0..20 {
        let log = std::fs::File::create(&o.daemons[i].log).unwrap();
        let child = o.daemon_command(i).stdout(std::process::Stdio::null()).stderr(log).spawn().unwrap();
        o.daemons[i].proc = e2e_tests::overlay::Proc(Some(child));
    }
    for i in 0..20 {
        let p = o.daemons[i].subnet_file.clone();
        wait_until(Duration::from_secs(30), &format!("node{i}'s subnet.env"), || p.exists());
    }
    let subnets: std::collections::BTreeSet<_> = (0..20).map(|i| o.subnet(i)).collect();
    assert_eq!(subnets.len(), 20, "{subnets:?}");
    assert_eq!(leases(o.outside()).len(), 20);
}

#[test]
fn pod_traffic_survives_an_etcd_outage_and_the_daemon_recovers() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(3);
    o.start(0);
    o.start(1);
    o.wait_converged(0);
    let (a, _) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let outside = o.cluster.outside().unwrap();
    o.etcd.stop();
    // The outage itself: 30 s without etcd, with traffic checked every 10 s.
    for n in 0..3 {
        std::thread::sleep(Duration::from_secs(10));
        let target = SocketAddr::new(b_addr.into(), 8400 + n);
        let server = echo_server(&b, target);
        assert_eq!(tcp_round_trip(&a, target), "ping\n", "during the etcd outage");
        server.join().unwrap();
    }
    o.etcd.restart(outside);
    // The daemon is still there and sees a node that joins after the outage.
    o.start(2);
    o.wait_converged(0);
    assert_eq!(o.vtep_state(0).routes.len(), 2);
    assert!(o.daemons[0].proc.0.as_mut().unwrap().try_wait().unwrap().is_none(), "node0's daemon died: {}", o.log(0));
}

#[test]
fn diagnose_is_quiet_on_a_healthy_node_and_names_each_injected_fault() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(3);
    o.set_flags(0, &["--ip-masq"]);
    o.start_all();
    for i in 0..3 {
        o.wait_converged(i);
    }
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v}");
    assert_eq!(v["findings"], serde_json::json!([]), "{v}");
    // Stop the daemon (state stays) so that faults are not repaired.
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    let (s1, s2) = (o.subnet(1), o.subnet(2));
    ns.run_ok("ip", &["route", "del", &s1.to_string()]);
    ns.run_ok(
        "ip",
        &[
            "neigh",
            "replace",
            &s2.network().to_string(),
            "lladdr",
            "02:11:22:33:44:55",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    );
    ns.run_ok(
        "bridge",
        &["fdb", "append", "02:aa:bb:cc:dd:ee", "dev", "flannel.1", "dst", "192.0.2.99", "self", "permanent"],
    );
    ns.run_ok("ip", &["link", "set", "flannel.1", "mtu", "1400"]);
    ns.run_ok("iptables", &["-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    let env =
        std::fs::read_to_string(&o.daemons[0].subnet_file).unwrap().replace("FLANNEL_MTU=1450", "FLANNEL_MTU=1300");
    std::fs::write(&o.daemons[0].subnet_file, env).unwrap();
    let (ok, v) = o.diagnose(0, &[]);
    assert!(!ok, "{v}");
    let text = v["findings"].to_string();
    for want in [
        format!("route {s1} via {} dev flannel.1 onlink is missing", s1.network()),
        format!("neighbour {} on flannel.1 has MAC 02:11:22:33:44:55", s2.network()),
        "FDB entry 02:aa:bb:cc:dd:ee dst 192.0.2.99 on flannel.1 belongs to no lease".to_string(),
        "flannel.1 has MTU 1400, want 1450".to_string(),
        // The JSON text escapes the comment's quotes: the part before them.
        "iptables rule `-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment ".to_string(),
        "mtu 1300".to_string(),
    ] {
        assert!(text.contains(&want), "diagnose does not say {want:?}: {v:#}");
    }
    // Starting the daemon repairs all of it.
    o.start(0);
    o.wait_converged(0);
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v}");
}

#[test]
fn direct_routing_reaches_peers_on_the_same_segment_without_the_tunnel() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::with_conf(2, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#);
    o.start_all();
    let s1 = o.subnet(1);
    let ns = &o.cluster.node(0).ns;
    let want = format!("{s1} via 192.0.2.11 dev eth0");
    wait_until(Duration::from_secs(10), "node0's direct route to node1", || {
        ns.ip_json(&["route", "show", &s1.to_string()]).to_string().contains("192.0.2.11")
    });
    let r = &ns.ip_json(&["route", "show", &s1.to_string()])[0];
    assert_eq!(
        format!(
            "{} via {} dev {}",
            r["dst"].as_str().unwrap(),
            r["gateway"].as_str().unwrap(),
            r["dev"].as_str().unwrap()
        ),
        want
    );
    // No tunnel entries for a peer reached directly.
    let st = o.vtep_state(0);
    assert!(st.fdbs.is_empty() && st.neighs.is_empty() && st.routes.is_empty(), "{st:?}");
    let (a, _) = o.add_pod(0, "a");
    let (b, b_addr) = o.add_pod(1, "b");
    let target = SocketAddr::new(b_addr.into(), 8500);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    server.join().unwrap();
    // A direct route deleted by hand comes back too; diagnose agrees.
    o.assert_repaired_on_notification(
        0,
        "the direct route",
        || {
            ns.run_ok("ip", &["route", "del", &s1.to_string()]);
        },
        || ns.ip_json(&["route", "show", &s1.to_string()]).to_string().contains("192.0.2.11"),
    );
    let (ok, v) = o.diagnose(0, &[]);
    assert!(ok, "{v}");
}

/// Sends `GET path` to `addr` from inside `ns`; returns the whole response.
#[test]
fn health_metrics_firewall_resync_and_bad_leases() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.set_flags(0, &["--ip-masq", "--healthz-ip", "127.0.0.1", "--healthz-port", "9102", "--iptables-resync", "1"]);
    // A lease with a bad MAC and one with a loopback public IP, beside a good peer.
    let out = o.outside();
    etcdctl_ok(
        out,
        &[
            "put",
            "/coreos.com/network/subnets/10.244.250.0-24",
            r#"{"PublicIP":"192.0.2.50","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"not-a-mac"}}"#,
        ],
    );
    etcdctl_ok(
        out,
        &[
            "put",
            "/coreos.com/network/subnets/10.244.251.0-24",
            r#"{"PublicIP":"127.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:51"}}"#,
        ],
    );
    o.start_all();
    wait_until(Duration::from_secs(10), "node0 to program node1 only", || o.vtep_state(0).routes.len() == 1);
    let log = o.log(0);
    assert!(
        log.contains("10.244.250.0-24") && log.contains("not-a-mac"),
        "the bad MAC is not named in the log:\n{log}"
    );
    assert!(
        log.contains("10.244.251.0-24") && log.contains("127.0.0.1"),
        "the loopback lease is not named in the log:\n{log}"
    );

    let ns = &o.cluster.node(0).ns;
    let addr = SocketAddr::from(([127, 0, 0, 1], 9102));
    assert!(http_get(ns, addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(ns, addr, "/readyz").starts_with("HTTP/1.1 200"));
    let metrics = http_get(ns, addr, "/metrics");
    for want in [
        "flannel_peers 1",
        "flannel_ready 1",
        "flannel_reconcile_runs_total",
        "flannel_netlink_errors_total 0",
        "flannel_lease_renewals_total",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }
    assert!(http_get(ns, addr, "/nope").starts_with("HTTP/1.1 404"));

    // flannel's masquerade chain emptied by hand is filled again within --iptables-resync.
    let full = ns.run_ok("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert_eq!(full.lines().count(), 6, "{full}");
    ns.run_ok("iptables", &["-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    wait_until(Duration::from_secs(5), "the masquerade rules to be re-asserted", || {
        ns.run_ok("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]) == full
    });
    // The bad leases never reached the kernel; the good one did.
    let st = o.vtep_state(0);
    let bad = ["10.244.250.", "10.244.251.", "192.0.2.50", "127.0.0.1"];
    assert_eq!(st, o.expected_state(0).clone_without(&bad), "{st:?}");
}

/// A host whose forwarding is closed, as Docker leaves it (iptables'
/// FORWARD policy DROP): without flannel's accept rules pods cannot reach
/// each other across nodes; the daemon makes flannel's chain FLANNEL-FWD
/// with a jump to it first in FORWARD, and puts them back when removed.
#[test]
fn forward_rules_open_a_closed_iptables_forward_chain() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    for i in 0..2 {
        o.cluster.node(i).ns.run_ok("iptables", &["-P", "FORWARD", "DROP"]);
        o.set_flags(i, &["--iptables-forward-rules=false"]);
    }
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    let (a, _) = o.add_pod(0, "fa");
    let (_b, b_addr) = o.add_pod(1, "fb");
    let ping = |a: &netns_fixtures::Netns| {
        a.command("ping").args(["-c", "1", "-W", "1", &b_addr.to_string()]).status().unwrap().success()
    };
    assert!(!ping(&a), "the closed FORWARD chain lets pod traffic through: the test shows nothing");
    let ns = &o.cluster.node(0).ns;
    assert!(!ns.run_ok("iptables-save", &["-t", "filter"]).contains("FLANNEL-FWD"));

    for i in 0..2 {
        o.stop(i);
        o.set_flags(i, &["--iptables-resync", "1"]);
        o.start(i);
    }
    assert!(ping(&a), "pod traffic is still dropped with the forward rules");
    let ns = &o.cluster.node(0).ns;
    let forward = ns.run_ok("iptables", &["-S", "FORWARD"]);
    assert_eq!(
        forward, "-P FORWARD DROP\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n",
        "{forward}"
    );
    let ours = ns.run_ok("iptables", &["-S", "FLANNEL-FWD"]);
    assert_eq!(
        ours,
        "-N FLANNEL-FWD\n\
         -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n"
    );
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");

    // Flushed by hand (`iptables -F FORWARD`) while the daemon is down:
    // diagnose names the missing jump.
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("iptables", &["-F", "FORWARD"]);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok && report.to_string().contains("-j FLANNEL-FWD` (table filter) is missing"), "{report}");
    o.start(0);
    // Flushed while it runs: back within --iptables-resync.
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("iptables", &["-F", "FORWARD"]);
    wait_until(Duration::from_secs(10), "the forward rules to be re-asserted", || {
        ns.run_ok("iptables", &["-S", "FORWARD"]) == forward
    });
    assert!(ping(&a));

    // Turned off again: the next start takes flannel's chain out (flannel
    // itself would leave it).
    o.stop(0);
    o.set_flags(0, &["--iptables-forward-rules=false"]);
    o.start(0);
    let ns = &o.cluster.node(0).ns;
    assert!(!ns.run_ok("iptables-save", &["-t", "filter"]).contains("FLANNEL-FWD"));
}

/// The underlay interface deleted and added again (another ifindex; the
/// kernel deletes a VTEP with its underlay), then its address changed: the
/// VTEP is made again on the new interface, every peer is programmed again,
/// and the new address is advertised in the lease and used by the peers.
#[test]
fn the_underlay_deleted_re_added_and_readdressed_is_followed() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(3);
    o.start_all();
    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("u{i}"))).collect();
    for i in 0..3 {
        o.wait_converged(i);
    }
    let ns = &o.cluster.node(0).ns;
    let ifindex = |name: &str| -> Option<u64> {
        ns.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifname"] == name)
            .map(|l| l["ifindex"].as_u64().unwrap())
    };
    let (eth0_before, vtep_before) = (ifindex("eth0").unwrap(), ifindex("flannel.1").unwrap());

    // Deleted: the kernel takes flannel.1 with it.
    ns.run_ok("ip", &["link", "del", "eth0"]);
    wait_until(Duration::from_secs(10), "flannel.1 to go with eth0", || ifindex("flannel.1").is_none());
    // Added again, as the fixture plugs a node in.
    let switch = o.cluster.switch();
    switch.run_ok("ip", &["link", "add", "p-n0", "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
    switch.run_ok("ip", &["link", "set", "p-n0", "master", "br0", "up"]);
    for cmd in ["addr add 192.0.2.10/24 dev eth0", "link set eth0 up", "route add default via 192.0.2.1 dev eth0"] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let eth0_after = ifindex("eth0").unwrap();
    assert_ne!(eth0_before, eth0_after);
    wait_until(Duration::from_secs(30), "flannel.1 to be made again on the new eth0 with every peer", || {
        ifindex("flannel.1").is_some() && o.vtep_state(0) == o.expected_state(0)
    });
    assert_ne!(ifindex("flannel.1"), Some(vtep_before));
    let link = &ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
    assert_eq!(link["linkinfo"]["info_data"]["link"], "eth0", "{link}");
    assert_eq!(link["linkinfo"]["info_data"]["local"], "192.0.2.10", "{link}");
    e2e_tests::all_pods_talk(&pods, 7400);

    // Readdressed: 192.0.2.10 -> 192.0.2.30 (no --public-ip: the lease follows).
    let mac = link["address"].as_str().unwrap().to_string();
    for cmd in [
        "addr del 192.0.2.10/24 dev eth0",
        "addr add 192.0.2.30/24 dev eth0",
        "route add default via 192.0.2.1 dev eth0",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let key = o.lease_key(0);
    wait_until(Duration::from_secs(30), "node0's lease to advertise 192.0.2.30", || {
        leases(o.outside()).get(&key).is_some_and(|v| v["PublicIP"] == "192.0.2.30")
    });
    for i in 1..3 {
        let peer_ns = &o.cluster.node(i).ns;
        wait_until(Duration::from_secs(30), "the peers' FDB entry for node0 to point to 192.0.2.30", || {
            peer_ns
                .bridge_json(&["fdb", "show", "dev", "flannel.1"])
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["mac"].as_str() == Some(mac.as_str()) && f["dst"] == "192.0.2.30")
        });
    }
    // The VTEP's local address is fixed at creation: it is made anew.
    wait_until(Duration::from_secs(30), "flannel.1 to send from 192.0.2.30", || {
        ifindex("flannel.1").is_some()
            && ns
                .ip_json(&["-d", "link", "show"])
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["ifname"] == "flannel.1" && l["linkinfo"]["info_data"]["local"] == "192.0.2.30")
    });
    for i in 1..3 {
        wait_until(Duration::from_secs(30), "every peer to converge", || o.vtep_state(i) == o.expected_state(i));
    }
    let others = || {
        leases(o.outside()).into_iter().filter(|(k, _)| *k != key).map(|(k, v)| {
            let tail = k.rsplit('/').next().unwrap().replacen('-', "/", 1);
            (
                tail,
                v["BackendData"]["VtepMAC"].as_str().unwrap().to_string(),
                v["PublicIP"].as_str().unwrap().to_string(),
            )
        })
    };
    wait_until(Duration::from_secs(30), "node0 to converge", || o.vtep_state(0) == o.expected_state_for(0, others()));
    e2e_tests::all_pods_talk(&pods, 7500);
}
