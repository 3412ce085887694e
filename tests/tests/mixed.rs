//! Mixed clusters: upstream flannel's own flanneld (v0.20.2) on nodes 0 and
//! 2, flanneld-rs on nodes 1 and 3, both with the same flags and files, in
//! etcd mode (real etcd) and Kubernetes mode (real kube-apiserver), for each
//! backend both have. Every pod reaches every pod; every node programs the
//! other kind's nodes exactly as it programs its own kind's, and exactly as
//! the other kind programs them; a node of either kind leaving is cleaned up
//! on both kinds.
//!
//! Dual-stack (vxlan, etcd and Kubernetes mode,
//! [`etcd_vxlan_dual_stack_mixed_cluster`]): the same with `EnableIPv6`,
//! for both families.
//!
//! The default run covers every backend in etcd mode and vxlan and host-gw
//! in Kubernetes mode; the rest of the matrix (Kubernetes mode with
//! DirectRouting and udp) is `#[ignore]`d: `cargo test -p e2e-tests --test
//! mixed -- --include-ignored`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e_tests::kube::{require_kube, ApiServer, KubeOverlay};
use e2e_tests::mixed::{
    dev_mac, dual_conf, etcd_peers, etcd_peers6, key_subnets, kube_dual_stack_overlay, kube_peers, kube_peers6,
    lease_key_of, node_ipv6, own_device, peer_entries, peer_shapes, pod_addr6, require_upstream, start_nodes, subnet6,
    tail, Kind, Peer, NETWORK6,
};
use e2e_tests::overlay::{etcdctl_ok, Overlay};
use e2e_tests::{echo_server, tcp_round_trip};
use netns_fixtures::{require_root, wait_until, Netns};

const KINDS: [Kind; 4] = [Kind::Upstream, Kind::Ours, Kind::Upstream, Kind::Ours];

fn conf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#)
}

