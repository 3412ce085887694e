//! The thin side of the reconcile loop: dump what we own, apply ops (the
//! device's one netlink request each, the peers' entries many per system
//! call).

use flannel_net::netlink::{BulkOp, Netlink, NlError, NlResult, Route};
use futures_util::StreamExt;
use ipnet::IpNet;
use ipnet::Ipv4Net;

use super::plan::{Desired, Device, Observed, Op};

/// Which routes with a next hop into the cluster network, besides those
/// through our device, are ours to keep in line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// None (only routes through our device are ours).
    None,
    /// Those through the underlay interface with this index (host-gw, and
    /// VXLAN's `DirectRouting`).
    Underlay(u32),
    /// Those through any device (udp: any such route takes traffic away from
    /// its data path).
    AnyDevice,
}

/// Dumps the state we own in `cluster`'s family: our device (`device`, by
/// name), its addresses, the main-table routes through it, its permanent
/// neighbours and FDB entries, the routes `sweep` names to subnets of
/// `cluster`, and whether `blackhole <blackhole>` is there (when asked).
pub async fn observe(
    nl: &Netlink,
    device: Option<&str>,
    sweep: Sweep,
    cluster: IpNet,
    blackhole: Option<Ipv4Net>,
) -> NlResult<Observed> {
    let v6 = matches!(cluster, IpNet::V6(_));
    let same_family = |a: &IpNet| matches!(a, IpNet::V6(_)) == v6;
    let (all_routes, blackholes) = nl.routes_and_blackholes(v6).await?;
    let blackhole = blackhole.is_some_and(|b| blackholes.contains(&IpNet::V4(b)));
    let direct = |r: &Route| {
        let ours = match sweep {
            Sweep::None => false,
            Sweep::Underlay(u) => r.oif == Some(u),
            Sweep::AnyDevice => true,
        };
        ours && r.gateway.is_some() && cluster.contains(&r.dst) && r.dst.prefix_len() > cluster.prefix_len()
    };
    let link = match device {
        Some(name) => nl.vxlan_by_name(name).await?,
        None => None,
    };
    let Some(link) = link else {
        return Ok(Observed {
            routes: all_routes.into_iter().filter(direct).collect(),
            blackhole,
            ..Observed::default()
        });
    };
    let index = link.index;
    // IPv6 devices also hold a link-local address, which is the kernel's.
    let addrs: Vec<IpNet> = nl
        .addrs(index)
        .await?
        .into_iter()
        .filter(|a| same_family(a) && !matches!(a, IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80))
        .collect();
    // The kernel's own IPv6 routes through the device (fe80::/64, multicast)
    // are not in the cluster network; only those into it are ours. Nor is
    // the prefix route IPv6 adds for our own <subnet>/128 address (no next
    // hop, proto kernel): it is the kernel's, like fe80::/64, and counting it
    // made every reconcile try to delete it and `diagnose` call it stale.
    let own_prefix = |r: &Route| v6 && r.gateway.is_none() && addrs.iter().any(|a| a.trunc() == r.dst);
    let routes = all_routes
        .into_iter()
        .filter(|r| {
            (r.oif == Some(index) && same_family(&r.dst) && (!v6 || cluster.contains(&r.dst)) && !own_prefix(r))
                || direct(r)
        })
        .collect();
    // A TUN has no neighbours or FDB entries: two dumps per reconcile saved.
    let (neighs, fdbs) = if link.kind.as_deref() == Some("tun") {
        (Vec::new(), Vec::new())
    } else {
        (nl.neighs_of(index, v6).await?, nl.fdbs(index).await?)
    };
    Ok(Observed { device: Some(link), addrs, routes, neighs, fdbs, blackhole })
}

/// Requests in flight at once within a phase of the device's ops (the
/// peers' entries go in batches instead). The kernel handles them one by one
/// anyway; pipelining saves the round trip between each.
const PIPELINE: usize = 64;

