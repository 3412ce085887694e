//! The compiler's input: NetworkPolicies, pods and namespaces reduced to the
//! fields policy depends on, as plain data (built from the API objects by
//! [`super::k8s::model_from_k8s`], or by hand in tests).
//!
//! Everything here is already normalised: `policyTypes` defaulted, a null
//! `namespaceSelector` replaced by the policy's own namespace, protocols
//! defaulted to TCP. Addresses are of both families: a pod's set holds its
//! IPv4 and its IPv6 addresses, an `ipBlock` is of one family. What the API
//! server would have rejected becomes a peer or port that matches nothing,
//! with a note.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

pub use super::selector::{Labels, Operator, Requirement, Selector};

/// The label the API server puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// An L4 protocol a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// `TCP` (the default).
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP`.
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`; case-sensitive as in
    /// the API server's validation).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// nft's keyword for it (`tcp dport`, `meta l4proto udp`, ...).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A named container port: `name` -> (`protocol`, `port`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    /// The port's name (`containers[].ports[].name`).
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its number (`containerPort`).
    pub port: u16,
}

/// A pod, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// Its addresses, of both families (`status.podIPs`, or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// The node it runs on (`spec.nodeName`).
    pub node: Option<String>,
    /// Its named container ports.
    pub ports: Vec<NamedPort>,
    /// `spec.hostNetwork`: such a pod has its node's addresses, so policy
    /// neither applies to it nor selects it as a peer.
    pub host_network: bool,
}

impl PodInfo {
    /// Whether policy applies to the pod and selects it as a peer: it has
    /// an address of its own (of either family).
    pub fn is_eligible(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }

    /// The port numbers the pod's container ports named `name` with
    /// `protocol` have (none: the named port matches nothing on this pod).
    pub fn resolve(&self, name: &str, protocol: Protocol) -> BTreeSet<u16> {
        self.ports.iter().filter(|p| p.name == name && p.protocol == protocol).map(|p| p.port).collect()
    }
}

/// A namespace, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
}

/// Which namespaces a pod peer's pods come from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceScope {
    /// Exactly this namespace (a peer without `namespaceSelector`: the
    /// policy's own).
    Named(String),
    /// Every namespace whose labels the selector matches.
    Selected(Selector),
}

/// One entry of a rule's `from` or `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces of `namespaces`
    /// (`podSelector`, `namespaceSelector`, or both).
    Pods {
        /// Where the pods are.
        namespaces: NamespaceScope,
        /// Which pods there (the empty selector for a `namespaceSelector`-only peer).
        pods: Selector,
    },
    /// Any address in `cidr` and in none of `except` (`ipBlock`): addresses
    /// of `cidr`'s family only.
    Block {
        /// The block.
        cidr: IpNet,
        /// Holes in it, of the block's family.
        except: Vec<IpNet>,
    },
    /// Matches nothing: a peer the API server would have rejected. The
    /// reason is in the input's notes.
    Nothing,
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    /// Every port of the protocol (`port` absent).
    Any(Protocol),
    /// `port` ..= `endPort` (a single port when both are equal).
    Range(Protocol, u16, u16),
    /// A named port, resolved on the destination pod.
    Named(Protocol, String),
    /// Matches nothing: something the API server would have rejected (an
    /// unknown protocol, `endPort` below `port`, ...). The reason is in the
    /// input's notes.
    Nothing,
}

/// An ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress); empty: every address.
    pub peers: Vec<Peer>,
    /// `ports`; empty: every port and protocol.
    pub ports: Vec<Port>,
}

/// A NetworkPolicy, with its `policyTypes` applied: a direction the policy
/// does not cover is `None`; `Some(vec![])` denies everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// The policy's namespace (its pods are the only ones it can select).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `spec.podSelector` (empty: every pod of the namespace).
    pub pod_selector: Selector,
    /// Ingress rules, when the policy covers ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules, when the policy covers egress.
    pub egress: Option<Vec<Rule>>,
}

/// Traffic direction, from the point of view of the selected pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the selected pod.
    Ingress,
    /// From the selected pod.
    Egress,
}

impl PolicyInfo {
    /// The rules of direction `d`, when the policy covers it.
    pub fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// Everything the compiler needs to build this node's ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyInput {
    /// This node's name: only pods with this `node` are enforced here.
    pub node: String,
    /// This node's own addresses of both families (underlay, `cni0`
    /// gateways, `flannel.1`): always allowed to reach its pods and be
    /// reached by them.
    pub node_ips: Vec<IpAddr>,
    /// Namespaces and their labels.
    pub namespaces: Vec<NamespaceInfo>,
    /// Pods of every node (peers may live anywhere).
    pub pods: Vec<PodInfo>,
    /// Every NetworkPolicy.
    pub policies: Vec<PolicyInfo>,
    /// What the conversion ignored, and why (for the daemon's log).
    pub notes: Vec<String>,
}

impl PolicyInput {
    /// The labels of namespace `ns`. A namespace the input does not list
    /// (its watch event not seen yet) has only the name label every
    /// namespace carries.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        match self.namespaces.iter().find(|n| n.name == ns) {
            Some(n) => n.labels.clone(),
            None => [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into(),
        }
    }

    /// Whether `scope` includes namespace `ns`.
    pub fn scope_includes(&self, scope: &NamespaceScope, ns: &str) -> bool {
        match scope {
            NamespaceScope::Named(n) => n == ns,
            NamespaceScope::Selected(sel) => sel.matches(&self.namespace_labels(ns)),
        }
    }

    /// Whether `pod` is on this node and subject to policy here.
    pub fn is_local(&self, pod: &PodInfo) -> bool {
        pod.is_eligible() && pod.node.as_deref() == Some(self.node.as_str())
    }
}