/// Waits until every node in `alive` programs each of the other alive nodes
/// the same way (one shape of [`peer_entries`], not empty), and every node,
/// whichever its kind, the same shape; returns it. Panics with every node's
/// shapes when that does not happen within 30 s.
fn wait_uniform(o: &Overlay, alive: &[usize], peers: &dyn Fn() -> Vec<Peer>) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ips: Vec<String> =
            alive.iter().flat_map(|&i| [o.cluster.node(i).underlay_ip.to_string(), node_ipv6(i).to_string()]).collect();
        let ps: Vec<Peer> = peers().into_iter().filter(|p| ips.contains(&p.public_ip)).collect();
        let shapes: Vec<_> = alive.iter().map(|&i| (i, peer_shapes(o, i, &ps))).collect();
        let complete = ps.len() == alive.len()
            && shapes.iter().all(|(_, s)| s.len() == 1 && !s[0].0.is_empty() && s[0].1.len() == alive.len() - 1);
        let first = shapes[0].1.first().map(|s| s.0.clone());
        if complete && shapes.iter().all(|(_, s)| Some(&s[0].0) == first.as_ref()) {
            return first.unwrap();
        }
        if Instant::now() >= deadline {
            let mut text = String::new();
            for (i, s) in &shapes {
                text += &format!("node{i} ({:?}):\n", KINDS[*i]);
                for (entries, who) in s {
                    text += &format!("  for {who:?}:\n");
                    for e in entries {
                        text += &format!("    {e}\n");
                    }
                }
            }
            for &i in alive {
                text += &format!("node{i}'s log ends:\n{}\n", tail(o, i));
            }
            panic!("the nodes do not program their peers alike (peers {ps:?}):\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every node in `alive` has the same overlay device `dev` (none for host-gw).
fn assert_same_device(o: &Overlay, alive: &[usize], dev: &str, subnets: &dyn Fn(usize) -> String) {
    let devs: Vec<_> = alive.iter().map(|&i| (i, own_device(o, i, dev, &subnets(i)))).collect();
    for (i, d) in &devs[1..] {
        assert_eq!(d, &devs[0].1, "node{i} ({:?}) and node{} ({:?}): {dev}", KINDS[*i], devs[0].0, KINDS[devs[0].0]);
    }
}

/// Node `i`'s subnet.env with its own subnet's address as `<own>`.
fn subnet_env(o: &Overlay, i: usize) -> String {
    let text = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
    let net = o.subnet(i).network().octets();
    text.replace(&format!("{}.{}.{}.", net[0], net[1], net[2]), "<own>.")
}

/// Every node's subnet.env is the same text, but for its own subnet.
fn assert_same_subnet_env(o: &Overlay, kinds: &[Kind]) {
    for i in 1..kinds.len() {
        assert_eq!(
            subnet_env(o, i),
            subnet_env(o, 0),
            "subnet.env of node{i} ({:?}) and node0 ({:?})",
            kinds[i],
            kinds[0]
        );
    }
}

/// Waits until a ping from every pod reaches every other pod (upstream's udp
/// backend learns its peers a moment after it says it runs), then checks TCP
/// both ways between every pair, source addresses kept.
fn pods_talk(pods: &[&(Netns, Ipv4Addr)], port_base: u16) {
    let pods: Vec<(&Netns, IpAddr)> = pods.iter().map(|p| (&p.0, IpAddr::V4(p.1))).collect();
    pods_talk_ips(&pods, port_base);
}

/// [`pods_talk`] for pods given by one address each, of either family.
fn pods_talk_ips(pods: &[(&Netns, IpAddr)], port_base: u16) {
    let n = pods.len();
    for (i, &(from, from_addr)) in pods.iter().enumerate() {
        for (j, &(to, addr)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            wait_until(Duration::from_secs(20), &format!("pod {from_addr} to reach pod {addr}"), || {
                from.run("ping", &["-c", "1", "-W", "1", &addr.to_string()]).is_ok_and(|o| o.status.success())
            });
            let target = SocketAddr::new(addr, port_base + (i * n + j) as u16);
            let server = echo_server(to, target);
            assert_eq!(tcp_round_trip(from, target), "ping\n", "pod {from_addr} -> pod {addr}");
            assert_eq!(server.join().unwrap().ip(), from_addr, "pod {from_addr} -> {addr}: source kept");
        }
    }
}

/// The mixed cluster in etcd mode with `backend`: node `dev`'s device must be
/// alike on both kinds; `per_peer` whether the backend programs anything per
/// peer in the kernel (udp does not: its peers live in the daemon).
fn etcd_mixed(backend: &str, dev: Option<&str>, per_peer: bool, port_base: u16) {
    if !(require_root() && require_upstream()) {
        return;
    }
    let mut o = Overlay::with_conf(4, &conf(backend));
    start_nodes(&mut o, &KINDS);
    assert_same_subnet_env(&o, &KINDS);
    let all = [0, 1, 2, 3];
    // The leases both kinds write are alike: same keys, same fields.
    let values: Vec<serde_json::Value> = e2e_tests::overlay::leases(o.outside()).into_values().collect();
    let shape = |v: &serde_json::Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.extend(v["BackendData"].as_object().into_iter().flat_map(|d| d.keys().cloned()));
        (keys, v["BackendType"].to_string(), v["BackendData"]["VNI"].to_string())
    };
    let ours = values.iter().filter(|v| ["192.0.2.11", "192.0.2.13"].contains(&v["PublicIP"].as_str().unwrap()));
    let theirs = values.iter().filter(|v| ["192.0.2.10", "192.0.2.12"].contains(&v["PublicIP"].as_str().unwrap()));
    let (ours, theirs): (BTreeSet<_>, BTreeSet<_>) = (ours.map(shape).collect(), theirs.map(shape).collect());
    assert_eq!(ours, theirs, "leases of flanneld-rs and of upstream: {values:?}");
    assert_eq!(ours.len(), 1, "{values:?}");

    if per_peer {
        let shape = wait_uniform(&o, &all, &|| etcd_peers(&o));
        println!("every node programs each peer as:\n  {}", shape.into_iter().collect::<Vec<_>>().join("\n  "));
    }
    if let Some(dev) = dev {
        assert_same_device(&o, &all, dev, &|i| o.subnet(i).to_string());
    }
    let pods: Vec<_> = (0..4).map(|i| o.add_pod(i, &format!("m{i}"))).collect();
    pods_talk(&pods.iter().collect::<Vec<_>>(), port_base);

    // Node 2 (upstream) leaves, then node 3 (flanneld-rs): their daemons
    // stop and their leases go; each remaining node of both kinds forgets them.
    for (gone, alive) in [(2usize, vec![0usize, 1, 3]), (3, vec![0, 1])] {
        let leaving =
            etcd_peers(&o).into_iter().find(|p| p.public_ip == o.cluster.node(gone).underlay_ip.to_string()).unwrap();
        o.stop(gone);
        etcdctl_ok(o.outside(), &["del", &o.lease_key(gone)]);
        for &i in &alive {
            if per_peer {
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    peer_entries(&o.cluster.node(i).ns, &leaving).is_empty()
                });
            } else if KINDS[i] == Kind::Upstream {
                // Without a per-peer kernel state, the sign is the daemon's:
                // upstream logs it (its ICMP net unreachable for a subnet it
                // does not know did not reach the pod's ping here).
                let said = format!("Subnet removed: {}", leaving.subnet);
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    o.log(i).contains(&said)
                });
            } else {
                // flanneld-rs refuses a packet to a subnet it does not know
                // at once (ICMP net unreachable) instead of sending it on.
                let pod_gone = pods[gone].1.to_string();
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    let out = pods[i].0.run("ping", &["-c", "1", "-W", "1", &pod_gone]).unwrap();
                    String::from_utf8_lossy(&out.stdout).contains("Unreachable")
                });
            }
        }
        if per_peer {
            wait_uniform(&o, &alive, &|| etcd_peers(&o));
        }
        let remaining: Vec<_> = alive.iter().map(|&i| &pods[i]).collect();
        pods_talk(&remaining, port_base + 100);
    }
}

