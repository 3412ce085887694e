//! GC: release every allocation (and its host veth) that belongs to no
//! attachment the runtime still holds.

use std::collections::HashSet;

use flannel_net::netlink::Netlink;

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
    let Some(store) = Store::open_existing(&conf.data_dir(), &conf.name)? else {
        return Ok(());
    };
    let store = store.with_host_local(conf.host_local_dir(), false)?;
    let stale: Vec<_> = store
        .records()?
        .into_iter()
        .filter(|r| !valid.contains(&(r.container_id.as_str(), r.ifname.as_str())))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    let host = Netlink::connect()?;
    let mut errors = Vec::new();
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
        if let Err(e) = host.del_link_by_name(&veth).await {
            errors.push(e.to_string());
            continue;
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
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::INTERNAL, format!("GC: {}", errors.join("; "))))
    }
}
