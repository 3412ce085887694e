//! ADD failing after it allocated an address, and (b, c) after the veth pair
//! exists: the rollback must leave node, pod, IPAM store and masquerade set
//! exactly as they were. Each test records that footprint with `ip -j`,
//! `nft -j` and the files on disk before the failing ADD and compares after.

mod common;

use common::{Footprint, Node};
use netns_fixtures::Netns;
use serde_json::{json, Value};

/// The namespace's path as CNI_NETNS wants it.
fn path(ns: &Netns) -> String {
    ns.path().to_string_lossy().into_owned()
}

/// A node whose bridge (which ADD keeps: it is shared by every pod) already
/// exists, made by an ADD and a DEL of another pod with `conf`.
fn node_with_bridge(conf_for: impl Fn(&Node) -> Value) -> Option<(Node, Netns)> {
    let node = Node::new()?;
    if !common::have_nft(&node.ns) {
        return None;
    }
    let pod = Netns::new("pod").expect("pod namespace");
    let conf = conf_for(&node);
    let out = node.verb("ADD", "warm-up", &path(&pod), "eth0", &conf);
    assert!(out.ok, "warm-up ADD: {} {}", out.stdout, out.stderr);
    let out = node.verb("DEL", "warm-up", &path(&pod), "eth0", &conf);
    assert!(out.ok, "warm-up DEL: {} {}", out.stdout, out.stderr);
    node.assert_clean();
    common::wait_pod_empty(&pod);
    Some((node, pod))
}

fn masq_conf(node: &Node) -> Value {
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasq"] = json!(true);
    conf
}

/// The failed ADD took an address (its record and index entry are gone now,
/// but the rotation hint moved past it), so it really got past allocation.
fn assert_allocated_then_released(node: &Node) {
    let hint = std::fs::read_to_string(common::store_dir(node).join("last_reserved_ip.0")).unwrap();
    assert_eq!(hint.trim(), "10.244.1.3", "the failing ADD never allocated: the test does not reach the rollback");
}

#[test]
fn add_failing_on_an_interface_of_that_name_in_the_pod_leaves_nothing_behind() {
    let Some((node, pod)) = node_with_bridge(masq_conf) else { return };
    // Somebody else's interface, already called eth0, up and running (a veth
    // pair inside the pod: ADD waits only for a veth without carrier, which
    // DEL's background teardown may still be deleting), with an address.
    pod.run_ok("ip", &["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]);
    pod.run_ok("ip", &["addr", "add", "192.0.2.5/24", "dev", "eth0"]);
    pod.run_ok("ip", &["link", "set", "other0", "up"]);
    pod.run_ok("ip", &["link", "set", "eth0", "up"]);
    let before = Footprint::of(&node, &pod);
    assert!(before.pod.contains("addr eth0 192.0.2.5/24"), "{before:?}");

    node.verb("ADD", "ctr", &path(&pod), "eth0", &masq_conf(&node))
        .expect_error(999, &format!("interface eth0 already exists in {}", path(&pod)));

    assert_allocated_then_released(&node);
    assert_eq!(Footprint::of(&node, &pod), before, "the failed ADD left something behind (or touched the pod's eth0)");
}

#[test]
fn add_failing_on_an_unreachable_ipam_route_gateway_leaves_nothing_behind() {
    let conf = |node: &Node| {
        let mut conf = masq_conf(node);
        conf["ipam"] = json!({"routes": [{"dst": "198.51.100.0/24", "gw": "203.0.113.1"}]});
        conf
    };
    let Some((node, pod)) = node_with_bridge(masq_conf) else { return };
    let before = Footprint::of(&node, &pod);

    // The veth pair, the pod's address and its cluster routes exist by now;
    // 203.0.113.1 is on no link of the pod, so the kernel refuses the route.
    let out = node.verb("ADD", "ctr", &path(&pod), "eth0", &conf(&node));
    out.expect_error(999, "198.51.100.0/24 via 203.0.113.1");
    let msg = out.stdout["msg"].as_str().unwrap();
    assert!(msg.contains("unreachable"), "{msg}");

    assert_allocated_then_released(&node);
    assert_eq!(Footprint::of(&node, &pod), before, "the failed ADD left something behind");
}

#[test]
fn add_failing_in_nftables_leaves_nothing_behind() {
    // No masquerade for the warm-up: the conflicting chain below must be the
    // first thing in our table.
    let Some((node, pod)) = node_with_bridge(|n| n.conf("1.0.0")) else { return };
    // A base chain `postrouting` of type filter in our table (an older
    // version's, or someone's typo): the kernel refuses to turn it into the
    // nat chain ADD declares, and the whole transaction fails. This is the
    // last step of ADD, after links, addresses and routes.
    let mut nft = node.ns.command("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"table ip flannel-rs-cni {\n chain postrouting { type filter hook postrouting priority 0; policy accept; }\n}\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let before = Footprint::of(&node, &pod);

    let out = node.verb("ADD", "ctr", &path(&pod), "eth0", &masq_conf(&node));
    out.expect_error(999, "nftables table flannel-rs-cni: nft -f failed");
    assert!(out.stdout["details"].as_str().unwrap_or_default().contains("add element ip flannel-rs-cni pods"));

    assert_allocated_then_released(&node);
    assert_eq!(Footprint::of(&node, &pod), before, "the failed ADD left something behind");
    // And the other tool's chain is still what it was.
    let chain = node.ns.run_ok("nft", &["list", "chain", "ip", "flannel-rs-cni", "postrouting"]);
    assert!(chain.contains("type filter hook postrouting priority filter"), "{chain}");
}
