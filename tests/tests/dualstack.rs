//! Dual-stack overlays end to end: a real etcd, real flanneld-rs daemons on
//! nodes of a dual-stack underlay (192.0.2.0/24 and 2001:db8::/64), pods
//! plugged in by the real plugin with an address of each family, real
//! traffic over IPv4 and over IPv6, and the kernel state of each family read
//! back exactly: `flannel.1` and `flannel-v6.1` for VXLAN, routes via the
//! peer's `PublicIP` / `PublicIPv6` for host-gw.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, leases, Overlay, NET_CONF_DUAL, VXLAN6_DEV};
use e2e_tests::stream::UdpStream;
use e2e_tests::{echo_server, tcp_round_trip};
use netns_fixtures::{echo, echo_server_until_closed, require_root, tcp_connect, wait_until, Netns};
use serde_json::Value;

const HOST_GW_DUAL: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"host-gw"}}"#;

/// The global addresses of `dev` in `ns` of one family (`-4`/`-6`), as
/// `addr/len`.
fn addrs(ns: &Netns, family: &str, dev: &str) -> Vec<String> {
    ns.ip_json(&[family, "addr", "show", "dev", dev, "scope", "global"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        // `ip -j` lists an address a filter drops as `{}`.
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

/// A dual-stack pod on each of `o`'s nodes, as `all_pods_talk_ips` wants them.
fn dual_pods(o: &Overlay, prefix: &str) -> Vec<(Netns, Vec<IpAddr>)> {
    (0..o.daemons.len())
        .map(|i| {
            let (ns, v4, v6) = o.add_dual_pod(i, &format!("{prefix}{i}"));
            (ns, vec![IpAddr::V4(v4), IpAddr::V6(v6)])
        })
        .collect()
}

fn all_talk(pods: &[(Netns, Vec<IpAddr>)], port_base: u16) {
    let refs: Vec<(&Netns, Vec<IpAddr>)> = pods.iter().map(|(ns, a)| (ns, a.clone())).collect();
    e2e_tests::all_pods_talk_ips(&refs, port_base);
}

/// Checks node `i`'s lease in etcd and subnet.env against its subnets.
fn check_lease_and_subnet_env(o: &Overlay, i: usize, backend: &str) {
    let s6 = o.subnet6(i).unwrap_or_else(|| panic!("node{i}'s subnet.env has no FLANNEL_IPV6_SUBNET"));
    assert_eq!(s6.prefix_len(), 64, "IPv6SubnetLen defaults to 64");
    assert!("2001:db8:10::/56".parse::<ipnet::Ipv6Net>().unwrap().contains(&s6), "{s6}");
    assert_eq!(o.subnet_env(i, "FLANNEL_IPV6_NETWORK").as_deref(), Some("2001:db8:10::/56"));
    let key = o.lease_key(i);
    let all = leases(o.outside());
    let v = all.get(&key).unwrap_or_else(|| panic!("no lease {key} in etcd: {:?}", all.keys()));
    let node = o.cluster.node(i);
    assert_eq!(v["PublicIP"], node.underlay_ip.to_string(), "{key}: {v}");
    assert_eq!(v["PublicIPv6"], node.underlay_ipv6.unwrap().to_string(), "{key}: {v}");
    assert_eq!(v["BackendType"], backend, "{key}: {v}");
    if backend == "vxlan" {
        assert_eq!(v["BackendV6Data"]["VNI"], 1, "{key}: {v}");
        assert!(v["BackendV6Data"]["VtepMAC"].is_string(), "{key}: {v}");
    } else {
        assert!(v.get("BackendV6Data").is_none_or(Value::is_null), "{key}: {v}");
    }
}

#[test]
fn vxlan_dual_stack_pods_reach_every_pod_over_both_families_and_state_is_exact() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(3, NET_CONF_DUAL);
    o.start_all();
    for i in 0..3 {
        o.wait_converged(i);
        o.wait_converged6(i);
        assert_eq!(o.vtep_state(i).routes.len(), 2, "node{i}: {:?}", o.vtep_state(i));
        assert_eq!(o.vtep6_state(i).routes.len(), 2, "node{i}: {:?}", o.vtep6_state(i));
        check_lease_and_subnet_env(&o, i, "vxlan");
    }
    for i in 0..3 {
        let ns = &o.cluster.node(i).ns;
        let (s4, s6) = (o.subnet(i), o.subnet6(i).unwrap());
        // One device per family, each with its subnet's first address alone.
        assert_eq!(addrs(ns, "-4", "flannel.1"), [format!("{}/32", s4.network())], "node{i}");
        assert_eq!(addrs(ns, "-6", "flannel.1"), Vec::<String>::new(), "node{i}");
        assert_eq!(addrs(ns, "-6", VXLAN6_DEV), [format!("{}/128", s6.network())], "node{i}");
        assert_eq!(addrs(ns, "-4", VXLAN6_DEV), Vec::<String>::new(), "node{i}");
        // flannel-v6.1: VNI 1, port 8472, no learning, the node's IPv6
        // underlay address as the local end, 70 bytes of IPv6 encapsulation.
        let link = &ns.ip_json(&["-d", "link", "show", VXLAN6_DEV])[0];
        let info = &link["linkinfo"]["info_data"];
        assert_eq!(info["id"], 1, "{link}");
        assert_eq!(info["port"], 8472, "{link}");
        assert_eq!(info["learning"], false, "{link}");
        assert_eq!(info["local6"], o.cluster.node(i).underlay_ipv6.unwrap().to_string(), "{link}");
        assert_eq!(link["mtu"], 1430, "{link}");
        let link4 = &ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
        assert_eq!(link4["linkinfo"]["info_data"]["local"], o.cluster.node(i).underlay_ip.to_string());
        assert_ne!(link["address"], link4["address"], "each VTEP has its own MAC");
        // Both VTEPs with transmit checksum offload as the kernel made them
        // (on): flannel-rs leaves it alone without --vxlan-tx-checksum-off
        // (see the README's "Services and kube-proxy").
        for dev in ["flannel.1", VXLAN6_DEV] {
            let k = ns.run_ok("ethtool", &["-k", dev]);
            assert!(k.lines().any(|l| l == "tx-checksumming: on"), "node{i} {dev}: {k}");
        }
    }
    // Exactly, on node 0: peer by peer, both families.
    let st6 = o.vtep6_state(0);
    for peer in 1..3 {
        let s6 = o.subnet6(peer).unwrap();
        let net = s6.network();
        assert!(st6.routes.contains(&format!("{s6} via {net} onlink")), "{st6:?}");
        let public6 = o.cluster.node(peer).underlay_ipv6.unwrap().to_string();
        assert!(st6.fdbs.iter().any(|f| f.ends_with(&format!(" {public6}"))), "{st6:?}");
        assert!(st6.neighs.iter().any(|n| n.starts_with(&format!("{net} "))), "{st6:?}");
    }

    let pods = dual_pods(&o, "p");
    all_talk(&pods, 7300);
    // The IPv6 traffic goes through flannel-v6.1, the IPv4 through flannel.1.
    let node0 = &o.cluster.node(0).ns;
    let to6 = node0.run_ok("ip", &["-6", "route", "get", &pods[1].1[1].to_string()]);
    assert!(to6.contains(&format!("dev {VXLAN6_DEV}")), "{to6}");
    let to4 = node0.run_ok("ip", &["route", "get", &pods[1].1[0].to_string()]);
    assert!(to4.contains("dev flannel.1"), "{to4}");
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn host_gw_dual_stack_pods_reach_every_pod_over_both_families_with_one_route_per_peer_and_family() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(3, HOST_GW_DUAL);
    o.start_all();
    let converged = |o: &Overlay, i: usize| {
        o.underlay_routes(i) == o.expected_underlay_routes(i) && o.underlay_routes6(i) == o.expected_underlay_routes6(i)
    };
    for i in 0..3 {
        wait_until(Duration::from_secs(10), &format!("node{i}'s host-gw routes of both families"), || converged(&o, i));
        assert_eq!(o.underlay_routes(i).len(), 2, "node{i}");
        assert_eq!(o.underlay_routes6(i).len(), 2, "node{i}");
        check_lease_and_subnet_env(&o, i, "host-gw");
        let links = o.cluster.node(i).ns.ip_json(&["link", "show"]);
        assert!(
            !links.as_array().unwrap().iter().any(|l| l["ifname"] == "flannel.1" || l["ifname"] == VXLAN6_DEV),
            "{links}"
        );
    }
    // Exactly: `<peer v6 subnet> via <peer PublicIPv6> dev eth0`.
    let want: Vec<String> = {
        let mut v: Vec<String> = (1..3)
            .map(|p| format!("{} via {}", o.subnet6(p).unwrap(), o.cluster.node(p).underlay_ipv6.unwrap()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(o.underlay_routes6(0), want);

    let pods = dual_pods(&o, "h");
    all_talk(&pods, 7400);
    // No encapsulation: the pod's IPv6 packet goes to the peer's PublicIPv6.
    let route = o.cluster.node(0).ns.run_ok("ip", &["-6", "route", "get", &pods[1].1[1].to_string()]);
    assert!(route.contains("via 2001:db8::11 dev eth0"), "{route}");

    // A route deleted by hand comes back.
    let ns = &o.cluster.node(0).ns;
    let dst = o.subnet6(1).unwrap().to_string();
    o.assert_repaired_on_notification(
        0,
        &format!("ip -6 route del {dst}"),
        || {
            ns.run_ok("ip", &["-6", "route", "del", &dst]);
        },
        || converged(&o, 0),
    );
    // A stale IPv6 route to a subnet of the IPv6 Network is swept.
    ns.run_ok("ip", &["-6", "route", "add", "2001:db8:10:ee::/64", "via", "2001:db8::50", "dev", "eth0"]);
    wait_until(Duration::from_secs(30), "node0's stale IPv6 host-gw route to go", || converged(&o, 0));
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn ipv6_entries_deleted_by_hand_come_back_and_stale_ones_are_swept() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(3, NET_CONF_DUAL);
    o.start_all();
    for i in 0..3 {
        o.wait_converged(i);
        o.wait_converged6(i);
    }
    let (a, _, _) = o.add_dual_pod(0, "a");
    let (b, _, b6) = o.add_dual_pod(1, "b");
    let ns = &o.cluster.node(0).ns;
    let s6 = o.subnet6(1).unwrap();
    let net = s6.network().to_string();
    let public6 = o.cluster.node(1).underlay_ipv6.unwrap().to_string();
    let state = o.vtep6_state(0);
    let fdb = state.fdbs.iter().find(|f| f.ends_with(&format!(" {public6}"))).unwrap_or_else(|| panic!("{state:?}"));
    let mac = fdb.split(' ').next().unwrap().to_string();
    let faults: Vec<Vec<String>> = vec![
        ["ip", "-6", "route", "del", &s6.to_string(), "dev", VXLAN6_DEV].map(String::from).to_vec(),
        ["ip", "-6", "neigh", "del", &net, "dev", VXLAN6_DEV].map(String::from).to_vec(),
        ["bridge", "fdb", "del", &mac, "dev", VXLAN6_DEV, "dst", &public6].map(String::from).to_vec(),
        ["ip", "link", "del", VXLAN6_DEV].map(String::from).to_vec(),
    ];
    for (n, fault) in faults.iter().enumerate() {
        let args: Vec<&str> = fault[1..].iter().map(String::as_str).collect();
        o.assert_repaired_on_notification(
            0,
            &format!("{fault:?}"),
            || {
                ns.run_ok(&fault[0], &args);
            },
            || o.vtep6_state(0) == o.expected_state6(0),
        );
        // The IPv4 side never noticed.
        assert_eq!(o.vtep_state(0), o.expected_state(0), "after {fault:?}");
        let target = SocketAddr::new(b6.into(), 8200 + n as u16);
        let server = echo_server(&b, target);
        assert_eq!(tcp_round_trip(&a, target), "ping\n", "after {fault:?}");
        server.join().unwrap();
    }

    // A stale route to a subnet of the IPv6 Network on flannel-v6.1 (a
    // node that left long ago) goes, with its neighbour.
    ns.run_ok("ip", &["-6", "neigh", "replace", "2001:db8:10:ee::", "lladdr", "02:00:00:00:ee:01", "dev", VXLAN6_DEV]);
    ns.run_ok(
        "ip",
        &["-6", "route", "add", "2001:db8:10:ee::/64", "via", "2001:db8:10:ee::", "dev", VXLAN6_DEV, "onlink"],
    );
    wait_until(Duration::from_secs(30), "node0's stale IPv6 route and neighbour to go", || {
        o.vtep6_state(0) == o.expected_state6(0)
    });

    // Node 2 leaves while node 0's daemon is down: node 0 sweeps its IPv6
    // entries when it comes back.
    let key2 = o.lease_key(2);
    o.stop(2);
    o.stop(0);
    etcdctl_ok(o.outside(), &["del", &key2]);
    wait_until(Duration::from_secs(10), "node1 to drop node2's IPv6 entries", || o.vtep6_state(1).routes.len() == 1);
    o.wait_converged6(1);
    assert_eq!(o.vtep6_state(0).routes.len(), 2, "node0's kernel changed while its daemon was down");
    o.start(0);
    o.wait_converged6(0);
    o.wait_converged(0);
    assert_eq!(o.vtep6_state(0).routes.len(), 1);
}

#[test]
fn a_tcp_connection_over_ipv6_survives_daemon_restarts() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(2, NET_CONF_DUAL);
    o.start_all();
    for i in 0..2 {
        o.wait_converged(i);
        o.wait_converged6(i);
    }
    let (a, _, _) = o.add_dual_pod(0, "tx");
    let (b, _, b6) = o.add_dual_pod(1, "rx");
    let target = SocketAddr::new(b6.into(), 9100);
    let server = echo_server_until_closed(&b, target);
    let mut conn = tcp_connect(&a, target);
    assert_eq!(echo(&mut conn, b"before\n").unwrap(), b"before\n");
    let stream = UdpStream::start(&a, &b, SocketAddr::new(b6.into(), 9997));
    let ifindex =
        |o: &Overlay, i: usize| o.cluster.node(i).ns.ip_json(&["link", "show", VXLAN6_DEV])[0]["ifindex"].clone();
    let before: Vec<Value> = (0..2).map(|i| ifindex(&o, i)).collect();
    for round in 0..2 {
        o.stop(0);
        o.stop(1);
        // While both daemons are down, the connection still works: nothing
        // was taken down on the way out.
        let msg = format!("down {round}\n");
        assert_eq!(echo(&mut conn, msg.as_bytes()).unwrap(), msg.as_bytes());
        o.start(0);
        o.start(1);
        o.wait_converged6(0);
        o.wait_converged6(1);
        let msg = format!("after {round}\n");
        assert_eq!(echo(&mut conn, msg.as_bytes()).unwrap(), msg.as_bytes(), "the same connection, restart {round}");
    }
    let after: Vec<Value> = (0..2).map(|i| ifindex(&o, i)).collect();
    assert_eq!(after, before, "flannel-v6.1's ifindex on node0 and node1: the restarts adopted the devices");
    stream.wait_flowing("IPv6 datagrams to keep flowing after the restarts");
    stream.stop_and_check_none_lost("over IPv6 across restarts");
    drop(conn);
    let peer = server.join().unwrap();
    assert_eq!(peer.ip(), a_addr6(&a), "the server saw the pod's own IPv6 address");
}

/// The global IPv6 address of a pod's eth0.
fn a_addr6(pod: &Netns) -> IpAddr {
    let a = addrs(pod, "-6", "eth0");
    a.first()
        .unwrap_or_else(|| panic!("{} has no IPv6 address", pod.name()))
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn ipv6_masquerade_hides_pods_from_the_outside_but_not_from_each_other() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(2, NET_CONF_DUAL);
    o.set_flags(0, &["--ip-masq"]);
    o.start_all();
    for i in 0..2 {
        o.wait_converged(i);
        o.wait_converged6(i);
    }
    let (a, _, _) = o.add_dual_pod(0, "a");
    let (b, _, b6) = o.add_dual_pod(1, "b");
    let a6 = a_addr6(&a);
    // To the outside host: node0's IPv6 underlay address, as flannel's
    // MasqIP6Rules make it.
    let out = SocketAddr::new(IpAddr::V6(netns_fixtures::OUTSIDE_IPV6), 9310);
    let server = echo_server(o.outside(), out);
    assert_eq!(tcp_round_trip(&a, out), "ping\n");
    let node0_v6 = o.cluster.node(0).underlay_ipv6.unwrap();
    assert_eq!(server.join().unwrap().ip(), IpAddr::V6(node0_v6), "the outside host must see node0's IPv6 address");
    // To a pod on another node: the pod's own IPv6 address.
    let target = SocketAddr::new(IpAddr::V6(b6), 9311);
    let server = echo_server(&b, target);
    assert_eq!(tcp_round_trip(&a, target), "ping\n");
    assert_eq!(server.join().unwrap().ip(), a6, "pod-to-pod traffic over IPv6 must keep the pod's address");
    // The rules are flannel's chain in ip6tables, and only with --ip-masq.
    let chain = o.cluster.node(0).ns.run_ok("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert!(chain.contains("! -d ff00::/8") && chain.contains("-j MASQUERADE --random-fully"), "{chain}");
    let none = o.cluster.node(1).ns.run("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    assert!(!none.status.success(), "node1 runs without --ip-masq: {}", String::from_utf8_lossy(&none.stdout));
}

/// EnableIPv6 turned off: the IPv6 VTEP an earlier dual-stack run left
/// (`flannel-v6.1`, with an address of the old IPv6Network that no
/// configuration names any more) is named by `diagnose` and deleted at
/// start, like another backend's device; the IPv4 overlay is untouched.
#[test]
fn the_ipv6_vtep_of_an_earlier_dual_stack_run_goes_when_ipv6_is_off() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.start_all();
    o.wait_converged(0);
    o.wait_converged(1);
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    for cmd in [
        "link add flannel-v6.1 type vxlan id 1 dstport 4789 dev eth0",
        "-6 addr add 2001:db8:10:7::/128 dev flannel-v6.1 nodad",
        "link set flannel-v6.1 up",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok, "{report}");
    assert!(report.to_string().contains("device flannel-v6.1 is an earlier backend's"), "{report}");
    o.start(0);
    o.wait_converged(0);
    let ns = &o.cluster.node(0).ns;
    let links = ns.ip_json(&["link", "show"]);
    let names: Vec<&str> = links.as_array().unwrap().iter().filter_map(|l| l["ifname"].as_str()).collect();
    assert!(!names.contains(&"flannel-v6.1") && names.contains(&"flannel.1"), "{names:?}");
    assert!(o.log(0).contains("deleting flannel-v6.1"), "{}", o.log(0));
    assert_eq!(o.vtep_state(0), o.expected_state(0));
}

/// A dual-stack key of this node's that lost the race of its create (an
/// older key holds its IPv4 subnet beside another IPv6 one) and whose check
/// did not run (etcd failed, or the daemon was stopped, right after the
/// create) is given up when the node finds it again by its PublicIP, not
/// taken over: two nodes never share a subnet.
#[test]
fn a_key_of_ours_that_lost_its_dual_stack_race_is_given_up_when_found_again() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(1, NET_CONF_DUAL);
    let node = o.cluster.node(0);
    let (ip, ip6) = (node.underlay_ip.to_string(), node.underlay_ipv6.unwrap().to_string());
    let value = |ip: &str, ip6: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":"{ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:50"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"02:00:00:00:00:51"}}}}"#
        )
    };
    let older = "/coreos.com/network/subnets/10.244.7.0-24&2001:db8:10:9::-64";
    let ours = "/coreos.com/network/subnets/10.244.7.0-24&2001:db8:10:1::-64";
    // Another node's key (a reservation: bound to no etcd lease)...
    etcdctl_ok(o.outside(), &["put", older, &value("192.0.2.50", "2001:db8::50")]);
    // ... then ours, bound to an etcd lease as our creates are.
    let granted = etcdctl_ok(o.outside(), &["lease", "grant", "600"]);
    let id = granted.split_whitespace().nth(1).unwrap_or_else(|| panic!("etcdctl lease grant said {granted:?}"));
    etcdctl_ok(o.outside(), &["put", &format!("--lease={id}"), ours, &value(&ip, &ip6)]);
    o.start(0);
    let key = o.lease_key(0);
    assert_ne!(o.subnet(0).to_string(), "10.244.7.0/24", "node0 kept the subnet it lost ({key})");
    let all = leases(o.outside());
    assert!(!all.contains_key(ours), "the lost key is still there: {:?}", all.keys());
    assert!(all.contains_key(older) && all.contains_key(&key), "{key}, {older}: {:?}", all.keys());
    let log = o.log(0);
    assert!(
        log.contains(&format!("this node's lease {ours} = "))
            && log.contains(&format!("lost IPv4 subnet 10.244.7.0/24 to the older {older}")),
        "{log}"
    );
}
