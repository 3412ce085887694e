//! NetworkPolicy enforced by flanneld-rs, on real pods, against a real API
//! server: the reachability-matrix method of the Kubernetes network-policy
//! e2e tests (pods a, b, c in namespaces x, y, z over two nodes; every pair
//! probed on TCP and UDP 80 and 81, over IPv4 and IPv6; observed matrix ==
//! expected matrix).

use std::time::Duration;

use e2e_tests::kube::require_kube;
use e2e_tests::netpol::{Family, Lab, Proto};
use netns_fixtures::require_root;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn ready() -> bool {
    require_root() && require_kube()
}

fn ns(id: &str) -> &str {
    id.split('/').next().unwrap()
}

fn pod(id: &str) -> &str {
    id.split('/').nth(1).unwrap()
}

fn policy(namespace: &str, name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    })
    .to_string()
}

fn delete_policies(lab: &Lab) {
    for n in ["x", "y", "z"] {
        lab.ko.api.kubectl_ok(&["delete", "networkpolicy", "--all", "-n", n]);
    }
}

#[test]
fn ingress_policies_reachability_matrix() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    lab.wait_for("no policy: everything allowed", &lab.expect(|_, _, _, _| true), WAIT);

    // Deny all ingress in x.
    lab.apply(&policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress"]})));
    lab.wait_for("deny all ingress in x", &lab.expect(|_, to, _, _| ns(to) != "x"), WAIT);

    // Allow from the same namespace (x).
    lab.apply(&policy("x", "same-ns", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})));
    lab.wait_for("allow from the same namespace", &lab.expect(|from, to, _, _| ns(to) != "x" || ns(from) == "x"), WAIT);

    // Allow from a namespace by label (y), replacing the previous one.
    delete_policies(&lab);
    lab.apply(&policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    lab.wait_for("allow from namespace y", &lab.expect(|from, to, _, _| ns(to) != "x" || ns(from) == "y"), WAIT);

    // A namespace's labels change: z now carries ns=y too... as a second label.
    lab.ko.api.kubectl_ok(&["label", "namespace", "z", "ns=y", "--overwrite"]);
    lab.wait_for(
        "namespace z relabelled ns=y",
        &lab.expect(|from, to, _, _| ns(to) != "x" || ns(from) == "y" || ns(from) == "z"),
        WAIT,
    );
    lab.ko.api.kubectl_ok(&["label", "namespace", "z", "ns=z", "--overwrite"]);

    // Allow from pods by label in another namespace: pod=b in any namespace
    // (namespaceSelector {} AND podSelector pod=b), only to x/a.
    delete_policies(&lab);
    lab.apply(&policy(
        "x",
        "a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    lab.wait_for("x/a only from pods b anywhere", &lab.expect(|from, to, _, _| to != "x/a" || pod(from) == "b"), WAIT);

    // podSelector AND namespaceSelector: pods b in namespace y only.
    lab.apply(&policy(
        "x",
        "a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    lab.wait_for(
        "x/a only from y/b (policy updated)",
        &lab.expect(|from, to, _, _| to != "x/a" || from == "y/b"),
        WAIT,
    );

    // A pod's labels change: y/c becomes pod=b.
    lab.ko.api.kubectl_ok(&["label", "pod", "c", "-n", "y", "pod=b", "--overwrite"]);
    lab.wait_for(
        "y/c relabelled pod=b",
        &lab.expect(|from, to, _, _| to != "x/a" || from == "y/b" || from == "y/c"),
        WAIT,
    );
    lab.ko.api.kubectl_ok(&["label", "pod", "c", "-n", "y", "pod=c", "--overwrite"]);

    // ipBlock with except: y/b is reachable from the pod network except x/a.
    delete_policies(&lab);
    let xa = lab.pods.iter().find(|p| p.id == "x/a").unwrap().ip;
    lab.apply(&policy(
        "y",
        "ipblock",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [format!("{xa}/32")]}}]}]}),
    ));
    // An IPv4 block: y/b takes no IPv6 from anyone.
    lab.wait_for(
        "ipBlock with except",
        &lab.expect_by_family(|from, to, _, _, fam| to != "y/b" || (fam == Family::V4 && from != "x/a")),
        WAIT,
    );

    // Named ports: z's pods accept only their port named serve-81-tcp.
    delete_policies(&lab);
    lab.apply(&policy("z", "named", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]})));
    lab.wait_for(
        "named port",
        &lab.expect(|_, to, port, proto| ns(to) != "z" || (port == 81 && proto == Proto::Tcp)),
        WAIT,
    );

    // Numeric ports and a protocol: z's pods accept UDP 80 and 81 only.
    // (endPort ranges came with Kubernetes 1.21; the API server here is 1.20
    // and rejects the field, so they are covered by the compiler's tests.)
    lab.apply(&policy(
        "z",
        "named",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP", "port": 80}, {"protocol": "UDP", "port": 81}]}]}),
    ));
    lab.wait_for("numeric UDP ports", &lab.expect(|_, to, _, proto| ns(to) != "z" || proto == Proto::Udp), WAIT);

    // Deleted: everything allowed again.
    delete_policies(&lab);
    lab.wait_for("policies deleted", &lab.expect(|_, _, _, _| true), WAIT);
}

