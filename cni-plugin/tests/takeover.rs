//! Delegation and takeover against the real reference plugins (Debian's
//! `bridge`, `host-local`, `static`, `macvlan` in /usr/lib/cni) and
//! upstream flannel's own CNI plugin (v1.9.1, built by
//! /work/shared/upstream-flannel/build.sh), inside throw-away namespaces.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{ipv4_of, pod_links, wait_pod_empty, Node, Outcome, PLUGIN};
use netns_fixtures::{echo_server, tcp_round_trip, Netns};
use serde_json::{json, Value};

const REFERENCE: &str = "/usr/lib/cni";

fn path(ns: &Netns) -> String {
    ns.path().to_string_lossy().into_owned()
}

/// Upstream flannel's CNI plugin binary, or `None` (skipped; fails in CI).
fn upstream_plugin() -> Option<PathBuf> {
    let p = std::env::var_os("FLANNEL_RS_UPSTREAM_CNI")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/flannel-rs/upstream/flannel-cni-v1.9.1-flannel1".into());
    if p.is_file() {
        Some(p)
    } else {
        netns_fixtures::skip_or_fail(&format!(
            "upstream flannel's CNI plugin is not at {} (run /work/shared/upstream-flannel/build.sh, or set FLANNEL_RS_UPSTREAM_CNI)",
            p.display()
        ));
        None
    }
}

fn have_reference_plugins() -> bool {
    let all = ["bridge", "host-local", "static", "macvlan"].iter().all(|p| Path::new(REFERENCE).join(p).is_file());
    all || netns_fixtures::skip_or_fail(
        "the reference CNI plugins are not in /usr/lib/cni (containernetworking-plugins)",
    )
}

/// Runs `binary` (ours or upstream's) in the node for `verb`.
fn run(node: &Node, binary: &Path, verb: &str, id: &str, pod: &Netns, conf: &Value) -> Outcome {
    run_with_path(node, binary, verb, id, pod, conf, REFERENCE)
}

/// [`run`] with `cni_path` as `CNI_PATH`.
fn run_with_path(
    node: &Node,
    binary: &Path,
    verb: &str,
    id: &str,
    pod: &Netns,
    conf: &Value,
    cni_path: &str,
) -> Outcome {
    let mut cmd = node.ns.command(binary);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", path(pod))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn plugin");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), conf.to_string().as_bytes()).unwrap();
    Outcome::from_output(child.wait_with_output().unwrap())
}

fn ok(out: Outcome, what: &str) -> Value {
    assert!(out.ok, "{what} failed: {} {}", out.stdout, out.stderr);
    out.stdout
}

/// host-local's directory for the test network.
fn host_local_dir(node: &Node) -> PathBuf {
    node.dir.path().join("host-local")
}

/// flannel's configuration for this node, with host-local's directory in the
/// node's temporary directory (the node's root default is never touched).
fn conf(node: &Node) -> Value {
    let mut c = node.conf("1.0.0");
    c["ipam"] = json!({ "dataDir": host_local_dir(node) });
    c
}

/// Addresses host-local holds (its files), sorted.
fn host_local_addresses(node: &Node) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(host_local_dir(node).join("cbr0")) else { return Vec::new() };
    let mut v: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    v.sort();
    v
}

fn pod_ip(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// Waits until the node has no veth left.
fn wait_no_veths(node: &Node) {
    netns_fixtures::wait_until(std::time::Duration::from_secs(10), "the node's veths to be deleted", || {
        node.veths().is_empty()
    });
}

#[test]
fn without_cni_command_the_binary_says_what_it_is_like_flannels() {
    let out = std::process::Command::new(PLUGIN).env_clear().stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].starts_with("CNI Plugin flannel version v") && lines[0].contains("flannel-rs"), "{err}");
    assert_eq!(lines[1], "CNI protocol versions supported: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0");
    // Upstream's says the same two things the same way.
    if let Some(up) = upstream_plugin() {
        let out = std::process::Command::new(up).env_clear().stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
        let theirs = String::from_utf8(out.stderr).unwrap();
        let theirs: Vec<&str> = theirs.lines().collect();
        assert!(theirs[0].starts_with("CNI Plugin flannel version v"), "{theirs:?}");
        assert!(theirs[1].starts_with("CNI protocol versions supported: 0.1.0, "), "{theirs:?}");
    }
}

