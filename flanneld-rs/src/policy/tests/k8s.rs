//! From API objects to the model: defaults, what is skipped, notes.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use super::policies;
use crate::policy::{
    model_from_k8s, NamedPort, NamespaceScope, Peer, PolicyInfo, Port, Protocol, Rule, Selector, NAMESPACE_NAME_LABEL,
};

fn one_policy(spec: serde_json::Value) -> (PolicyInfo, Vec<String>) {
    let p = policies(&[json!({"metadata": {"namespace": "x", "name": "p"}, "spec": spec})]);
    let input = model_from_k8s::<_, Pod, Namespace>(&p, &[], &[], "n1", &[]);
    (input.policies[0].clone(), input.notes)
}

#[test]
fn policy_types_default_as_the_api_server_does() {
    // (spec, ingress covered, egress covered)
    let cases = [
        (json!({"podSelector": {}}), true, false),
        (json!({"podSelector": {}, "egress": [{}]}), true, true),
        (json!({"podSelector": {}, "egress": []}), true, false),
        (json!({"podSelector": {}, "policyTypes": []}), true, false),
        (json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}), false, true),
        (json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}), true, true),
        (json!({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]}), true, false),
    ];
    for (spec, ingress, egress) in cases {
        let (p, _) = one_policy(spec.clone());
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (ingress, egress), "{spec}");
    }
    // No spec at all is the zero spec: every pod, ingress denied.
    let p = policies(&[json!({"metadata": {"namespace": "x", "name": "p"}})]);
    let input = model_from_k8s::<_, Pod, Namespace>(&p, &[], &[], "n1", &[]);
    assert_eq!(input.policies[0].ingress, Some(vec![]));
    assert_eq!(input.policies[0].pod_selector, Selector::everything());
}

#[test]
fn policy_peers_and_ports_convert() {
    let (p, notes) = one_policy(json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{
    "from": [
        {"podSelector": {"matchLabels": {"role": "client"}}},
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}},
        {"ipBlock": {"cidr": "10.1.2.3/16", "except": ["10.1.2.0/24"]}},
        {"ipBlock": {"cidr": "10.1.2.3/16", "except": ["10.1.2.0/24", "fd00::/64"]}},
        {"ipBlock": {"cidr": "2001:db8::1/32", "except": ["2001:db8:1::/48"]}},
        {"ipBlock": {"cidr": "2001:db8::/32", "except": ["10.0.0.0/8"]}},
        {"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8::/zz"]}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
        {}
    ],
    "ports": [
        {"port": 80}, {"protocol": "UDP", "port": 53, "endPort": 60}, {"protocol": "SCTP"},
        {"port": "http"}, {"protocol": "ICMP", "port": 1}, {"port": 90, "endPort": 80},
        {"port": "http", "endPort": 90}, {"endPort": 90}
    ]}]}));
    let client = Selector::labels([("role", "client")]);
    let want = Rule {
        peers: vec![
            Peer::Pods { namespaces: NamespaceScope::Named("x".into()), pods: client.clone() },
            Peer::Pods {
                namespaces: NamespaceScope::Selected(Selector::labels([("ns", "y")])),
                pods: Selector::everything(),
            },
            Peer::Pods { namespaces: NamespaceScope::Selected(Selector::everything()), pods: client },
            Peer::Block { cidr: "10.1.0.0/16".parse().unwrap(), except: vec!["10.1.2.0/24".parse().unwrap()] },
            Peer::Nothing,
            Peer::Block { cidr: "2001:db8::/32".parse().unwrap(), except: vec!["2001:db8:1::/48".parse().unwrap()] },
            Peer::Nothing,
            Peer::Nothing,
            Peer::Nothing,
            Peer::Nothing,
        ],
        ports: vec![
            Port::Range(Protocol::Tcp, 80, 80),
            Port::Range(Protocol::Udp, 53, 60),
            Port::Any(Protocol::Sctp),
            Port::Named(Protocol::Tcp, "http".into()),
            Port::Nothing,
            Port::Nothing,
            Port::Nothing,
            Port::Nothing,
        ],
    };
    assert_eq!(p.ingress, Some(vec![want]));
    assert_eq!(p.egress, None);
    // Every ignored thing says why.
    for needle in [
        "peer[4]: except fd00::/64 is not of the family of cidr 10.1.2.3/16",
        "peer[6]: except 10.0.0.0/8 is not of the family of cidr 2001:db8::/32",
        "peer[7]: except \"2001:db8::/zz\" is no CIDR",
        "ipBlock together",
        "needs podSelector",
        "\"ICMP\"",
        "port 90..",
        "named port",
        "endPort without port",
    ] {
        assert!(notes.iter().any(|n| n.contains(needle)), "no note about {needle}: {notes:#?}");
    }
    let (p, notes) = one_policy(json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}));
    assert!(p.pod_selector.invalid && notes.iter().any(|n| n.contains("Near")), "{notes:?}");
}

