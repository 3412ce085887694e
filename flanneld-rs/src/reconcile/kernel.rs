//! The thin side of the reconcile loop: dump what we own, apply ops (one
//! netlink request each).

use flannel_net::netlink::{Netlink, NlError, NlResult, Route};
use ipnet::IpNet;

use super::plan::{Desired, Observed, Op};

/// Dumps the state of our VTEP: the device, its IPv4 addresses, the main-table
/// routes through it, and its permanent neighbours and FDB entries.
pub async fn observe(nl: &Netlink, vtep_name: &str) -> NlResult<Observed> {
    let Some(vtep) = nl.vxlan_by_name(vtep_name).await? else {
        return Ok(Observed::default());
    };
    let index = vtep.index;
    let addrs = nl.addrs(index).await?.into_iter().filter(|a| matches!(a, IpNet::V4(_))).collect();
    let routes =
        nl.routes().await?.into_iter().filter(|r| r.oif == Some(index) && matches!(r.dst, IpNet::V4(_))).collect();
    let neighs = nl.neighs(index).await?;
    let fdbs = nl.fdbs(index).await?;
    Ok(Observed { vtep: Some(vtep), addrs, routes, neighs, fdbs })
}

/// Applies `ops` in order. Keeps going past a failed op (a later reconcile
/// retries it) and returns every error; "already there" on add and "already
/// gone" on delete count as success.
pub async fn apply(nl: &Netlink, desired: &Desired, observed: &Observed, ops: &[Op]) -> Vec<NlError> {
    let name = desired.vtep.name.as_str();
    let mut index = observed.vtep.as_ref().map(|v| v.index);
    let mut errors = Vec::new();
    for op in ops {
        let result: NlResult<()> = async {
            match op {
                Op::CreateVtep | Op::RecreateVtep(_) => {
                    if matches!(op, Op::RecreateVtep(_)) {
                        nl.del_link_by_name(name).await?;
                    }
                    nl.add_vxlan(&desired.vtep).await?;
                    index = nl.link_by_name(name).await?.map(|l| l.index);
                    Ok(())
                }
                _ => {
                    let Some(idx) = index else {
                        // The device is missing and could not be created; the
                        // create's error is already reported.
                        return Ok(());
                    };
                    apply_one(nl, name, idx, op).await
                }
            }
        }
        .await;
        if let Err(e) = result {
            errors.push(e);
        }
    }
    errors
}

async fn apply_one(nl: &Netlink, name: &str, idx: u32, op: &Op) -> NlResult<()> {
    let tolerate = |r: NlResult<()>, ok_if: fn(&NlError) -> bool| match r {
        Err(e) if ok_if(&e) => Ok(()),
        other => other,
    };
    match op {
        Op::CreateVtep | Op::RecreateVtep(_) => unreachable!("handled by apply"),
        Op::SetMtu(m) => nl.set_mtu(idx, name, *m).await,
        Op::SetUp => nl.set_up(idx, name).await,
        Op::AddAddr(a) => tolerate(nl.add_addr(idx, name, *a).await, NlError::is_exists),
        Op::DelAddr(a) => tolerate(nl.del_addr(idx, name, *a).await, NlError::is_not_found),
        Op::SetNeigh(n) => nl.set_neigh(idx, name, n).await,
        Op::DelNeigh(n) => tolerate(nl.del_neigh(idx, name, n).await, NlError::is_not_found),
        Op::SetFdb(f) => nl.set_fdb(idx, name, f).await,
        Op::DelFdb(f) => tolerate(nl.del_fdb(idx, name, f).await, NlError::is_not_found),
        Op::SetRoute(r) => {
            let r = Route { oif: Some(idx), ..r.clone() };
            nl.replace_route(&r, name).await
        }
        Op::DelRoute(r) => {
            let r = Route { oif: Some(idx), ..r.clone() };
            tolerate(nl.del_route(&r, name).await, NlError::is_not_found)
        }
    }
}