#[test]
fn egress_policies_and_established_flows() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    lab.wait_for("no policy: everything allowed", &lab.expect(|_, _, _, _| true), WAIT);

    // Deny all egress from y.
    lab.apply(&policy("y", "deny-egress", json!({"podSelector": {}, "policyTypes": ["Egress"]})));
    lab.wait_for("deny all egress from y", &lab.expect(|from, _, _, _| ns(from) != "y"), WAIT);

    // "DNS only": x/a may send only UDP and TCP to port 81 (standing in for
    // 53), anywhere; the deny-egress on y stays.
    lab.apply(&policy(
        "x",
        "dns-only",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 81}, {"protocol": "TCP", "port": 81}]}]}),
    ));
    lab.wait_for(
        "egress to port 81 only from x/a",
        &lab.expect(|from, _, port, _| ns(from) != "y" && (from != "x/a" || port == 81)),
        WAIT,
    );

    // An established allowed flow survives an unrelated policy change.
    let from = lab.pods.iter().find(|p| p.id == "z/a").unwrap();
    let to = lab.pods.iter().find(|p| p.id == "z/b").unwrap();
    let target = std::net::SocketAddr::new(to.ip.into(), 7400);
    let listener = to.netns.in_thread(|| std::net::TcpListener::bind(target)).unwrap();
    let mut client = from.netns.in_thread(|| std::net::TcpStream::connect(target)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let round = |c: &mut std::net::TcpStream, s: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.read_exact(&mut b).unwrap();
    };
    round(&mut client, &mut server);
    lab.apply(&policy(
        "x",
        "unrelated",
        json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"]}),
    ));
    lab.wait_for(
        "an unrelated policy added",
        &lab.expect(|from, to, port, _| ns(from) != "y" && (from != "x/a" || port == 81) && to != "x/c"),
        WAIT,
    );
    round(&mut client, &mut server);

    delete_policies(&lab);
    lab.wait_for("policies deleted", &lab.expect(|_, _, _, _| true), WAIT);
    round(&mut client, &mut server);
}

/// `ip -6 -j neigh show dev eth0` in pod `id`: (address, state) pairs.
fn neighbours6(lab: &Lab, id: &str) -> Vec<(String, String)> {
    let out = lab.pod(id).netns.run_ok("ip", &["-6", "-j", "neigh", "show", "dev", "eth0"]);
    let v: Value = serde_json::from_str(&out).expect("ip -j neigh output");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|n| {
            let state = n["state"].as_array().and_then(|s| s.first()).and_then(Value::as_str).unwrap_or("");
            (n["dst"].as_str().unwrap_or("").to_string(), state.to_string())
        })
        .collect()
}

