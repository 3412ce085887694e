//! Dual-stack and IPv6-only leases: the real plugin binary against the real
//! kernel, inside throw-away namespaces (TEST-NET and 2001:db8::/32 only).
//! State is read with `ip -j` and from the files on disk.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{pod_links, wait_pod_empty, Node};
use netns_fixtures::{echo_server, tcp_round_trip, Netns};
use serde_json::json;

/// A dual-stack lease as flanneld writes it.
const DUAL: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
/// An IPv6-only lease (`EnableIPv4: false`).
const V6_ONLY: &str =
    "FLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

fn path(ns: &Netns) -> &'static str {
    Box::leak(ns.path().to_string_lossy().into_owned().into_boxed_str())
}

/// Global addresses (`addr/len`) of `dev` in `ns` for `family` (`-4`/`-6`),
/// sorted; the kernel's own link-local IPv6 address is left out.
fn addrs(ns: &Netns, family: &str, dev: &str) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip_json(&[family, "addr", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().unwrap().clone())
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    v.sort();
    v
}

/// Whether any IPv6 address of `dev` is still tentative (DAD running).
fn tentative(ns: &Netns, dev: &str) -> Vec<String> {
    ns.ip_json(&["-6", "addr", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().unwrap().clone())
        .filter(|a| a["scope"] != "link" && (a["tentative"] == true || a["dadfailed"] == true))
        .map(|a| a["local"].as_str().unwrap().to_string())
        .collect()
}

/// The main table's routes of `family` as `dst via gw dev`, sorted; the
/// kernel's fe80::/64 per interface is left out.
fn routes(ns: &Netns, family: &str) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip_json(&[family, "route", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dst"] != "fe80::/64")
        .map(|r| {
            format!(
                "{} via {} dev {}",
                r["dst"].as_str().unwrap(),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("-")
            )
        })
        .collect();
    v.sort();
    v
}

/// Files (name and content) of an IPAM directory, sorted; the lock and the
/// shared copy of the configuration saved for a rollback excepted.
fn store_files(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<(String, String)> = entries
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_type().unwrap().is_file() && e.file_name() != "lock" && e.file_name() != "rollback-delegate.json"
        })
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), text.trim_end_matches(' ').to_string())
        })
        .collect();
    v.sort();
    v
}

fn ours(node: &Node) -> std::path::PathBuf {
    node.data_dir().join("networks/cbr0")
}