#[test]
fn etcd_vxlan_mixed_cluster() {
    etcd_mixed(r#"{"Type":"vxlan"}"#, Some("flannel.1"), true, 7400);
}

#[test]
fn etcd_vxlan_direct_routing_mixed_cluster() {
    etcd_mixed(r#"{"Type":"vxlan","DirectRouting":true}"#, Some("flannel.1"), true, 7500);
}

#[test]
fn etcd_host_gw_mixed_cluster() {
    etcd_mixed(r#"{"Type":"host-gw"}"#, None, true, 7600);
}

#[test]
fn etcd_udp_mixed_cluster() {
    etcd_mixed(r#"{"Type":"udp"}"#, Some("flannel0"), false, 7700);
}

/// Node `i`'s flannel annotations as `key=value`, the values that differ
/// per node by nature (public IPs, VTEP MACs) reduced to their shape.
fn node_annotations(api: &ApiServer, i: usize) -> BTreeSet<String> {
    let n = api.get_json(&["node", &KubeOverlay::node_name(i)]);
    let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    a.into_iter()
        .filter(|(k, _)| k.starts_with(e2e_tests::kube::PREFIX))
        .map(|(k, v)| {
            let v = v.as_str().unwrap();
            let per_node = k.ends_with("/public-ip")
                || k.ends_with("/public-ipv6")
                || (k.ends_with("/backend-data") || k.ends_with("/backend-v6-data")) && v.contains("VtepMAC");
            let v = if per_node {
                serde_json::from_str::<serde_json::Value>(v)
                    .ok()
                    .and_then(|d| d.as_object().map(|o| format!("{:?}", o.keys().collect::<Vec<_>>())))
                    .unwrap_or_else(|| "<per node>".into())
            } else {
                v.to_string()
            };
            format!("{k}={v}")
        })
        .collect()
}

/// The mixed cluster in Kubernetes mode: upstream gets the same
/// `--kube-subnet-mgr --kubeconfig-file --net-config-path` and `NODE_NAME`
/// as flanneld-rs.
fn kube_mixed(backend: &str, dev: Option<&str>, per_peer: bool, port_base: u16) {
    if !(require_root() && require_kube() && require_upstream()) {
        return;
    }
    let mut ko = KubeOverlay::with_conf(4, &conf(backend));
    for i in 0..4 {
        ko.create_node(i);
    }
    start_nodes(&mut ko.o, &KINDS);
    assert_same_subnet_env(&ko.o, &KINDS);
    let all = [0, 1, 2, 3];
    // Both kinds annotate their Node alike.
    let ann: Vec<BTreeSet<String>> = (0..4).map(|i| node_annotations(&ko.api, i)).collect();
    // Both set the Node's NetworkUnavailable condition alike.
    let cond = |i: usize| {
        let n = ko.api.get_json(&["node", &KubeOverlay::node_name(i)]);
        let c = n["status"]["conditions"].as_array().cloned().unwrap_or_default();
        c.into_iter()
            .find(|c| c["type"] == "NetworkUnavailable")
            .map(|c| format!("{} {} {}", c["status"], c["reason"], c["message"]))
    };
    assert!(cond(0).is_some(), "upstream set no NetworkUnavailable condition");
    assert_eq!(cond(1), cond(0), "NetworkUnavailable of flanneld-rs (node1) and upstream (node0)");
    assert_eq!(ann[1], ann[0], "annotations of flanneld-rs (node1) and upstream (node0)");
    assert_eq!(ann[3], ann[2], "annotations of flanneld-rs (node3) and upstream (node2)");

    if per_peer {
        let shape = wait_uniform(&ko.o, &all, &|| kube_peers(&ko.api));
        println!("every node programs each peer as:\n  {}", shape.into_iter().collect::<Vec<_>>().join("\n  "));
    }
    if let Some(dev) = dev {
        assert_same_device(&ko.o, &all, dev, &|i| format!("10.244.{}.0/24", i + 1));
    }
    let pods: Vec<_> = (0..4).map(|i| ko.o.add_pod(i, &format!("k{i}"))).collect();
    pods_talk(&pods.iter().collect::<Vec<_>>(), port_base);

    for (gone, alive) in [(2usize, vec![0usize, 1, 3]), (3, vec![0, 1])] {
        let leaving = kube_peers(&ko.api)
            .into_iter()
            .find(|p| p.public_ip == ko.o.cluster.node(gone).underlay_ip.to_string())
            .unwrap();
        ko.o.stop(gone);
        ko.api.kubectl_ok(&["delete", "node", &KubeOverlay::node_name(gone)]);
        for &i in &alive {
            if per_peer {
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    peer_entries(&ko.o.cluster.node(i).ns, &leaving).is_empty()
                });
            } else if KINDS[i] == Kind::Upstream {
                let said = format!("Subnet removed: {}", leaving.subnet);
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    ko.o.log(i).contains(&said)
                });
            } else {
                let pod_gone = pods[gone].1.to_string();
                wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                    let out = pods[i].0.run("ping", &["-c", "1", "-W", "1", &pod_gone]).unwrap();
                    String::from_utf8_lossy(&out.stdout).contains("Unreachable")
                });
            }
        }
        if per_peer {
            wait_uniform(&ko.o, &alive, &|| kube_peers(&ko.api));
        }
        let remaining: Vec<_> = alive.iter().map(|&i| &pods[i]).collect();
        pods_talk(&remaining, port_base + 100);
    }
}

