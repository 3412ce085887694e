//! IPv6-only clusters (`"EnableIPv4": false`) end to end, in Kubernetes
//! mode, the only mode flannel has them in: a real kube-apiserver (reached
//! over IPv6 only), Nodes with one IPv6 podCIDR each (`2001:db8:10:<i+1>::/64`),
//! nodes whose `eth0` has no IPv4 address at all
//! ([`e2e_tests::mixed::kube_ipv6_only_overlay`]), our real daemons (and
//! upstream flanneld v0.20.2 beside them), pods plugged in by the real
//! plugin, real IPv6 traffic, and the kernel state, subnet.env, Node
//! annotations and firewall read back exactly. The refusals (etcd mode, a
//! Node without an IPv6 podCIDR, udp) are real runs of the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use e2e_tests::kube::{require_kube, KubeOverlay, PREFIX};
use e2e_tests::mixed::{
    dev_mac, kube_ipv6_only_overlay, kube_peers6, node_cidr6, node_ipv6, own_device, peer_entries, peer_shapes,
    pod_addr6, require_upstream, start, start_nodes, subnet6, tail, Kind, Peer, NETWORK6,
};
use e2e_tests::overlay::{Overlay, VtepState, VXLAN6_DEV};
use e2e_tests::stream::UdpStream;
use e2e_tests::wait_until_or;
use netns_fixtures::{echo, echo_server, echo_server_until_closed, require_root, tcp_connect, tcp_round_trip, Netns};
use serde_json::Value;

/// An IPv6-only network configuration with `backend`, as
/// `/tmp/v6spec.md` and upstream write it (no `Network`).
fn conf(backend: &str) -> String {
    format!(r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{backend}}}"#)
}

const VXLAN: &str = r#"{"Type":"vxlan"}"#;
const HOST_GW: &str = r#"{"Type":"host-gw"}"#;

