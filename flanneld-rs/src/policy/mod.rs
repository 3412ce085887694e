//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) compiled to nftables,
//! for the pods on this node.
//!
//! Pure: [`model_from_k8s`] reduces the API objects to a [`PolicyInput`];
//! [`compile`] turns that into a [`Ruleset`] (sets, chains, rules as data);
//! [`Ruleset::render`] prints the one `nft -f` transaction that replaces
//! our table. Applying it is the caller's job (`flannel_net::host::nft_apply`).
//! [`reference::allowed`] answers the same question from the model directly:
//! it is the specification the compiled rules are tested against, through
//! [`Ruleset::evaluate`], an interpreter of the rules.
//!
//! # Where pod traffic is seen
//!
//! Pods are veths on the bridge `cni0`. Three kinds of path cross the node:
//!
//! - routed: pod to another node's pod (out via `flannel.1`), to or from
//!   outside, and to a Service (kube-proxy's DNAT in prerouting happens
//!   before forward, so the rules see the backend pod's address, as the
//!   API requires);
//! - bridged: pod to pod on the same node, by pod address: L2 within `cni0`;
//! - local: pod to its node and back (input and output hooks), which policy
//!   never restricts; kubelet's probes take this path.
//!
//! Routed traffic passes the `inet` family's forward hook. Bridged traffic
//! does only when `br_netfilter` hands bridged IPv4 and IPv6 to the IP hooks
//! (`net.bridge.bridge-nf-call-iptables=1` and `...-ip6tables=1`, per
//! network namespace, the default once the module is loaded, and what
//! kubeadm's preflight and kube-proxy require anyway). The rules need
//! conntrack (replies of allowed connections pass), and `br_netfilter` gives
//! bridged packets conntrack. So one `inet` table covers both paths and both
//! families, and the daemon keeps both sysctls at 1. (A `bridge` family table could judge bridged traffic without
//! `br_netfilter`, but its `ct state` needs the kernel's bridge conntrack,
//! CONFIG_NF_CONNTRACK_BRIDGE, which the kernels here lack, so nothing here
//! could test it; it is not offered.)
//!
//! # The table
//!
//! `table inet flannel-rs-policy`:
//!
//! - sets of addresses, each of one family (IPv6 ones carry a `6` after
//!   the prefix: `node_ips6`, `pods6_<ns>_<h>`): `node_ips` (this node's
//!   own), `local_<ns>_<h>` (this node's pods a policy selects), `pods_[<ns>_]<h>` (the pods, on
//!   any node, a peer selects), `cidr_<h>` (an `ipBlock` minus its `except`
//!   holes, an interval set), `isolated_ingress` / `isolated_egress` (this
//!   node's pods selected by any policy of that direction); `<h>` is a
//!   stable hash of the selector, so names do not change with unrelated
//!   policies;
//! - base chain `egress` (forward hook, priority `filter`) and `ingress`
//!   (priority `filter + 1`), policy accept. Each accepts established and
//!   related packets, then IPv6 neighbour and router discovery (ICMPv6
//!   types 133-137 with hop limit 255, i.e. not routed: pods must resolve
//!   their neighbours and gateway whatever the policy), then packets to
//!   (egress) or from (ingress) the node's own addresses; jumps, for the
//!   pods each policy selects, to its chain; and finally drops packets of
//!   isolated pods. Address rules come once per family (`ip saddr @s`,
//!   `ip6 saddr @s6`), for the families that have addresses. Accept ends
//!   only the base chain it is in, so the sender's egress and the
//!   receiver's ingress are judged separately, and a drop in either is
//!   final;
//! - one chain per policy and direction, `in_<ns>_<name>` /
//!   `eg_<ns>_<name>`, with one `accept` rule per (peer, port clause);
//!   falling off its end returns to the next policy, so a pod gets the union
//!   of the policies that select it.
//!
//! Named ports are resolved per destination pod: in ingress, rules name the
//! selected pods whose container port has that name (`ip daddr { ... } tcp
//! dport 8080`); in egress, the peer pods whose port has it.
//!
//! The text depends only on the input's content (not its order): sets,
//! chains and elements are sorted, so the daemon can compare it with what
//! it applied last and skip `nft -f` when nothing changed.

mod compile;
mod ir;
mod k8s;
mod model;
pub mod reference;
mod render;
mod selector;

#[cfg(test)]
mod tests;

pub use compile::{
    compile, family_name, EGRESS_CHAIN, INGRESS_CHAIN, ISOLATED_EGRESS_SET, ISOLATED_INGRESS_SET, NODE_IPS_SET,
};
pub use ir::{AddrRange, Addrs, Chain, Family, Match, NamedSet, NftRule, Packet, PortRange, Ruleset, Verdict};
pub use k8s::model_from_k8s;
pub use model::{
    Direction, Labels, NamedPort, NamespaceInfo, NamespaceScope, Operator, Peer, PodInfo, PolicyInfo, PolicyInput,
    Port, Protocol, Requirement, Rule, Selector, NAMESPACE_NAME_LABEL,
};
pub use render::teardown_script;

/// Our table's name, in family `inet`.
pub const TABLE: &str = "flannel-rs-policy";

/// The sysctl that makes bridged IPv4 traffic pass the `inet` hooks; the
/// daemon keeps it at 1.
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The same for bridged IPv6 traffic.
pub const BRIDGE_NF_CALL_IP6TABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-ip6tables";
