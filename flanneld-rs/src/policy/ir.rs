//! The compiled ruleset as data: named address sets, chains and rules in
//! nftables' own terms. [`Ruleset::render`] prints it for `nft -f`;
//! [`Ruleset::evaluate`] runs a packet through it the way the kernel would,
//! so tests can check what the rules do without a kernel.
//!
//! One `inet` table serves both address families: a set holds addresses of
//! one family (nft's set types are `ipv4_addr` or `ipv6_addr`), and an
//! address match names its family (`ip saddr` or `ip6 saddr`), which also
//! makes it match only packets of that family.

use std::net::IpAddr;

use super::model::Protocol;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4 (`ip`, `ipv4_addr`).
    V4,
    /// IPv6 (`ip6`, `ipv6_addr`).
    V6,
}

impl Family {
    /// Both, in the order rules and sets are emitted.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// An inclusive range of addresses of one family (one address when both
/// ends are equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    /// The first address.
    pub first: IpAddr,
    /// The last address (same family as `first`).
    pub last: IpAddr,
}

impl AddrRange {
    /// A single address.
    pub fn one(a: IpAddr) -> AddrRange {
        AddrRange { first: a, last: a }
    }

    /// Whether `a` is in the range (never, for an address of the other family).
    pub fn contains(&self, a: IpAddr) -> bool {
        Family::of(&a) == Family::of(&self.first) && self.first <= a && a <= self.last
    }

    /// The range's family.
    pub fn family(&self) -> Family {
        Family::of(&self.first)
    }
}

/// A named set of addresses of one family (`set NAME { type ipv4_addr; ... }`
/// or `ipv6_addr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSet {
    /// The set's name.
    pub name: String,
    /// The family of its elements.
    pub family: Family,
    /// `flags interval`: elements may be ranges and prefixes.
    pub interval: bool,
    /// Sorted, disjoint elements, all of `family`.
    pub elements: Vec<AddrRange>,
}

impl NamedSet {
    /// Whether `a` is an element.
    pub fn contains(&self, a: IpAddr) -> bool {
        // Elements are sorted and disjoint: the last one starting at or
        // before `a` is the only candidate.
        let i = self.elements.partition_point(|r| r.first <= a);
        i > 0 && self.elements[i - 1].contains(a)
    }
}

/// Where an address match looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addrs {
    /// A named set of the table (`@name`).
    Set(String),
    /// Literal addresses (`10.0.0.1` or an anonymous set `{ a, b }`), all
    /// of the family of the match that holds them. Never empty.
    Literal(Vec<IpAddr>),
}

/// An inclusive port range (one port when both ends are equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port.
    pub last: u16,
}

/// One match of a rule; a rule matches when all of its matches do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ct state established,related`.
    Established,
    /// `ip saddr ...` or `ip6 saddr ...`: the packet is of that family and
    /// its source is in the set.
    Saddr(Family, Addrs),
    /// `ip daddr ...` or `ip6 daddr ...`.
    Daddr(Family, Addrs),
    /// `meta l4proto P` when `ports` is empty, else `P dport { ... }`.
    L4 {
        /// The protocol.
        protocol: Protocol,
        /// Destination ports (sorted, disjoint); empty: any.
        ports: Vec<PortRange>,
    },
    /// An ICMPv6 neighbour-discovery or router message (types 133 to 137:
    /// router solicitation and advertisement, neighbour solicitation and
    /// advertisement, redirect) with hop limit 255, which only a packet
    /// that was never routed has (RFC 4861: receivers discard any other).
    NeighbourDiscovery,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ends this base chain's evaluation; later base chains still run.
    Accept,
    /// Drops the packet.
    Drop,
    /// Runs the named chain; when it ends without a verdict, continues here.
    Jump(String),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// All must match (none: always).
    pub matches: Vec<Match>,
    /// Applied when they do.
    pub verdict: Verdict,
}