#[test]
fn a_bridge_key_we_do_not_implement_is_delegated_to_bridge_and_host_local() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    let pod = Netns::new("pod").expect("pod namespace");
    let mut c = conf(&node);
    c["delegate"]["forceAddress"] = json!(true);
    let out = run(&node, Path::new(PLUGIN), "ADD", "ctr-d", &pod, &c);
    assert!(out.stderr.contains("delegate.forceAddress is set"), "{}", out.stderr);
    let result = ok(out, "delegated ADD");
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(pod_ip(&result), "10.244.1.2");
    assert_eq!(ipv4_of(&pod, "eth0"), ["10.244.1.2/24"]);
    // Saved as flannel saves it, and host-local (not our store) holds the address.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(node.data_dir().join("ctr-d")).expect("saved delegate configuration"))
            .unwrap();
    assert_eq!(
        saved,
        json!({"cniVersion":"1.0.0","name":"cbr0","type":"bridge","hairpinMode":true,"isDefaultGateway":true,
            "forceAddress":true,"ipMasq":false,"mtu":1450,"isGateway":true,
            "ipam":{"type":"host-local","dataDir":host_local_dir(&node),
                "ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}]}})
    );
    assert_eq!(host_local_addresses(&node), ["10.244.1.2"]);
    assert!(node.allocations().is_empty());

    let mut check = c.clone();
    check["prevResult"] = result.clone();
    ok(run(&node, Path::new(PLUGIN), "CHECK", "ctr-d", &pod, &check), "delegated CHECK");
    // upstream's chain passes the same CHECK (its plugin does not look).
    if let Some(up) = upstream_plugin() {
        ok(run(&node, &up, "CHECK", "ctr-d", &pod, &check), "upstream CHECK");
    }
    // CHECK does look: a missing address is reported, naming it.
    pod.run_ok("ip", &["addr", "flush", "dev", "eth0"]);
    let out = run(&node, Path::new(PLUGIN), "CHECK", "ctr-d", &pod, &check);
    out.expect_error(999, "address 10.244.1.2/24 is missing from eth0");

    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-d", &pod, &c), "delegated DEL");
    assert!(pod_links(&pod).is_empty());
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty());
    assert!(!node.data_dir().join("ctr-d").exists());
    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-d", &pod, &c), "second DEL");
}

#[test]
fn runtime_config_reaches_the_delegate() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    let pod = Netns::new("pod").expect("pod namespace");
    // The bridge plugin's "mac" capability: the runtime asks for the pod's MAC.
    let mut c = conf(&node);
    c["runtimeConfig"] = json!({"mac": "0a:00:00:00:12:34"});
    let result = ok(run(&node, Path::new(PLUGIN), "ADD", "ctr-r", &pod, &c), "ADD with runtimeConfig");
    assert_eq!(pod.ip_json(&["link", "show", "eth0"])[0]["address"], "0a:00:00:00:12:34");
    assert_eq!(result["interfaces"][2]["mac"], "0a:00:00:00:12:34");
    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-r", &pod, &c), "DEL");
    wait_pod_empty(&pod);
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty());
}

#[test]
fn another_ipam_plugin_is_delegated_static() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    let pod = Netns::new("pod").expect("pod namespace");
    let mut c = node.conf("1.0.0");
    c["ipam"] = json!({"type": "static", "addresses": [{"address": "10.244.1.77/24", "gateway": "10.244.1.1"}]});
    let result = ok(run(&node, Path::new(PLUGIN), "ADD", "ctr-s", &pod, &c), "ADD with static IPAM");
    assert_eq!(pod_ip(&result), "10.244.1.77");
    assert_eq!(ipv4_of(&pod, "eth0"), ["10.244.1.77/24"]);
    assert!(node.allocations().is_empty());
    let mut check = c.clone();
    check["prevResult"] = result;
    ok(run(&node, Path::new(PLUGIN), "CHECK", "ctr-s", &pod, &check), "CHECK");
    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-s", &pod, &c), "DEL");
    wait_pod_empty(&pod);
    wait_no_veths(&node);
    assert!(!node.data_dir().join("ctr-s").exists());
}

