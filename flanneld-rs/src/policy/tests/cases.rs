//! The API's semantics, case by case: each case is a set of NetworkPolicy
//! manifests and the verdict a person expects for every probe of the lab
//! (written from the Kubernetes documentation, not from the code). Both the
//! reference and the compiled rules must give exactly that verdict.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::{assert_agree, disagreements, lab_cluster, lab_input, policies, ExpectFn, D6_IP, NODES};
use crate::policy::{compile, Protocol};

type Expect = Box<ExpectFn>;

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// Whether `ip` is in `net` (never when their families differ).
fn in_net(ip: IpAddr, net: &str) -> bool {
    net.parse::<ipnet::IpNet>().unwrap().contains(&ip)
}

/// The cases: name, manifests, expected verdict of the whole cluster.
pub(super) fn all() -> Vec<(&'static str, Vec<Value>, Expect)> {
    use Protocol::*;
    vec![
        (
            "deny all ingress",
            vec![np("x", "deny", json!({"podSelector": {}}))],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "deny all egress",
            vec![np("x", "deny", json!({"podSelector": {}, "policyTypes": ["Egress"]}))],
            Box::new(|s, d, _, _| !s.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "allow from the same namespace",
            vec![np("x", "same", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "allow from a namespace by label",
            vec![np(
                "x",
                "from-y",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
            )],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.in_ns("y") || s.own_node_of(d)),
        ),
        (
            "allow from pods by label in other namespaces (podSelector AND namespaceSelector)",
            vec![np(
                "x",
                "b-of-y-z",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                    "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                    "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            Box::new(|s, d, _, _| !d.is("x", "a") || s.is("y", "b") || s.is("z", "b") || s.own_node_of(d)),
        ),
        (
            "two peers are OR: a namespace, or pods of our namespace",
            vec![np(
                "x",
                "y-or-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            Box::new(|s, d, _, _| !d.is("x", "a") || s.in_ns("y") || s.is("x", "b") || s.own_node_of(d)),
        ),
        (
            "namespaceSelector by NotIn and DoesNotExist",
            vec![np(
                "z",
                "not-x",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                       "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                           {"key": "ns", "operator": "NotIn", "values": ["x"]},
                           {"key": "team", "operator": "DoesNotExist"}]}}]}]}),
            )],
            Box::new(|s, d, _, _| {
                !d.in_ns("z")
                    || d.is("z", "c")
                    || s.in_ns("y")
                    || s.in_ns("z")
                    || s.in_ns("kube-system")
                    || s.own_node_of(d)
            }),
        ),
        (
            "ipBlock with except, ingress and egress",
            vec![
                np(
                    "x",
                    "from-n1-pods",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]}),
                ),
                np(
                    "z",
                    "outside-only",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
                        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}]}),
                ),
            ],
            Box::new(|s, d, _, _| {
                let ingress = !d.is("x", "a")
                    || (in_net(s.ip, "10.244.0.0/16") && !in_net(s.ip, "10.244.2.0/24"))
                    || s.own_node_of(d);
                // An IPv4 block: no IPv6 destination is in it.
                let egress =
                    !s.in_ns("z") || (in_net(d.ip, "0.0.0.0/0") && !in_net(d.ip, "10.244.0.0/16")) || s.own_node_of(d);
                ingress && egress
            }),
        ),
        (
            "IPv6 ipBlock with except: IPv6 sources only",
            vec![np(
                "x",
                "from-n1-pods6",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"ipBlock": {"cidr": "2001:db8:2440::/44", "except": ["2001:db8:2442::/64"]}}]}]}),
            )],
            Box::new(|s, d, _, _| {
                !d.is("x", "a")
                    || (in_net(s.ip, "2001:db8:2440::/44") && !in_net(s.ip, "2001:db8:2442::/64"))
                    || s.own_node_of(d)
            }),
        ),
        (
            "ipBlocks of both families in one egress rule",
            vec![np(
                "y",
                "to-n2-v4-n1-v6",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
                    {"ipBlock": {"cidr": "10.244.2.0/24"}},
                    {"ipBlock": {"cidr": "2001:db8:2441::/64", "except": ["2001:db8:2441::99/128"]}}]}]}),
            )],
            Box::new(|s, d, _, _| {
                !s.in_ns("y")
                    || in_net(d.ip, "10.244.2.0/24")
                    || (in_net(d.ip, "2001:db8:2441::/64") && d.ip != D6_IP)
                    || s.own_node_of(d)
            }),
        ),
        (
            "an except of the other family (the API server rejects it) matches nothing",
            vec![np(
                "x",
                "mixed-except",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["2001:db8::/32"]}}]}]}),
            )],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "named port resolved on an IPv6-only pod too",
            vec![np("y", "http", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}))],
            Box::new(|s, d, proto, port| {
                !d.in_ns("y")
                    || s.own_node_of(d)
                    || (proto == Tcp
                        && (((d.is("y", "a") || d.is("y", "d")) && port == 80) || (d.is("y", "b") && port == 81)))
            }),
        ),
        (
            "named port in ingress: resolved on each destination pod",
            vec![np("x", "http", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}))],
            Box::new(|s, d, proto, port| {
                !d.in_ns("x")
                    || s.own_node_of(d)
                    || (proto == Tcp && ((d.is("x", "a") && port == 80) || (d.is("x", "b") && port == 81)))
            }),
        ),
        (
            "named port in egress: resolved on each destination peer",
            vec![np(
                "y",
                "to-x-http",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                    "to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                    "ports": [{"port": "http"}, {"port": "serve-81-udp", "protocol": "UDP"}]}]}),
            )],
            Box::new(|s, d, proto, port| {
                !s.in_ns("y")
                    || s.own_node_of(d)
                    || (d.in_ns("x")
                        && ((proto == Tcp && ((d.is("x", "a") && port == 80) || (d.is("x", "b") && port == 81)))
                            || (proto == Udp && port == 81)))
            }),
        ),
        (
            "named port no pod has matches nothing",
            vec![np("x", "nope", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}]}))],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "named port with the wrong protocol matches nothing",
            vec![np(
                "x",
                "udp-http",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "protocol": "UDP"}]}]}),
            )],
            Box::new(|s, d, _, _| !d.in_ns("x") || s.own_node_of(d)),
        ),
        (
            "endPort range",
            vec![np("z", "range", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 82}]}]}))],
            Box::new(|s, d, proto, port| {
                !d.in_ns("z") || s.own_node_of(d) || (proto == Tcp && (80..=82).contains(&port))
            }),
        ),
        (
            "UDP and SCTP",
            vec![np(
                "z",
                "udp-sctp",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [
                    {"protocol": "UDP", "port": 81}, {"protocol": "SCTP"}]}]}),
            )],
            Box::new(|s, d, proto, port| {
                !d.is("z", "a") || s.own_node_of(d) || (proto == Udp && port == 81) || proto == Sctp
            }),
        ),
        (
            "egress to DNS only",
            vec![np(
                "x",
                "dns-only",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
            )],
            Box::new(|s, d, proto, port| {
                !s.in_ns("x")
                    || s.own_node_of(d)
                    || (d.is("kube-system", "dns") && port == 53 && matches!(proto, Tcp | Udp))
            }),
        ),
        (
            "policyTypes absent with egress rules: Ingress and Egress",
            vec![np(
                "y",
                "defaulted",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"podSelector": {}}]}]}),
            )],
            Box::new(|s, d, _, _| {
                (!d.is("y", "a") || s.own_node_of(d)) && (!s.is("y", "a") || d.in_ns("y") || s.own_node_of(d))
            }),
        ),
        (
            "policyTypes [Egress] ignores ingress rules",
            vec![np(
                "y",
                "egress-only",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "ingress": [{"from": [{"podSelector": {}}]}]}),
            )],
            Box::new(|s, d, _, _| !s.is("y", "a") || s.own_node_of(d)),
        ),
        (
            "empty egress list without policyTypes is not an egress policy",
            vec![np("y", "open", json!({"podSelector": {}, "egress": [], "ingress": [{}]}))],
            Box::new(|_, _, _, _| true),
        ),
        (
            "a pod selected by two policies gets their union",
            vec![
                np(
                    "x",
                    "y-tcp-80",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
                        "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}),
                ),
                np(
                    "x",
                    "z-udp-81",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
                        "from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                        "ports": [{"port": 81, "protocol": "UDP"}]}]}),
                ),
            ],
            Box::new(|s, d, proto, port| {
                !d.is("x", "a")
                    || s.own_node_of(d)
                    || (s.in_ns("y") && proto == Tcp && port == 80)
                    || (s.in_ns("z") && proto == Udp && port == 81)
            }),
        ),
        (
            "an allow-all policy beside a deny-all one",
            vec![
                np("x", "deny", json!({"podSelector": {}})),
                np("x", "allow", json!({"podSelector": {}, "ingress": [{}]})),
            ],
            Box::new(|_, _, _, _| true),
        ),
        (
            "host-network pods are neither enforced nor selected",
            // x/hostnet (on n2, n2's address) carries pod=a too.
            vec![np(
                "x",
                "a-from-a",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            )],
            Box::new(|s, d, _, _| !d.is("x", "a") || s.own_node_of(d)),
        ),
        (
            "ingress and egress of different pods on one path",
            vec![
                np(
                    "x",
                    "a-out",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                                         "egress": [{"to": [{"namespaceSelector": {}}]}]}),
                ),
                np(
                    "y",
                    "in-from-x",
                    json!({"podSelector": {}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
                ),
            ],
            Box::new(|s, d, _, _| {
                let egress = !s.is("x", "a") || matches!(d.who, super::Who::Pod(..)) || s.own_node_of(d);
                let ingress = !d.in_ns("y") || s.in_ns("x") || s.own_node_of(d);
                egress && ingress
            }),
        ),
    ]
}

