//! Tests of the policy compiler. `lab` builds the cluster every test uses:
//! namespaces x, y, z with dual-stack pods a, b, c (a and b on node n1, c
//! on n2), an IPv6-only pod y/d on n1, an IPv4-only DNS pod in kube-system,
//! a host-network pod, and an outside address of each family.

mod cases;
mod golden;
mod k8s;
mod matrix;
mod nft_check;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

use super::{compile, model_from_k8s, reference, Packet, PolicyInput, Protocol, Ruleset};

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const fn v6(net: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host))
}

/// The two nodes and their own addresses (underlay, flannel.1, cni0, of
/// each family; the underlay first).
pub(super) const NODES: [(&str, [IpAddr; 6]); 2] = [
    ("n1", [v4(192, 0, 2, 11), v4(10, 244, 1, 0), v4(10, 244, 1, 1), v6(0xff, 0x11), v6(0x2441, 0), v6(0x2441, 1)]),
    ("n2", [v4(192, 0, 2, 12), v4(10, 244, 2, 0), v4(10, 244, 2, 1), v6(0xff, 0x12), v6(0x2442, 0), v6(0x2442, 1)]),
];

/// The IPv6 underlay address of node `node` (index into [`NODES`]).
pub(super) fn node_ip6(node: usize) -> IpAddr {
    NODES[node].1[3]
}

/// Addresses outside the cluster.
pub(super) const OUTSIDE: IpAddr = v4(203, 0, 113, 7);
/// The same, IPv6.
pub(super) const OUTSIDE6: IpAddr = v6(0xee, 7);

/// Who owns a probed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Who {
    /// A pod: namespace, name, node.
    Pod(&'static str, &'static str, &'static str),
    /// A node's underlay address (also a host-network pod's).
    Node(&'static str),
    /// Outside the cluster.
    Outside,
}

/// A probed address.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub who: Who,
    pub ip: IpAddr,
}

impl Endpoint {
    /// `x/a`, `n1`, `outside`.
    pub fn label(&self) -> String {
        match &self.who {
            Who::Pod(ns, name, _) => format!("{ns}/{name} ({})", self.ip),
            Who::Node(n) => format!("{n} ({})", self.ip),
            Who::Outside => format!("outside ({})", self.ip),
        }
    }

    /// Whether it is a pod of namespace `ns`.
    pub fn in_ns(&self, ns: &str) -> bool {
        matches!(self.who, Who::Pod(n, _, _) if n == ns)
    }

    /// Whether it is pod `ns/name`.
    pub fn is(&self, ns: &str, name: &str) -> bool {
        matches!(self.who, Who::Pod(n, p, _) if n == ns && p == name)
    }

    /// Whether it is a pod and `other` is its node (or the other way round).
    pub fn own_node_of(&self, other: &Endpoint) -> bool {
        match (&self.who, &other.who) {
            (Who::Node(n), Who::Pod(_, _, pn)) | (Who::Pod(_, _, pn), Who::Node(n)) => n == pn,
            _ => false,
        }
    }
}

/// Namespaces x, y, z (labelled `ns=<name>`) and the lab pods.
pub(super) const LAB_NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pod names in each lab namespace.
pub(super) const LAB_PODS: [&str; 3] = ["a", "b", "c"];

/// The DNS pod's address (IPv4 only).
pub(super) const DNS_IP: IpAddr = v4(10, 244, 2, 53);

/// The IPv6-only pod y/d, on n1.
pub(super) const D6_IP: IpAddr = v6(0x2441, 0x99);

/// A lab pod's node and addresses (IPv4 first): a and b on n1, c on n2.
pub(super) fn lab_pod_addr(ns_index: usize, pod_index: usize) -> (&'static str, [IpAddr; 2]) {
    let node = if pod_index < 2 { 1 } else { 2 };
    let host = (10 + 10 * ns_index + pod_index) as u8;
    (NODES[node - 1].0, [v4(10, 244, node as u8, host), v6(0x2440 + node as u16, u16::from(host))])
}

fn pod_json(ns: &str, name: &str, node: &str, ips: &[IpAddr], labels: Value, ports: Value, host: bool) -> Pod {
    let listed: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "hostNetwork": host, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips[0].to_string(), "podIPs": listed}
    }))
    .expect("a pod")
}

/// The lab's pods. Every pod serves ports named `serve-80-tcp`,
/// `serve-81-udp`; `http` is TCP 80 on a, TCP 81 on b, absent on c.
pub(super) fn lab_pods() -> Vec<Pod> {
    let mut pods = Vec::new();
    for (i, ns) in LAB_NAMESPACES.iter().enumerate() {
        for (j, name) in LAB_PODS.iter().enumerate() {
            let (node, ips) = lab_pod_addr(i, j);
            let mut ports = vec![
                json!({"name": "serve-80-tcp", "containerPort": 80}),
                json!({"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}),
            ];
            match *name {
                "a" => ports.push(json!({"name": "http", "containerPort": 80})),
                "b" => ports.push(json!({"name": "http", "containerPort": 81})),
                _ => {}
            }
            pods.push(pod_json(ns, name, node, &ips, json!({"pod": name}), Value::Array(ports), false));
        }
    }
    pods.push(pod_json(
        "y",
        "d",
        "n1",
        &[D6_IP],
        json!({"pod": "d"}),
        json!([{"name": "http", "containerPort": 80}, {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]),
        false,
    ));
    pods.push(pod_json(
        "kube-system",
        "dns",
        "n2",
        &[DNS_IP],
        json!({"k8s-app": "kube-dns"}),
        json!([{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "dns-tcp", "containerPort": 53}]),
        false,
    ));
    // A host-network pod on n2 labelled like the lab's a pods: it has n2's
    // address, and policy must neither enforce on it nor select it.
    pods.push(pod_json("x", "hostnet", "n2", &[NODES[1].1[0], node_ip6(1)], json!({"pod": "a"}), json!([]), true));
    pods
}

/// The lab's namespaces (`ns=<name>`, plus the name label the API server adds).
pub(super) fn lab_namespaces() -> Vec<Namespace> {
    LAB_NAMESPACES
        .iter()
        .chain(["kube-system"].iter())
        .map(|ns| {
            serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"ns": ns, "kubernetes.io/metadata.name": ns}}}),
            )
            .expect("a namespace")
        })
        .collect()
}