#[test]
fn dual_stack_add_builds_both_families_and_check_del_gc_handle_both() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let p = Netns::new("pod").expect("pod namespace");
    let result = node.add("ctr-a", &p);

    // One interface in the pod with an address of each family, usable at once.
    let links = pod_links(&p);
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["ifname"], "eth0");
    assert_eq!(links[0]["mtu"], 1450);
    assert_eq!(addrs(&p, "-4", "eth0"), ["10.244.1.2/24"]);
    assert_eq!(addrs(&p, "-6", "eth0"), ["2001:db8:10:1::2/64"]);
    assert!(tentative(&p, "eth0").is_empty(), "pod address still tentative: {:?}", tentative(&p, "eth0"));
    assert_eq!(
        routes(&p, "-4"),
        ["10.244.0.0/16 via 10.244.1.1 dev eth0", "10.244.1.0/24 via - dev eth0", "default via 10.244.1.1 dev eth0"]
    );
    assert_eq!(
        routes(&p, "-6"),
        [
            "2001:db8:10:1::/64 via - dev eth0",
            "2001:db8:10::/56 via 2001:db8:10:1::1 dev eth0",
            "default via 2001:db8:10:1::1 dev eth0"
        ]
    );
    // The bridge: a gateway address per family, not tentative either.
    assert_eq!(addrs(&node.ns, "-4", "cni0"), ["10.244.1.1/24"]);
    assert_eq!(addrs(&node.ns, "-6", "cni0"), ["2001:db8:10:1::1/64"]);
    assert!(tentative(&node.ns, "cni0").is_empty());
    assert_eq!(node.ns.ip_json(&["link", "show", "cni0"])[0]["mtu"], 1450);
    assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"]).trim(), "1");
    assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv6/conf/cni0/accept_ra"]).trim(), "0");
    assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");

    // The result lists both.
    assert_eq!(
        result["ips"],
        json!([
            {"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "2001:db8:10:1::2/64", "gateway": "2001:db8:10:1::1", "interface": 2}
        ])
    );
    assert_eq!(
        result["routes"],
        json!([
            {"dst": "10.244.0.0/16", "gw": "10.244.1.1"},
            {"dst": "2001:db8:10::/56", "gw": "2001:db8:10:1::1"},
            {"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
            {"dst": "::/0", "gw": "2001:db8:10:1::1"}
        ])
    );

    // The store: both records, a hint per range set (host-local's index rule).
    assert_eq!(node.allocations(), ["10.244.1.2", "2001:db8:10:1::2"]);
    let files = store_files(&ours(&node));
    assert_eq!(
        files,
        [
            ("10.244.1.2".to_string(), "ctr-a\r\neth0".to_string()),
            ("2001:db8:10:1::2".into(), "ctr-a\r\neth0".into()),
            ("last_reserved_ip.0".into(), "10.244.1.2".into()),
            ("last_reserved_ip.1".into(), "2001:db8:10:1::2".into()),
        ]
    );
    // ...mirrored in host-local's directory in host-local's format.
    assert_eq!(store_files(&node.dir.path().join("networks/cbr0")), files);
    // The configuration saved for a rollback is the network's shared copy.
    {
        use std::os::unix::fs::MetadataExt;
        let saved = std::fs::metadata(node.data_dir().join("ctr-a")).unwrap();
        let shared = std::fs::metadata(ours(&node).join("rollback-delegate.json")).unwrap();
        assert_eq!(saved.ino(), shared.ino());
    }

    // CHECK passes, and names a missing IPv6 address or route.
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = result.clone();
    let ok = node.verb("CHECK", "ctr-a", path(&p), "eth0", &conf);
    assert!(ok.ok, "{} {}", ok.stdout, ok.stderr);
    p.run_ok("ip", &["-6", "route", "del", "2001:db8:10::/56"]);
    node.verb("CHECK", "ctr-a", path(&p), "eth0", &conf)
        .expect_error(999, "route 2001:db8:10::/56 via 2001:db8:10:1::1 is missing");
    p.run_ok("ip", &["-6", "addr", "del", "2001:db8:10:1::2/64", "dev", "eth0"]);
    node.verb("CHECK", "ctr-a", path(&p), "eth0", &conf)
        .expect_error(999, "address 2001:db8:10:1::2/64 is missing from eth0");

    // DEL releases both.
    node.del("ctr-a", &p);
    node.assert_clean();
    wait_pod_empty(&p);

    // GC releases both families' reservations of a vanished attachment.
    let q: Vec<Netns> = (0..2).map(|i| Netns::new(&format!("gc{i}")).expect("pod namespace")).collect();
    node.add("gc-0", &q[0]);
    node.add("gc-1", &q[1]);
    assert_eq!(node.allocations(), ["10.244.1.3", "10.244.1.4", "2001:db8:10:1::3", "2001:db8:10:1::4"]);
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc-1", "ifname": "eth0"}]);
    let out = node.call(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes());
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(node.allocations(), ["10.244.1.4", "2001:db8:10:1::4"]);
    // STATUS: fine while both ranges have room.
    let status = node.call(&[("CNI_COMMAND", "STATUS")], node.conf("1.1.0").to_string().as_bytes());
    assert!(status.ok, "{} {}", status.stdout, status.stderr);
    node.del("gc-1", &q[1]);
    node.assert_clean();
}

#[test]
fn two_pods_reach_each_other_over_ipv6_and_ipv4() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let a = Netns::new("a").expect("pod namespace");
    let b = Netns::new("b").expect("pod namespace");
    node.add("ctr-a", &a);
    node.add("ctr-b", &b);
    for (server_addr, client) in [("[2001:db8:10:1::2]:8080", "2001:db8:10:1::3"), ("10.244.1.2:8080", "10.244.1.3")] {
        let addr: SocketAddr = server_addr.parse().unwrap();
        let server = echo_server(&a, addr);
        assert_eq!(tcp_round_trip(&b, addr), "ping\n");
        assert_eq!(server.join().unwrap().ip().to_string(), client);
    }
    // The gateway on the bridge answers over IPv6 too (the node side).
    let gw: SocketAddr = "[2001:db8:10:1::1]:8081".parse().unwrap();
    let server = echo_server(&node.ns, gw);
    assert_eq!(tcp_round_trip(&a, gw), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "2001:db8:10:1::2");
    node.del("ctr-a", &a);
    node.del("ctr-b", &b);
    node.assert_clean();
}

