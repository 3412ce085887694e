//! [`PolicyInput`] to [`Ruleset`]: the pure heart of policy enforcement.
//!
//! For each policy that selects at least one pod on this node, and for each
//! direction it covers, one chain `in_<ns>_<name>` / `eg_<ns>_<name>` holds
//! one `accept` rule per (peer, port clause) of its rules. The base chains
//! jump to it for the pods it selects here (`local_*` sets), and after all
//! jumps drop what is addressed to (or sent by) an isolated pod: a pod
//! selected by any policy of that direction (`isolated_*` sets). A rule
//! that matches accepts, which ends that base chain only, so egress (of the
//! sender) and ingress (of the receiver) are decided independently and both
//! must allow.
//!
//! Both families: every address set is split into an IPv4 set (the name
//! without family mark, as before IPv6) and an IPv6 set (`6` after the
//! prefix: `pods6_...`, `node_ips6`), and a rule naming a set is emitted
//! once per family whose set has elements. A cluster without IPv6 gets the
//! address rules it had (plus the neighbour-discovery accept of each base
//! chain); a peer with no address at all needs no rule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::ir::{AddrRange, Addrs, Chain, Family, Match, NamedSet, NftRule, PortRange, Ruleset, Verdict};
use super::model::{
    Direction, Labels, NamespaceScope, Peer, PodInfo, PolicyInfo, PolicyInput, Port, Protocol, Rule, Selector,
};
use super::render::{addr_bits, addr_from_bits};

/// The base chain deciding egress: what this node's pods may send.
pub const EGRESS_CHAIN: &str = "egress";
/// The base chain deciding ingress: what this node's pods may receive.
pub const INGRESS_CHAIN: &str = "ingress";
/// The set of this node's own addresses (IPv4; IPv6 in [`family_name`]`(.., V6)`).
pub const NODE_IPS_SET: &str = "node_ips";
/// Pods on this node selected by some ingress policy.
pub const ISOLATED_INGRESS_SET: &str = "isolated_ingress";
/// Pods on this node selected by some egress policy.
pub const ISOLATED_EGRESS_SET: &str = "isolated_egress";

/// The name of the `family` set of a set named `prefix[_rest]` for IPv4:
/// IPv6 sets carry a `6` after the prefix (`node_ips6`, `pods6_x_<h>`).
pub fn family_name(name: &str, family: Family) -> String {
    match family {
        Family::V4 => name.to_string(),
        Family::V6 => match name.split_once('_') {
            Some((prefix, rest)) if !matches!(name, NODE_IPS_SET | ISOLATED_INGRESS_SET | ISOLATED_EGRESS_SET) => {
                format!("{prefix}6_{rest}")
            }
            _ => format!("{name}6"),
        },
    }
}

/// Builds `ip[6] saddr` or `ip[6] daddr`.
type AddrMatch = fn(Family, Addrs) -> Match;

/// The sets of one logical set that have elements: (family, name).
type FamilySets = Vec<(Family, String)>;

/// Longest chain or set name we produce; the kernel's limit is 255 bytes.
const MAX_NAME: usize = 96;

