//! The incremental reconcile, end to end: a lease added, changed and
//! removed in etcd is programmed without a full reconcile; the kernel's
//! notifications about our own changes (their echo) ask for no reconcile,
//! while a route deleted by hand still disagrees and is put back. Counted
//! by the daemon's /metrics, never timed.

use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, Overlay};
use e2e_tests::{http_get, metric};
use netns_fixtures::{require_root, wait_until};

const HEALTH: &[&str] = &["--healthz-ip", "127.0.0.1", "--healthz-port", "9106"];

fn lease(mac: &str) -> String {
    format!(r#"{{"PublicIP":"192.0.2.50","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#)
}

/// Node 0's counters that matter here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    full: f64,
    incremental: f64,
    echoes: f64,
    disagreements: f64,
}

fn counts(o: &Overlay) -> Counts {
    let text = http_get(&o.cluster.node(0).ns, "127.0.0.1:9106".parse().unwrap(), "/metrics");
    let m = |name: &str| metric(&text, name).unwrap_or_else(|| panic!("no {name} in node0's /metrics:\n{text}"));
    Counts {
        full: m("flannel_reconcile_full_runs_total"),
        incremental: m("flannel_reconcile_incremental_runs_total"),
        echoes: m("flannel_kernel_echoes_total"),
        disagreements: m("flannel_kernel_disagreements_total"),
    }
}

#[test]
fn lease_changes_run_incrementally_our_echoes_ask_for_nothing_and_a_hand_deleted_route_comes_back() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(2);
    o.set_flags(0, HEALTH);
    o.start_all();
    o.wait_converged(0);
    // The peer's subnet: one neither node was given (the allocator picks at random).
    let owned = [o.subnet(0), o.subnet(1)];
    let net = (250..=254u8)
        .map(|x| format!("10.244.{x}.0"))
        .find(|n| !owned.iter().any(|s| s.network().to_string() == *n))
        .expect("two nodes cannot own five subnets");
    let (key, subnet) = (format!("/coreos.com/network/subnets/{net}-24"), format!("{net}/24"));
    let (key, subnet, net) = (key.as_str(), subnet.as_str(), net.as_str());
    let ns = &o.cluster.node(0).ns;
    let route = || ns.ip_json(&["route", "show", subnet]).to_string();
    let fdb = || ns.run_ok("bridge", &["fdb", "show", "dev", "flannel.1"]);

    // A new lease: its neighbour, FDB entry and route, without a full run.
    let c0 = counts(&o);
    etcdctl_ok(o.outside(), &["put", key, &lease("02:00:00:00:00:50")]);
    wait_until(Duration::from_secs(10), "node0 to route the new lease", || route().contains(net));
    // Its three kernel notifications (neighbour, FDB entry, route) each
    // agree with what the run programmed.
    wait_until(Duration::from_secs(10), "the three echoes to be counted", || counts(&o).echoes >= c0.echoes + 3.0);
    let c1 = counts(&o);
    assert!(c1.incremental > c0.incremental, "no incremental run: {c0:?} -> {c1:?}");
    assert_eq!(c1.disagreements, c0.disagreements, "an echo of our own change disagreed: {c0:?} -> {c1:?}");

    // The same lease with another VTEP MAC: the new FDB entry, the old one gone.
    etcdctl_ok(o.outside(), &["put", key, &lease("02:00:00:00:00:51")]);
    wait_until(Duration::from_secs(10), "the FDB entry to follow the new MAC", || {
        let f = fdb();
        f.contains("02:00:00:00:00:51 dst 192.0.2.50") && !f.contains("02:00:00:00:00:50")
    });
    // Neighbour replaced, new FDB entry, old one deleted.
    wait_until(Duration::from_secs(10), "their echoes to be counted", || counts(&o).echoes >= c1.echoes + 3.0);
    let c2 = counts(&o);
    assert!(c2.incremental > c1.incremental, "no incremental run: {c1:?} -> {c2:?}");
    assert_eq!(c2.disagreements, c1.disagreements, "an echo of our own change disagreed: {c1:?} -> {c2:?}");

    // A route deleted by hand disagrees, and a full run puts it back.
    let log_before = o.log(0).len();
    ns.run_ok("ip", &["route", "del", subnet]);
    wait_until(Duration::from_secs(30), "the deleted route to come back", || route().contains(net));
    wait_until(Duration::from_secs(10), "the deletion to be counted", || counts(&o).disagreements > c2.disagreements);
    let c3 = counts(&o);
    assert_eq!(c3.disagreements, c2.disagreements + 1.0, "only the deletion disagrees: {c2:?} -> {c3:?}");
    assert!(c3.full > c2.full, "no full run put the route back: {c2:?} -> {c3:?}");
    let log = o.log(0);
    let since = &log[log_before..];
    assert!(
        since.lines().any(|l| l.contains("SetRoute(") && l.contains(subnet) && !l.contains("(lease change)")),
        "no full run restored the route:\n{since}"
    );

    // The lease removed: its entries go, incrementally.
    etcdctl_ok(o.outside(), &["del", key]);
    wait_until(Duration::from_secs(10), "the removed lease's entries to go", || {
        !route().contains(net) && !fdb().contains("192.0.2.50")
    });
    let c4 = counts(&o);
    assert!(c4.incremental > c3.incremental, "no incremental run: {c3:?} -> {c4:?}");
    // What is left is exactly what the leases ask for.
    o.wait_converged(0);
}