/// A chain: a base chain on the forward hook, or a regular chain reached by
/// `jump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The chain's name.
    pub name: String,
    /// For a base chain: `type filter hook forward priority filter + N;
    /// policy accept;` with N this offset.
    pub base_priority: Option<i32>,
    /// The rules, in order.
    pub rules: Vec<NftRule>,
}

/// The whole policy ruleset of one node, the body of the `inet` table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Named sets, sorted by name.
    pub sets: Vec<NamedSet>,
    /// Base chains first, in priority order, then regular chains by name.
    pub chains: Vec<Chain>,
    /// What the conversion ignored, and why.
    pub notes: Vec<String>,
}

/// A packet, for [`Ruleset::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family).
    pub dst: IpAddr,
    /// L4 protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// Whether conntrack sees it as part of an established (or related)
    /// connection, as a reply is.
    pub established: bool,
    /// Whether it is an ICMPv6 neighbour-discovery or router message that
    /// was not routed ([`Match::NeighbourDiscovery`]); `protocol` and `port`
    /// are then meaningless.
    pub nd: bool,
}

impl Packet {
    /// The first packet of a new connection.
    pub fn new(src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> Packet {
        Packet { src, dst, protocol, port, established: false, nd: false }
    }

    /// A neighbour solicitation or advertisement, router solicitation or
    /// advertisement, or redirect from `src` to `dst`.
    pub fn neighbour_discovery(src: IpAddr, dst: IpAddr) -> Packet {
        Packet { nd: true, ..Packet::new(src, dst, Protocol::Tcp, 0) }
    }
}

/// How a chain ended.
enum Outcome {
    Accept,
    Drop,
    Return,
}

impl Ruleset {
    /// A set by name.
    pub fn set(&self, name: &str) -> Option<&NamedSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// A chain by name.
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Whether the forward hook lets `p` through: every base chain runs in
    /// priority order; `accept` ends only the chain it is in, `drop` is
    /// final, and a base chain's policy is accept. Panics on a reference to
    /// a set or chain that does not exist (nft would refuse the ruleset).
    pub fn evaluate(&self, p: &Packet) -> bool {
        let mut bases: Vec<&Chain> = self.chains.iter().filter(|c| c.base_priority.is_some()).collect();
        bases.sort_by_key(|c| c.base_priority);
        bases.iter().all(|c| !matches!(self.run(c, p, 0), Outcome::Drop))
    }

    fn run(&self, chain: &Chain, p: &Packet, depth: usize) -> Outcome {
        assert!(depth < 16, "jump depth at chain {}", chain.name);
        for rule in &chain.rules {
            if !rule.matches.iter().all(|m| self.matches(m, p)) {
                continue;
            }
            match &rule.verdict {
                Verdict::Accept => return Outcome::Accept,
                Verdict::Drop => return Outcome::Drop,
                Verdict::Jump(to) => {
                    let target = self.chain(to).unwrap_or_else(|| panic!("jump to missing chain {to}"));
                    match self.run(target, p, depth + 1) {
                        Outcome::Return => {}
                        verdict => return verdict,
                    }
                }
            }
        }
        Outcome::Return
    }

    fn matches(&self, m: &Match, p: &Packet) -> bool {
        match m {
            Match::Established => p.established,
            Match::Saddr(f, a) => Family::of(&p.src) == *f && self.addrs_contain(a, p.src),
            Match::Daddr(f, a) => Family::of(&p.dst) == *f && self.addrs_contain(a, p.dst),
            Match::L4 { protocol, ports } => {
                !p.nd
                    && *protocol == p.protocol
                    && (ports.is_empty() || ports.iter().any(|r| r.first <= p.port && p.port <= r.last))
            }
            Match::NeighbourDiscovery => p.nd,
        }
    }

    fn addrs_contain(&self, a: &Addrs, ip: IpAddr) -> bool {
        match a {
            Addrs::Set(name) => self.set(name).unwrap_or_else(|| panic!("missing set {name}")).contains(ip),
            Addrs::Literal(ips) => ips.contains(&ip),
        }
    }
}
