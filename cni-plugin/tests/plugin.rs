//! The real plugin binary against the real kernel, inside throw-away
//! namespaces. Each test builds its own node; state is checked with `ip -j`,
//! `bridge -j` and the files on disk, not with the plugin's own code.

mod common;

use std::net::SocketAddr;

use common::{ipv4_of, pod_links, wait_pod_empty, Node, LEASE};
use netns_fixtures::{echo_server, tcp_round_trip, Netns};
use serde_json::{json, Value};

fn pod(node: &Node, name: &str) -> Netns {
    let _ = node;
    Netns::new(name).expect("pod namespace")
}

/// The namespace's path as the `&str` CNI_NETNS wants (leaked: test code,
/// a few bytes per namespace).
fn path(ns: &Netns) -> &'static str {
    Box::leak(ns.path().to_string_lossy().into_owned().into_boxed_str())
}

#[test]
fn add_builds_exactly_the_expected_links_addresses_and_routes() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "pod");
    let result = node.add("ctr-a", &p);

    // Pod side: one interface, its address, the routes, the MTU.
    let links = pod_links(&p);
    assert_eq!(links.len(), 1, "{links:?}");
    let eth0 = &links[0];
    assert_eq!(eth0["ifname"], "eth0");
    assert_eq!(eth0["mtu"], 1450);
    assert!(eth0["flags"].as_array().unwrap().contains(&json!("UP")));
    assert_eq!(ipv4_of(&p, "eth0"), ["10.244.1.2/24"]);
    let mut routes: Vec<String> = p
        .ip_json(&["-4", "route", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} via {}", r["dst"].as_str().unwrap(), r["gateway"].as_str().unwrap_or("-")))
        .collect();
    routes.sort();
    assert_eq!(routes, ["10.244.0.0/16 via 10.244.1.1", "10.244.1.0/24 via -", "default via 10.244.1.1"]);

    // Node side: the bridge with the gateway address and a fixed MAC, the host
    // veth on it with hairpin on, forwarding enabled.
    assert_eq!(ipv4_of(&node.ns, "cni0"), ["10.244.1.1/24"]);
    let cni0 = &node.ns.ip_json(&["-d", "link", "show", "cni0"])[0];
    assert_eq!(cni0["linkinfo"]["info_kind"], "bridge");
    assert_eq!(cni0["address"], "0a:58:0a:f4:01:01");
    assert_eq!(cni0["mtu"], 1450);
    let veths = node.ns.ip_json(&["-d", "link", "show", "type", "veth"]);
    let veths = veths.as_array().unwrap();
    assert_eq!(veths.len(), 1);
    let veth = &veths[0];
    assert_eq!(veth["master"], "cni0");
    assert_eq!(veth["mtu"], 1450);
    assert_eq!(veth["linkinfo"]["info_slave_data"]["hairpin"], true);
    assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");

    // The result names what is really there.
    assert_eq!(result["cniVersion"], "1.0.0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert_eq!(ifaces[0]["name"], "cni0");
    assert_eq!(ifaces[0]["mac"], cni0["address"]);
    assert_eq!(ifaces[1]["name"], veth["ifname"]);
    assert_eq!(ifaces[1]["mac"], veth["address"]);
    assert_eq!(ifaces[2]["name"], "eth0");
    assert_eq!(ifaces[2]["mac"], eth0["address"]);
    assert_eq!(ifaces[2]["sandbox"], path(&p));
    assert_eq!(result["ips"], json!([{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2}]));
    assert_eq!(
        result["routes"],
        json!([{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
    );
    assert_eq!(node.allocations(), ["10.244.1.2"]);
    let record = std::fs::read_to_string(node.data_dir().join("networks/cbr0/10.244.1.2")).unwrap();
    assert_eq!(record, "ctr-a\r\neth0");

    // When DEL returns, the host end no longer passes traffic (it is down or
    // already deleted); the deletion itself completes in the background.
    node.del("ctr-a", &p);
    let after = node.ns.ip_json(&["link", "show", "type", "veth"]);
    for l in after.as_array().unwrap() {
        assert!(!l["flags"].as_array().unwrap().contains(&json!("UP")), "veth still up after DEL: {l}");
    }
    node.assert_clean();
    wait_pod_empty(&p);
}

#[test]
fn two_pods_reach_each_other_and_the_gateway_over_tcp() {
    let Some(node) = Node::new() else { return };
    let a = pod(&node, "a");
    let b = pod(&node, "b");
    node.add("ctr-a", &a);
    node.add("ctr-b", &b);
    let a_addr: SocketAddr = "10.244.1.2:8080".parse().unwrap();
    let server = echo_server(&a, a_addr);
    assert_eq!(tcp_round_trip(&b, a_addr), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.244.1.3");

    let gw: SocketAddr = "10.244.1.1:8081".parse().unwrap();
    let server = echo_server(&node.ns, gw);
    assert_eq!(tcp_round_trip(&a, gw), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.244.1.2");
    node.del("ctr-a", &a);
    node.del("ctr-b", &b);
    node.assert_clean();
}

#[test]
fn two_hundred_sequential_add_del_leave_nothing_behind() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "seq");
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let id = format!("seq-{i}");
        let r = node.add(&id, &p);
        seen.insert(r["ips"][0]["address"].as_str().unwrap().to_string());
        node.del(&id, &p);
    }
    node.assert_clean();
    wait_pod_empty(&p);
    // Rotation: the freed address is not reused at once, so 200 cycles walk
    // through (almost) the whole /24 instead of reusing .2.
    assert_eq!(seen.len(), 200, "a freed address was reused before the range was walked");
}

#[test]
fn fifty_parallel_adds_get_fifty_distinct_addresses() {
    let Some(node) = Node::new() else { return };
    let pods: Vec<Netns> = (0..50).map(|i| pod(&node, &format!("par{i}"))).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || node.add(&format!("par-{i}"), p))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: std::collections::HashSet<String> =
        results.iter().map(|r| r["ips"][0]["address"].as_str().unwrap().to_string()).collect();
    assert_eq!(ips.len(), 50);
    assert_eq!(node.allocations().len(), 50);
    assert_eq!(node.veths().len(), 50);
    let on_bridge = node.ns.ip_json(&["link", "show", "master", "cni0"]);
    assert_eq!(on_bridge.as_array().unwrap().len(), 50);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let node = &node;
            s.spawn(move || node.del(&format!("par-{i}"), p));
        }
    });
    node.assert_clean();
}