/// Every probed address.
pub(super) fn lab_endpoints() -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, ns) in LAB_NAMESPACES.iter().enumerate() {
        for (j, name) in LAB_PODS.iter().enumerate() {
            let (node, ips) = lab_pod_addr(i, j);
            for ip in ips {
                out.push(Endpoint { who: Who::Pod(ns, name, node), ip });
            }
        }
    }
    out.push(Endpoint { who: Who::Pod("y", "d", "n1"), ip: D6_IP });
    out.push(Endpoint { who: Who::Pod("kube-system", "dns", "n2"), ip: DNS_IP });
    for (i, (node, ips)) in NODES.iter().enumerate() {
        out.push(Endpoint { who: Who::Node(node), ip: ips[0] });
        out.push(Endpoint { who: Who::Node(node), ip: node_ip6(i) });
    }
    out.push(Endpoint { who: Who::Outside, ip: OUTSIDE });
    out.push(Endpoint { who: Who::Outside, ip: OUTSIDE6 });
    out
}

/// Probed (protocol, port) pairs.
pub(super) fn lab_ports() -> Vec<(Protocol, u16)> {
    let mut out = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        for port in [53, 80, 81, 82] {
            out.push((proto, port));
        }
    }
    out
}

/// NetworkPolicy objects from JSON manifests.
pub(super) fn policies(manifests: &[Value]) -> Vec<NetworkPolicy> {
    manifests.iter().map(|m| serde_json::from_value(m.clone()).expect("a NetworkPolicy")).collect()
}

/// The compiler's input for node `node` of the lab.
pub(super) fn lab_input(policies: &[NetworkPolicy], node: usize) -> PolicyInput {
    let (name, ips) = NODES[node];
    model_from_k8s(policies, &lab_pods(), &lab_namespaces(), name, &ips)
}

/// Both nodes' inputs and compiled rulesets.
pub(super) fn lab_cluster(policies: &[NetworkPolicy]) -> Vec<(PolicyInput, Ruleset)> {
    (0..NODES.len())
        .map(|n| {
            let input = lab_input(policies, n);
            let rules = compile(&input);
            (input, rules)
        })
        .collect()
}

/// A person's expectation: may a new connection from `src` to `dst` on
/// (protocol, port) pass the cluster?
pub(super) type ExpectFn = dyn Fn(&Endpoint, &Endpoint, Protocol, u16) -> bool;

/// Every disagreement, over the whole probe matrix (pairs of addresses of
/// one family), between the reference and the compiled rules on each node;
/// and, when `expect` is given, between the cluster's verdict (every node
/// must allow) and it. Neighbour discovery between any two IPv6 addresses
/// must pass every node, whatever the policies.
pub(super) fn disagreements(cluster: &[(PolicyInput, Ruleset)], expect: Option<&ExpectFn>) -> Vec<String> {
    let mut bad = Vec::new();
    let endpoints = lab_endpoints();
    for src in &endpoints {
        for dst in &endpoints {
            if src.ip == dst.ip || src.ip.is_ipv4() != dst.ip.is_ipv4() {
                continue;
            }
            if src.ip.is_ipv6() {
                let nd = Packet::neighbour_discovery(src.ip, dst.ip);
                for (input, rules) in cluster {
                    if !rules.evaluate(&nd) || !reference::allowed(input, &nd) {
                        bad.push(format!(
                            "{} -> {}: neighbour discovery dropped on {}",
                            src.label(),
                            dst.label(),
                            input.node
                        ));
                    }
                }
            }
            for (proto, port) in lab_ports() {
                let p = Packet::new(src.ip, dst.ip, proto, port);
                let what = format!("{} -> {} {proto:?}/{port}", src.label(), dst.label());
                let mut by_ref = true;
                let mut by_rules = true;
                for (input, rules) in cluster {
                    let r = reference::allowed(input, &p);
                    let c = rules.evaluate(&p);
                    if r != c {
                        bad.push(format!("{what} on {}: reference {r}, compiled {c}", input.node));
                    }
                    by_ref &= r;
                    by_rules &= c;
                    // A reply is always let through.
                    if !rules.evaluate(&Packet { established: true, ..p }) {
                        bad.push(format!("{what} on {}: an established packet is dropped", input.node));
                    }
                }
                if let Some(expect) = expect {
                    let want = expect(src, dst, proto, port);
                    if by_ref != want || by_rules != want {
                        bad.push(format!("{what}: expected {want}, reference {by_ref}, compiled {by_rules}"));
                    }
                }
            }
        }
    }
    bad
}

/// Panics listing the first disagreements.
pub(super) fn assert_agree(case: &str, bad: &[String]) {
    if !bad.is_empty() {
        let shown: Vec<&str> = bad.iter().take(25).map(String::as_str).collect();
        panic!("{case}: {} disagreements:\n  {}", bad.len(), shown.join("\n  "));
    }
}