/// Compiles the NetworkPolicies of `input` into this node's ruleset.
pub fn compile(input: &PolicyInput) -> Ruleset {
    let mut b = Builder::new(input);
    let mut policies: Vec<&PolicyInfo> = input.policies.iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut dispatch: BTreeMap<Direction, Vec<(FamilySets, String)>> = BTreeMap::new();
    let mut isolated: BTreeMap<Direction, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut chains = Vec::new();
    for p in policies {
        let targets: Vec<&PodInfo> = b
            .pods_in(&p.namespace)
            .iter()
            .copied()
            .filter(|pod| input.is_local(pod) && p.pod_selector.matches(&pod.labels))
            .collect();
        if targets.is_empty() {
            continue;
        }
        for d in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = p.rules(d) else { continue };
            let target_set = b.local_set(&p.namespace, &p.pod_selector, &targets);
            let name = chain_name(d, &p.namespace, &p.name);
            let rules = rules.iter().flat_map(|r| b.rule(d, r, &targets)).collect();
            chains.push(Chain { name: name.clone(), base_priority: None, rules });
            dispatch.entry(d).or_default().push((target_set, name));
            isolated.entry(d).or_default().extend(targets.iter().flat_map(|t| t.ips.iter().copied()));
        }
    }
    chains.sort_by(|a, b| a.name.cmp(&b.name));

    let mut base = Vec::new();
    for (d, jumps) in &dispatch {
        let (name, priority, isolated_set) = match d {
            Direction::Egress => (EGRESS_CHAIN, 0, ISOLATED_EGRESS_SET),
            Direction::Ingress => (INGRESS_CHAIN, 1, ISOLATED_INGRESS_SET),
        };
        // The pod's side of the packet, and the other side.
        let (own, other): (AddrMatch, AddrMatch) = match d {
            Direction::Egress => (Match::Saddr, Match::Daddr),
            Direction::Ingress => (Match::Daddr, Match::Saddr),
        };
        let mut rules = vec![
            // Replies, and flows a rule allowed before the table was replaced.
            NftRule { matches: vec![Match::Established], verdict: Verdict::Accept },
            // IPv6 neighbour and router discovery between the bridge's
            // members: without it an isolated pod could not resolve (or be
            // resolved by) its neighbours and its gateway, and nothing would
            // reach it, allowed or not. Not tracked by conntrack, so the
            // rule above never covers it. Hop limit 255: only unrouted ones.
            NftRule { matches: vec![Match::NeighbourDiscovery], verdict: Verdict::Accept },
        ];
        // A pod and its own node always talk (kubelet's probes).
        let node_ips: BTreeSet<IpAddr> = input.node_ips.iter().copied().collect();
        for (f, set) in b.fixed_sets(NODE_IPS_SET, &node_ips) {
            rules.push(NftRule { matches: vec![other(f, Addrs::Set(set))], verdict: Verdict::Accept });
        }
        for (sets, chain) in jumps {
            for (f, set) in sets {
                rules.push(NftRule {
                    matches: vec![own(*f, Addrs::Set(set.clone()))],
                    verdict: Verdict::Jump(chain.clone()),
                });
            }
        }
        let members = isolated.remove(d).unwrap_or_default();
        for (f, set) in b.fixed_sets(isolated_set, &members) {
            rules.push(NftRule { matches: vec![own(f, Addrs::Set(set))], verdict: Verdict::Drop });
        }
        base.push((priority, Chain { name: name.into(), base_priority: Some(priority), rules }));
    }
    base.sort_by_key(|(priority, _)| *priority);

    Ruleset {
        sets: b.sets.into_values().collect(),
        chains: base.into_iter().map(|(_, c)| c).chain(chains).collect(),
        notes: input.notes.clone(),
    }
}

struct Builder<'a> {
    /// Pods policy applies to and selects, sorted by namespace and name.
    pods: Vec<&'a PodInfo>,
    /// The same, by namespace.
    by_ns: BTreeMap<&'a str, Vec<&'a PodInfo>>,
    /// The labels of every namespace that has such pods.
    ns_labels: BTreeMap<&'a str, Labels>,
    /// The pods a peer selects, by the canonical text of the peer: many
    /// policies name the same peers, and a cluster has thousands of pods.
    peer_cache: BTreeMap<String, Vec<&'a PodInfo>>,
    /// Sets by name.
    sets: BTreeMap<String, NamedSet>,
    /// Set names, per family, by the canonical text of what they hold.
    names: BTreeMap<String, FamilySets>,
}

