//! NetworkPolicies, Pods and Namespaces from the API (k8s-openapi types) to
//! the compiler's model. Defaults are applied here, the way the API server
//! applies them; what it would have rejected matches nothing and leaves a
//! note. Addresses of both families are kept.

use std::borrow::Borrow;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{
    NamedPort, NamespaceInfo, NamespaceScope, Operator, Peer, PodInfo, PolicyInfo, PolicyInput, Port, Protocol,
    Requirement, Rule, Selector, NAMESPACE_NAME_LABEL,
};

/// The compiler's input for node `node` (whose own addresses are
/// `node_ips`) from the current lists of the three kinds.
/// The lists may hold the objects or shared references to them (a
/// reflector's `Arc`s), so that nothing is copied to compile.
pub fn model_from_k8s<P: Borrow<NetworkPolicy>, Q: Borrow<Pod>, N: Borrow<Namespace>>(
    policies: &[P],
    pods: &[Q],
    namespaces: &[N],
    node: &str,
    node_ips: &[IpAddr],
) -> PolicyInput {
    let mut notes = Vec::new();
    let namespaces = namespaces.iter().filter_map(|n| namespace_info(n.borrow())).collect();
    let pods = pods.iter().filter_map(|p| pod_info(p.borrow())).collect();
    let policies = policies.iter().filter_map(|p| policy_info(p.borrow(), &mut notes)).collect();
    PolicyInput { node: node.to_string(), node_ips: node_ips.to_vec(), namespaces, pods, policies, notes }
}

fn namespace_info(ns: &Namespace) -> Option<NamespaceInfo> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    // The API server sets it on every namespace (1.21+); objects built by
    // hand may lack it.
    labels.entry(NAMESPACE_NAME_LABEL.to_string()).or_insert_with(|| name.clone());
    Some(NamespaceInfo { name, labels })
}

/// A pod, or None for one that holds no address any more: finished pods
/// keep `podIP` in their status while the address goes to a new pod.
fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.and_then(|s| s.pod_ips.as_ref()).map(|v| v.iter().map(|i| i.ip.as_str()).collect::<Vec<_>>());
    let candidates = match listed {
        Some(v) if !v.is_empty() => v,
        _ => status.and_then(|s| s.pod_ip.as_deref()).into_iter().collect(),
    };
    for ip in candidates {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    let spec = pod.spec.as_ref();
    // Ports of the app containers, and of sidecars (init containers that
    // keep running: `restartPolicy: Always`).
    let containers = spec.into_iter().flat_map(|s| {
        let sidecars = s.init_containers.iter().flatten().filter(|c| c.restart_policy.as_deref() == Some("Always"));
        s.containers.iter().chain(sidecars)
    });
    let ports = containers.flat_map(named_ports).collect();
    Some(PodInfo {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()),
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    })
}

fn named_ports(c: &Container) -> Vec<NamedPort> {
    c.ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let name = p.name.clone()?;
            let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(p.container_port).ok().filter(|n| *n != 0)?;
            Some(NamedPort { name, protocol, port })
        })
        .collect()
}

fn policy_info(p: &NetworkPolicy, notes: &mut Vec<String>) -> Option<PolicyInfo> {
    let namespace = p.metadata.namespace.clone()?;
    let name = p.metadata.name.clone()?;
    let id = format!("{namespace}/{name}");
    // A policy without spec is the zero spec: every pod, ingress denied.
    let spec = p.spec.clone().unwrap_or_default();
    let ingress_rules = spec.ingress.unwrap_or_default();
    let egress_rules = spec.egress.unwrap_or_default();
    // policyTypes defaults (as the API server fills them in): Ingress, plus
    // Egress when there are egress rules.
    let types = match spec.policy_types {
        Some(t) if !t.is_empty() => t,
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if !egress_rules.is_empty() {
                t.push("Egress".to_string());
            }
            t
        }
    };
    for t in &types {
        if t != "Ingress" && t != "Egress" {
            notes.push(format!("policy {id}: unknown policyType {t:?} ignored"));
        }
    }
    let ingress = types.iter().any(|t| t == "Ingress").then(|| {
        ingress_rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(&namespace, r.from.as_deref(), r.ports.as_deref(), &format!("{id} ingress[{i}]"), notes))
            .collect()
    });
    let egress = types.iter().any(|t| t == "Egress").then(|| {
        egress_rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(&namespace, r.to.as_deref(), r.ports.as_deref(), &format!("{id} egress[{i}]"), notes))
            .collect()
    });
    let pod_selector = selector(spec.pod_selector.as_ref(), &format!("{id} podSelector"), notes);
    Some(PolicyInfo { namespace, name, pod_selector, ingress, egress })
}