/// Applies `ops` in order. Consecutive ops of the same kind (a phase of the
/// plan) go together: their order among themselves does not matter, and a
/// phase finishes before the next starts, so each peer's neighbour, FDB entry
/// and route still go in that order. The peers' entries (neighbours, FDB
/// entries, routes) go many per system call ([`Netlink::apply_bulk`]); the
/// device's few ops are pipelined one request each. Keeps going past a failed op (a later
/// reconcile retries it) and returns every error; "already there" on add and
/// "already gone" on delete count as success.
pub async fn apply(nl: &Netlink, desired: &Desired, observed: &Observed, ops: &[Op]) -> Vec<NlError> {
    let name = desired.device.as_ref().map(|d| d.name()).unwrap_or("the underlay");
    // Without a device of ours (host-gw) every route names its interface.
    let mut index = match &desired.device {
        Some(_) => observed.device.as_ref().map(|v| v.index),
        None => Some(0),
    };
    let mut errors = Vec::new();
    let mut rest = ops;
    while let Some(first) = rest.first() {
        if let Op::CreateDevice | Op::RecreateDevice(_) = first {
            let result: NlResult<()> = async {
                if matches!(first, Op::RecreateDevice(_)) {
                    nl.del_link_by_name(name).await?;
                }
                match desired.device.as_ref().expect("only plans with a device create one") {
                    Device::Vxlan(spec) => {
                        nl.add_vxlan(spec).await?;
                        index = nl.link_by_name(name).await?.map(|l| l.index);
                    }
                    // A TUN is made by the data path that owns its queues
                    // (the driver starts it before applying); without it
                    // there is nothing to apply to.
                    Device::Tun(_) => index = None,
                }
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
        // Without a device (it could not be created) there is nothing to do
        // on it; the create's error is already reported. The blackhole route
        // is not on a device.
        let blackhole = matches!(first, Op::AddBlackhole(_) | Op::DelBlackhole(_));
        let Some(idx) = index.or(blackhole.then_some(0)) else { continue };
        let t = std::time::Instant::now();
        let results: Vec<NlResult<()>> = if bulk_op(first, idx).is_some() {
            apply_bulk(nl, name, idx, phase)
        } else {
            futures_util::stream::iter(phase.iter().map(|op| apply_one(nl, name, idx, op)))
                .buffer_unordered(PIPELINE)
                .collect()
                .await
        };
        if phase.len() > 1000 {
            log::debug!("apply: {} x {} in {:.1} ms", phase.len(), first.kind(), t.elapsed().as_secs_f64() * 1000.0);
        }
        errors.extend(results.into_iter().filter_map(Result::err));
    }
    errors
}

/// Phases of at least this many ops are applied off the async workers
/// (`block_in_place`): the kernel takes about a millisecond per hundred
/// routes, and the other tasks (the store's watch, metrics) should not wait
/// behind it. Smaller ones (an incremental run's) cost less than the move.
const BLOCK_IN_PLACE_AT: usize = 64;

/// Applies a phase of peers' entries in batches, with each op's errors
/// tolerated as for every op ([`tolerate`]).
fn apply_bulk(nl: &Netlink, name: &str, idx: u32, phase: &[Op]) -> Vec<NlResult<()>> {
    let ops: Vec<BulkOp> = phase.iter().map(|op| bulk_op(op, idx).expect("a phase of one kind")).collect();
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let results = if multi_thread && ops.len() >= BLOCK_IN_PLACE_AT {
        tokio::task::block_in_place(|| nl.apply_bulk(idx, name, &ops))
    } else {
        nl.apply_bulk(idx, name, &ops)
    };
    results.into_iter().zip(phase).map(|(r, op)| tolerate(op, r)).collect()
}

/// The batch form of a peer's entry op (`None` for the device's ops); a
/// route without a device goes through the VTEP (`idx`), direct routes name
/// the underlay.
fn bulk_op(op: &Op, idx: u32) -> Option<BulkOp> {
    let through = |r: &Route| Route { oif: r.oif.or(Some(idx)), ..r.clone() };
    Some(match op {
        Op::SetNeigh(n) => BulkOp::SetNeigh(*n),
        Op::DelNeigh(n) => BulkOp::DelNeigh(*n),
        Op::SetFdb(f) => BulkOp::SetFdb(*f),
        Op::DelFdb(f) => BulkOp::DelFdb(*f),
        Op::SetRoute(r) => BulkOp::ReplaceRoute(through(r)),
        Op::DelRoute(r) => BulkOp::DelRoute(through(r)),
        _ => return None,
    })
}

/// `op`'s result with the errors that mean its intent holds taken as
/// success: "already there" on add, "already gone" on delete.
fn tolerate(op: &Op, r: NlResult<()>) -> NlResult<()> {
    let ok_if: fn(&NlError) -> bool = match op {
        Op::AddAddr(_) => NlError::is_exists,
        Op::DelAddr(_) | Op::DelNeigh(_) | Op::DelFdb(_) | Op::DelRoute(_) | Op::DelBlackhole(_) => {
            NlError::is_not_found
        }
        _ => return r,
    };
    match r {
        Err(e) if ok_if(&e) => Ok(()),
        other => other,
    }
}

async fn apply_one(nl: &Netlink, name: &str, idx: u32, op: &Op) -> NlResult<()> {
    let r = match op {
        Op::CreateDevice | Op::RecreateDevice(_) => unreachable!("handled by apply"),
        Op::SetMtu(m) => nl.set_mtu(idx, name, *m).await,
        Op::SetUp => nl.set_up(idx, name).await,
        Op::SetTxChecksum(on) => nl.set_tx_checksum(name, *on),
        Op::AddAddr(a) => nl.add_addr(idx, name, *a).await,
        Op::DelAddr(a) => nl.del_addr(idx, name, *a).await,
        Op::SetNeigh(_) | Op::DelNeigh(_) | Op::SetFdb(_) | Op::DelFdb(_) | Op::SetRoute(_) | Op::DelRoute(_) => {
            unreachable!("applied in batches")
        }
        Op::AddBlackhole(n) => nl.add_blackhole_route(IpNet::V4(*n)).await,
        Op::DelBlackhole(n) => nl.del_blackhole_route(IpNet::V4(*n)).await,
    };
    tolerate(op, r)
}