impl<'a> Builder<'a> {
    fn new(input: &'a PolicyInput) -> Builder<'a> {
        let mut pods: Vec<&PodInfo> = input.pods.iter().filter(|p| p.is_eligible()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut by_ns: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
        for p in &pods {
            by_ns.entry(p.namespace.as_str()).or_default().push(p);
        }
        let ns_labels = by_ns.keys().map(|ns| (*ns, input.namespace_labels(ns))).collect();
        Builder { pods, by_ns, ns_labels, peer_cache: BTreeMap::new(), sets: BTreeMap::new(), names: BTreeMap::new() }
    }

    /// The pods of namespace `ns`.
    fn pods_in(&self, ns: &str) -> &[&'a PodInfo] {
        self.by_ns.get(ns).map(Vec::as_slice).unwrap_or_default()
    }

    fn add_set(&mut self, name: String, family: Family, interval: bool, elements: Vec<AddrRange>) {
        self.sets.insert(name.clone(), NamedSet { name, family, interval, elements });
    }

    /// The sets of fixed name `name` holding `ips`, one per family that has
    /// addresses.
    fn fixed_sets(&mut self, name: &str, ips: &BTreeSet<IpAddr>) -> FamilySets {
        let mut out = Vec::new();
        for f in Family::ALL {
            let elements: Vec<AddrRange> =
                ips.iter().filter(|ip| Family::of(ip) == f).map(|ip| AddrRange::one(*ip)).collect();
            if !elements.is_empty() {
                let name = family_name(name, f);
                self.add_set(name.clone(), f, false, elements);
                out.push((f, name));
            }
        }
        out
    }

    /// The names of the sets for `key`, one per family with elements,
    /// creating them with `elements()` the first time. Names are
    /// `<prefix>[6][_<readable>]_<hash of key>`; two keys with the same hash
    /// (unlikely at 40 bits) get distinct suffixes.
    fn intern(
        &mut self,
        prefix: &str,
        readable: Option<&str>,
        key: String,
        interval: bool,
        elements: impl FnOnce(&Self) -> Vec<AddrRange>,
    ) -> FamilySets {
        if let Some(names) = self.names.get(&key) {
            return names.clone();
        }
        let hash = short_hash(&key);
        let elements = elements(self);
        let mut names = Vec::new();
        for f in Family::ALL {
            let mine: Vec<AddrRange> = elements.iter().filter(|r| r.family() == f).copied().collect();
            if mine.is_empty() {
                continue;
            }
            let prefix = family_name(prefix, f);
            let base = match readable {
                Some(r) => ident(&format!("{prefix}_{r}_{hash}")),
                None => format!("{prefix}_{hash}"),
            };
            let mut name = base.clone();
            let mut n = 2;
            while self.sets.contains_key(&name) {
                name = format!("{base}_{n}");
                n += 1;
            }
            self.add_set(name.clone(), f, interval, mine);
            names.push((f, name));
        }
        self.names.insert(key, names.clone());
        names
    }

    /// The sets of the pods on this node a policy selects.
    fn local_set(&mut self, ns: &str, selector: &Selector, targets: &[&PodInfo]) -> FamilySets {
        let key = format!("local|{ns}|{}", selector.canonical());
        let ips: BTreeSet<IpAddr> = targets.iter().flat_map(|t| t.ips.iter().copied()).collect();
        self.intern("local", Some(ns), key, false, |_| ips.into_iter().map(AddrRange::one).collect())
    }

    /// The pods, on any node, a pod peer selects.
    fn peer_pods(&mut self, namespaces: &NamespaceScope, pods: &Selector) -> Vec<&'a PodInfo> {
        let key = format!("{}|{}", scope_key(namespaces), pods.canonical());
        if let Some(hit) = self.peer_cache.get(&key) {
            return hit.clone();
        }
        let mut out = Vec::new();
        for (ns, labels) in &self.ns_labels {
            let included = match namespaces {
                NamespaceScope::Named(n) => n == ns,
                NamespaceScope::Selected(sel) => sel.matches(labels),
            };
            if included {
                out.extend(self.pods_in(ns).iter().copied().filter(|p| pods.matches(&p.labels)));
            }
        }
        self.peer_cache.insert(key, out.clone());
        out
    }

    /// The sets a peer's addresses are in (none for a peer that matches nothing).
    fn peer_sets(&mut self, peer: &Peer) -> FamilySets {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let readable = match namespaces {
                    NamespaceScope::Named(ns) => Some(ns.as_str()),
                    NamespaceScope::Selected(_) => None,
                };
                let key = format!("pods|{}|{}", scope_key(namespaces), pods.canonical());
                if let Some(names) = self.names.get(&key) {
                    return names.clone();
                }
                let ips: BTreeSet<IpAddr> =
                    self.peer_pods(namespaces, pods).iter().flat_map(|p| p.ips.iter().copied()).collect();
                self.intern("pods", readable, key, false, |_| ips.into_iter().map(AddrRange::one).collect())
            }
            Peer::Block { cidr, except } => {
                let mut holes: Vec<String> = except.iter().map(|e| e.trunc().to_string()).collect();
                holes.sort();
                holes.dedup();
                let key = format!("cidr|{}|{}", cidr.trunc(), holes.join(","));
                self.intern("cidr", None, key, true, |_| block_ranges(*cidr, except))
            }
            Peer::Nothing => Vec::new(),
        }
    }

    /// The `accept` rules for one ingress or egress rule of a policy that
    /// selects `targets` here.
    fn rule(&mut self, d: Direction, rule: &Rule, targets: &[&PodInfo]) -> Vec<NftRule> {
        let peer_match: AddrMatch = match d {
            Direction::Ingress => Match::Saddr,
            Direction::Egress => Match::Daddr,
        };
        // (family, match) per peer set; None: any address of either family.
        let peers: Vec<Option<(Family, Match)>> = if rule.peers.is_empty() {
            vec![None]
        } else {
            rule.peers
                .iter()
                .flat_map(|p| self.peer_sets(p))
                .map(|(f, s)| Some((f, peer_match(f, Addrs::Set(s)))))
                .collect()
        };
        let clauses = port_clauses(&rule.ports);
        let mut out: Vec<NftRule> = Vec::new();
        for peer in &peers {
            for clause in &clauses {
                let matches = peer.iter().map(|(_, m)| m.clone()).chain(clause.iter().cloned()).collect();
                out.push(NftRule { matches, verdict: Verdict::Accept });
            }
        }
        // Named ports: resolved on the destination pod, so each resolution
        // becomes a rule naming the destinations that resolve that way.
        let named: Vec<(Protocol, &str)> = rule
            .ports
            .iter()
            .filter_map(|p| match p {
                Port::Named(proto, name) => Some((*proto, name.as_str())),
                _ => None,
            })
            .collect();
        if named.is_empty() {
            return out;
        }
        match d {
            Direction::Ingress => {
                // The destination is the selected pod itself; a peer of one
                // family can only reach its addresses of that family.
                let dests: Vec<(&PodInfo, Vec<IpAddr>)> = targets.iter().map(|t| (*t, t.ips.clone())).collect();
                let by_port = resolve_named(&named, &dests);
                for peer in &peers {
                    for ((proto, port), ips) in &by_port {
                        for (f, literal) in by_family(ips) {
                            if peer.as_ref().is_some_and(|(pf, _)| *pf != f) {
                                continue;
                            }
                            let mut matches: Vec<Match> = peer.iter().map(|(_, m)| m.clone()).collect();
                            matches.push(Match::Daddr(f, Addrs::Literal(literal)));
                            matches.push(Match::L4 {
                                protocol: *proto,
                                ports: vec![PortRange { first: *port, last: *port }],
                            });
                            out.push(NftRule { matches, verdict: Verdict::Accept });
                        }
                    }
                }
            }
            Direction::Egress => {
                // The destination is a peer pod: the addresses of the peers'
                // pods (an ipBlock's pods are those whose address it holds),
                // by the port their name resolves to on each.
                let dests = self.peer_destinations(&rule.peers);
                for ((proto, port), ips) in resolve_named(&named, &dests) {
                    for (f, literal) in by_family(&ips) {
                        let matches = vec![
                            Match::Daddr(f, Addrs::Literal(literal)),
                            Match::L4 { protocol: proto, ports: vec![PortRange { first: port, last: port }] },
                        ];
                        out.push(NftRule { matches, verdict: Verdict::Accept });
                    }
                }
            }
        }
        out
    }

    /// The pods an egress rule's peers name, each with those of its
    /// addresses the peers cover. No peers: every pod, every address.
    fn peer_destinations(&mut self, peers: &[Peer]) -> Vec<(&'a PodInfo, Vec<IpAddr>)> {
        let mut dests: BTreeMap<(&str, &str), (&'a PodInfo, BTreeSet<IpAddr>)> = BTreeMap::new();
        let mut add = |pod: &'a PodInfo, ips: &mut dyn Iterator<Item = IpAddr>| {
            dests.entry((pod.namespace.as_str(), pod.name.as_str())).or_insert((pod, BTreeSet::new())).1.extend(ips);
        };
        if peers.is_empty() {
            for pod in self.pods.iter().copied() {
                add(pod, &mut pod.ips.iter().copied());
            }
        }
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for pod in self.peer_pods(namespaces, pods) {
                        add(pod, &mut pod.ips.iter().copied());
                    }
                }
                Peer::Block { cidr, except } => {
                    for pod in self.pods.iter().copied() {
                        add(pod, &mut pod.ips.iter().copied().filter(|ip| block_contains(cidr, except, *ip)));
                    }
                }
                Peer::Nothing => {}
            }
        }
        dests.into_values().filter(|(_, ips)| !ips.is_empty()).map(|(p, ips)| (p, ips.into_iter().collect())).collect()
    }
}

