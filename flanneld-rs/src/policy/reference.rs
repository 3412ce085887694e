//! The NetworkPolicy semantics, answered straight from the model: the
//! specification the compiled rules are tested against. It shares nothing
//! with the compiler but the model itself (label selectors, named-port
//! lookup), and is written for obviousness, not speed.

use std::net::IpAddr;

use super::ir::Packet;
use super::model::{Direction, Peer, PodInfo, PolicyInfo, PolicyInput, Port, Rule};

/// Whether this node lets packet `p` through, by the Kubernetes semantics:
/// the sender's egress, when the sender is a pod on this node, and the
/// receiver's ingress, when the receiver is a pod on this node, must both
/// allow it. Pods on other nodes are enforced there, so a cluster allows a
/// packet when every node does.
pub fn allowed(input: &PolicyInput, p: &Packet) -> bool {
    // Replies; and neighbour discovery, without which pods lose their
    // neighbours (policy is about connections between pods, not about L2).
    if p.established || p.nd {
        return true;
    }
    let egress_ok = match local_pod(input, p.src) {
        Some(src) => direction_allows(input, src, Direction::Egress, p),
        None => true,
    };
    let ingress_ok = match local_pod(input, p.dst) {
        Some(dst) => direction_allows(input, dst, Direction::Ingress, p),
        None => true,
    };
    egress_ok && ingress_ok
}

/// Whether `pod`'s policies of direction `d` allow `p`: unrestricted when
/// no policy of that direction selects it, else some rule of some policy
/// must allow the packet.
fn direction_allows(input: &PolicyInput, pod: &PodInfo, d: Direction, p: &Packet) -> bool {
    let other = match d {
        Direction::Egress => p.dst,
        Direction::Ingress => p.src,
    };
    if input.node_ips.contains(&other) {
        return true;
    }
    let selecting: Vec<&PolicyInfo> = input
        .policies
        .iter()
        .filter(|pol| pol.rules(d).is_some() && pol.namespace == pod.namespace && pol.pod_selector.matches(&pod.labels))
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|pol| pol.rules(d).unwrap_or_default().iter().any(|r| rule_allows(input, pod, d, r, p)))
}

fn rule_allows(input: &PolicyInput, pod: &PodInfo, d: Direction, rule: &Rule, p: &Packet) -> bool {
    let other = match d {
        Direction::Egress => p.dst,
        Direction::Ingress => p.src,
    };
    let peer_ok = rule.peers.is_empty() || rule.peers.iter().any(|peer| peer_has(input, peer, other));
    if !peer_ok {
        return false;
    }
    if rule.ports.is_empty() {
        return true;
    }
    rule.ports.iter().any(|port| match port {
        Port::Any(proto) => *proto == p.protocol,
        Port::Range(proto, first, last) => *proto == p.protocol && *first <= p.port && p.port <= *last,
        Port::Named(proto, name) => {
            if *proto != p.protocol {
                return false;
            }
            // Named ports are looked up on the destination pod: for ingress
            // that is the selected pod; for egress the peer pod at the
            // destination address (an address outside every pod has no
            // named ports).
            let dest = match d {
                Direction::Ingress => Some(pod),
                Direction::Egress => pod_at(input, p.dst),
            };
            dest.is_some_and(|dp| dp.resolve(name, *proto).contains(&p.port))
        }
        Port::Nothing => false,
    })
}

/// Whether `peer` covers address `ip`.
fn peer_has(input: &PolicyInput, peer: &Peer, ip: IpAddr) -> bool {
    match peer {
        Peer::Pods { namespaces, pods } => pod_at(input, ip)
            .is_some_and(|pod| input.scope_includes(namespaces, &pod.namespace) && pods.matches(&pod.labels)),
        Peer::Block { cidr, except } => cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)),
        Peer::Nothing => false,
    }
}

/// The pod (on any node) that has address `ip` and is subject to policy.
fn pod_at(input: &PolicyInput, ip: IpAddr) -> Option<&PodInfo> {
    input.pods.iter().find(|pod| pod.is_eligible() && pod.ips.contains(&ip))
}

/// The pod on this node that has address `ip` and is subject to policy.
fn local_pod(input: &PolicyInput, ip: IpAddr) -> Option<&PodInfo> {
    input.pods.iter().find(|pod| input.is_local(pod) && pod.ips.contains(&ip))
}