#[test]
fn del_is_idempotent() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "idem");
    node.add("ctr", &p);
    node.del("ctr", &p);
    node.del("ctr", &p);
    // containerd's second DEL: no namespace at all.
    let out = node.verb("DEL", "ctr", "", "eth0", &node.conf("1.0.0"));
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    // A container we never saw.
    let out = node.verb("DEL", "never-added", path(&p), "eth0", &node.conf("1.0.0"));
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    // The namespace is already gone: DEL still releases the address.
    let gone = pod(&node, "gone");
    node.add("ctr2", &gone);
    let gone_path = path(&gone).to_string();
    drop(gone);
    let out = node.verb("DEL", "ctr2", &gone_path, "eth0", &node.conf("1.0.0"));
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    // And without subnet.env (the daemon is down): DEL does not need it.
    node.add("ctr3", &p);
    std::fs::remove_file(node.subnet_file()).unwrap();
    node.del("ctr3", &p);
    node.assert_clean();
}

#[test]
fn check_passes_on_a_healthy_pod_and_names_what_was_removed() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "chk");
    let result = node.add("ctr", &p);
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = result;
    let ok = node.verb("CHECK", "ctr", path(&p), "eth0", &conf);
    assert!(ok.ok, "{} {}", ok.stdout, ok.stderr);

    p.run_ok("ip", &["route", "del", "10.244.0.0/16"]);
    node.verb("CHECK", "ctr", path(&p), "eth0", &conf)
        .expect_error(999, "route 10.244.0.0/16 via 10.244.1.1 is missing");

    p.run_ok("ip", &["addr", "del", "10.244.1.2/24", "dev", "eth0"]);
    node.verb("CHECK", "ctr", path(&p), "eth0", &conf).expect_error(999, "address 10.244.1.2/24 is missing from eth0");

    // CHECK came with 0.4.0.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    node.verb("CHECK", "ctr", path(&p), "eth0", &old).expect_error(1, "CHECK needs cniVersion 0.4.0");
    node.del("ctr", &p);
    node.assert_clean();
}