#[test]
fn another_delegate_type_is_delegated_macvlan() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    node.ns.run_ok("ip", &["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"]);
    node.ns.run_ok("ip", &["link", "set", "uplink0", "up"]);
    let pod = Netns::new("pod").expect("pod namespace");
    let mut c = conf(&node);
    c["delegate"] = json!({"type": "macvlan", "master": "uplink0", "mode": "bridge"});
    let result = ok(run(&node, Path::new(PLUGIN), "ADD", "ctr-m", &pod, &c), "ADD with macvlan");
    assert_eq!(pod_ip(&result), "10.244.1.2");
    let links = pod_links(&pod);
    assert_eq!(links.len(), 1);
    let eth0 = &pod.ip_json(&["-d", "link", "show", "eth0"])[0];
    assert_eq!(eth0["linkinfo"]["info_kind"], "macvlan");
    assert_eq!(eth0["mtu"], 1450);
    let saved: Value = serde_json::from_slice(&std::fs::read(node.data_dir().join("ctr-m")).unwrap()).unwrap();
    assert_eq!(saved["isGateway"], Value::Null, "isGateway is only added for bridge");
    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-m", &pod, &c), "DEL");
    wait_pod_empty(&pod);
    assert!(host_local_addresses(&node).is_empty());
}

#[test]
fn pods_of_upstreams_plugin_are_taken_over_and_ours_survive_a_rollback() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    let Some(upstream) = upstream_plugin() else { return };
    let ours = Path::new(PLUGIN);
    let c = conf(&node);
    let pods: Vec<Netns> = (0..6).map(|i| Netns::new(&format!("p{i}")).expect("pod namespace")).collect();

    // flannel's plugin (-> bridge -> host-local) adds two pods.
    let up_a = ok(run(&node, &upstream, "ADD", "up-a", &pods[0], &c), "upstream ADD a");
    let a = pod_ip(&up_a);
    let b = pod_ip(&ok(run(&node, &upstream, "ADD", "up-b", &pods[1], &c), "upstream ADD b"));
    assert_eq!((a.as_str(), b.as_str()), ("10.244.1.2", "10.244.1.3"));
    assert!(node.data_dir().join("up-a").is_file());

    // The node moves to flannel-rs: our pods get other addresses, and each
    // gets host-local's reservation file too.
    let c1 = pod_ip(&ok(run(&node, ours, "ADD", "rs-c", &pods[2], &c), "our ADD c"));
    assert!(c1 != a && c1 != b, "our ADD handed out {c1}, held by an upstream pod");
    assert_eq!(host_local_addresses(&node), [a.clone(), b.clone(), c1.clone()]);
    assert_eq!(
        std::fs::read_to_string(host_local_dir(&node).join("cbr0").join(&c1)).unwrap(),
        "rs-c\r\neth0",
        "host-local's format"
    );
    // ...and the configuration flannel's plugin would have saved for it, the
    // same as it saved for its own pods (for its DEL after a rollback).
    let saved = |id: &str| -> Value {
        serde_json::from_slice(&std::fs::read(node.data_dir().join(id)).unwrap_or_else(|e| panic!("{id}: {e}")))
            .unwrap()
    };
    assert_eq!(saved("rs-c"), saved("up-b"));
    // Our pod and upstream's talk over the shared bridge.
    let b_addr: SocketAddr = format!("{b}:8080").parse().unwrap();
    let server = echo_server(&pods[1], b_addr);
    assert_eq!(tcp_round_trip(&pods[2], b_addr), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), c1);

    // CHECK of an upstream pod, through our plugin: its interface and address.
    let mut check = c.clone();
    check["prevResult"] = up_a.clone();
    ok(run(&node, ours, "CHECK", "up-a", &pods[0], &check), "our CHECK of an upstream pod");

    // Our DEL removes a pod upstream's plugin added, completely.
    let veths_before = node.veths().len();
    ok(run(&node, ours, "DEL", "up-a", &pods[0], &c), "our DEL of an upstream pod");
    assert!(pod_links(&pods[0]).is_empty(), "upstream pod's interface left behind");
    netns_fixtures::wait_until(std::time::Duration::from_secs(10), "upstream pod's veth to go", || {
        node.veths().len() == veths_before - 1
    });
    assert!(!node.data_dir().join("up-a").exists(), "saved delegate configuration left behind");
    assert_eq!(host_local_addresses(&node), [b.clone(), c1.clone()]);
    ok(run(&node, ours, "DEL", "up-a", &pods[0], &c), "second DEL");

    let d = pod_ip(&ok(run(&node, ours, "ADD", "rs-d", &pods[3], &c), "our ADD d"));
    assert!(d != b && d != c1, "our ADD handed out {d}, already held");

    // Rollback to flannel's plugin: host-local never hands out ours.
    let e = pod_ip(&ok(run(&node, &upstream, "ADD", "up-e", &pods[4], &c), "upstream ADD e after rollback"));
    assert!(![&b, &c1, &d].contains(&&e), "upstream handed out {e}, held by one of b={b} c={c1} d={d}");
    let f = pod_ip(&ok(run(&node, &upstream, "ADD", "up-f", &pods[5], &c), "upstream ADD f after rollback"));
    assert!(![&b, &c1, &d, &e].contains(&&f), "upstream handed out {f} twice");
    // ...and its pods reach ours.
    let c_addr: SocketAddr = format!("{c1}:8081").parse().unwrap();
    let server = echo_server(&pods[2], c_addr);
    assert_eq!(tcp_round_trip(&pods[4], c_addr), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), e);

    // flannel's DEL of a pod we added works: the bridge plugin deletes its
    // interface, host-local releases the reservation we mirrored, the saved
    // configuration goes. (Our own record stays until our GC: see README.)
    ok(run(&node, &upstream, "DEL", "rs-d", &pods[3], &c), "upstream DEL of our pod after rollback");
    assert!(pod_links(&pods[3]).is_empty(), "our pod's interface left behind by upstream's DEL");
    assert!(!host_local_addresses(&node).contains(&d), "{:?}", host_local_addresses(&node));
    assert!(!node.data_dir().join("rs-d").exists());

    // Forward again: ours deletes everything, upstream's and its own.
    for (id, p) in [("up-b", &pods[1]), ("rs-c", &pods[2]), ("rs-d", &pods[3]), ("up-e", &pods[4]), ("up-f", &pods[5])]
    {
        ok(run(&node, ours, "DEL", id, p, &c), &format!("our DEL {id}"));
        assert!(pod_links(p).is_empty() || id.starts_with("rs-"), "{id}: interface left behind");
    }
    for p in &pods {
        wait_pod_empty(p);
    }
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty(), "{:?}", host_local_addresses(&node));
    assert!(node.allocations().is_empty());
    let left: Vec<_> = std::fs::read_dir(node.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "networks")
        .collect();
    assert!(left.is_empty(), "saved delegate configurations left: {left:?}");
}

