//! GC: release every allocation (and its host veth) that belongs to no
//! attachment the runtime still holds.

use std::collections::HashSet;

use flannel_net::netlink::{Link, Netlink};

use super::veth_name;
use crate::config::NetConf;
use crate::error::{code, CniError};
use crate::ipam::Store;
use crate::masq;

/// Runs GC; reports on stderr what it released.
pub async fn run(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "network configuration: GC needs cni.dev/valid-attachments")
    })?;
    let valid: HashSet<(&str, &str)> = valid.iter().map(|a| (a.container_id.as_str(), a.ifname.as_str())).collect();
    let host = Netlink::connect()?;
    let mut errors = Vec::new();
    let store = match Store::open_existing(&conf.data_dir(), &conf.name)? {
        Some(store) => Some(store.with_host_local(conf.host_local_dir(), false)?),
        None => None,
    };
    let records = match &store {
        Some(store) => store.records()?,
        None => Vec::new(),
    };
    // One dump of the host's links serves the sweep and the stale records.
    let links = host.links().await?;
    sweep_unrecorded_veths(conf, &host, &links, &valid, &records, &mut errors).await;
    let stale: Vec<_> =
        records.into_iter().filter(|r| !valid.contains(&(r.container_id.as_str(), r.ifname.as_str()))).collect();
    let Some(store) = store.filter(|_| !stale.is_empty()) else {
        return finish(errors);
    };
    // Out of the masquerade set before the records go (see cmd::del): when
    // that fails, the masqueraded records stay for the next GC to retry.
    let masqueraded: Vec<_> = stale.iter().filter(|r| r.masq).map(|r| r.ip).collect();
    let masq_removed = match masq::apply(&masq::remove_script(&masqueraded)) {
        Ok(()) => true,
        Err(e) => {
            errors.push(e.msg);
            false
        }
    };
    for r in &stale {
        // Keep going past errors: one stuck link must not pin every other address.
        let veth = veth_name(&r.container_id, &r.ifname);
        if let Some(l) = links.iter().find(|l| l.name == veth) {
            if let Err(e) = host.del_link(l.index, &veth).await {
                errors.push(e.to_string());
                continue;
            }
        }
        if r.masq && !masq_removed {
            continue;
        }
        if let Err(e) = store.release_record(r) {
            errors.push(e.to_string());
            continue;
        }
        // The configuration saved for a rollback (see delegate::save_for_rollback).
        if let Err(e) = crate::delegate::remove_saved(&conf.data_dir(), &r.container_id) {
            errors.push(e.msg);
        }
        eprintln!("flannel: GC released {} of {}/{}", r.ip, r.container_id, r.ifname);
    }
    finish(errors)
}

fn finish(errors: Vec<String>) -> Result<(), CniError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::INTERNAL, format!("GC: {}", errors.join("; "))))
    }
}

/// Deletes host veths of ours (among `links`) that no valid attachment and
/// no record accounts for (a stale record's veth goes with its record).
/// ADD writes the record before it makes the veth, but DEL releases the
/// address before the detached child deletes the veth (see `cmd::del`), so
/// a DEL killed in between leaves a veth without a record; a retried DEL of
/// the attachment deletes it (by its derived name), and GC catches the
/// rest. Only links that are certainly ours: veths named as [`veth_name`]
/// names them (`veth` and 11 hex digits; the bridge plugin's are `veth` and
/// 8), on this network's bridge or on none (a DEL detaches its veth before
/// the deletion). A bridge shared by two networks of ours would lose the
/// other network's veths here: each network needs a bridge of its own, as
/// with the reference plugins' GC.
async fn sweep_unrecorded_veths(
    conf: &NetConf,
    host: &Netlink,
    links: &[Link],
    valid: &HashSet<(&str, &str)>,
    records: &[crate::ipam::Record],
    errors: &mut Vec<String>,
) {
    let bridge_name = conf.delegate.bridge.as_deref().unwrap_or(crate::config::DEFAULT_BRIDGE);
    let Some(bridge) = links.iter().find(|l| l.name == bridge_name).map(|l| l.index) else {
        // No bridge: every pod veth was made on it, so none is left.
        return;
    };
    let accounted: HashSet<String> = valid
        .iter()
        .map(|(id, ifname)| veth_name(id, ifname))
        .chain(records.iter().map(|r| veth_name(&r.container_id, &r.ifname)))
        .collect();
    for l in links {
        let ours = is_our_veth_name(&l.name)
            && l.kind.as_deref() == Some("veth")
            && (l.master == Some(bridge) || l.master.is_none());
        if !ours || accounted.contains(&l.name) {
            continue;
        }
        match host.del_link(l.index, &l.name).await {
            Ok(_) => eprintln!("flannel: GC deleted veth {} (no valid attachment and no address record)", l.name),
            Err(e) => errors.push(e.to_string()),
        }
    }
}

/// `veth` and 11 lowercase hex digits: what [`veth_name`] makes.
fn is_our_veth_name(name: &str) -> bool {
    name.len() == 15
        && name.starts_with("veth")
        && name[4..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_veth_name_makes_are_ours() {
        assert!(is_our_veth_name(&veth_name("abc", "eth0")));
        for other in ["veth1234abcd", "vethABCDEF01234", "veth0123456789a0", "cni0", "eth0", "vethxyz45678901"] {
            assert!(!is_our_veth_name(other), "{other}");
        }
    }
}
