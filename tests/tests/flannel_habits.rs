//! flannel users' habits (issue 13), end to end: real etcd, real daemons,
//! real kernel, observed from outside the daemon (`ip -j`, `nft -j`,
//! `etcdctl`, `diagnose`).

use std::time::Duration;

use e2e_tests::overlay::{leases, second_interface, Overlay, ETCD};
use netns_fixtures::{require_root, wait_until, Netns};
use serde_json::Value;

/// The masquerade rules of flannel's chain FLANNEL-POSTRTG (0 when it is absent).
fn masquerade_rules(ns: &Netns) -> usize {
    let chain = ns.run("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    String::from_utf8_lossy(&chain.stdout).lines().filter(|l| l.contains("-j MASQUERADE")).count()
}

/// The main table's blackhole routes in `ns` (`ip -j route show type blackhole`).
fn blackholes(ns: &Netns) -> Vec<String> {
    let v = ns.ip_json(&["route", "show", "table", "main", "type", "blackhole"]);
    v.as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap().to_string()).collect()
}

/// A daemon started the way flannel's docs and unit files start flanneld:
/// single-dash long flags with `=` and with the value as the next argument,
/// klog's flags, and `FLANNELD_IP_MASQ=1` (a Go boolean), against real etcd.
#[test]
fn a_daemon_started_with_go_flag_syntax_does_what_the_flags_say() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    let ns = &o.cluster.node(0).ns;
    // A second interface, so that -iface is not what the default route picks.
    second_interface(ns);
    let subnet_file = o.daemons[0].subnet_file.clone();
    let command = |o: &Overlay| {
        let mut cmd = o.bare_daemon_command(0);
        cmd.arg(format!("-etcd-endpoints={ETCD}"))
            .arg("-subnet-file")
            .arg(&subnet_file)
            .args(["-iface=nope0", "-iface-regex", "^198\\.51\\.100\\.[0-9]{1,3}$", "-v=10", "-vmodule=kube=4"])
            .args(["-log_backtrace_at=main.go:100", "-subnet-lease-renew-margin=0x3c"])
            .env("FLANNELD_IP_MASQ", "1");
        cmd
    };
    o.spawn_command(0, command(&o));
    o.wait_ready(0);
    let text = std::fs::read_to_string(&subnet_file).unwrap();
    assert!(text.contains("FLANNEL_IPMASQ=true"), "{text}");
    let ns = &o.cluster.node(0).ns;
    assert_eq!(masquerade_rules(ns), 2, "FLANNELD_IP_MASQ=1 puts the masquerade rules in place");
    // -iface matched nothing, the regex (with its commas) chose ext1.
    let lease = &leases(o.outside())[&o.lease_key(0)];
    assert_eq!(lease["PublicIP"], "198.51.100.10", "{lease}");
    let log = o.log(0);
    assert!(log.contains("--iface nope0: no such interface"), "{log}");
    // -v=10 is trace for our lines (debug ones show, which the default
    // hides); -log_backtrace_at is named as without effect.
    assert!(log.contains("DEBUG flanneld_rs::subnet::etcd: lease watcher: listed"), "-v=10 shows debug lines:\n{log}");
    assert!(log.contains("-log_backtrace_at main.go:100 has no effect"), "{log}");
    // diagnose takes the same syntax.
    let out = command(&o).args(["diagnose", "-json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["converged"], true, "{report}");

    // A bad Go boolean in the environment: refused, naming the variable.
    o.stop(0);
    let out = o
        .bare_daemon_command(0)
        .arg(format!("-etcd-endpoints={ETCD}"))
        .env("FLANNELD_IP_MASQ", "yes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FLANNELD_IP_MASQ=yes") && err.contains("not a boolean"), "{err}");
}