#[test]
fn kube_vxlan_mixed_cluster() {
    kube_mixed(r#"{"Type":"vxlan"}"#, Some("flannel.1"), true, 7800);
}

#[test]
fn kube_host_gw_mixed_cluster() {
    kube_mixed(r#"{"Type":"host-gw"}"#, None, true, 7900);
}

#[test]
#[ignore = "full matrix: run with --include-ignored"]
fn kube_vxlan_direct_routing_mixed_cluster() {
    kube_mixed(r#"{"Type":"vxlan","DirectRouting":true}"#, Some("flannel.1"), true, 8000);
}

#[test]
#[ignore = "full matrix: run with --include-ignored"]
fn kube_udp_mixed_cluster() {
    kube_mixed(r#"{"Type":"udp"}"#, Some("flannel0"), false, 8100);
}

/// Node `i`'s subnet.env with its own subnets' addresses as `<own>` and
/// `<own6>`, and its `FLANNEL_MTU` line apart.
fn dual_subnet_env(o: &Overlay, i: usize) -> (String, String) {
    let text = subnet_env(o, i);
    let own6 = subnet6(o, i).unwrap_or_else(|| panic!("node{i}'s subnet.env has no FLANNEL_IPV6_SUBNET:\n{text}"));
    // "2001:db8:10:1::1/64": the network's address without its trailing "::".
    let text = text.replace(&own6.network().to_string(), "<own6>::");
    let mtu = text.lines().find(|l| l.starts_with("FLANNEL_MTU=")).unwrap_or_default().to_string();
    let rest = text.lines().filter(|l| !l.starts_with("FLANNEL_MTU=")).collect::<Vec<_>>().join("\n");
    (rest, mtu)
}

/// Every node's subnet.env is the same but for its own subnets and
/// `FLANNEL_MTU`, which is upstream's 1450 and our 1430 (see
/// [`etcd_vxlan_dual_stack_mixed_cluster`]); both name [`NETWORK6`].
fn assert_same_dual_subnet_env(o: &Overlay) {
    let envs: Vec<(String, String)> = (0..KINDS.len()).map(|i| dual_subnet_env(o, i)).collect();
    for (i, (rest, mtu)) in envs.iter().enumerate() {
        assert_eq!(rest, &envs[0].0, "subnet.env of node{i} ({:?}) and node0 ({:?})", KINDS[i], KINDS[0]);
        assert!(rest.contains(&format!("FLANNEL_IPV6_NETWORK={NETWORK6}")), "node{i}'s subnet.env:\n{rest}");
        let want = match KINDS[i] {
            Kind::Upstream => "FLANNEL_MTU=1450",
            Kind::Ours => "FLANNEL_MTU=1430",
        };
        assert_eq!(mtu, want, "node{i} ({:?})'s FLANNEL_MTU", KINDS[i]);
    }
}

/// Both planes of a dual-stack vxlan cluster, on the nodes in `alive`:
/// every node programs each peer alike per family (`peers4`, `peers6`:
/// the leases' halves), and has the same flannel.1 and flannel-v6.1.
fn assert_dual_planes_alike(
    o: &Overlay,
    alive: &[usize],
    peers4: &dyn Fn() -> Vec<Peer>,
    peers6: &dyn Fn() -> Vec<Peer>,
) {
    for (family, dev, peers) in [("IPv4", "flannel.1", peers4), ("IPv6", "flannel-v6.1", peers6)] {
        let shape = wait_uniform(o, alive, peers);
        println!(
            "{family}: every node programs each peer as:\n  {}",
            shape.into_iter().collect::<Vec<_>>().join("\n  ")
        );
        let own =
            |i: usize| if family == "IPv4" { o.subnet(i).to_string() } else { subnet6(o, i).unwrap().to_string() };
        assert_same_device(o, alive, dev, &own);
        let d = own_device(o, alive[0], dev, &own(alive[0])).unwrap_or_else(|| panic!("node{} has no {dev}", alive[0]));
        if alive.len() == KINDS.len() {
            println!("{family}: every node's {dev}:\n  {}", d.join("\n  "));
        }
    }
}

/// A pod on each node (the plugin gives it an address of each family);
/// returns them with their IPv6 addresses, checked to be in their node's
/// `FLANNEL_IPV6_SUBNET`.
fn dual_pods(o: &Overlay, prefix: &str) -> Vec<(Netns, Ipv4Addr, IpAddr)> {
    (0..o.daemons.len())
        .map(|i| {
            let (pod, a4) = o.add_pod(i, &format!("{prefix}{i}"));
            let a6 = pod_addr6(&pod).unwrap_or_else(|| panic!("pod on node{i} has no IPv6 address"));
            let own6 = subnet6(o, i).unwrap();
            assert!(own6.contains(&a6), "pod on node{i}: {a6} outside {own6}");
            (pod, a4, IpAddr::V6(a6))
        })
        .collect()
}

/// TCP both ways between the pods of the nodes in `alive`, over IPv4 and
/// over IPv6.
fn dual_pods_talk(pods: &[(Netns, Ipv4Addr, IpAddr)], alive: &[usize], port: u16) {
    let v4: Vec<(&Netns, IpAddr)> = alive.iter().map(|&i| (&pods[i].0, IpAddr::V4(pods[i].1))).collect();
    pods_talk_ips(&v4, port);
    let v6: Vec<(&Netns, IpAddr)> = alive.iter().map(|&i| (&pods[i].0, pods[i].2)).collect();
    pods_talk_ips(&v6, port + 50);
}

/// Dual-stack vxlan, etcd mode: upstream flanneld v0.20.2 (nodes 0 and 2)
/// and flanneld-rs (nodes 1 and 3) with `EnableIPv6` and
/// `IPv6Network` [`NETWORK6`], each node's underlay with an IPv6 address
/// beside its IPv4 one. Both kinds write alike dual-stack leases (one key
/// with both subnets, `PublicIPv6`, `BackendV6Data`) and subnet.env (but
/// `FLANNEL_MTU`, below); every node programs every peer alike in each
/// family (flannel.1 and flannel-v6.1: routes, neighbours, FDB entries) and
/// has the same devices; every pod reaches every pod over IPv4 and over IPv6,
/// TCP both ways, sources kept; a node of each kind leaves and both
/// families forget it on every node.
///
/// The one difference accepted: `FLANNEL_MTU`. Upstream v0.20.2 writes the
/// underlay's MTU minus 50 whatever the families (1450), although its
/// flannel-v6.1 (made by the kernel over the IPv6 underlay) has 1430;
/// flanneld-rs writes the smaller of its two devices' (1430, README
/// "dual-stack"), so that a pod's IPv6 packets fit flannel-v6.1.
#[test]
fn etcd_vxlan_dual_stack_mixed_cluster() {
    if !(require_root() && require_upstream()) {
        return;
    }
    let mut o = Overlay::dual_stack(4, &dual_conf(r#"{"Type":"vxlan"}"#));
    start_nodes(&mut o, &KINDS);
    let all = [0, 1, 2, 3];
    assert_same_dual_subnet_env(&o);

    // The leases: one dual-stack key per node, the same fields on both kinds.
    let all_leases = e2e_tests::overlay::leases(o.outside());
    assert_eq!(all_leases.len(), 4, "{all_leases:?}");
    for key in all_leases.keys() {
        assert!(key_subnets(key).1.is_some(), "a lease without its IPv6 subnet: {key}");
    }
    let shape = |v: &serde_json::Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        for data in ["BackendData", "BackendV6Data"] {
            keys.extend(v[data].as_object().into_iter().flat_map(|d| d.keys().map(|k| format!("{data}.{k}"))));
        }
        (keys, v["BackendType"].to_string(), v["BackendData"]["VNI"].to_string(), v["BackendV6Data"]["VNI"].to_string())
    };
    let kind_of = |v: &serde_json::Value| {
        let ip = v["PublicIP"].as_str().unwrap();
        KINDS[all.iter().position(|&i| o.cluster.node(i).underlay_ip.to_string() == ip).unwrap()]
    };
    let (ours, theirs): (Vec<_>, Vec<_>) = all_leases.values().partition(|v| kind_of(v) == Kind::Ours);
    let ours: BTreeSet<_> = ours.into_iter().map(shape).collect();
    let theirs: BTreeSet<_> = theirs.into_iter().map(shape).collect();
    assert_eq!(ours, theirs, "dual-stack leases of flanneld-rs and of upstream: {all_leases:?}");
    assert_eq!(ours.len(), 1, "{all_leases:?}");
    for (i, v) in all.iter().map(|&i| (i, &all_leases[&lease_key_of(&o, i)])) {
        assert_eq!(v["PublicIPv6"], node_ipv6(i).to_string(), "node{i}'s lease: {v}");
        assert_eq!(v["BackendV6Data"]["VtepMAC"], dev_mac(&o, i, "flannel-v6.1").unwrap(), "node{i}'s lease: {v}");
    }

    assert_dual_planes_alike(&o, &all, &|| etcd_peers(&o), &|| etcd_peers6(&o));
    let pods = dual_pods(&o, "d");
    dual_pods_talk(&pods, &all, 8200);

    // Node 2 (upstream) leaves, then node 3 (flanneld-rs): every remaining
    // node of both kinds forgets both halves of its lease.
    for (gone, alive) in [(2usize, vec![0usize, 1, 3]), (3, vec![0, 1])] {
        let ip = o.cluster.node(gone).underlay_ip.to_string();
        let ip6 = node_ipv6(gone).to_string();
        let leaving = etcd_peers(&o).into_iter().find(|p| p.public_ip == ip).unwrap();
        let leaving6 = etcd_peers6(&o).into_iter().find(|p| p.public_ip == ip6).unwrap();
        let key = lease_key_of(&o, gone);
        o.stop(gone);
        etcdctl_ok(o.outside(), &["del", &key]);
        for &i in &alive {
            wait_until(Duration::from_secs(15), &format!("node{i} ({:?}) to forget node{gone}", KINDS[i]), || {
                let ns = &o.cluster.node(i).ns;
                peer_entries(ns, &leaving).is_empty() && peer_entries(ns, &leaving6).is_empty()
            });
        }
        assert_dual_planes_alike(&o, &alive, &|| etcd_peers(&o), &|| etcd_peers6(&o));
        dual_pods_talk(&pods, &alive, 8300);
    }
}

/// Dual-stack vxlan in Kubernetes mode: as
/// [`etcd_vxlan_dual_stack_mixed_cluster`], the leases being the Nodes'
/// `spec.podCIDRs` of both families (set through the API as
/// kube-controller-manager sets them; the API server runs with
/// `IPv6DualStack`, without which 1.20 keeps only the first) and the
/// annotations `backend-v6-data` and `public-ipv6`, which both kinds write
/// alike.
#[test]
fn kube_vxlan_dual_stack_mixed_cluster() {
    if !(require_root() && require_kube() && require_upstream()) {
        return;
    }
    let mut ko = kube_dual_stack_overlay(4, &dual_conf(r#"{"Type":"vxlan"}"#));
    start_nodes(&mut ko.o, &KINDS);
    let all = [0, 1, 2, 3];
    assert_same_dual_subnet_env(&ko.o);
    let ann: Vec<BTreeSet<String>> = all.iter().map(|&i| node_annotations(&ko.api, i)).collect();
    assert!(ann[0].iter().any(|a| a.contains("/backend-v6-data=")), "upstream's annotations: {:?}", ann[0]);
    assert_eq!(ann[1], ann[0], "annotations of flanneld-rs (node1) and upstream (node0)");
    assert_eq!(ann[3], ann[2], "annotations of flanneld-rs (node3) and upstream (node2)");
    assert_dual_planes_alike(&ko.o, &all, &|| kube_peers(&ko.api), &|| kube_peers6(&ko.api));
    let pods = dual_pods(&ko.o, "kd");
    dual_pods_talk(&pods, &all, 8400);
}
