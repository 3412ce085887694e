//! The fixtures build what they promise, reach each other, leave the root
//! namespace alone, and remove everything, also on panic. These tests need
//! root; without it they skip (or fail with `CI=true`, see `require_root`).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use netns_fixtures::{require_root, single_node, wait_until, Cluster, Netns, PREFIX};
use serde_json::Value;

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// What `ip netns list` shows, names only.
fn netns_list() -> HashSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// Names of the root namespace's links (this test process runs there).
fn root_links() -> Vec<String> {
    let out = Command::new("ip").args(["-j", "link", "show"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> =
        v.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

fn root_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
}

/// The IPv4 addresses (`a.b.c.d/len`) of `dev` inside `ns`.
fn ipv4_of(ns: &Netns, dev: &str) -> Vec<String> {
    let v = ns.ip_json(&["-4", "addr", "show", "dev", dev]);
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

#[test]
fn cluster_has_the_addresses_it_promises_and_nodes_reach_each_other() {
    if !require_root() {
        return;
    }
    let links_before = root_links();
    let forward_before = root_ip_forward();
    let cluster = Cluster::with_outside(3).unwrap();
    assert_eq!(cluster.nodes().len(), 3);

    for (i, node) in cluster.nodes().iter().enumerate() {
        assert_eq!(node.index, i);
        assert_eq!(node.underlay_if, "eth0");
        assert_eq!(node.underlay_ip.to_string(), format!("192.0.2.{}", 10 + i));
        assert_eq!(ipv4_of(&node.ns, "eth0"), [format!("192.0.2.{}/24", 10 + i)]);
        let eth0 = &node.ns.ip_json(&["link", "show", "dev", "eth0"])[0];
        assert_eq!(eth0["mtu"], 1500);
        assert_eq!(eth0["operstate"], "UP");
        let default = node.ns.ip_json(&["-4", "route", "show", "default"]);
        assert_eq!(default[0]["gateway"], "192.0.2.1", "{default}");
        assert_eq!(default[0]["dev"], "eth0");
        assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    }
    let outside = cluster.outside().expect("outside host");
    assert_eq!(ipv4_of(outside, "eth0"), ["192.0.2.200/24"]);
    assert_eq!(ipv4_of(cluster.switch(), "br0"), ["192.0.2.1/24"]);
    // The switch forwards nothing beyond the segment.
    assert_eq!(cluster.switch().run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "0");
    let ports = cluster.switch().bridge_json(&["link", "show"]);
    assert_eq!(ports.as_array().unwrap().len(), 4, "{ports}");

    // Every node reaches every other node, the gateway and the outside host.
    for node in cluster.nodes() {
        for target in ["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.1", "192.0.2.200"] {
            node.ns.run_ok("ping", &["-c1", "-W1", target]);
        }
    }
    outside.run_ok("ping", &["-c1", "-W1", "192.0.2.11"]);

    // Nothing leaked into the root namespace.
    assert_eq!(root_links(), links_before, "the fixture changed the root namespace's links");
    assert_eq!(root_ip_forward(), forward_before, "the fixture changed the root namespace's ip_forward");

    let mut names: Vec<String> = cluster.nodes().iter().map(|n| n.ns.name().to_string()).collect();
    names.push(cluster.switch().name().to_string());
    names.push(outside.name().to_string());
    let listed = netns_list();
    for n in &names {
        assert!(n.starts_with(PREFIX), "{n}");
        assert!(listed.contains(n) && exists(n), "{n} not in `ip netns list`");
    }
    drop(cluster);
    let listed = netns_list();
    for n in &names {
        assert!(!exists(n) && !listed.contains(n), "{n} survived the drop");
    }
    assert_eq!(root_links(), links_before);
}

#[test]
fn a_panic_inside_a_fixture_still_removes_everything() {
    if !require_root() {
        return;
    }
    let links_before = root_links();
    let mut names = Vec::new();
    let mut server = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::with_outside(2).unwrap();
        let pod = cluster.node(0).add_pod_netns("p").unwrap();
        // A process a failing test never stopped: it would keep the pod's
        // namespace alive after its name is gone.
        server = Some(pod.spawn("sleep", &["60"]).unwrap());
        names.extend([cluster.node(0).ns.name().to_string(), cluster.switch().name().to_string()]);
        names.push(pod.name().to_string());
        panic!("test failure inside a fixture");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(!exists(n), "{n} survived a panic");
    }
    let status = server.unwrap().wait().unwrap();
    assert!(!status.success(), "the process inside the pod was not killed: {status}");
    assert_eq!(root_links(), links_before);
}

#[test]
fn command_runs_inside_the_namespace_without_touching_the_root() {
    if !require_root() {
        return;
    }
    let links_before = root_links();
    let ns = Netns::new("cmd").unwrap();
    assert!(ns.name().starts_with(PREFIX) && ns.name().ends_with("-cmd"), "{}", ns.name());
    assert_eq!(ns.path(), Path::new("/run/netns").join(ns.name()));
    // (A bridge rather than a dummy: the dummy module is not always there.)
    ns.run_ok("ip", &["link", "add", "fixt0", "type", "bridge"]);
    assert_eq!(ns.ip_json(&["link", "show", "fixt0"]).as_array().unwrap().len(), 1);
    assert_eq!(root_links(), links_before);
    // sh and run see the same namespace; `lo` is up from the start.
    let out = ns.sh("ip -br link show lo; ip -br link show fixt0");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lo") && text.contains("UNKNOWN") && text.contains("fixt0"), "{text}");
    assert!(!ns.run("false", &[]).unwrap().status.success());
    // A bridge without ports never comes up: waiting for it fails in time.
    let err = ns.wait_oper_up(&["fixt0"], Duration::from_millis(50)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(err.to_string().contains("fixt0"), "{err}");
    // Empty JSON output reads as an empty list.
    assert_eq!(ns.ip_json(&["-4", "route", "show"]), Value::Array(Vec::new()));
    // run_ok panics with what ran and what it said.
    let err = std::panic::catch_unwind(|| ns.run_ok("ip", &["link", "show", "nosuch0"])).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("ip link show nosuch0") && msg.contains("nosuch0"), "{msg}");

    // A command built before its Netns is dropped still enters that
    // namespace (it holds its own descriptor), never the root.
    let mut cmd = ns.command("ip");
    cmd.args(["-j", "link", "show"]);
    drop(ns);
    let out = cmd.output().unwrap();
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = links.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap()).collect();
    assert_eq!(names, ["lo", "fixt0"]);
}

#[test]
fn single_node_is_a_forwarding_namespace_with_only_lo() {
    if !require_root() {
        return;
    }
    let forward_before = root_ip_forward();
    let node = single_node().unwrap();
    assert_eq!(node.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    assert_eq!(root_ip_forward(), forward_before);
    let links = node.ip_json(&["link", "show"]);
    assert_eq!(links.as_array().unwrap().len(), 1, "{links}");
    assert_eq!(links[0]["ifname"], "lo");
    node.run_ok("ping", &["-c1", "-W1", "127.0.0.1"]);
    let name = node.name().to_string();
    drop(node);
    assert!(!exists(&name));
}

#[test]
fn names_are_unique_across_threads() {
    if !require_root() {
        return;
    }
    let all: Vec<Netns> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| Netns::new("par").unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let names: HashSet<&str> = all.iter().map(|n| n.name()).collect();
    assert_eq!(names.len(), 8);
    assert!(names.iter().all(|n| exists(n)));
    let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    drop(all);
    assert!(owned.iter().all(|n| !exists(n)));
}

#[test]
fn wait_until_polls_and_times_out() {
    let mut n = 0;
    wait_until(Duration::from_secs(1), "three polls", || {
        n += 1;
        n >= 3
    });
    assert_eq!(n, 3);
    let timed_out = std::panic::catch_unwind(|| wait_until(Duration::from_millis(30), "never", || false));
    let msg = timed_out.unwrap_err().downcast_ref::<String>().unwrap().clone();
    assert!(msg.contains("never"), "{msg}");
}

#[test]
fn cleanup_removes_namespaces_of_dead_processes_only() {
    if !require_root() {
        return;
    }
    let alive = Netns::new("alive").unwrap();
    // Named like one made by a process that has exited: pids never exceed
    // 4194304 (PID_MAX_LIMIT). Our pid as counter keeps test processes
    // running in parallel apart. Their cleanups may still remove it, even
    // while `ip netns add` is creating it; retry then.
    let dead = format!("{PREFIX}4194999x{}-leftover", std::process::id());
    let mut created = false;
    for _ in 0..10 {
        let out = Command::new("ip").args(["netns", "add", &dead]).output().unwrap();
        if out.status.success() {
            created = true;
            netns_fixtures::cleanup_leftovers();
            assert!(!exists(&dead), "cleanup left a dead process's namespace");
            break;
        }
    }
    assert!(created, "could not create {dead}");
    assert!(exists(alive.name()), "cleanup removed a live process's namespace");
}

#[test]
fn bad_names_are_refused() {
    // No root needed: validation happens before anything is created.
    assert!(Netns::new("").is_err());
    assert!(Netns::new("a/b").is_err());
    assert!(Netns::named("not-ours").is_err());
    assert!(Cluster::new_named("a-b", 1, false).is_err());
    assert!(Cluster::new_named("1x2", 1, false).is_err());
    assert!(Cluster::new(netns_fixtures::MAX_NODES + 1).is_err());
    assert!(netns_fixtures::cleanup_tag("").is_err());
    assert!(netns_fixtures::cleanup_tag("a-b").is_err());
}

#[test]
fn cli_up_keeps_a_cluster_that_down_removes() {
    if !require_root() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_netns-fixture");
    let tag = format!("cli{}", std::process::id());
    let up = Command::new(bin).args(["up", "--nodes", "2", "--outside", "--name", &tag]).output().unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let text = String::from_utf8_lossy(&up.stdout).to_string();
    let lines: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let (role, name) = l.split_once(' ').unwrap();
            (role.to_string(), name.to_string())
        })
        .collect();
    let expected: Vec<(String, String)> =
        ["switch", "node0", "node1", "outside"].iter().map(|r| (r.to_string(), format!("{PREFIX}{tag}-{r}"))).collect();
    assert_eq!(lines, expected);
    for (_, name) in &lines {
        assert!(exists(name), "{name} not kept");
    }
    // The kept cluster works: node1 reaches the outside host.
    let ping = Command::new("ip")
        .args(["netns", "exec", &format!("{PREFIX}{tag}-node1"), "ping", "-c1", "-W1", "192.0.2.200"])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));

    // A second `up` with the same tag fails and leaves the first alone;
    // `cleanup` (dead processes only) does not touch a kept cluster.
    let again = Command::new(bin).args(["up", "--nodes", "1", "--name", &tag]).output().unwrap();
    assert!(!again.status.success());
    netns_fixtures::cleanup_leftovers();
    assert!(lines.iter().all(|(_, n)| exists(n)));

    // `down` removes the cluster and a pod a script made under its tag.
    let pod = format!("{PREFIX}{tag}-pod-a");
    assert!(Command::new("ip").args(["netns", "add", &pod]).status().unwrap().success());
    let down = Command::new(bin).args(["down", "--name", &tag]).output().unwrap();
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(!exists(&pod));
    assert!(lines.iter().all(|(_, n)| !exists(n)));

    let bad = Command::new(bin).args(["up", "--name", "no/slash"]).output().unwrap();
    assert!(!bad.status.success());
}