#[test]
fn gc_releases_what_no_valid_attachment_holds() {
    let Some(node) = Node::new() else { return };
    let pods: Vec<Netns> = (0..3).map(|i| pod(&node, &format!("gc{i}"))).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&format!("gc-{i}"), p);
    }
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "gc-0", "ifname": "eth0"}]);
    let out = node.call(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    // The stale veths go with their records, not as unrecorded leftovers.
    assert_eq!(out.stderr.matches("GC released").count(), 2, "{}", out.stderr);
    assert!(!out.stderr.contains("GC deleted veth"), "{}", out.stderr);
    assert_eq!(node.allocations(), ["10.244.1.2"]);
    assert_eq!(node.veths().len(), 1);
    assert_eq!(pod_links(&pods[0]).len(), 1);
    assert!(pod_links(&pods[1]).is_empty(), "GC left gc-1's interface");
    node.del("gc-0", &pods[0]);
    node.assert_clean();
}

/// A veth of ours that no record names (a DEL killed between releasing the
/// address and deleting the veth, or any other leftover): GC deletes it
/// unless a valid attachment accounts for it, and leaves veths of other
/// plugins alone.
#[test]
fn gc_deletes_our_veths_that_no_record_and_no_valid_attachment_account_for() {
    let Some(node) = Node::new() else { return };
    let pods: Vec<Netns> = (0..3).map(|i| pod(&node, &format!("gcv{i}"))).collect();
    node.add("gcv-0", &pods[0]);
    // Our naming (veth + 11 hex digits), on cni0, with no record.
    let veth = |name: &str, p: &Netns| {
        let ns = p.name().to_string();
        node.ns.run_ok(
            "ip",
            &["link", "add", name, "master", "cni0", "type", "veth", "peer", "name", "eth0", "netns", &ns],
        );
    };
    veth("veth0123456789a", &pods[1]);
    // The bridge plugin's naming (veth + 8 hex digits): not ours.
    veth("veth1234abcd", &pods[2]);
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "gcv-0", "ifname": "eth0"}]);
    let out = node.call(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("GC deleted veth veth0123456789a"), "{}", out.stderr);
    let left = node.veths();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&"veth1234abcd".to_string()), "{left:?}");
    assert!(pod_links(&pods[1]).is_empty(), "GC left the unrecorded veth's pod end");
    assert_eq!(pod_links(&pods[0]).len(), 1);
    node.ns.run_ok("ip", &["link", "del", "veth1234abcd"]);
    node.del("gcv-0", &pods[0]);
    node.assert_clean();
}

#[test]
fn status_reports_availability() {
    let Some(node) = Node::with_lease(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    ) else {
        return;
    };
    let conf = node.conf("1.1.0").to_string();
    let status = || node.call(&[("CNI_COMMAND", "STATUS")], conf.as_bytes());
    assert!(status().ok);
    let p = pod(&node, "st");
    node.add("only", &p); // a /30 has one pod address
    status().expect_error(50, "no free pod address in 10.244.1.0/30");
    node.del("only", &p);
    assert!(status().ok);
    std::fs::remove_file(node.subnet_file()).unwrap();
    status().expect_error(50, "flanneld");
}