/// `--ip-blackhole-route`: `blackhole <our subnet>` in the main table once
/// ready, back after a hand deletion (re-asserted with the resync), reported
/// by `diagnose` when missing; without the flag the daemon removes it (only
/// that one) and `diagnose` reports one that is there.
#[test]
fn the_blackhole_route_is_kept_reported_and_removed_with_the_flag() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::new(1);
    o.set_flags(0, &["-ip-blackhole-route", "-iptables-resync=1"]);
    o.start(0);
    let subnet = o.subnet(0).to_string();
    let ns = &o.cluster.node(0).ns;
    assert_eq!(blackholes(ns), std::slice::from_ref(&subnet));
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
    // Deleted by hand: back.
    ns.run_ok("ip", &["route", "del", "blackhole", &subnet]);
    wait_until(Duration::from_secs(10), "the blackhole route to come back", || blackholes(ns) == [subnet.clone()]);

    // Missing while the daemon is stopped: diagnose says so.
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("ip", &["route", "del", "blackhole", &subnet]);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok, "{report}");
    assert!(report.to_string().contains(&format!("blackhole route for our subnet {subnet} is missing")), "{report}");

    // Another blackhole (not ours) and ours; the flag off: ours goes, the other stays.
    ns.run_ok("ip", &["route", "add", "blackhole", &subnet]);
    ns.run_ok("ip", &["route", "add", "blackhole", "203.0.113.0/24"]);
    o.set_flags(0, &[]);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok && report.to_string().contains("without --ip-blackhole-route"), "{report}");
    o.start(0);
    let ns = &o.cluster.node(0).ns;
    wait_until(Duration::from_secs(10), "our blackhole route to go", || blackholes(ns) == ["203.0.113.0/24"]);
    o.wait_converged(0);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

/// `--kube-annotation-prefix` with a slash, against a real kube-apiserver:
/// `example.com/x` makes `example.com/x-backend-type` etc. (flannel's
/// normalisation; `example.com/x/backend-type` would be refused by the API
/// server), both nodes read each other's, and a prefix that is not a DNS
/// name stops the daemon with a message naming the flag.
#[test]
fn an_annotation_prefix_with_a_slash_is_normalised_as_flannel_does() {
    if !(require_root() && e2e_tests::kube::require_kube()) {
        return;
    }
    let mut ko = e2e_tests::kube::KubeOverlay::new(2);
    for i in 0..2 {
        let mut flags = ko.o.flags(i);
        flags.push("-kube-annotation-prefix=example.com/x".into());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ko.o.set_flags(i, &flags);
        ko.create_node(i);
    }
    ko.o.start_all();
    // Both nodes program each other from the annotations under the prefix.
    let leases = || -> Vec<(String, String, String)> {
        (0..2)
            .filter_map(|i| {
                let n = ko.api.get_json(&["node", &format!("node{i}")]);
                let a = &n["metadata"]["annotations"];
                let data: Value = serde_json::from_str(a["example.com/x-backend-data"].as_str()?).ok()?;
                Some((
                    n["spec"]["podCIDR"].as_str()?.to_string(),
                    data["VtepMAC"].as_str()?.to_string(),
                    a["example.com/x-public-ip"].as_str()?.to_string(),
                ))
            })
            .collect()
    };
    for i in 0..2 {
        wait_until(Duration::from_secs(15), &format!("node{i} to program both nodes"), || {
            let l = leases();
            l.len() == 2 && ko.o.vtep_state(i) == ko.o.expected_state_for(i, l)
        });
    }
    let n = ko.api.get_json(&["node", "node0"]);
    let mut names: Vec<String> = n["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("example.com/"))
        .cloned()
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "example.com/x-backend-data",
            "example.com/x-backend-type",
            "example.com/x-kube-subnet-manager",
            "example.com/x-public-ip"
        ]
    );
    assert_eq!(n["metadata"]["annotations"]["example.com/x-public-ip"], "192.0.2.10");

    ko.o.stop(0);
    let mut cmd = ko.o.bare_daemon_command(0);
    let flags: Vec<String> = ko.o.flags(0).into_iter().filter(|f| !f.starts_with("-kube-annotation-prefix")).collect();
    cmd.args(&flags).arg("--kube-annotation-prefix=Example.com").env("NODE_NAME", "node0");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kube-annotation-prefix \"Example.com\""), "{err}");
}
