//! Masquerade and forward rules, where flannel keeps them.
//!
//! By default (`EnableNFTables` absent or false) they are flannel v0.20.2's
//! iptables objects ([`iptables`]): the chains `FLANNEL-POSTRTG` (table nat)
//! and `FLANNEL-FWD` (table filter), each with a jump from the built-in
//! chain at its top; with `"EnableNFTables": true` they are current
//! flannel's nftables tables `ip flannel-ipv4` and `ip6 flannel-ipv6`
//! ([`nftables`]). IPv6 gets the same objects for the IPv6 network: the
//! chains in ip6tables, or the chains of `ip6 flannel-ipv6`. The same
//! chains, rules, comments and order as flannel's,
//! so that scripts, monitoring and flannel itself find them; what we add is
//! that every change is one transaction (`iptables-restore --noflush`,
//! `nft -f`), that the resync re-asserts the exact content (not only the
//! presence of each rule), and that `diagnose` names what differs.
//!
//! A node where flannel ran keeps its objects: they are ours to rewrite in
//! place, with no moment without masquerade. What the other setting, or an
//! earlier flanneld-rs ([`legacy`]), left behind is removed at start, after
//! ours are in place.

pub mod iptables;
pub mod legacy;
pub mod nftables;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetworkConfig;

/// The IPv4 part: the cluster network N and this node's subnet P.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Rules {
    /// The cluster network N (`Network`).
    pub network: Ipv4Net,
    /// This node's subnet P.
    pub subnet: Ipv4Net,
}

/// The IPv6 part: the cluster network and this node's IPv6 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Rules {
    /// The IPv6 cluster network (`IPv6Network`).
    pub network: Ipv6Net,
    /// This node's IPv6 subnet.
    pub subnet: Ipv6Net,
}

/// What the rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallSpec {
    /// The IPv4 part; `None` in an IPv6-only cluster (no IPv4 rules then,
    /// and ours from an earlier configuration are removed).
    pub ipv4: Option<Ipv4Rules>,
    /// The IPv6 part; `None` without IPv6 (ours from an earlier
    /// configuration are removed).
    pub ipv6: Option<Ipv6Rules>,
    /// `--ip-masq`.
    pub masquerade: bool,
    /// Not `--ip-masq-fully-random-disable`.
    pub fully_random: bool,
    /// `--iptables-forward-rules`.
    pub forward: bool,
    /// `EnableNFTables` in the network configuration.
    pub nftables: bool,
}

impl FirewallSpec {
    /// The rules the flags and the network configuration ask for, for our
    /// lease `own`: a part per family the cluster runs (no IPv4 part in an
    /// IPv6-only cluster, no IPv6 part without `EnableIPv6`).
    pub fn from_opts(opts: &crate::flags::Opts, cfg: &NetworkConfig, own: &crate::lease::Lease) -> FirewallSpec {
        FirewallSpec {
            ipv4: cfg.ipv4.zip(own.subnet4()).map(|(c4, subnet)| Ipv4Rules { network: c4.network, subnet }),
            ipv6: cfg.ipv6.zip(own.subnet6()).map(|(c6, subnet)| Ipv6Rules { network: c6.network, subnet }),
            masquerade: opts.ip_masq,
            fully_random: !opts.ip_masq_fully_random_disable,
            forward: opts.iptables_forward_rules,
            nftables: cfg.enable_nftables,
        }
    }

    /// Where the rules live, in words.
    pub fn describe(&self) -> &'static str {
        match (self.nftables, self.ipv4.is_some(), self.ipv6.is_some()) {
            (true, _, _) => "nftables tables ip flannel-ipv4 and ip6 flannel-ipv6",
            (false, true, true) => "iptables and ip6tables chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter)",
            (false, false, _) => "ip6tables chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter)",
            (false, true, false) => "iptables chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter)",
        }
    }
}