#[test]
fn ipv6_only_lease() {
    let Some(node) = Node::with_lease(V6_ONLY) else { return };
    let a = Netns::new("a").expect("pod namespace");
    let b = Netns::new("b").expect("pod namespace");
    let result = node.add("ctr-a", &a);
    node.add("ctr-b", &b);
    assert!(addrs(&a, "-4", "eth0").is_empty());
    assert_eq!(addrs(&a, "-6", "eth0"), ["2001:db8:10:1::2/64"]);
    assert_eq!(
        routes(&a, "-6"),
        [
            "2001:db8:10:1::/64 via - dev eth0",
            "2001:db8:10::/56 via 2001:db8:10:1::1 dev eth0",
            "default via 2001:db8:10:1::1 dev eth0"
        ]
    );
    assert!(routes(&a, "-4").is_empty(), "{:?}", routes(&a, "-4"));
    assert!(addrs(&node.ns, "-4", "cni0").is_empty());
    assert_eq!(addrs(&node.ns, "-6", "cni0"), ["2001:db8:10:1::1/64"]);
    assert_eq!(
        result["ips"],
        json!([{"address": "2001:db8:10:1::2/64", "gateway": "2001:db8:10:1::1", "interface": 2}])
    );
    assert_eq!(
        result["routes"],
        json!([{"dst": "2001:db8:10::/56", "gw": "2001:db8:10:1::1"}, {"dst": "::/0", "gw": "2001:db8:10:1::1"}])
    );
    // The only range set is the first: its hint is last_reserved_ip.0.
    assert_eq!(
        store_files(&ours(&node)),
        [
            ("2001:db8:10:1::2".to_string(), "ctr-a\r\neth0".to_string()),
            ("2001:db8:10:1::3".into(), "ctr-b\r\neth0".into()),
            ("last_reserved_ip.0".into(), "2001:db8:10:1::3".into()),
        ]
    );
    let addr: SocketAddr = "[2001:db8:10:1::3]:8080".parse().unwrap();
    let server = echo_server(&b, addr);
    assert_eq!(tcp_round_trip(&a, addr), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "2001:db8:10:1::2");
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = result;
    let ok = node.verb("CHECK", "ctr-a", path(&a), "eth0", &conf);
    assert!(ok.ok, "{} {}", ok.stdout, ok.stderr);
    node.del("ctr-a", &a);
    node.del("ctr-b", &b);
    node.assert_clean();
}

#[test]
fn every_version_that_can_express_both_families_gets_both() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let p = Netns::new("ver").expect("pod namespace");
    for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let out = node.verb("ADD", "ver", path(&p), "eth0", &node.conf(v));
        assert!(out.ok, "ADD in {v}: {} {}", out.stdout, out.stderr);
        let r = &out.stdout;
        assert_eq!(r["cniVersion"], json!(v));
        // The addresses walk on from the last allocation (host-local's rule).
        let (v4, v6) = {
            let recs = node.allocations();
            assert_eq!(recs.len(), 2, "{v}: {recs:?}");
            (format!("{}/24", recs[0]), format!("{}/64", recs[1]))
        };
        if v.starts_with("0.1") || v.starts_with("0.2") {
            assert_eq!(
                r["ip4"],
                json!({"ip": v4, "gateway": "10.244.1.1",
                    "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]}),
                "{v}"
            );
            assert_eq!(
                r["ip6"],
                json!({"ip": v6, "gateway": "2001:db8:10:1::1",
                    "routes": [{"dst": "2001:db8:10::/56", "gw": "2001:db8:10:1::1"}, {"dst": "::/0", "gw": "2001:db8:10:1::1"}]}),
                "{v}"
            );
            assert!(r.get("ips").is_none() && r.get("interfaces").is_none(), "{v}: {r}");
        } else {
            let mut want_ips = json!([
                {"address": v4, "gateway": "10.244.1.1", "interface": 2},
                {"address": v6, "gateway": "2001:db8:10:1::1", "interface": 2}
            ]);
            if v.starts_with("0.") {
                want_ips[0]["version"] = json!("4");
                want_ips[1]["version"] = json!("6");
            }
            assert_eq!(r["ips"], want_ips, "{v}");
            let dsts: Vec<&str> = r["routes"].as_array().unwrap().iter().map(|x| x["dst"].as_str().unwrap()).collect();
            assert_eq!(dsts, ["10.244.0.0/16", "2001:db8:10::/56", "0.0.0.0/0", "::/0"], "{v}");
            assert_eq!(r["interfaces"].as_array().unwrap().len(), 3, "{v}: {r}");
        }
        node.del("ver", &p);
    }
    node.assert_clean();
}