#[test]
fn bad_input_gets_the_right_code_and_leaves_nothing_behind() {
    let Some(node) = Node::with_lease(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    ) else {
        return;
    };
    let p = pod(&node, "bad");
    let q = pod(&node, "bad2");
    let conf = node.conf("1.0.0");
    let env = |id: &'static str, ns: &Netns| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", id.into()),
            ("CNI_NETNS", path(ns).into()),
            ("CNI_IFNAME", "eth0".into()),
        ]
    };
    let call = |pairs: &[(&str, String)], stdin: &[u8]| {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node.call(&pairs, stdin)
    };

    // Exhausted range: the /30 holds one pod.
    node.add("first", &p);
    node.verb("ADD", "second", path(&q), "eth0", &conf).expect_error(11, "no free address in 10.244.1.0/30");
    assert!(pod_links(&q).is_empty(), "half-made link in the pod");
    assert_eq!(node.veths().len(), 1);
    assert_eq!(node.allocations(), ["10.244.1.2"]);
    node.del("first", &p);

    // Malformed stdin: decoding failure.
    call(&env("x", &q), b"{\"cniVersion\": ").expect_error(6, "network configuration");
    // JSON of the wrong shape: invalid configuration, naming the field.
    let mut wrong = conf.clone();
    wrong["delegate"]["mtu"] = json!("big");
    call(&env("x", &q), wrong.to_string().as_bytes()).expect_error(7, "delegate.mtu");
    // Unknown version.
    let mut v = conf.clone();
    v["cniVersion"] = json!("2.0.0");
    call(&env("x", &q), v.to_string().as_bytes()).expect_error(1, "cniVersion \"2.0.0\" is not supported");
    // Missing environment variables. (Without CNI_COMMAND the binary prints
    // its version, as flannel's does: tests/takeover.rs.)
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let pairs: Vec<_> = env("x", &q).into_iter().filter(|(k, _)| *k != missing).collect();
        call(&pairs, conf.to_string().as_bytes()).expect_error(4, missing);
    }
    // Unknown CNI_ARGS key without IgnoreUnknown; with it, fine.
    let mut with_args = env("x", &q);
    with_args.push(("CNI_ARGS", "K8S_POD_NAME=web;Color=blue".into()));
    call(&with_args, conf.to_string().as_bytes()).expect_error(4, "Color");
    // A namespace that does not exist: unknown container.
    node.verb("ADD", "x", "/run/netns/does-not-exist", "eth0", &conf).expect_error(3, "does-not-exist");
    // No subnet.env: the daemon is not running; try again later.
    std::fs::remove_file(node.subnet_file()).unwrap();
    node.verb("ADD", "x", path(&q), "eth0", &conf).expect_error(11, "flanneld");

    wait_pod_empty(&q);
    node.assert_clean();
}

#[test]
fn cni_args_in_any_order_with_ignore_unknown_and_a_requested_ip() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "args");
    let conf = node.conf("1.0.0").to_string();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "args"),
        ("CNI_NETNS", path(&p)),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IP=10.244.1.77;K8S_POD_NAME=web;Extra=1;IgnoreUnknown=1;K8S_POD_NAMESPACE=default"),
    ];
    let out = node.call(&env, conf.as_bytes());
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(ipv4_of(&p, "eth0"), ["10.244.1.77/24"]);
    node.del("args", &p);
    node.assert_clean();
}

#[test]
fn every_supported_version_gets_a_well_formed_result_in_its_own_version() {
    let Some(node) = Node::new() else { return };
    let version = node.call(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert!(version.ok);
    let supported: Vec<String> = serde_json::from_value(version.stdout["supportedVersions"].clone()).unwrap();
    assert_eq!(supported, ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    let p = pod(&node, "ver");
    for v in &supported {
        let out = node.verb("ADD", "ver", path(&p), "eth0", &node.conf(v));
        assert!(out.ok, "ADD in {v}: {} {}", out.stdout, out.stderr);
        let r = &out.stdout;
        assert_eq!(r["cniVersion"], json!(v));
        let (major, minor) = (v.as_bytes()[0] - b'0', v.as_bytes()[2] - b'0');
        if major == 0 && minor < 3 {
            let addr = r["ip4"]["ip"].as_str().unwrap_or_default();
            assert!(addr.starts_with("10.244.1.") && addr.ends_with("/24"), "{v}: {r}");
            assert_eq!(r["ip4"]["gateway"], "10.244.1.1", "{v}: {r}");
            assert!(r.get("interfaces").is_none());
        } else {
            assert_eq!(r["interfaces"].as_array().unwrap().len(), 3, "{v}: {r}");
            assert_eq!(r["ips"][0]["interface"], 2);
            assert_eq!(r["ips"][0].get("version").is_some(), major == 0, "{v}: {r}");
            assert_eq!(r["interfaces"][2].get("mtu").is_some(), v == "1.1.0", "{v}: {r}");
        }
        node.del("ver", &p);
    }
    node.assert_clean();
}

#[test]
fn bridge_address_from_an_earlier_lease_is_replaced_only_when_no_pod_uses_it() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "lease");
    node.add("old", &p);
    // The node got a new lease while a pod is still attached: refuse, naming both.
    std::fs::write(node.subnet_file(), LEASE.replace("10.244.1.1/24", "10.244.7.1/24")).unwrap();
    let q = pod(&node, "lease2");
    node.verb("ADD", "new", path(&q), "eth0", &node.conf("1.0.0"))
        .expect_error(999, "carries 10.244.1.1/24 from an earlier lease but the node's lease is now 10.244.7.1/24");
    assert!(pod_links(&q).is_empty());
    assert_eq!(node.allocations(), ["10.244.1.2"], "the refused ADD kept a reservation");
    // Once the old pod is gone, the bridge takes the new address.
    node.del("old", &p);
    let r = node.add("new", &q);
    assert_eq!(r["ips"][0]["address"], "10.244.7.2/24");
    assert_eq!(ipv4_of(&node.ns, "cni0"), ["10.244.7.1/24"]);
    node.del("new", &q);
    node.assert_clean();
}