/// One difference between the node and what the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `missing`, `wrong` or `stale` (as diagnose's findings).
    pub kind: &'static str,
    /// What differs, naming the chain or table and the rule as the tools print it.
    pub what: String,
}

impl Problem {
    fn missing(what: String) -> Problem {
        Problem { kind: "missing", what }
    }
    fn wrong(what: String) -> Problem {
        Problem { kind: "wrong", what }
    }
    fn stale(what: String) -> Problem {
        Problem { kind: "stale", what }
    }
}

/// Whether family `f`'s iptables tools are needed (not only looked at).
fn needs(s: &FirewallSpec, f: iptables::Family) -> bool {
    let here = match f {
        iptables::Family::V4 => s.ipv4.is_some(),
        iptables::Family::V6 => s.ipv6.is_some(),
    };
    here && (s.masquerade || s.forward)
}

/// The differences in the setting's own objects (not the leftovers).
pub fn check(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    if s.nftables {
        return nftables::check(s);
    }
    let mut out = Vec::new();
    for f in iptables::FAMILIES {
        out.extend(iptables::plan(s, f, &iptables::observe(f, needs(s, f))?, false).problems);
    }
    Ok(out)
}

/// What the other setting or an earlier flanneld-rs left on the node.
pub fn leftovers(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    let mut out = legacy::find()?;
    if s.nftables {
        for f in iptables::FAMILIES {
            out.extend(iptables::plan(&iptables::nothing(s), f, &iptables::observe(f, false)?, false).problems);
        }
    } else {
        out.extend(nftables::find_tables()?);
    }
    Ok(out)
}

/// Start-up: writes the setting's objects, one transaction per family,
/// whatever is there (as flannel does at its start: its jumps go back to
/// the top of the built-in chains), then removes the leftovers. Returns
/// what it changed.
pub fn setup(s: &FirewallSpec) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    if s.nftables {
        nftables::apply(s)?;
        done.push(format!("{} written", s.describe()));
        for f in iptables::FAMILIES {
            let old = iptables::plan(&iptables::nothing(s), f, &iptables::observe(f, false)?, false);
            if let Some(payload) = &old.restore {
                iptables::restore(f, payload).map_err(|e| format!("remove {} chains of flannel: {e}", f.tool()))?;
                done.extend(old.problems.into_iter().map(|p| format!("removed: {}", p.what)));
            }
        }
    } else {
        let mut wrote = false;
        for f in iptables::FAMILIES {
            let p = iptables::plan(s, f, &iptables::observe(f, needs(s, f))?, true);
            if let Some(payload) = &p.restore {
                iptables::restore(f, payload)?;
                if needs(s, f) {
                    wrote = true;
                }
                // Chains of a family the configuration no longer has.
                done.extend(
                    p.problems.into_iter().filter(|p| p.kind == "stale").map(|p| format!("removed: {}", p.what)),
                );
            }
        }
        if wrote {
            done.push(format!("{} written", s.describe()));
        }
        let tables = nftables::find_tables()?;
        if !tables.is_empty() {
            nftables::remove_tables()?;
            done.extend(tables.into_iter().map(|p| format!("removed: {}", p.what)));
        }
    }
    let old = legacy::find()?;
    if !old.is_empty() {
        legacy::remove()?;
        done.extend(old.into_iter().map(|p| format!("removed: {}", p.what)));
    }
    Ok(done)
}

/// The resync: rewrites the setting's objects when they differ from the
/// spec; returns what differed (empty when nothing did).
pub fn ensure(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    if s.nftables {
        let problems = nftables::check(s)?;
        if !problems.is_empty() {
            nftables::apply(s)?;
        }
        return Ok(problems);
    }
    let mut out = Vec::new();
    for f in iptables::FAMILIES {
        let p = iptables::plan(s, f, &iptables::observe(f, needs(s, f))?, false);
        if let Some(payload) = &p.restore {
            iptables::restore(f, payload)?;
        }
        out.extend(p.problems);
    }
    Ok(out)
}