/// [`conf`] with an IPv4 `Network` besides, which an IPv6-only network
/// does not use: accepted, with a warning naming it.
fn conf_with_network(backend: &str) -> String {
    conf(backend).replacen('{', r#"{"Network":"10.244.0.0/16","#, 1)
}

/// The underlay's MTU (the fixtures' veths) and flannel-v6.1's: 70 bytes
/// less, for the IPv6, UDP, VXLAN and inner Ethernet headers.
const UNDERLAY_MTU: u64 = 1500;
const VXLAN6_MTU: u64 = UNDERLAY_MTU - 70;

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Node `i`'s routes in the main table to destinations inside
/// [`NETWORK6`], but the kernel's own (`proto kernel`: an address's
/// prefix, the bridge's subnet), as sorted `dst via gw dev D[ onlink]`.
fn cluster_routes6(ns: &Netns) -> Vec<String> {
    let network: ipnet::Ipv6Net = NETWORK6.parse().unwrap();
    let routes = ns.ip_json(&["-6", "route", "show", "table", "main"]);
    let mut v: Vec<String> = array(&routes)
        .iter()
        .filter(|r| r["protocol"] != "kernel")
        .filter(|r| {
            let d = r["dst"].as_str().unwrap_or_default();
            let d = if d.contains('/') { d.to_string() } else { format!("{d}/128") };
            d.parse::<ipnet::Ipv6Net>().is_ok_and(|d| network.contains(&d))
        })
        .map(|r| {
            let onlink = array(&r["flags"]).iter().any(|f| f == "onlink");
            format!(
                "{} via {} dev {}{}",
                r["dst"].as_str().unwrap(),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("-"),
                if onlink { " onlink" } else { "" }
            )
        })
        .collect();
    v.sort();
    v
}

/// The peers of node `i` as the API server has them (every Node we or
/// upstream annotated but node `i`'s own).
fn peers_of(ko: &KubeOverlay, i: usize) -> Vec<Peer> {
    let own = node_ipv6(i).to_string();
    kube_peers6(&ko.api).into_iter().filter(|p| p.public_ip != own).collect()
}

/// What node `i`'s routes into the cluster network must be, per
/// `/tmp/v6spec.md` item 6: vxlan `<peer subnet6> via <its network
/// address> dev flannel-v6.1 onlink`, host-gw `<peer subnet6> via <peer
/// public IPv6> dev eth0`, one per peer.
fn want_routes6(ko: &KubeOverlay, i: usize, backend: &str) -> Vec<String> {
    let mut v: Vec<String> = peers_of(ko, i)
        .into_iter()
        .map(|p| {
            let net = p.subnet.split('/').next().unwrap().to_string();
            match backend {
                "vxlan" => format!("{} via {net} dev {VXLAN6_DEV} onlink", p.subnet),
                _ => format!("{} via {} dev eth0", p.subnet, p.public_ip),
            }
        })
        .collect();
    v.sort();
    v
}

/// What node `i`'s flannel-v6.1 must hold (routes, neighbours, FDB entries)
/// for the peers the API server knows.
fn want_vtep6(ko: &KubeOverlay, i: usize) -> VtepState {
    let peers = peers_of(ko, i).into_iter().filter_map(|p| Some((p.subnet, p.mac?, p.public_ip)));
    ko.o.expected_state6_for(i, peers)
}

/// Waits until node `i` programs exactly its `peers` peers (the Nodes'
/// leases) and nothing else into the cluster network: its routes and, for
/// vxlan, flannel-v6.1's neighbours and FDB entries.
fn wait_converged(ko: &KubeOverlay, i: usize, backend: &str, peers: usize) {
    let ns = &ko.o.cluster.node(i).ns;
    let done = || {
        let want = want_routes6(ko, i, backend);
        want.len() == peers
            && cluster_routes6(ns) == want
            && (backend != "vxlan" || ko.o.vtep6_state(i) == want_vtep6(ko, i))
    };
    wait_until_or(Duration::from_secs(20), &done, &|| {
        format!(
            "node{i} to program its {peers} peers ({backend}): routes {:?}, want {:?}; {VXLAN6_DEV} {:?}, want {:?}; \
             its log ends:\n{}",
            cluster_routes6(ns),
            want_routes6(ko, i, backend),
            ko.o.vtep6_state(i),
            want_vtep6(ko, i),
            tail(&ko.o, i)
        )
    });
}

/// Node `i`'s global addresses of family `family` (`-4`/`-6`) on `dev` (all
/// devices when `None`), as `addr/len`.
fn addrs(ns: &Netns, family: &str, dev: Option<&str>) -> Vec<String> {
    let mut args = vec![family, "addr", "show"];
    if let Some(dev) = dev {
        args.extend(["dev", dev]);
    }
    args.extend(["scope", "global"]);
    array(&ns.ip_json(&args))
        .iter()
        .flat_map(|l| array(&l["addr_info"]).to_vec())
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

fn link_names(ns: &Netns) -> Vec<String> {
    array(&ns.ip_json(&["link", "show"])).iter().filter_map(|l| l["ifname"].as_str().map(str::to_string)).collect()
}

/// Node `i` has no IPv4 at all: no global IPv4 address, no IPv4 route in
/// its main table, no `flannel.1`; and none of flannel's IPv4 firewall
/// chains.
fn assert_no_ipv4(ko: &KubeOverlay, i: usize) {
    let ns = &ko.o.cluster.node(i).ns;
    assert_eq!(addrs(ns, "-4", None), Vec::<String>::new(), "node{i}'s IPv4 addresses");
    let routes = ns.ip_json(&["-4", "route", "show", "table", "main"]);
    assert!(array(&routes).is_empty(), "node{i} has IPv4 routes: {routes}");
    assert!(!link_names(ns).contains(&"flannel.1".to_string()), "node{i}: {:?}", link_names(ns));
    for table in ["nat", "filter"] {
        let rules = ns.run_ok("iptables", &["-t", table, "-S"]);
        assert!(!rules.contains("FLANNEL"), "node{i}: IPv4 chains of flannel in {table}:\n{rules}");
    }
    let tables = ns.run_ok("nft", &["list", "tables"]);
    assert!(!tables.contains("flannel-ipv4"), "node{i}: {tables}");
}

/// Node `i`'s subnet.env, exactly as `/tmp/v6spec.md` item 7 (upstream's
/// `WriteSubnetFile` with `EnableIPv4` false): the IPv6 network, the first
/// address of the node's podCIDR, the MTU, the masquerade flag; nothing of
/// IPv4.
fn assert_subnet_env(o: &Overlay, i: usize, mtu: u64, masq: bool) {
    let text = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
    let net = node_cidr6(i);
    let first = net.replace("::/", "::1/");
    let want = format!(
        "FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={first}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={masq}\n"
    );
    assert_eq!(text, want, "node{i}'s subnet.env");
}

/// Node `i`'s flannel annotations, read through the API server.
fn annotations(ko: &KubeOverlay, i: usize) -> BTreeMap<String, String> {
    let n = ko.api.get_json(&["node", &KubeOverlay::node_name(i)]);
    let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    a.into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{PREFIX}/"))?.to_string(), v.as_str()?.to_string())))
        .collect()
}

/// Node `i`'s annotations are exactly `/tmp/v6spec.md` item 5's:
/// `backend-type`, `backend-v6-data` (vxlan: its VNI and flannel-v6.1's
/// MAC; host-gw: `null`, as flannel writes it), `public-ipv6` (its
/// underlay's IPv6 address), `kube-subnet-manager`; no `backend-data` or
/// `public-ip`.
fn assert_annotations(ko: &KubeOverlay, i: usize, backend: &str) {
    let data6 = match backend {
        "vxlan" => {
            let mac = dev_mac(&ko.o, i, VXLAN6_DEV).unwrap_or_else(|| panic!("node{i} has no {VXLAN6_DEV}"));
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)
        }
        _ => "null".to_string(),
    };
    let want: BTreeMap<String, String> = [
        ("backend-type", backend.to_string()),
        ("backend-v6-data", data6),
        ("kube-subnet-manager", "true".to_string()),
        ("public-ipv6", node_ipv6(i).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(annotations(ko, i), want, "node{i}'s flannel annotations");
    let n = ko.api.get_json(&["node", &KubeOverlay::node_name(i)]);
    assert_eq!(n["spec"]["podCIDRs"], serde_json::json!([node_cidr6(i)]), "node{i}'s podCIDRs are untouched");
}

/// Node `i`'s flannel-v6.1: VNI 1, port 8472, no learning, its IPv6
/// underlay address as the local end, MTU underlay - 70, and its podCIDR's
/// network address as its one global address (a /128); no IPv4 address.
fn assert_vxlan6_device(ko: &KubeOverlay, i: usize) {
    let ns = &ko.o.cluster.node(i).ns;
    let link = &ns.ip_json(&["-d", "link", "show", VXLAN6_DEV])[0];
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1, "{link}");
    assert_eq!(info["port"], 8472, "{link}");
    assert_eq!(info["learning"], false, "{link}");
    assert_eq!(info["local6"], node_ipv6(i).to_string(), "{link}");
    assert_eq!(link["mtu"], VXLAN6_MTU, "{link}");
    let net = node_cidr6(i).split('/').next().unwrap().to_string();
    assert_eq!(addrs(ns, "-6", Some(VXLAN6_DEV)), [format!("{net}/128")], "node{i}'s {VXLAN6_DEV}");
    assert_eq!(addrs(ns, "-4", Some(VXLAN6_DEV)), Vec::<String>::new(), "node{i}'s {VXLAN6_DEV}");
    // Every neighbour is permanent: nothing is learned or resolved.
    let neighs = ns.ip_json(&["-6", "neigh", "show", "dev", VXLAN6_DEV]);
    for n in array(&neighs) {
        assert!(array(&n["state"]).iter().any(|s| s == "PERMANENT"), "node{i}: {n}");
    }
}

/// A pod on node `i` plugged in by the real plugin: its one address is
/// IPv6, inside the node's podCIDR; it has no IPv4 address.
fn add_pod(o: &Overlay, i: usize, name: &str) -> (Netns, Ipv6Addr) {
    let (pod, ips) = o.add_pod_ips(i, name);
    let a6 = match ips[..] {
        [IpAddr::V6(a)] => a,
        _ => panic!("ADD {name} on node{i}: want one IPv6 address, got {ips:?}"),
    };
    let own: ipnet::Ipv6Net = node_cidr6(i).parse().unwrap();
    assert!(own.contains(&a6), "pod {name} on node{i}: {a6} outside {own}");
    assert_eq!(addrs(&pod, "-4", None), Vec::<String>::new(), "pod {name}'s IPv4 addresses");
    (pod, a6)
}

/// Every pod reaches every other over IPv6 (a ping first, while peers may
/// still be coming), then TCP both ways between every pair, each source
/// address kept.
fn pods_talk(pods: &[(Netns, Ipv6Addr)], port_base: u16) {
    for (from, a) in pods {
        for (_, b) in pods.iter().filter(|(_, b)| b != a) {
            wait_until_or(
                Duration::from_secs(20),
                &|| from.run("ping", &["-6", "-n", "-c1", "-W1", &b.to_string()]).is_ok_and(|o| o.status.success()),
                &|| format!("pod {a} to reach pod {b}"),
            );
        }
    }
    let refs: Vec<(&Netns, Vec<IpAddr>)> = pods.iter().map(|(ns, a)| (ns, vec![IpAddr::V6(*a)])).collect();
    e2e_tests::all_pods_talk_ips(&refs, port_base);
}

/// A pod on each of `o`'s nodes.
fn pods(o: &Overlay, prefix: &str) -> Vec<(Netns, Ipv6Addr)> {
    (0..o.daemons.len()).map(|i| add_pod(o, i, &format!("{prefix}{i}"))).collect()
}

/// Three IPv6-only nodes with `backend`, node 0 with `--ip-masq`: each
/// programs exactly its two peers and nothing of IPv4, writes subnet.env
/// and its annotations exactly as the spec says, every pod reaches every
/// pod over IPv6; the masquerade is ip6tables' alone and works.
fn three_nodes(net_conf: &str, backend: &str, port_base: u16) -> KubeOverlay {
    let mut ko = kube_ipv6_only_overlay(3, net_conf);
    let mut flags = ko.o.flags(0);
    flags.push("--ip-masq".into());
    ko.o.set_flags(0, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    ko.o.start_all();
    for i in 0..3 {
        wait_converged(&ko, i, backend, 2);
    }
    let mtu = if backend == "vxlan" { VXLAN6_MTU } else { UNDERLAY_MTU };
    for i in 0..3 {
        assert_subnet_env(&ko.o, i, mtu, i == 0);
        assert_annotations(&ko, i, backend);
        let links = link_names(&ko.o.cluster.node(i).ns);
        if backend == "vxlan" {
            assert_vxlan6_device(&ko, i);
        } else {
            assert!(!links.contains(&VXLAN6_DEV.to_string()), "node{i} (host-gw): {links:?}");
        }
        assert_no_ipv4(&ko, i);
    }
    // Exactly, on node 0: peer by peer.
    let ns0 = &ko.o.cluster.node(0).ns;
    let mut want: Vec<String> = (1..3)
        .map(|p| {
            let (s6, net) = (node_cidr6(p), node_cidr6(p).replace("::/64", "::"));
            match backend {
                "vxlan" => format!("{s6} via {net} dev {VXLAN6_DEV} onlink"),
                _ => format!("{s6} via {} dev eth0", node_ipv6(p)),
            }
        })
        .collect();
    want.sort();
    assert_eq!(cluster_routes6(ns0), want, "node0's routes into {NETWORK6}");
    if backend == "vxlan" {
        let st = ko.o.vtep6_state(0);
        for p in 1..3 {
            let mac = dev_mac(&ko.o, p, VXLAN6_DEV).unwrap();
            let net = node_cidr6(p).replace("::/64", "::");
            assert!(st.neighs.contains(&format!("{net} {mac}")), "node0 for node{p}: {st:?}");
            assert!(st.fdbs.contains(&format!("{mac} {}", node_ipv6(p))), "node0 for node{p}: {st:?}");
        }
    }

    let pods = pods(&ko.o, "p");
    pods_talk(&pods, port_base);
    // The pods' traffic takes the overlay: flannel-v6.1, or (host-gw)
    // eth0 to the peer's address.
    let route = ns0.run_ok("ip", &["-6", "route", "get", &pods[1].1.to_string()]);
    let via = match backend {
        "vxlan" => format!("dev {VXLAN6_DEV}"),
        _ => format!("via {} dev eth0", node_ipv6(1)),
    };
    assert!(route.contains(&via), "{route}");
    for i in 0..3 {
        assert_no_ipv4(&ko, i);
    }

    // --ip-masq: flannel's chain in ip6tables on node 0 alone, for the
    // IPv6 network; FLANNEL-FWD in ip6tables on every node.
    let chain = ns0.run_ok("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    assert!(chain.contains(NETWORK6) && chain.contains("! -d ff00::/8"), "{chain}");
    assert!(chain.contains("-j MASQUERADE --random-fully"), "{chain}");
    let none = ko.o.cluster.node(1).ns.run("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    assert!(!none.status.success(), "node1 runs without --ip-masq: {}", String::from_utf8_lossy(&none.stdout));
    for i in 0..3 {
        let fwd = ko.o.cluster.node(i).ns.run_ok("ip6tables", &["-t", "filter", "-S", "FLANNEL-FWD"]);
        assert_eq!(fwd.lines().filter(|l| l.starts_with("-A FLANNEL-FWD")).count(), 2, "node{i}: {fwd}");
        assert!(fwd.contains(NETWORK6), "node{i}: {fwd}");
    }
    // It works: the outside host (no route to the pods) sees node 0's
    // address; a pod on another node sees the pod's own (above).
    let out = SocketAddr::new(IpAddr::V6(netns_fixtures::OUTSIDE_IPV6), port_base + 90);
    let server = echo_server(ko.o.outside(), out);
    assert_eq!(tcp_round_trip(&pods[0].0, out), "ping\n");
    assert_eq!(server.join().unwrap().ip(), IpAddr::V6(node_ipv6(0)), "the outside host must see node0's address");

    let (ok, report) = ko.o.diagnose(0, &[]);
    assert!(ok, "diagnose on node0: {report}");
    ko
}

#[test]
fn vxlan_ipv6_only_pods_reach_every_pod_and_state_is_exact() {
    if !(require_root() && require_kube()) {
        return;
    }
    three_nodes(&conf(VXLAN), "vxlan", 7100);
}

/// host-gw, the network configuration naming an IPv4 `Network` too
/// (warned about as having no effect; nothing of IPv4 made, as the checks
/// show), and its self-healing: a peer's route deleted by hand comes back,
/// a stale route into the IPv6 network via eth0 goes.
#[test]
fn host_gw_ipv6_only_pods_reach_every_pod_and_routes_are_kept() {
    if !(require_root() && require_kube()) {
        return;
    }
    let ko = three_nodes(&conf_with_network(HOST_GW), "host-gw", 7200);
    for i in 0..3 {
        let log = ko.o.log(i);
        let warned = log.lines().any(|l| l.contains(" WARN ") && l.contains("Network") && l.contains("no effect"));
        assert!(warned, "node{i} did not warn that Network has no effect; its log ends:\n{}", tail(&ko.o, i));
    }
    let ns = &ko.o.cluster.node(0).ns;
    let dst = node_cidr6(1);
    let converged = || cluster_routes6(ns) == want_routes6(&ko, 0, "host-gw") && cluster_routes6(ns).len() == 2;
    ko.o.assert_repaired_on_notification(
        0,
        &format!("ip -6 route del {dst}"),
        || {
            ns.run_ok("ip", &["-6", "route", "del", &dst]);
        },
        converged,
    );
    ns.run_ok("ip", &["-6", "route", "add", "2001:db8:10:ee::/64", "via", "2001:db8::50", "dev", "eth0"]);
    wait_until_or(Duration::from_secs(30), &converged, &|| {
        format!("node0's stale route to 2001:db8:10:ee::/64 to go: {:?}", cluster_routes6(ns))
    });
    assert_no_ipv4(&ko, 0);
}

/// Runs `cmd` (a daemon that must refuse to start) until it exits, at most
/// 60 s; its status and stderr.
fn run_to_exit(cmd: Command) -> (ExitStatus, String) {
    e2e_tests::overlay::run_to_exit(cmd, Duration::from_secs(60))
}

/// IPv6-only vxlan, two nodes (node 2 is kept for the refusals): entries
/// deleted by hand come back, stale ones in the IPv6 network go, both
/// daemons restart without a pod noticing (same subnet, same
/// annotations, same device, a TCP connection and a datagram stream over
/// IPv6 kept without loss); a Node without an IPv6 podCIDR and a udp
/// backend are refused by name, nothing made.
#[test]
fn vxlan_ipv6_only_heals_sweeps_restarts_and_refuses_what_it_cannot_do() {
    if !(require_root() && require_kube()) {
        return;
    }
    let mut ko = kube_ipv6_only_overlay(3, &conf(VXLAN));
    ko.o.start(0);
    ko.o.start(1);
    for i in 0..2 {
        wait_converged(&ko, i, "vxlan", 1);
    }
    let (a, _) = add_pod(&ko.o, 0, "a");
    let (b, b6) = add_pod(&ko.o, 1, "b");
    let ns = &ko.o.cluster.node(0).ns;
    let converged = || {
        let want = want_routes6(&ko, 0, "vxlan");
        want.len() == 1 && cluster_routes6(ns) == want && ko.o.vtep6_state(0) == want_vtep6(&ko, 0)
    };

    // Self-healing: each of node 1's entries on node 0, deleted by hand.
    let s6 = node_cidr6(1);
    let net = s6.replace("::/64", "::");
    let public6 = node_ipv6(1).to_string();
    let mac = dev_mac(&ko.o, 1, VXLAN6_DEV).unwrap();
    let faults: Vec<Vec<&str>> = vec![
        vec!["ip", "-6", "route", "del", &s6, "dev", VXLAN6_DEV],
        vec!["ip", "-6", "neigh", "del", &net, "dev", VXLAN6_DEV],
        vec!["bridge", "fdb", "del", &mac, "dev", VXLAN6_DEV, "dst", &public6],
    ];
    for (n, fault) in faults.iter().enumerate() {
        ko.o.assert_repaired_on_notification(
            0,
            &format!("{fault:?}"),
            || {
                ns.run_ok(fault[0], &fault[1..]);
            },
            converged,
        );
        let target = SocketAddr::new(b6.into(), 8200 + n as u16);
        let server = echo_server(&b, target);
        assert_eq!(tcp_round_trip(&a, target), "ping\n", "after {fault:?}");
        server.join().unwrap();
    }
    // A stale route into the IPv6 network (a node gone long ago), with its
    // neighbour, goes.
    ns.run_ok("ip", &["-6", "neigh", "replace", "2001:db8:10:ee::", "lladdr", "02:00:00:00:ee:01", "dev", VXLAN6_DEV]);
    ns.run_ok(
        "ip",
        &["-6", "route", "add", "2001:db8:10:ee::/64", "via", "2001:db8:10:ee::", "dev", VXLAN6_DEV, "onlink"],
    );
    wait_until_or(Duration::from_secs(30), &converged, &|| {
        format!("node0's stale route and neighbour to go: {:?} {:?}", cluster_routes6(ns), ko.o.vtep6_state(0))
    });

    // Restarts: both daemons down and up, twice; nothing a pod notices.
    let target = SocketAddr::new(b6.into(), 9100);
    let server = echo_server_until_closed(&b, target);
    let mut conn = tcp_connect(&a, target);
    assert_eq!(echo(&mut conn, b"before\n").unwrap(), b"before\n");
    let stream = UdpStream::start(&a, &b, SocketAddr::new(b6.into(), 9997));
    let identity = |ko: &KubeOverlay| -> Vec<String> {
        (0..2)
            .map(|i| {
                let ifindex = ko.o.cluster.node(i).ns.ip_json(&["link", "show", VXLAN6_DEV])[0]["ifindex"].clone();
                let env = std::fs::read_to_string(&ko.o.daemons[i].subnet_file).unwrap();
                format!("node{i}: {ifindex} {env:?} {:?}", annotations(ko, i))
            })
            .collect()
    };
    let before = identity(&ko);
    for round in 0..2 {
        ko.o.stop(0);
        ko.o.stop(1);
        let msg = format!("down {round}\n");
        assert_eq!(echo(&mut conn, msg.as_bytes()).unwrap(), msg.as_bytes(), "with both daemons down");
        ko.o.start(0);
        ko.o.start(1);
        wait_converged(&ko, 0, "vxlan", 1);
        wait_converged(&ko, 1, "vxlan", 1);
        let msg = format!("after {round}\n");
        assert_eq!(echo(&mut conn, msg.as_bytes()).unwrap(), msg.as_bytes(), "the same connection, restart {round}");
        assert_eq!(identity(&ko), before, "subnet, subnet.env, annotations, {VXLAN6_DEV} across restart {round}");
    }
    stream.wait_flowing("IPv6 datagrams to keep flowing after the restarts");
    stream.stop_and_check_none_lost("over IPv6 across restarts");
    drop(conn);
    assert_eq!(server.join().unwrap().ip(), IpAddr::V6(pod_addr6(&a).unwrap()), "the server saw the pod's address");

    // Refusals, on node 2 (no daemon ran there).
    let spare = 2;
    let nothing_made = |what: &str| {
        let links = link_names(&ko.o.cluster.node(spare).ns);
        assert!(!links.iter().any(|l| l.starts_with("flannel")), "{what}: node{spare} was left with {links:?}");
        assert!(!ko.o.daemons[spare].subnet_file.exists(), "{what}: a subnet.env was written");
    };
    // A Node with an IPv4 podCIDR only: named, with the field.
    ko.api.create_node("v4only", Some("10.244.9.0/24"), &[]);
    let mut cmd = ko.o.daemon_command(spare);
    cmd.args(ko.o.flags(spare)).env("NODE_NAME", "v4only");
    let (status, err) = run_to_exit(cmd);
    println!("a Node without an IPv6 podCIDR: {status}: {err}");
    assert!(!status.success(), "a Node without an IPv6 podCIDR: {status}\n{err}");
    assert!(err.contains("v4only") && err.contains("podCIDR"), "the error must name the node and the field:\n{err}");
    assert!(annotations_of(&ko, "v4only").is_empty(), "nothing written on v4only: {:?}", annotations_of(&ko, "v4only"));
    nothing_made("a Node without an IPv6 podCIDR");
    // udp with EnableIPv4 false.
    let udp_conf = ko.o.dir.path().join("net-conf-udp.json");
    std::fs::write(&udp_conf, conf(r#"{"Type":"udp"}"#)).unwrap();
    let mut cmd = ko.o.daemon_command(spare);
    let kc = ko.kubeconfig.display().to_string();
    cmd.args(["--kube-subnet-mgr", "--kubeconfig-file", &kc, "--net-config-path"]).arg(&udp_conf);
    cmd.env("NODE_NAME", KubeOverlay::node_name(spare));
    let (status, err) = run_to_exit(cmd);
    println!("udp with EnableIPv4 false: {status}: {err}");
    assert!(!status.success(), "udp with EnableIPv4 false: {status}\n{err}");
    // Named by the backend and the family setting that rules it out
    // (IPv6-only is EnableIPv4 false and EnableIPv6 true).
    let field = err.contains("EnableIPv4") || err.contains("EnableIPv6");
    assert!(err.contains("udp") && field, "the error must name udp and EnableIPv4 or EnableIPv6:\n{err}");
    assert!(annotations(&ko, spare).is_empty(), "nothing written on node{spare}: {:?}", annotations(&ko, spare));
    nothing_made("udp");
    // The two running nodes never noticed.
    for i in 0..2 {
        wait_converged(&ko, i, "vxlan", 1);
    }
}

fn annotations_of(ko: &KubeOverlay, node: &str) -> BTreeMap<String, String> {
    let n = ko.api.get_json(&["node", node]);
    let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    a.into_iter().filter(|(k, _)| k.starts_with(PREFIX)).map(|(k, v)| (k, v.to_string())).collect()
}

/// etcd mode has no IPv6-only lease (flannel's etcd store writes an IPv4
/// one whatever the configuration): the daemon refuses to start, naming
/// `EnableIPv4` and `--kube-subnet-mgr`, and makes nothing.
#[test]
fn etcd_mode_refuses_an_ipv6_only_network() {
    if !require_root() {
        return;
    }
    let o = Overlay::dual_stack(1, &conf(VXLAN));
    let (status, err) = run_to_exit(o.daemon_command(0));
    println!("etcd mode with EnableIPv4 false: {status}: {err}");
    assert!(!status.success(), "etcd mode with EnableIPv4 false: {status}\n{err}");
    assert!(
        err.contains("EnableIPv4") && err.contains("--kube-subnet-mgr"),
        "the error must name EnableIPv4 and --kube-subnet-mgr:\n{err}"
    );
    let links = link_names(&o.cluster.node(0).ns);
    assert!(!links.iter().any(|l| l.starts_with("flannel")), "{links:?}");
    assert!(!o.daemons[0].subnet_file.exists(), "a subnet.env was written");
    assert!(e2e_tests::overlay::leases(o.outside()).is_empty(), "a lease was written");
}

/// Waits until every node in `alive` programs each other alive node alike
/// in the IPv6 plane (one non-empty shape of [`peer_entries`] per node,
/// the same on every node whichever its kind); returns it.
fn wait_uniform6(ko: &KubeOverlay, alive: &[usize], kinds: &[Kind]) -> BTreeSet<String> {
    let ips: Vec<String> = alive.iter().map(|&i| node_ipv6(i).to_string()).collect();
    let shapes = || {
        let ps: Vec<Peer> = kube_peers6(&ko.api).into_iter().filter(|p| ips.contains(&p.public_ip)).collect();
        (ps.len(), alive.iter().map(|&i| (i, peer_shapes(&ko.o, i, &ps))).collect::<Vec<_>>())
    };
    let uniform = || {
        let (n, s) = shapes();
        let first = s[0].1.first().map(|x| x.0.clone());
        n == alive.len()
            && s.iter().all(|(_, s)| s.len() == 1 && !s[0].0.is_empty() && s[0].1.len() == alive.len() - 1)
            && s.iter().all(|(_, s)| Some(&s[0].0) == first.as_ref())
    };
    wait_until_or(Duration::from_secs(30), &uniform, &|| {
        let mut text = String::new();
        for (i, s) in shapes().1 {
            text += &format!("node{i} ({:?}):\n", kinds[i]);
            for (entries, who) in s {
                text += &format!("  for {who:?}:\n    {}\n", entries.into_iter().collect::<Vec<_>>().join("\n    "));
            }
            text += &format!("  its log ends:\n{}\n", tail(&ko.o, i));
        }
        format!("the nodes to program their peers alike:\n{text}")
    });
    shapes().1[0].1[0].0.clone()
}

/// What must not change on node 0 when it migrates: its subnet.env but
/// `FLANNEL_MTU` (upstream's differs, below), its Node's podCIDRs and
/// annotations, flannel-v6.1's MAC, its pod's address, and what node 1
/// programs for it.
fn identity(ko: &KubeOverlay, pod: &Netns) -> Vec<String> {
    let env = std::fs::read_to_string(&ko.o.daemons[0].subnet_file).unwrap();
    let env: Vec<&str> = env.lines().filter(|l| !l.starts_with("FLANNEL_MTU=")).collect();
    let n = ko.api.get_json(&["node", "node0"]);
    let me = kube_peers6(&ko.api).into_iter().find(|p| p.public_ip == node_ipv6(0).to_string()).expect("node0's lease");
    vec![
        format!("subnet.env {env:?}"),
        format!("podCIDRs {}", n["spec"]["podCIDRs"]),
        format!("annotations {:?}", annotations(ko, 0)),
        format!("{VXLAN6_DEV} {:?}", dev_mac(&ko.o, 0, VXLAN6_DEV)),
        format!("pod {:?}", pod_addr6(pod)),
        format!("node1 for node0 {:?}", peer_entries(&ko.o.cluster.node(1).ns, &me)),
    ]
}

/// Upstream flanneld v0.20.2 and flanneld-rs side by side in one
/// IPv6-only vxlan cluster in Kubernetes mode (nodes 0 and 2 upstream,
/// node 1 ours), started with the same flags, files and environment: both
/// annotate their Nodes alike, have the same flannel-v6.1 and program every
/// peer alike; pods reach each other across kinds. Then node 0 migrates in
/// place, upstream -> flanneld-rs -> upstream, keeping its subnet, its
/// VTEP MAC, its annotations and node 1's state for it, with a TCP
/// connection and a datagram stream over IPv6 to node 1's pod kept
/// without loss.
///
/// The one difference accepted, as in dual-stack (README): `FLANNEL_MTU`.
/// Upstream writes the underlay's MTU minus 50 (1450) although its
/// flannel-v6.1 has 1430; flanneld-rs writes flannel-v6.1's.
#[test]
fn kube_vxlan_ipv6_only_mixed_with_upstream_and_migration() {
    if !(require_root() && require_kube() && require_upstream()) {
        return;
    }
    const KINDS: [Kind; 3] = [Kind::Upstream, Kind::Ours, Kind::Upstream];
    let mut ko = kube_ipv6_only_overlay(3, &conf(VXLAN));
    start_nodes(&mut ko.o, &KINDS);
    let all = [0, 1, 2];
    for (i, kind) in KINDS.iter().enumerate() {
        let mtu = if *kind == Kind::Ours { VXLAN6_MTU } else { UNDERLAY_MTU - 50 };
        assert_subnet_env(&ko.o, i, mtu, false);
        assert_annotations(&ko, i, "vxlan");
        assert_no_ipv4(&ko, i);
        assert_eq!(subnet6(&ko.o, i).unwrap().to_string(), node_cidr6(i));
    }
    let shape = wait_uniform6(&ko, &all, &KINDS);
    println!("every node programs each peer as:\n  {}", shape.into_iter().collect::<Vec<_>>().join("\n  "));
    let devs: Vec<_> = all.iter().map(|&i| own_device(&ko.o, i, VXLAN6_DEV, &node_cidr6(i))).collect();
    assert!(devs[0].is_some(), "upstream's node0 has no {VXLAN6_DEV}");
    for i in 1..3 {
        assert_eq!(devs[i], devs[0], "{VXLAN6_DEV} of node{i} ({:?}) and node0 (upstream)", KINDS[i]);
    }
    for i in 0..3 {
        wait_converged(&ko, i, "vxlan", 2);
    }
    let pods = pods(&ko.o, "m");
    pods_talk(&pods, 7600);

    // Node 0 migrates in place, both ways.
    let (p0, a0) = (&pods[0].0, pods[0].1);
    let (p1, a1) = (&pods[1].0, pods[1].1);
    let before = identity(&ko, p0);
    for (k, (step, to)) in
        [("upstream -> flanneld-rs", Kind::Ours), ("flanneld-rs -> upstream", Kind::Upstream)].into_iter().enumerate()
    {
        let port = 7700 + 10 * k as u16;
        let target = SocketAddr::new(a1.into(), port);
        let server = echo_server_until_closed(p1, target);
        let mut conn = tcp_connect(p0, target);
        assert_eq!(echo(&mut conn, b"before\n").unwrap(), b"before\n");
        let fwd = UdpStream::start(p0, p1, SocketAddr::new(a1.into(), port + 1));
        let back = UdpStream::start(p1, p0, SocketAddr::new(a0.into(), port + 2));
        ko.o.stop(0);
        start(&mut ko.o, 0, to);
        wait_converged(&ko, 0, "vxlan", 2);
        fwd.wait_flowing(&format!("pod0 -> pod1 to flow after {step}"));
        back.wait_flowing(&format!("pod1 -> pod0 to flow after {step}"));
        let msg = format!("after {step}\n");
        assert_eq!(echo(&mut conn, msg.as_bytes()).unwrap(), msg.as_bytes(), "the connection kept across {step}");
        assert_eq!(identity(&ko, p0), before, "node0 across {step}");
        assert_annotations(&ko, 0, "vxlan");
        assert_no_ipv4(&ko, 0);
        for (dir, s) in [("pod0 -> pod1", fwd), ("pod1 -> pod0", back)] {
            let (sent, lost) = s.stop_and_count();
            println!("{step}: {dir}: {} of {sent} datagrams lost", lost.len());
            assert!(lost.is_empty(), "{step}: {dir}: {} of {sent} datagrams lost: {lost:?}", lost.len());
        }
        drop(conn);
        assert_eq!(server.join().unwrap().ip(), IpAddr::V6(a0), "{step}: the server saw pod0's address");
    }
    wait_uniform6(&ko, &all, &KINDS);
    pods_talk(&pods, 7800);
}