#[test]
fn ip_masq_puts_the_pod_in_our_nftables_set_and_del_takes_it_out() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "masq");
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasq"] = json!(true);
    let out = node.verb("ADD", "m", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    let set = node.ns.run_ok("nft", &["-j", "list", "set", "ip", "flannel-rs-cni", "pods"]);
    assert!(set.contains("10.244.1.2"), "{set}");
    let chain = node.ns.run_ok("nft", &["list", "chain", "ip", "flannel-rs-cni", "postrouting"]);
    assert!(chain.contains("ip saddr @pods ip daddr != @cluster ip daddr != 224.0.0.0/4 masquerade"), "{chain}");
    let out = node.verb("DEL", "m", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    let set = node.ns.run_ok("nft", &["-j", "list", "set", "ip", "flannel-rs-cni", "pods"]);
    assert!(!set.contains("10.244.1.2"), "{set}");
    // A second DEL still succeeds.
    assert!(node.verb("DEL", "m", path(&p), "eth0", &conf).ok);
    node.assert_clean();
}

/// The pod's IPv4 routes as `dst via gw` (`-` for none), sorted.
fn pod_routes(p: &Netns) -> Vec<String> {
    let mut routes: Vec<String> = p
        .ip_json(&["-4", "route", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} via {}", r["dst"].as_str().unwrap(), r["gateway"].as_str().unwrap_or("-")))
        .collect();
    routes.sort();
    routes
}

#[test]
fn ipam_routes_are_added_in_the_pod_via_their_gateway_or_the_pods() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "routes");
    let mut conf = node.conf("1.0.0");
    conf["ipam"] = json!({"routes": [
        {"dst": "198.51.100.0/24"},
        {"dst": "203.0.113.0/24", "gw": "10.244.1.254"}
    ]});
    let out = node.verb("ADD", "r", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(
        pod_routes(&p),
        [
            "10.244.0.0/16 via 10.244.1.1",
            "10.244.1.0/24 via -",
            "198.51.100.0/24 via 10.244.1.1",
            "203.0.113.0/24 via 10.244.1.254",
            "default via 10.244.1.1"
        ]
    );
    let routes = &out.stdout["routes"];
    assert!(routes.as_array().unwrap().contains(&json!({"dst": "198.51.100.0/24", "gw": "10.244.1.1"})), "{routes}");
    assert!(routes.as_array().unwrap().contains(&json!({"dst": "203.0.113.0/24", "gw": "10.244.1.254"})), "{routes}");
    assert!(node.verb("DEL", "r", path(&p), "eth0", &conf).ok);
    node.assert_clean();
}

#[test]
fn delegate_mtu_overrides_the_lease_mtu_on_bridge_veth_and_pod() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "mtu");
    let mut conf = node.conf("1.1.0");
    conf["delegate"]["mtu"] = json!(1400);
    let out = node.verb("ADD", "m", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(p.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1400);
    let veths = node.ns.ip_json(&["link", "show", "type", "veth"]);
    assert_eq!(veths.as_array().unwrap().len(), 1);
    assert_eq!(veths[0]["mtu"], 1400);
    assert_eq!(node.ns.ip_json(&["link", "show", "cni0"])[0]["mtu"], 1400);
    assert_eq!(out.stdout["interfaces"][2]["mtu"], 1400);
    assert!(node.verb("DEL", "m", path(&p), "eth0", &conf).ok);
    node.assert_clean();
}

