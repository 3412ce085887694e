//! Masquerade and forward rules, where flannel keeps them.
//!
//! By default (`EnableNFTables` absent or false) they are flannel v0.20.2's
//! iptables objects ([`iptables`]): the chains `FLANNEL-POSTRTG` (table nat)
//! and `FLANNEL-FWD` (table filter), each with a jump from the built-in
//! chain at its top; with `"EnableNFTables": true` they are current
//! flannel's nftables tables `ip flannel-ipv4` and `ip6 flannel-ipv6`
//! ([`nftables`]). The same chains, rules, comments and order as flannel's,
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

use ipnet::Ipv4Net;

use crate::config::NetworkConfig;

/// What the rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallSpec {
    /// The cluster network N.
    pub network: Ipv4Net,
    /// This node's subnet P.
    pub subnet: Ipv4Net,
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
    /// The rules the flags and the network configuration ask for, for our `subnet`.
    pub fn from_opts(opts: &crate::flags::Opts, cfg: &NetworkConfig, subnet: Ipv4Net) -> FirewallSpec {
        FirewallSpec {
            network: cfg.network,
            subnet,
            masquerade: opts.ip_masq,
            fully_random: !opts.ip_masq_fully_random_disable,
            forward: opts.iptables_forward_rules,
            nftables: cfg.enable_nftables,
        }
    }

    /// Where the rules live, in words.
    pub fn describe(&self) -> &'static str {
        if self.nftables {
            "nftables tables ip flannel-ipv4 and ip6 flannel-ipv6"
        } else {
            "iptables chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter)"
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

/// The differences in the setting's own objects (not the leftovers).
pub fn check(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    if s.nftables {
        nftables::check(s)
    } else {
        Ok(iptables::plan(s, &iptables::observe(s.masquerade || s.forward)?, false).problems)
    }
}

/// What the other setting or an earlier flanneld-rs left on the node.
pub fn leftovers(s: &FirewallSpec) -> Result<Vec<Problem>, String> {
    let mut out = legacy::find()?;
    if s.nftables {
        out.extend(iptables::plan(&iptables::nothing(s), &iptables::observe(false)?, false).problems);
    } else {
        out.extend(nftables::find_tables()?);
    }
    Ok(out)
}

/// Start-up: writes the setting's objects in one transaction whatever is
/// there (as flannel does at its start: its jumps go back to the top of the
/// built-in chains), then removes the leftovers. Returns what it changed.
pub fn setup(s: &FirewallSpec) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    if s.nftables {
        nftables::apply(s)?;
        done.push(format!("{} written", s.describe()));
        let old = iptables::plan(&iptables::nothing(s), &iptables::observe(false)?, false);
        if let Some(payload) = &old.restore {
            iptables::restore(payload).map_err(|e| format!("remove iptables chains of flannel: {e}"))?;
            done.extend(old.problems.into_iter().map(|p| format!("removed: {}", p.what)));
        }
    } else {
        let have = iptables::observe(s.masquerade || s.forward)?;
        let p = iptables::plan(s, &have, true);
        if let Some(payload) = &p.restore {
            iptables::restore(payload)?;
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
        Ok(problems)
    } else {
        let p = iptables::plan(s, &iptables::observe(s.masquerade || s.forward)?, false);
        if let Some(payload) = &p.restore {
            iptables::restore(payload)?;
        }
        Ok(p.problems)
    }
}