#[test]
fn an_exhausted_ipv6_range_fails_add_and_leaves_no_link_and_no_ipv4_reservation() {
    // A /126 holds two pod addresses (::2, ::3; ::0 is the subnet, ::1 the gateway).
    let lease = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/126\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let Some(node) = Node::with_lease(lease) else { return };
    let pods: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("ex{i}")).expect("pod namespace")).collect();
    node.add("ex-0", &pods[0]);
    node.add("ex-1", &pods[1]);
    let before = node.allocations();
    assert_eq!(before, ["10.244.1.2", "10.244.1.3", "2001:db8:10:1::2", "2001:db8:10:1::3"]);
    let veths = node.veths().len();
    let out = node.verb("ADD", "ex-2", path(&pods[2]), "eth0", &node.conf("1.0.0"));
    out.expect_error(11, "no free address in 2001:db8:10:1::/126");
    assert_eq!(node.allocations(), before, "the IPv4 reservation of the failed ADD was kept");
    assert!(pod_links(&pods[2]).is_empty(), "a half-made interface was left in the pod");
    assert_eq!(node.veths().len(), veths, "a half-made veth was left on the node");
    assert!(!common::index_entries(&node).contains_key("ex-2:eth0"));
    assert!(node.data_dir().join("ex-0").exists());
    assert!(!node.data_dir().join("ex-2").exists(), "the failed ADD left a rollback file");
    // STATUS says why no pod can be added.
    let status = node.call(&[("CNI_COMMAND", "STATUS")], node.conf("1.1.0").to_string().as_bytes());
    status.expect_error(50, "no free pod address in 2001:db8:10:1::/126");
    node.del("ex-0", &pods[0]);
    let again = node.verb("ADD", "ex-2", path(&pods[2]), "eth0", &node.conf("1.0.0"));
    assert!(again.ok, "{} {}", again.stdout, again.stderr);
    node.del("ex-1", &pods[1]);
    node.del("ex-2", &pods[2]);
    node.assert_clean();
}

#[test]
fn an_ipv6_subnet_that_is_not_ipv6_is_refused_naming_key_and_value() {
    for (lease, key, value) in [
        (
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=10.245.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            "FLANNEL_IPV6_SUBNET",
            "10.245.1.1/24",
        ),
        (
            "FLANNEL_IPV6_NETWORK=10.0.0.0/8\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            "FLANNEL_IPV6_NETWORK",
            "10.0.0.0/8",
        ),
        (
            "FLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:99:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            "FLANNEL_IPV6_SUBNET",
            "2001:db8:99:1::1/64",
        ),
    ] {
        let Some(node) = Node::with_lease(lease) else { return };
        let p = Netns::new("bad").expect("pod namespace");
        let out = node.verb("ADD", "bad", path(&p), "eth0", &node.conf("1.0.0"));
        out.expect_error(7, key);
        let msg = out.stdout["msg"].as_str().unwrap();
        assert!(msg.contains(value), "{msg:?} does not name {value}");
        assert!(pod_links(&p).is_empty());
        assert!(node.veths().is_empty());
        assert!(node.allocations().is_empty());
    }
}

