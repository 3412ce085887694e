//! A node on an underlay with pods plugged in by the real plugin binary,
//! chained with the reference `portmap` plugin, and talking to an outside host.

use std::net::SocketAddr;

use e2e_tests::{cni, cni_env, echo_server, tcp_round_trip, workspace_bin};
use netns_fixtures::{Cluster, Netns};
use serde_json::json;

fn conf(dir: &std::path::Path, version: &str) -> serde_json::Value {
    json!({
        "cniVersion": version,
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": dir.join("subnet.env"),
        "dataDir": dir.join("data"),
        "delegate": { "hairpinMode": true, "isDefaultGateway": true }
    })
}

#[test]
fn portmap_chained_after_flannel_gets_a_usable_prev_result() {
    if !netns_fixtures::require_root() {
        return;
    }
    let cluster = Cluster::with_outside(1).unwrap();
    let node = cluster.node(0);
    let outside = cluster.outside().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let pod: Netns = node.add_pod_netns("web").unwrap();
    let pod_path = pod.path().to_str().unwrap().to_string();
    let plugin = workspace_bin("flannel");
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");

    // The runtime's conflist: flannel, then portmap with one mapping.
    let flannel_conf = conf(dir.path(), "1.0.0");
    let add = cni(&node.ns, &plugin, &cni_env("ADD", "web", &pod_path), &flannel_conf.to_string());
    assert!(add.ok, "flannel ADD: {:?}", add);
    let portmap_conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "portmap",
        "capabilities": { "portMappings": true },
        "runtimeConfig": { "portMappings": [ { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" } ] },
        "prevResult": add.json,
    });
    let pm = cni(&node.ns, portmap, &cni_env("ADD", "web", &pod_path), &portmap_conf.to_string());
    assert!(pm.ok, "portmap ADD with our prevResult failed: {:?}", pm);
    // portmap passes the result through unchanged.
    assert_eq!(pm.json["ips"], add.json["ips"]);

    // The outside host reaches the pod through the node's mapped port.
    let server = echo_server(&pod, "10.244.1.2:80".parse().unwrap());
    let node_port: SocketAddr = format!("{}:8080", node.underlay_ip).parse().unwrap();
    assert_eq!(tcp_round_trip(outside, node_port), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "192.0.2.200");

    let pm_del = cni(&node.ns, portmap, &cni_env("DEL", "web", &pod_path), &portmap_conf.to_string());
    assert!(pm_del.ok, "portmap DEL: {:?}", pm_del);
    let del = cni(&node.ns, &plugin, &cni_env("DEL", "web", &pod_path), &flannel_conf.to_string());
    assert!(del.ok, "flannel DEL: {:?}", del);
}

#[test]
fn ip_masq_makes_the_outside_host_see_the_node_address() {
    if !netns_fixtures::require_root() {
        return;
    }
    let cluster = Cluster::with_outside(1).unwrap();
    let node = cluster.node(0);
    let outside = cluster.outside().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The daemon does not masquerade, so the plugin does (flannel's default).
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let pod = node.add_pod_netns("client").unwrap();
    let pod_path = pod.path().to_str().unwrap().to_string();
    let plugin = workspace_bin("flannel");
    let c = conf(dir.path(), "1.0.0").to_string();
    let add = cni(&node.ns, &plugin, &cni_env("ADD", "client", &pod_path), &c);
    assert!(add.ok, "{:?}", add);

    let server = echo_server(outside, "192.0.2.200:9000".parse().unwrap());
    assert_eq!(tcp_round_trip(&pod, "192.0.2.200:9000".parse().unwrap()), "ping\n");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(node.underlay_ip));

    let del = cni(&node.ns, &plugin, &cni_env("DEL", "client", &pod_path), &c);
    assert!(del.ok, "{:?}", del);
    let set = e2e_tests::run_ok(node.ns.command("nft").args(["list", "set", "ip", "flannel-rs-cni", "pods"]));
    assert!(!set.contains("10.244.1.2"), "{set}");
}