#[test]
fn dual_stack_policies_and_neighbour_discovery() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    lab.wait_for("no policy: everything allowed, both families", &lab.expect(|_, _, _, _| true), WAIT);

    // The API server refuses an except of the other family (the compiler's
    // tests cover what flanneld-rs does if one comes anyway: the peer
    // matches nothing, with a note naming it).
    let mixed = lab.ko.o.dir.path().join("mixed-except.json");
    std::fs::write(
        &mixed,
        policy(
            "y",
            "mixed",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["2001:db8:244:1::/64"]}}]}]}),
        ),
    )
    .unwrap();
    let out = lab.ko.api.kubectl(&["apply", "-f", mixed.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("except"), "a mixed-family except was accepted: {err}");

    // Deny all, both directions, in z: IPv6 TCP and UDP are denied as IPv4.
    lab.apply(&policy("z", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})));
    lab.wait_for("deny all in z, both families", &lab.expect(|from, to, _, _| ns(from) != "z" && ns(to) != "z"), WAIT);

    // An allow by podSelector holds for both families: z/a -> z/c (both
    // on node 0, so their packets are bridged: neighbour discovery between
    // two isolated pods).
    lab.apply(&policy(
        "z",
        "a-to-c",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
    ));
    let z_only_a_to_c = |from: &str, to: &str| (ns(from) != "z" && ns(to) != "z") || (from == "z/a" && to == "z/c");
    lab.wait_for("z/a -> z/c allowed, both families", &lab.expect(|f, t, _, _| z_only_a_to_c(f, t)), WAIT);

    // Neighbour discovery is never blocked: with every neighbour forgotten
    // (pods and nodes), z/a must solicit z/c and z/c must answer (its
    // advertisement goes to z/a, whose ingress is isolated), and the
    // allowed traffic still flows, in both families, with the whole matrix
    // as before.
    let (za, zc) = (lab.pod("z/a"), lab.pod("z/c"));
    assert_eq!(za.node, zc.node, "z/a and z/c must share a node");
    for p in &lab.pods {
        p.netns.run_ok("ip", &["-6", "neigh", "flush", "all"]);
    }
    for n in lab.ko.o.cluster.nodes() {
        n.ns.run_ok("ip", &["-6", "neigh", "flush", "all"]);
    }
    assert!(
        !neighbours6(&lab, "z/a").iter().any(|(dst, state)| dst == &zc.ip6.to_string() && state != "FAILED"),
        "z/a still knows z/c after the flush"
    );
    let target = std::net::SocketAddr::new(zc.ip6.into(), 80);
    assert!(e2e_tests::netpol::probe(&za.netns, target, Proto::Tcp), "z/a -> z/c over IPv6 after the flush");
    let known = neighbours6(&lab, "z/a");
    assert!(
        known.iter().any(|(dst, state)| dst == &zc.ip6.to_string()
            && matches!(state.as_str(), "REACHABLE" | "STALE" | "DELAY" | "PROBE")),
        "z/a resolved z/c: {known:?}"
    );
    lab.wait_for("after the neighbour flush", &lab.expect(|f, t, _, _| z_only_a_to_c(f, t)), WAIT);

    // An IPv6 ipBlock with except: y/b takes IPv6 from the pod network but
    // x/a, and no IPv4 at all (the deny-all in z stays).
    delete_policies(&lab);
    let xa6 = lab.pod("x/a").ip6;
    lab.apply(&policy(
        "y",
        "ipblock6",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8:244::/48", "except": [format!("{xa6}/128")]}}]}]}),
    ));
    lab.wait_for(
        "IPv6 ipBlock with except",
        &lab.expect_by_family(|from, to, _, _, fam| to != "y/b" || (fam == Family::V6 && from != "x/a")),
        WAIT,
    );

    // Both families in one rule: y/b also takes IPv4 from x/c's address.
    let xc = lab.pod("x/c").ip;
    lab.apply(&policy(
        "y",
        "ipblock6",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8:244::/48", "except": [format!("{xa6}/128")]}},
                                     {"ipBlock": {"cidr": format!("{xc}/32")}}]}]}),
    ));
    lab.wait_for(
        "IPv6 and IPv4 ipBlocks",
        &lab.expect_by_family(|from, to, _, _, fam| {
            to != "y/b" || (fam == Family::V6 && from != "x/a") || (fam == Family::V4 && from == "x/c")
        }),
        WAIT,
    );

    delete_policies(&lab);
    lab.wait_for("policies deleted", &lab.expect(|_, _, _, _| true), WAIT);
}