#[test]
fn a_pod_namespace_with_ipv6_turned_off_gets_it_turned_on_as_the_reference_plugins_do() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let p = Netns::new("noip6").expect("pod namespace");
    for key in ["net.ipv6.conf.default.disable_ipv6", "net.ipv6.conf.lo.disable_ipv6"] {
        p.sysctl(key, "1").expect("turn IPv6 off in the pod");
    }
    node.add("ctr", &p);
    assert_eq!(addrs(&p, "-6", "eth0"), ["2001:db8:10:1::2/64"]);
    for dev in ["lo", "eth0"] {
        let v = p.run_ok("cat", &[&format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")]);
        assert_eq!(v.trim(), "0", "{dev}");
    }
    assert_eq!(addrs(&p, "-6", "lo"), ["::1/128"]);
    node.del("ctr", &p);
    node.assert_clean();
}

#[test]
fn ip_masq_covers_both_families_and_del_takes_both_out() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    if !common::have_nft(&node.ns) {
        return;
    }
    let p = Netns::new("masq").expect("pod namespace");
    let mut conf = node.conf("1.0.0");
    conf["delegate"]["ipMasq"] = json!(true);
    let out = node.verb("ADD", "m", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    let set = |fam: &str| node.ns.run_ok("nft", &["list", "set", fam, "flannel-rs-cni", "pods"]);
    assert!(set("ip").contains("10.244.1.2"), "{}", set("ip"));
    assert!(set("ip6").contains("2001:db8:10:1::2"), "{}", set("ip6"));
    let chain = node.ns.run_ok("nft", &["list", "chain", "ip6", "flannel-rs-cni", "postrouting"]);
    assert!(chain.contains("ip6 saddr @pods ip6 daddr != @cluster ip6 daddr != ff00::/8 masquerade"), "{chain}");
    let cluster = node.ns.run_ok("nft", &["list", "set", "ip6", "flannel-rs-cni", "cluster"]);
    assert!(cluster.contains("2001:db8:10::/56"), "{cluster}");
    let out = node.verb("DEL", "m", path(&p), "eth0", &conf);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert!(!set("ip").contains("10.244.1.2"), "{}", set("ip"));
    assert!(!set("ip6").contains("2001:db8:10:1::2"), "{}", set("ip6"));
    node.assert_clean();
}

#[test]
fn an_ipv6_bridge_address_from_an_earlier_lease_is_replaced_only_when_no_pod_uses_it() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let p = Netns::new("lease").expect("pod namespace");
    node.add("old", &p);
    std::fs::write(node.subnet_file(), DUAL.replace("2001:db8:10:1::1/64", "2001:db8:10:7::1/64")).unwrap();
    let q = Netns::new("lease2").expect("pod namespace");
    node.verb("ADD", "new", path(&q), "eth0", &node.conf("1.0.0")).expect_error(
        999,
        "carries 2001:db8:10:1::1/64 from an earlier lease but the node's lease is now 2001:db8:10:7::1/64",
    );
    assert!(pod_links(&q).is_empty());
    assert_eq!(node.allocations(), ["10.244.1.2", "2001:db8:10:1::2"], "the refused ADD kept a reservation");
    assert!(!node.data_dir().join("new").exists(), "the refused ADD left a rollback file");
    node.del("old", &p);
    let r = node.add("new", &q);
    assert_eq!(r["ips"][1]["address"], "2001:db8:10:7::2/64");
    assert_eq!(addrs(&node.ns, "-6", "cni0"), ["2001:db8:10:7::1/64"]);
    node.del("new", &q);
    node.assert_clean();
}

#[test]
fn requested_addresses_of_both_families_and_a_retried_add() {
    let Some(node) = Node::with_lease(DUAL) else { return };
    let p = Netns::new("args").expect("pod namespace");
    let conf = node.conf("1.0.0").to_string();
    let env = |args: &'static str| {
        [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "args"),
            ("CNI_NETNS", path(&p)),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ]
    };
    // IP= takes one address per family, comma-separated (host-local's form).
    let out = node.call(&env("IP=2001:db8:10:1::77,10.244.1.77"), conf.as_bytes());
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert_eq!(addrs(&p, "-4", "eth0"), ["10.244.1.77/24"]);
    assert_eq!(addrs(&p, "-6", "eth0"), ["2001:db8:10:1::77/64"]);
    // A retried ADD of the same attachment keeps its addresses and records.
    let again = node.add("args", &p);
    assert_eq!(
        again["ips"].as_array().unwrap().iter().map(|i| i["address"].as_str().unwrap()).collect::<Vec<_>>(),
        ["10.244.1.77/24", "2001:db8:10:1::77/64"]
    );
    assert_eq!(node.allocations(), ["10.244.1.77", "2001:db8:10:1::77"]);
    node.del("args", &p);
    node.assert_clean();
    wait_pod_empty(&p);
    // Two addresses of one family: the second has no range; nothing is kept.
    let out = node.call(&env("IP=10.244.1.77,10.244.1.78"), conf.as_bytes());
    out.expect_error(4, "IP=10.244.1.78 cannot be given");
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(pod_links(&p).is_empty());
}
