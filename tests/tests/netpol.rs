//! NetworkPolicy enforced by flanneld-rs, on real pods, against a real API
//! server: the reachability-matrix method of the Kubernetes network-policy
//! e2e tests (pods a, b, c in namespaces x, y, z over two nodes; every pair
//! probed on TCP and UDP 80 and 81; observed matrix == expected matrix).

use std::time::Duration;

use e2e_tests::kube::require_kube;
use e2e_tests::netpol::{Lab, Proto};
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
    lab.wait_for("ipBlock with except", &lab.expect(|from, to, _, _| to != "y/b" || from != "x/a"), WAIT);

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