#[test]
fn an_upstream_pod_is_deleted_even_when_the_reference_plugins_are_gone() {
    let Some(node) = Node::new() else { return };
    if !have_reference_plugins() {
        return;
    }
    let Some(upstream) = upstream_plugin() else { return };
    let c = conf(&node);
    let pods: Vec<Netns> = (0..2).map(|i| Netns::new(&format!("g{i}")).expect("pod namespace")).collect();
    let a = pod_ip(&ok(run(&node, &upstream, "ADD", "up-a", &pods[0], &c), "upstream ADD a"));
    let b = pod_ip(&ok(run(&node, &upstream, "ADD", "up-b", &pods[1], &c), "upstream ADD b"));
    assert_eq!(node.veths().len(), 2);
    // CNI_PATH without bridge and host-local (an empty directory).
    let empty = tempfile::tempdir().unwrap();
    let out = run_with_path(&node, Path::new(PLUGIN), "DEL", "up-a", &pods[0], &c, empty.path().to_str().unwrap());
    assert!(out.stderr.contains("deleting the pod as bridge and host-local would"), "{}", out.stderr);
    ok(out, "our DEL without the reference plugins");
    assert!(pod_links(&pods[0]).is_empty(), "interface left behind");
    netns_fixtures::wait_until(std::time::Duration::from_secs(10), "the pod's veth to go", || node.veths().len() == 1);
    assert_eq!(host_local_addresses(&node), vec![b.clone()], "{a} not released, or {b} released too");
    assert!(!node.data_dir().join("up-a").exists());
    ok(run(&node, Path::new(PLUGIN), "DEL", "up-b", &pods[1], &c), "DEL b");
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty());
}

/// A dual-stack lease as flanneld writes it (TEST-NET and 2001:db8::/32).
const DUAL: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