/// The global IPv6 addresses (`addr/len`) of `dev` inside `ns`.
fn ipv6_of(ns: &Netns, dev: &str) -> Vec<String> {
    let v = ns.ip_json(&["-6", "addr", "show", "dev", dev, "scope", "global"]);
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        // `ip -j` lists an address a filter drops as `{}`.
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

fn root_sysctl(key: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(key.replace('.', "/"))).unwrap()
}

#[test]
fn dual_stack_cluster_reaches_every_node_and_the_outside_host_over_ipv6() {
    if !require_root() {
        return;
    }
    let links_before = root_links();
    let root_keys = [
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
        "net.ipv6.conf.default.accept_dad",
    ];
    let root_before: Vec<String> = root_keys.iter().map(|k| root_sysctl(k)).collect();
    let cluster = Cluster::dual_stack(3, true).unwrap();
    assert!(cluster.is_dual_stack());
    for (i, node) in cluster.nodes().iter().enumerate() {
        let v6 = format!("2001:db8::{}", 10 + i);
        assert_eq!(node.underlay_ipv6.map(|a| a.to_string()), Some(v6.clone()));
        assert_eq!(netns_fixtures::ipv6_of_node(i).to_string(), v6);
        assert_eq!(ipv4_of(&node.ns, "eth0"), [format!("192.0.2.{}/24", 10 + i)]);
        assert_eq!(ipv6_of(&node.ns, "eth0"), [format!("{v6}/64")]);
        let default = node.ns.ip_json(&["-6", "route", "show", "default"]);
        assert_eq!(default[0]["gateway"], "2001:db8::1", "{default}");
        assert_eq!(default[0]["dev"], "eth0");
        assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"]).trim(), "1");
        assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    }
    let outside = cluster.outside().expect("outside host");
    assert_eq!(ipv6_of(outside, "eth0"), ["2001:db8::200/64"]);
    assert_eq!(outside.ip_json(&["-6", "route", "show", "default"]), serde_json::json!([]));
    assert_eq!(ipv6_of(cluster.switch(), "br0"), ["2001:db8::1/64"]);
    assert_eq!(cluster.switch().run_ok("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"]).trim(), "0");

    // Every node reaches every other node, the gateway and the outside host
    // over IPv6, at the first packet (the cluster waited for neighbours).
    for node in cluster.nodes() {
        for target in ["2001:db8::10", "2001:db8::11", "2001:db8::12", "2001:db8::1", "2001:db8::200"] {
            node.ns.run_ok("ping", &["-6", "-c1", "-W2", target]);
        }
    }
    outside.run_ok("ping", &["-6", "-c1", "-W2", "2001:db8::11"]);
    // And TCP, through sockets made inside the namespaces.
    let target: std::net::SocketAddr = "[2001:db8::12]:7100".parse().unwrap();
    let server = netns_fixtures::echo_server(&cluster.node(2).ns, target);
    assert_eq!(netns_fixtures::tcp_round_trip(&cluster.node(0).ns, target), "ping\n");
    assert_eq!(server.join().unwrap().ip().to_string(), "2001:db8::10");

    // Nothing of it in the root namespace.
    assert_eq!(root_links(), links_before);
    let root_after: Vec<String> = root_keys.iter().map(|k| root_sysctl(k)).collect();
    assert_eq!(root_after, root_before, "the fixture changed the root namespace's {root_keys:?}");

    let mut names: Vec<String> = cluster.nodes().iter().map(|n| n.ns.name().to_string()).collect();
    names.push(cluster.switch().name().to_string());
    names.push(outside.name().to_string());
    drop(cluster);
    for n in &names {
        assert!(!exists(n), "{n} survived the drop");
    }
    assert_eq!(root_links(), links_before);
}

