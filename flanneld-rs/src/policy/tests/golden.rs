//! The ruleset text for representative policies, byte for byte, against
//! files in `tests/golden/policy/` (regenerate with `UPDATE_GOLDEN=1` and
//! review the diff); and its independence from the order of the input.

use std::path::PathBuf;

use serde_json::json;

use super::{lab_input, lab_namespaces, lab_pods, policies, NODES};
use crate::policy::{compile, model_from_k8s, PolicyInput};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/policy")
}

fn np(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// The golden scenarios, rendered for node n1.
pub(super) fn scenarios() -> Vec<(&'static str, PolicyInput)> {
    let ingress = [
        np("x", "default-deny", json!({"podSelector": {}})),
        np(
            "x",
            "web-from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                         {"podSelector": {"matchLabels": {"pod": "b"}}}],
                "ports": [{"port": 80}, {"port": 8000, "endPort": 8080}, {"protocol": "UDP", "port": 81}]}]}),
        ),
    ];
    let dns = [np(
        "x",
        "egress-dns-only",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
    )];
    let mixed = [
        np(
            "y",
            "http-from-cluster",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24", "10.244.1.12/32"]}}],
                                "ports": [{"port": "http"}, {"protocol": "SCTP"}]}]}),
        ),
        np(
            "y",
            "egress-http-to-x",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": "http"}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "fd00::/8"]}}]}]}),
        ),
    ];
    let dual = [
        np("y", "default-deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})),
        np(
            "y",
            "web-both-families",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "d"]}]},
                   "ingress": [
                       {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "http"}]},
                       {"from": [{"ipBlock": {"cidr": "2001:db8:2440::/44", "except": ["2001:db8:2442::/64", "2001:db8:2441::b/128"]}},
                                 {"ipBlock": {"cidr": "10.244.2.0/24"}}]}],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}], "ports": [{"port": 80}]}]}),
        ),
    ];
    vec![
        ("ingress-deny-and-allow", lab_input(&policies(&ingress), 0)),
        ("dual-stack", lab_input(&policies(&dual), 0)),
        ("egress-dns-only", lab_input(&policies(&dns), 0)),
        ("named-ports-ipblock", lab_input(&policies(&mixed), 0)),
    ]
}

#[test]
fn policy_golden_rulesets() {
    let update = netns_fixtures::update_golden();
    let mut stale = Vec::new();
    for (name, input) in scenarios() {
        let text = compile(&input).render();
        let path = golden_dir().join(format!("{name}.nft"));
        if update {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if text != want {
            stale.push(format!("{}:\n--- want\n{want}\n--- got\n{text}", path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "rulesets differ from golden files (UPDATE_GOLDEN=1 rewrites them):\n{}",
        stale.join("\n")
    );
}

#[test]
fn policy_text_is_independent_of_input_order() {
    let manifests = [
        np(
            "x",
            "a",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
        np("y", "b", json!({"podSelector": {}, "policyTypes": ["Egress"]})),
        np("x", "c", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": "http"}]}]})),
    ];
    let (node, ips) = NODES[0];
    let mut pols = policies(&manifests);
    let mut pods = lab_pods();
    let mut nss = lab_namespaces();
    let first = compile(&model_from_k8s(&pols, &pods, &nss, node, &ips)).render();
    pols.reverse();
    pods.reverse();
    pods.rotate_left(3);
    nss.reverse();
    let mut ips_rev = ips;
    ips_rev.reverse();
    let second = compile(&model_from_k8s(&pols, &pods, &nss, node, &ips_rev)).render();
    assert_eq!(first, second);
    // And the same input twice gives the same text.
    assert_eq!(second, compile(&model_from_k8s(&pols, &pods, &nss, node, &ips_rev)).render());
}