/// Global addresses and main-table routes of both families in `ns` (the
/// kernel's own link-local addresses and fe80::/64 routes left out).
fn both_families(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        for l in ns.ip_json(&[fam, "addr", "show"]).as_array().unwrap() {
            for a in l["addr_info"].as_array().unwrap() {
                if a["scope"] == "global" {
                    out.push(format!(
                        "addr {} {}/{}",
                        l["ifname"].as_str().unwrap(),
                        a["local"].as_str().unwrap(),
                        a["prefixlen"]
                    ));
                }
            }
        }
        for r in ns.ip_json(&[fam, "route", "show"]).as_array().unwrap() {
            if r["dst"] != "fe80::/64" {
                out.push(format!(
                    "route {} via {} dev {}",
                    r["dst"].as_str().unwrap(),
                    r["gateway"].as_str().unwrap_or("-"),
                    r["dev"].as_str().unwrap_or("-")
                ));
            }
        }
    }
    out.sort();
    out
}

/// host-local's files for the test network (name and content; the lock
/// left out), sorted.
fn host_local_files(node: &Node) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(host_local_dir(node).join("cbr0")) else { return Vec::new() };
    let mut v: Vec<(String, String)> = entries
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "lock")
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

fn ips(result: &Value) -> Vec<String> {
    result["ips"].as_array().unwrap().iter().map(|i| i["address"].as_str().unwrap().to_string()).collect()
}

#[test]
fn dual_stack_matches_upstreams_chain_and_takeover_works_both_ways() {
    if !have_reference_plugins() {
        return;
    }
    let Some(upstream) = upstream_plugin() else { return };
    let ours = Path::new(PLUGIN);

    // The same lease, configuration and container on two fresh nodes: one
    // runs flannel's chain (flannel -> bridge -> host-local), one ours.
    let (Some(theirs_node), Some(our_node)) = (Node::with_lease(DUAL), Node::with_lease(DUAL)) else { return };
    let (tp, op) = (Netns::new("tp").expect("pod namespace"), Netns::new("op").expect("pod namespace"));
    let theirs = ok(run(&theirs_node, &upstream, "ADD", "ctr", &tp, &conf(&theirs_node)), "upstream dual-stack ADD");
    let mine = ok(run(&our_node, ours, "ADD", "ctr", &op, &conf(&our_node)), "our dual-stack ADD");
    assert_eq!(ips(&theirs), ["10.244.1.2/24", "2001:db8:10:1::2/64"]);
    assert_eq!(ips(&mine), ips(&theirs));
    for key in ["gateway", "interface"] {
        let pick = |r: &Value| r["ips"].as_array().unwrap().iter().map(|i| i[key].clone()).collect::<Vec<_>>();
        assert_eq!(pick(&mine), pick(&theirs), "ips[].{key}");
    }
    // The pod's addresses and routes of both families, and the bridge's.
    assert_eq!(both_families(&op), both_families(&tp));
    let bridge = |n: &Node| both_families(&n.ns).into_iter().filter(|l| l.contains(" cni0")).collect::<Vec<_>>();
    assert_eq!(bridge(&our_node), bridge(&theirs_node));
    assert!(bridge(&our_node).contains(&"addr cni0 2001:db8:10:1::1/64".to_string()), "{:?}", bridge(&our_node));
    // host-local's store: the same files with the same contents.
    assert_eq!(host_local_files(&our_node), host_local_files(&theirs_node));
    assert_eq!(
        host_local_files(&our_node).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["10.244.1.2", "2001:db8:10:1::2", "last_reserved_ip.0", "last_reserved_ip.1"]
    );
    // The configuration saved for DEL is the same too (the delegate path's
    // IPv6 range and route included).
    let saved = |n: &Node| -> Value {
        let mut v: Value = serde_json::from_slice(&std::fs::read(n.data_dir().join("ctr")).unwrap()).unwrap();
        v["ipam"]["dataDir"] = Value::Null;
        v
    };
    assert_eq!(saved(&our_node), saved(&theirs_node));
    assert_eq!(saved(&our_node)["ipam"]["ranges"][1], json!([{"subnet": "2001:db8:10:1::/64"}]));
    ok(run(&our_node, ours, "DEL", "ctr", &op, &conf(&our_node)), "our DEL");
    ok(run(&theirs_node, &upstream, "DEL", "ctr", &tp, &conf(&theirs_node)), "upstream DEL");
    assert!(host_local_addresses(&our_node).is_empty() && host_local_addresses(&theirs_node).is_empty());
    drop(our_node);

    // Takeover on one node: upstream's pod, then ours, then upstream again.
    let node = theirs_node;
    let c = conf(&node);
    let pods: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("d{i}")).expect("pod namespace")).collect();
    let up_a = ok(run(&node, &upstream, "ADD", "up-a", &pods[0], &c), "upstream ADD a");
    assert_eq!(ips(&up_a), ["10.244.1.3/24", "2001:db8:10:1::3/64"]);
    // Ours walks on from host-local's hints, both families.
    let rs_b = ok(run(&node, ours, "ADD", "rs-b", &pods[1], &c), "our ADD b");
    assert_eq!(ips(&rs_b), ["10.244.1.4/24", "2001:db8:10:1::4/64"]);
    // Our pod and upstream's talk over IPv6 on the shared bridge.
    let a6: SocketAddr = "[2001:db8:10:1::3]:8080".parse().unwrap();
    let server = echo_server(&pods[0], a6);
    assert_eq!(tcp_round_trip(&pods[1], a6), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "2001:db8:10:1::4");
    // Our CHECK of upstream's pod sees both its addresses.
    let mut check = c.clone();
    check["prevResult"] = up_a.clone();
    ok(run(&node, ours, "CHECK", "up-a", &pods[0], &check), "our CHECK of an upstream dual-stack pod");

    // Rollback: host-local walks on from our hints and never hands out ours.
    let up_c = ok(run(&node, &upstream, "ADD", "up-c", &pods[2], &c), "upstream ADD c after rollback");
    assert_eq!(ips(&up_c), ["10.244.1.5/24", "2001:db8:10:1::5/64"]);
    // flannel's DEL of our pod releases both its host-local reservations.
    ok(run(&node, &upstream, "DEL", "rs-b", &pods[1], &c), "upstream DEL of our pod");
    assert_eq!(host_local_addresses(&node), ["10.244.1.3", "10.244.1.5", "2001:db8:10:1::3", "2001:db8:10:1::5"]);
    // Forward again: our DEL of upstream's pods releases both families.
    ok(run(&node, ours, "DEL", "up-a", &pods[0], &c), "our DEL a");
    ok(run(&node, ours, "DEL", "up-c", &pods[2], &c), "our DEL c");
    ok(run(&node, ours, "DEL", "rs-b", &pods[1], &c), "our DEL b (upstream's DEL ran)");
    for p in &pods {
        wait_pod_empty(p);
    }
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty(), "{:?}", host_local_addresses(&node));
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
}