#[test]
fn ipv4_only_clusters_have_no_global_ipv6_address() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::with_outside(2).unwrap();
    assert!(!cluster.is_dual_stack());
    for node in cluster.nodes() {
        assert_eq!(node.underlay_ipv6, None);
        assert_eq!(ipv6_of(&node.ns, "eth0"), Vec::<String>::new());
        assert_eq!(node.ns.ip_json(&["-6", "route", "show", "default"]), serde_json::json!([]));
    }
    assert_eq!(ipv6_of(cluster.outside().unwrap(), "eth0"), Vec::<String>::new());
    assert_eq!(ipv6_of(cluster.switch(), "br0"), Vec::<String>::new());
}

#[test]
fn cli_up_ipv6_builds_a_dual_stack_cluster() {
    if !require_root() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_netns-fixture");
    let tag = format!("cliv{}", std::process::id());
    let up = Command::new(bin).args(["up", "--nodes", "2", "--outside", "--ipv6", "--name", &tag]).output().unwrap();
    let down = || Command::new(bin).args(["down", "--name", &tag]).output().unwrap();
    if !up.status.success() {
        down();
        panic!("{}", String::from_utf8_lossy(&up.stderr));
    }
    let ping = Command::new("ip")
        .args(["netns", "exec", &format!("{PREFIX}{tag}-node1"), "ping", "-6", "-c1", "-W2", "2001:db8::200"])
        .output()
        .unwrap();
    let removed = down();
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert!(!exists(&format!("{PREFIX}{tag}-node0")));
}