#[test]
fn delegate_bridge_names_another_bridge_and_cni0_is_never_made() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "br");
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["bridge"] = json!("kbr7");
    let out = node.verb("ADD", "b", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    let links = node.ns.ip_json(&["-d", "link", "show"]);
    let names: Vec<&str> = links.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap()).collect();
    assert!(!names.contains(&"cni0"), "{names:?}");
    let br = &node.ns.ip_json(&["-d", "link", "show", "kbr7"])[0];
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert_eq!(br["address"], "0a:58:0a:f4:01:01");
    assert_eq!(ipv4_of(&node.ns, "kbr7"), ["10.244.1.1/24"]);
    let ports = node.ns.ip_json(&["link", "show", "master", "kbr7"]);
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    assert_eq!(out.stdout["interfaces"][0]["name"], "kbr7");
    assert_eq!(out.stdout["interfaces"][1]["name"], ports[0]["ifname"]);
    // The pod reaches the gateway on that bridge.
    let gw: SocketAddr = "10.244.1.1:8082".parse().unwrap();
    let server = echo_server(&node.ns, gw);
    assert_eq!(tcp_round_trip(&p, gw), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.244.1.2");
    assert!(node.verb("DEL", "b", path(&p), "eth0", &conf).ok);
    node.assert_clean();
}

#[test]
fn without_is_default_gateway_the_pod_has_no_default_route() {
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "nodef");
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["isDefaultGateway"] = json!(false);
    let out = node.verb("ADD", "n", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(pod_routes(&p), ["10.244.0.0/16 via 10.244.1.1", "10.244.1.0/24 via -"]);
    let routes = node_routes_all_tables(&p);
    assert!(!routes.iter().any(|r| r.starts_with("default")), "{routes:?}");
    assert_eq!(out.stdout["routes"], json!([{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}]));
    assert!(node.verb("DEL", "n", path(&p), "eth0", &conf).ok);
    node.assert_clean();
}

/// Every IPv4 route of `ns` in every table, as `ip -j` prints `dst`.
fn node_routes_all_tables(ns: &Netns) -> Vec<String> {
    ns.ip_json(&["-4", "route", "show", "table", "all"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn ipam_lock_held_elsewhere_fails_add_with_try_again_instead_of_hanging() {
    use std::os::fd::AsRawFd;
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "lock");
    // Hold the IPAM lock the way another plugin process would: flock(2) on
    // <dataDir>/networks/<name>/lock.
    let dir = node.data_dir().join("networks/cbr0");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);

    let conf = node.conf("1.0.0").to_string();
    let env = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "l"), ("CNI_NETNS", path(&p)), ("CNI_IFNAME", "eth0")];
    // Far above the plugin's own timeout; reaching it means the plugin hangs.
    let out = node.call_within(std::time::Duration::from_secs(120), &env, conf.as_bytes());
    out.expect_error(11, &format!("IPAM: {} is locked by another plugin process", dir.display()));
    assert!(pod_links(&p).is_empty(), "ADD left a link in the pod");
    assert!(node.veths().is_empty(), "ADD left a veth on the node");
    assert_eq!(node.allocations(), Vec::<String>::new());

    // Once the lock is free, the same ADD goes through.
    drop(lock);
    node.add("l", &p);
    node.del("l", &p);
    node.assert_clean();
}

#[test]
fn a_cni_variable_that_is_not_utf8_is_rejected_naming_it() {
    use std::os::unix::ffi::OsStringExt;
    let Some(node) = Node::new() else { return };
    let p = pod(&node, "utf8");
    let mut cmd = node.ns.command(common::PLUGIN);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "u")
        .env("CNI_NETNS", path(&p))
        .env("CNI_IFNAME", std::ffi::OsString::from_vec(b"eth\xff".to_vec()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(node.conf("1.0.0").to_string().as_bytes()).unwrap();
    let out = common::Outcome::from_output(child.wait_with_output().unwrap());
    out.expect_error(4, "CNI_IFNAME=\"eth\\xFF\" is not valid UTF-8");
    node.assert_clean();
    assert!(pod_links(&p).is_empty());
}