#[test]
fn a_delegated_configuration_on_a_dual_stack_node_gets_both_ranges() {
    if !have_reference_plugins() {
        return;
    }
    let Some(node) = Node::with_lease(DUAL) else { return };
    let pod = Netns::new("pod").expect("pod namespace");
    let mut c = conf(&node);
    c["delegate"]["forceAddress"] = json!(true);
    let out = run(&node, Path::new(PLUGIN), "ADD", "ctr-d6", &pod, &c);
    assert!(out.stderr.contains("delegate.forceAddress is set"), "{}", out.stderr);
    let result = ok(out, "delegated dual-stack ADD");
    assert_eq!(ips(&result), ["10.244.1.2/24", "2001:db8:10:1::2/64"]);
    let saved: Value = serde_json::from_slice(&std::fs::read(node.data_dir().join("ctr-d6")).unwrap()).unwrap();
    assert_eq!(
        saved["ipam"],
        json!({"type":"host-local","dataDir":host_local_dir(&node),
            "ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"2001:db8:10:1::/64"}]],
            "routes":[{"dst":"10.244.0.0/16"},{"dst":"2001:db8:10::/56"}]})
    );
    let state = both_families(&pod);
    for want in ["addr eth0 2001:db8:10:1::2/64", "route 2001:db8:10::/56 via 2001:db8:10:1::1 dev eth0"] {
        assert!(state.contains(&want.to_string()), "{want} missing: {state:?}");
    }
    assert_eq!(host_local_addresses(&node), ["10.244.1.2", "2001:db8:10:1::2"]);
    ok(run(&node, Path::new(PLUGIN), "DEL", "ctr-d6", &pod, &c), "delegated DEL");
    wait_pod_empty(&pod);
    wait_no_veths(&node);
    assert!(host_local_addresses(&node).is_empty());
}