#[test]
fn policy_cases_match_the_api_semantics() {
    let mut failures = Vec::new();
    let all = all();
    for (name, manifests, expect) in &all {
        let cluster = lab_cluster(&policies(manifests));
        let bad = disagreements(&cluster, Some(expect.as_ref()));
        if !bad.is_empty() {
            failures.push(format!("{name}:\n    {}", bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n    ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases fail:\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[test]
fn policy_without_policies_allows_everything() {
    let cluster = lab_cluster(&[]);
    assert_agree("no policies", &disagreements(&cluster, Some(&|_, _, _, _| true)));
    for (_, rules) in &cluster {
        assert!(rules.chains.is_empty() && rules.sets.is_empty(), "{rules:?}");
    }
}

#[test]
fn policy_other_nodes_pods_are_peers_not_targets() {
    let manifests = [np("x", "same", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))];
    let rules = compile(&lab_input(&policies(&manifests), 0));
    let set = |prefix: &str| {
        let s = rules.sets.iter().find(|s| s.name.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} set"));
        s.elements.iter().map(|r| r.first.to_string()).collect::<Vec<_>>()
    };
    // x/a and x/b are on n1, x/c on n2; x/hostnet is ignored. Each family
    // has its sets.
    assert_eq!(set("local_x_"), ["10.244.1.10", "10.244.1.11"]);
    assert_eq!(set("local6_x_"), ["2001:db8:2441::a", "2001:db8:2441::b"]);
    assert_eq!(set("isolated_ingress"), ["10.244.1.10", "10.244.1.11"]);
    assert_eq!(set("isolated_ingress6"), ["2001:db8:2441::a", "2001:db8:2441::b"]);
    assert_eq!(set("pods_x_"), ["10.244.1.10", "10.244.1.11", "10.244.2.12"]);
    assert_eq!(set("pods6_x_"), ["2001:db8:2441::a", "2001:db8:2441::b", "2001:db8:2442::c"]);
    let mut node_ips = NODES[0].1;
    node_ips.sort();
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = node_ips.iter().partition(|ip| ip.is_ipv4());
    assert_eq!(set("node_ips"), v4.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(set("node_ips6"), v6.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    // Sets hold one family each.
    for s in &rules.sets {
        assert!(s.elements.iter().all(|r| r.family() == s.family), "{s:?}");
    }
    // A policy selecting only pods elsewhere adds nothing here.
    let manifests = [np("x", "c-only", json!({"podSelector": {"matchLabels": {"pod": "c"}}}))];
    let rules = compile(&lab_input(&policies(&manifests), 0));
    assert!(rules.chains.is_empty(), "{rules:?}");
}