fn rule(
    ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    at: &str,
    notes: &mut Vec<String>,
) -> Rule {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| peer(ns, p, &format!("{at} peer[{i}]"), notes))
        .collect();
    let ports =
        ports.unwrap_or_default().iter().enumerate().map(|(i, p)| port(p, &format!("{at} port[{i}]"), notes)).collect();
    Rule { peers, ports }
}

fn peer(ns: &str, p: &NetworkPolicyPeer, at: &str, notes: &mut Vec<String>) -> Peer {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            notes.push(format!("{at}: ipBlock together with a selector is invalid; the peer matches nothing"));
            return Peer::Nothing;
        }
        return match block.cidr.parse::<IpNet>() {
            Ok(cidr) => {
                let mut except = Vec::new();
                for e in block.except.iter().flatten() {
                    match e.parse::<IpNet>() {
                        Ok(hole) if same_family(&hole, &cidr) => except.push(hole.trunc()),
                        // The API server rejects it ("must be a strict subset
                        // of `cidr`"); what it meant is unknown, so the peer
                        // allows nothing rather than the whole block.
                        Ok(_) => {
                            notes.push(format!(
                                "{at}: except {e} is not of the family of cidr {} (the API server rejects this); the peer matches nothing",
                                block.cidr
                            ));
                            return Peer::Nothing;
                        }
                        Err(_) => {
                            notes.push(format!("{at}: except {e:?} is no CIDR; the peer matches nothing"));
                            return Peer::Nothing;
                        }
                    }
                }
                Peer::Block { cidr: cidr.trunc(), except }
            }
            Err(_) => {
                notes.push(format!("{at}: ipBlock cidr {:?} is no CIDR; the peer matches nothing", block.cidr));
                Peer::Nothing
            }
        };
    }
    let pods = p.pod_selector.as_ref().map(|s| selector(Some(s), &format!("{at} podSelector"), notes));
    let namespaces =
        p.namespace_selector.as_ref().map(|s| selector(Some(s), &format!("{at} namespaceSelector"), notes));
    match (namespaces, pods) {
        (None, None) => {
            notes.push(format!("{at}: a peer needs podSelector, namespaceSelector or ipBlock; it matches nothing"));
            Peer::Nothing
        }
        // Without namespaceSelector, pods of the policy's own namespace.
        (None, Some(pods)) => Peer::Pods { namespaces: NamespaceScope::Named(ns.to_string()), pods },
        (Some(nss), pods) => Peer::Pods { namespaces: NamespaceScope::Selected(nss), pods: pods.unwrap_or_default() },
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!((a, b), (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_)))
}

fn port(p: &NetworkPolicyPort, at: &str, notes: &mut Vec<String>) -> Port {
    let proto_name = p.protocol.as_deref().unwrap_or("TCP");
    let Some(proto) = Protocol::parse(proto_name) else {
        notes.push(format!("{at}: unknown protocol {proto_name:?}; the port matches nothing"));
        return Port::Nothing;
    };
    match (&p.port, p.end_port) {
        (None, None) => Port::Any(proto),
        (None, Some(_)) => {
            notes.push(format!("{at}: endPort without port is invalid; the port matches nothing"));
            Port::Nothing
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = u16::try_from(*n).ok().filter(|n| *n != 0);
            let last = match end {
                None => first,
                Some(e) => u16::try_from(e).ok(),
            };
            match (first, last) {
                (Some(first), Some(last)) if first <= last => Port::Range(proto, first, last),
                _ => {
                    notes.push(format!("{at}: port {n}..{end:?} is invalid; the port matches nothing"));
                    Port::Nothing
                }
            }
        }
        (Some(IntOrString::String(name)), None) => Port::Named(proto, name.clone()),
        (Some(IntOrString::String(name)), Some(_)) => {
            notes.push(format!("{at}: endPort with named port {name:?} is invalid; the port matches nothing"));
            Port::Nothing
        }
    }
}

/// A LabelSelector; None (a policy's absent podSelector) is the empty one.
fn selector(s: Option<&LabelSelector>, at: &str, notes: &mut Vec<String>) -> Selector {
    let Some(s) = s else { return Selector::everything() };
    let mut out = Selector { match_labels: s.match_labels.clone().unwrap_or_default(), ..Selector::default() };
    for e in s.match_expressions.iter().flatten() {
        let Some(operator) = Operator::parse(&e.operator) else {
            notes.push(format!("{at}: unknown operator {:?}; the selector matches nothing", e.operator));
            return Selector::nothing();
        };
        out.expressions.push(Requirement {
            key: e.key.clone(),
            operator,
            values: e.values.clone().unwrap_or_default(),
        });
    }
    out
}