/// The canonical text of a namespace scope.
fn scope_key(scope: &NamespaceScope) -> String {
    match scope {
        NamespaceScope::Named(ns) => format!("ns={ns}"),
        NamespaceScope::Selected(sel) => format!("nssel={}", sel.canonical()),
    }
}

/// `ips` split by family, families without addresses left out.
fn by_family(ips: &BTreeSet<IpAddr>) -> Vec<(Family, Vec<IpAddr>)> {
    Family::ALL
        .into_iter()
        .map(|f| (f, ips.iter().copied().filter(|ip| Family::of(ip) == f).collect::<Vec<_>>()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// For named ports `named`, the destination addresses grouped by the
/// (protocol, port) the name resolves to on their pod.
fn resolve_named(
    named: &[(Protocol, &str)],
    dests: &[(&PodInfo, Vec<IpAddr>)],
) -> BTreeMap<(Protocol, u16), BTreeSet<IpAddr>> {
    let mut by_port: BTreeMap<(Protocol, u16), BTreeSet<IpAddr>> = BTreeMap::new();
    for (proto, name) in named {
        for (pod, ips) in dests {
            for port in pod.resolve(name, *proto) {
                by_port.entry((*proto, port)).or_default().extend(ips.iter().copied());
            }
        }
    }
    by_port.retain(|_, ips| !ips.is_empty());
    by_port
}

/// The match lists for a rule's numeric ports: one per protocol; `[[]]`
/// (one empty clause: any traffic) when the rule names no ports. Named
/// ports are handled apart, and invalid ports add nothing.
fn port_clauses(ports: &[Port]) -> Vec<Vec<Match>> {
    if ports.is_empty() {
        return vec![vec![]];
    }
    // Per protocol: None = every port, else the ranges.
    let mut per_proto: BTreeMap<Protocol, Option<Vec<(u16, u16)>>> = BTreeMap::new();
    for p in ports {
        match p {
            Port::Any(proto) => {
                per_proto.insert(*proto, None);
            }
            Port::Range(proto, first, last) => {
                if let Some(ranges) = per_proto.entry(*proto).or_insert_with(|| Some(Vec::new())) {
                    ranges.push((*first, *last));
                }
            }
            Port::Named(..) | Port::Nothing => {}
        }
    }
    per_proto
        .into_iter()
        .map(|(protocol, ranges)| {
            let ports = ranges.map(merge_port_ranges).unwrap_or_default();
            vec![Match::L4 { protocol, ports }]
        })
        .collect()
}

fn merge_port_ranges(mut ranges: Vec<(u16, u16)>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::new();
    for (first, last) in ranges {
        match out.last_mut() {
            Some(prev) if u32::from(first) <= u32::from(prev.last) + 1 => prev.last = prev.last.max(last),
            _ => out.push(PortRange { first, last }),
        }
    }
    out
}

/// Whether an `ipBlock` holds `ip` (never an address of the other family).
pub(crate) fn block_contains(cidr: &IpNet, except: &[IpNet], ip: IpAddr) -> bool {
    cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
}

/// An `ipBlock` as sorted, disjoint, merged ranges: the CIDR minus its
/// holes (nft interval sets have no "except", so the holes are cut here).
/// Holes of the other family hold none of the block's addresses.
fn block_ranges(cidr: IpNet, except: &[IpNet]) -> Vec<AddrRange> {
    let span = |n: IpNet| (addr_bits(n.network()).0, addr_bits(n.broadcast()).0);
    let width = addr_bits(cidr.network()).1;
    let mut ranges = vec![span(cidr)];
    for hole in except.iter().filter(|h| addr_bits(h.network()).1 == width) {
        let (hs, he) = span(*hole);
        ranges = ranges
            .into_iter()
            .flat_map(|(s, e)| {
                let mut keep = Vec::new();
                if he < s || hs > e {
                    keep.push((s, e));
                } else {
                    if hs > s {
                        keep.push((s, hs - 1));
                    }
                    if he < e {
                        keep.push((he + 1, e));
                    }
                }
                keep
            })
            .collect();
    }
    ranges
        .into_iter()
        .map(|(s, e)| AddrRange { first: addr_from_bits(s, width), last: addr_from_bits(e, width) })
        .collect()
}

/// `in_<ns>_<name>` or `eg_<ns>_<name>`: neither a namespace nor a policy
/// name can contain `_`, so the name is unique.
fn chain_name(d: Direction, ns: &str, name: &str) -> String {
    let prefix = match d {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    };
    ident(&format!("{prefix}_{ns}_{name}"))
}

/// `raw` as an nft identifier: letters, digits, `_`, `-`, `.` only, at most
/// [`MAX_NAME`] bytes. When it had to be changed, a hash of the original
/// keeps it unique.
fn ident(raw: &str) -> String {
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '-' }).collect();
    if clean == raw && raw.len() <= MAX_NAME {
        return clean;
    }
    let keep: String = clean.chars().take(MAX_NAME - 11).collect();
    format!("{keep}_{}", short_hash(raw))
}

/// 40 bits of FNV-1a, as 10 hex digits: stable across runs, builds and
/// Rust versions (std's hasher promises none of that).
pub(crate) fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:010x}", h >> 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ranges(v: &[AddrRange]) -> Vec<String> {
        v.iter().map(|r| format!("{}-{}", r.first, r.last)).collect()
    }

    #[test]
    fn policy_block_ranges_cut_holes() {
        assert_eq!(ranges(&block_ranges(net("10.0.0.0/8"), &[])), ["10.0.0.0-10.255.255.255"]);
        assert_eq!(
            ranges(&block_ranges(net("10.0.0.0/8"), &[net("10.1.0.0/16"), net("10.0.0.0/24")])),
            ["10.0.1.0-10.0.255.255", "10.2.0.0-10.255.255.255"]
        );
        assert_eq!(ranges(&block_ranges(net("0.0.0.0/0"), &[net("0.0.0.0/0")])), Vec::<String>::new());
        assert_eq!(
            ranges(&block_ranges(net("0.0.0.0/0"), &[net("255.255.255.255/32"), net("0.0.0.0/32")])),
            ["0.0.0.1-255.255.255.254"]
        );
        // A hole outside the block changes nothing.
        assert_eq!(ranges(&block_ranges(net("10.0.0.0/24"), &[net("11.0.0.0/8")])), ["10.0.0.0-10.0.0.255"]);
        // Host bits in the CIDR are ignored, as the API's parser does.
        assert_eq!(ranges(&block_ranges(net("10.0.0.7/30"), &[])), ["10.0.0.4-10.0.0.7"]);
        // IPv6, to the ends of the space.
        assert_eq!(
            ranges(&block_ranges(net("2001:db8::/32"), &[net("2001:db8:1::/48")])),
            ["2001:db8::-2001:db8:0:ffff:ffff:ffff:ffff:ffff", "2001:db8:2::-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"]
        );
        assert_eq!(
            ranges(&block_ranges(net("::/0"), &[net("::/128"), net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")])),
            ["::1-ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"]
        );
        // A hole of the other family holds none of the block.
        assert_eq!(ranges(&block_ranges(net("10.0.0.0/24"), &[net("::/0")])), ["10.0.0.0-10.0.0.255"]);
        assert_eq!(ranges(&block_ranges(net("2001:db8::/127"), &[net("0.0.0.0/0")])), ["2001:db8::-2001:db8::1"]);
    }

    #[test]
    fn policy_set_names_per_family() {
        assert_eq!(family_name("pods_x_0123456789", Family::V4), "pods_x_0123456789");
        assert_eq!(family_name("pods_x_0123456789", Family::V6), "pods6_x_0123456789");
        assert_eq!(family_name("cidr", Family::V6), "cidr6");
        assert_eq!(family_name(NODE_IPS_SET, Family::V6), "node_ips6");
        assert_eq!(family_name(ISOLATED_INGRESS_SET, Family::V6), "isolated_ingress6");
        assert_eq!(family_name(ISOLATED_EGRESS_SET, Family::V6), "isolated_egress6");
    }

    #[test]
    fn policy_port_ranges_merge() {
        let m = merge_port_ranges(vec![(90, 95), (80, 80), (81, 85), (94, 100), (200, 200)]);
        assert_eq!(
            m,
            [
                PortRange { first: 80, last: 85 },
                PortRange { first: 90, last: 100 },
                PortRange { first: 200, last: 200 }
            ]
        );
    }

    #[test]
    fn policy_identifiers() {
        assert_eq!(chain_name(Direction::Ingress, "x", "allow-web.v1"), "in_x_allow-web.v1");
        let long = "p".repeat(253);
        let a = chain_name(Direction::Egress, "x", &long);
        assert!(a.len() <= MAX_NAME && a.starts_with("eg_x_ppp"), "{a}");
        assert_ne!(a, chain_name(Direction::Egress, "x", &format!("{long}q")));
        assert_eq!(ident("a b"), format!("a-b_{}", short_hash("a b")));
        assert_eq!(short_hash("x"), short_hash("x"));
        assert_eq!(short_hash("x").len(), 10);
    }
}