#[test]
fn policy_pods_and_namespaces_convert() {
    let pods: Vec<Pod> = [
        json!({"metadata": {"namespace": "x", "name": "web", "labels": {"app": "web"}},
               "spec": {"nodeName": "n1",
                        "containers": [{"name": "c", "ports": [
                            {"name": "http", "containerPort": 8080}, {"containerPort": 9090},
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}],
                        "initContainers": [
                            {"name": "sidecar", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9100}]},
                            {"name": "init", "ports": [{"name": "setup", "containerPort": 1}]}]},
               "status": {"phase": "Running", "podIP": "10.244.1.5",
                          "podIPs": [{"ip": "fd00::5"}, {"ip": "10.244.1.5"}]}}),
        json!({"metadata": {"namespace": "x", "name": "legacy"}, "spec": {"containers": []},
               "status": {"podIP": "10.244.1.6"}}),
        json!({"metadata": {"namespace": "x", "name": "done"}, "spec": {"nodeName": "n1", "containers": []},
               "status": {"phase": "Succeeded", "podIP": "10.244.1.7"}}),
        json!({"metadata": {"namespace": "x", "name": "host"}, "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
               "status": {"phase": "Running", "podIP": "192.0.2.11"}}),
        json!({"metadata": {"namespace": "x", "name": "pending"}, "spec": {"containers": []}, "status": {"phase": "Pending"}}),
    ]
    .into_iter()
    .map(|v| serde_json::from_value(v).unwrap())
    .collect();
    let nss: Vec<Namespace> =
        [json!({"metadata": {"name": "x", "labels": {"team": "a"}}}), json!({"metadata": {"name": "y"}})]
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
    let input =
        model_from_k8s::<NetworkPolicy, _, _>(&[], &pods, &nss, "n1", &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11))]);
    let names: Vec<&str> = input.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web", "legacy", "host", "pending"], "finished pods are left out");
    let web = &input.pods[0];
    // Both families, in podIPs' order.
    let want: [IpAddr; 2] = ["fd00::5".parse().unwrap(), "10.244.1.5".parse().unwrap()];
    assert_eq!(web.ips, want);
    assert_eq!(web.node.as_deref(), Some("n1"));
    assert_eq!(
        web.ports,
        [
            NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 },
            NamedPort { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
            NamedPort { name: "metrics".into(), protocol: Protocol::Tcp, port: 9100 },
        ]
    );
    assert!(input.is_local(web));
    assert_eq!(input.pods[1].ips, [IpAddr::V4(Ipv4Addr::new(10, 244, 1, 6))], "podIP when podIPs is absent");
    assert!(!input.is_local(&input.pods[1]), "no node, not local");
    assert!(input.pods[2].host_network && !input.pods[2].is_eligible());
    assert!(!input.pods[3].is_eligible(), "no address yet");
    assert_eq!(input.namespace_labels("x").get("team").map(String::as_str), Some("a"));
    assert_eq!(input.namespace_labels("y").get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("y"));
    assert_eq!(input.namespace_labels("unknown").get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("unknown"));
}
