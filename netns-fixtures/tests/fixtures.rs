//! The fixtures themselves: they build what they say, reach each other, leave
//! the root namespace alone, and remove everything, also on panic.

use std::time::Duration;

use netns_fixtures::{require_root, wait_until, Cluster, Netns};

fn exists(name: &str) -> bool {
    std::path::Path::new(&format!("/run/netns/{name}")).exists()
}

fn root_links() -> Vec<String> {
    let out = std::process::Command::new("ip").args(["-j", "link", "show"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> =
        v.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[test]
fn cluster_has_the_addresses_it_promises_and_nodes_reach_each_other() {
    if !require_root() {
        return;
    }
    let before = root_links();
    let cluster = Cluster::with_outside(3).unwrap();
    for (i, node) in cluster.nodes().iter().enumerate() {
        let addrs = node.ns.ip_json(&["-4", "addr", "show", "dev", "eth0"]);
        let local = addrs[0]["addr_info"][0]["local"].as_str().unwrap().to_string();
        assert_eq!(local, format!("192.0.2.{}", 10 + i));
        assert_eq!(local, node.underlay_ip.to_string());
        assert_eq!(node.ns.run_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    }
    let n0 = &cluster.node(0).ns;
    n0.run_ok("ping", &["-c1", "-W2", "192.0.2.12"]);
    n0.run_ok("ping", &["-c1", "-W2", "192.0.2.200"]);
    cluster.outside().unwrap().run_ok("ping", &["-c1", "-W2", "192.0.2.11"]);
    assert_eq!(root_links(), before, "the fixture changed the root namespace's links");

    let names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.ns.name().to_string())
        .chain([cluster.switch().name().to_string(), cluster.outside().unwrap().name().to_string()])
        .collect();
    assert!(names.iter().all(|n| exists(n)));
    drop(cluster);
    for n in &names {
        assert!(!exists(n), "{n} survived the drop");
    }
    assert_eq!(root_links(), before);
}

#[test]
fn a_panicking_test_still_removes_its_namespaces() {
    if !require_root() {
        return;
    }
    let mut seen = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new(2).unwrap();
        let pod = cluster.node(0).add_pod_netns("p").unwrap();
        seen.extend([cluster.node(0).ns.name().to_string(), pod.name().to_string()]);
        panic!("test failure inside a fixture");
    }));
    assert!(result.is_err());
    assert_eq!(seen.len(), 2);
    for n in &seen {
        assert!(!exists(n), "{n} survived a panic");
    }
}

#[test]
fn command_runs_inside_the_namespace_and_wait_until_polls() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("cmd").unwrap();
    ns.run_ok("ip", &["link", "add", "dummy7", "type", "bridge"]);
    // The link exists inside, not in the root namespace.
    assert_eq!(ns.ip_json(&["link", "show", "dummy7"]).as_array().unwrap().len(), 1);
    assert!(!root_links().contains(&"dummy7".to_string()));
    let mut n = 0;
    wait_until(Duration::from_secs(1), "three polls", || {
        n += 1;
        n >= 3
    });
    assert_eq!(n, 3);
    let timed_out = std::panic::catch_unwind(|| wait_until(Duration::from_millis(30), "never", || false));
    assert!(timed_out.is_err());
}

#[test]
fn cleanup_removes_namespaces_of_dead_processes_only() {
    if !require_root() {
        return;
    }
    // A namespace named like one made by a process that has exited (pid 1 is
    // alive; pick a pid that cannot exist).
    let dead = "flt-4194999x0-leftover";
    let status = std::process::Command::new("ip").args(["netns", "add", dead]).status().unwrap();
    assert!(status.success());
    let alive = Netns::new("alive").unwrap();
    let removed = netns_fixtures::cleanup_leftovers();
    assert!(removed >= 1);
    assert!(!exists(dead));
    assert!(exists(alive.name()), "cleanup removed a live process's namespace");
}
