//! The thin side of the reconcile loop: dump what we own, apply ops (one
//! netlink request each).

use flannel_net::netlink::{Netlink, NlError, NlResult, Route};
use futures_util::StreamExt;
use ipnet::IpNet;
use ipnet::Ipv4Net;

use super::plan::{Desired, Observed, Op};
use super::Backend;

/// Dumps the state we own: our VTEP, its IPv4 addresses, the main-table
/// routes through it, its permanent neighbours and FDB entries, and (for
/// host-gw and `DirectRouting`) routes through the underlay to subnets of
/// `cluster` that have a next hop (for udp: such routes through any device).
pub async fn observe(nl: &Netlink, backend: &Backend, cluster: Ipv4Net) -> NlResult<Observed> {
    let all_routes = nl.routes_v4().await?;
    let underlay = backend.underlay();
    // With udp no route to a part of the Network has a next hop: any such
    // route (a host-gw or VXLAN backend's leftover, on any device) would
    // take traffic away from the data path.
    let any_device = matches!(backend, Backend::Udp(_));
    let direct = |r: &Route| {
        (any_device || r.oif == Some(underlay))
            && r.gateway.is_some()
            && matches!(r.dst, IpNet::V4(d) if cluster.contains(&d) && d.prefix_len() > cluster.prefix_len())
    };
    let link = match backend.vtep() {
        Some(vtep) => nl.vxlan_by_name(&vtep.name).await?,
        None => None,
    };
    let Some(link) = link else {
        return Ok(Observed { routes: all_routes.into_iter().filter(direct).collect(), ..Observed::default() });
    };
    let index = link.index;
    let addrs = nl.addrs(index).await?.into_iter().filter(|a| matches!(a, IpNet::V4(_))).collect();
    let routes = all_routes
        .into_iter()
        .filter(|r| (r.oif == Some(index) && matches!(r.dst, IpNet::V4(_))) || direct(r))
        .collect();
    let neighs = nl.neighs(index).await?;
    let fdbs = nl.fdbs(index).await?;
    Ok(Observed { vtep: Some(link), addrs, routes, neighs, fdbs })
}

/// Requests in flight at once within a phase. The kernel handles them one by
/// one anyway; pipelining saves the round trip between each.
const PIPELINE: usize = 64;

/// Applies `ops` in order. Consecutive ops of the same kind (a phase of the
/// plan) are pipelined: their order among themselves does not matter, and a
/// phase finishes before the next starts, so each peer's neighbour, FDB entry
/// and route still go in that order. Keeps going past a failed op (a later
/// reconcile retries it) and returns every error; "already there" on add and
/// "already gone" on delete count as success.
pub async fn apply(nl: &Netlink, desired: &Desired, observed: &Observed, ops: &[Op]) -> Vec<NlError> {
    let name = desired.vtep.as_ref().map(|v| v.name.as_str()).unwrap_or("the underlay");
    // Without a device of ours (host-gw) every route names its interface.
    let mut index = match &desired.vtep {
        Some(_) => observed.vtep.as_ref().map(|v| v.index),
        None => Some(0),
    };
    let mut errors = Vec::new();
    let mut rest = ops;
    while let Some(first) = rest.first() {
        if let Op::CreateVtep | Op::RecreateVtep(_) = first {
            let result: NlResult<()> = async {
                if matches!(first, Op::RecreateVtep(_)) {
                    nl.del_link_by_name(name).await?;
                }
                nl.add_vxlan(desired.vtep.as_ref().expect("only VXLAN plans create a device")).await?;
                index = nl.link_by_name(name).await?.map(|l| l.index);
                Ok(())
            }
            .await;
            errors.extend(result.err());
            rest = &rest[1..];
            continue;
        }
        let len = rest.iter().take_while(|op| std::mem::discriminant(*op) == std::mem::discriminant(first)).count();
        let (phase, tail) = rest.split_at(len);
        rest = tail;
        // Without a device (it could not be created) there is nothing to do;
        // the create's error is already reported.
        let Some(idx) = index else { continue };
        let results: Vec<NlResult<()>> =
            futures_util::stream::iter(phase.iter().map(|op| apply_one(nl, name, idx, op)))
                .buffer_unordered(PIPELINE)
                .collect()
                .await;
        errors.extend(results.into_iter().filter_map(Result::err));
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
        // A route without a device goes through the VTEP; direct routes name the underlay.
        Op::SetRoute(r) => {
            let r = Route { oif: r.oif.or(Some(idx)), ..r.clone() };
            nl.replace_route(&r, name).await
        }
        Op::DelRoute(r) => {
            let r = Route { oif: r.oif.or(Some(idx)), ..r.clone() };
            tolerate(nl.del_route(&r, name).await, NlError::is_not_found)
        }
    }
}
