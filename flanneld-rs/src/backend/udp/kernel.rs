//! The kernel side of `flannel0`: MTU, address `<subnet>.0/32`, up, and a
//! route to the whole Network through it, the objects flannel's udp mode
//! creates. They go through the reconcile loop's one plan (observe, plan,
//! apply), here for the device alone, so that the data path's start-up, the
//! daemon's self-healing and `diagnose` are the same code.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;
use ipnet::IpNet;

use crate::reconcile::kernel::{self, Sweep};
use crate::reconcile::plan::{self, Desired, Device, Op, TunSpec};

/// What `flannel0` must look like.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device name.
    pub name: String,
    /// Our lease; the device gets its network address with a /32 (IPv6, as
    /// wireguard's `flannel-wg-v6` has it: a /128).
    pub subnet: IpNet,
    /// The whole Network, routed through the device.
    pub network: IpNet,
    /// MTU (underlay - 28).
    pub mtu: u32,
    /// The route's scope: global for udp (as flannel's udp backend makes
    /// it), link for wireguard (as flannel's wireguard backend does).
    pub route_scope: flannel_net::netlink::Scope,
}

impl DeviceSpec {
    /// `<subnet>.0/32`: a /32 so that the kernel adds no subnet or broadcast
    /// route for it; it is the source of the node's own traffic into the
    /// overlay.
    pub fn address(&self) -> IpNet {
        crate::reconcile::desired::vtep_addr(self.subnet)
    }

    /// The device alone, as the plan wants it.
    pub fn desired(&self) -> Desired {
        Desired {
            device: Some(Device::Tun(TunSpec { name: self.name.clone(), mtu: self.mtu })),
            addr: Some(self.address()),
            peers: BTreeMap::new(),
            tunnel: BTreeMap::new(),
            routes: vec![flannel_net::netlink::Route {
                dst: self.network,
                gateway: None,
                oif: None,
                onlink: false,
                scope: self.route_scope,
            }],
            blackhole: None,
        }
    }
}

/// Brings the device in line with `spec` and says what it changed, in `ip`
/// words. Fails when the device does not exist (the TUN queues own it; the
/// data path must be restarted to recreate it).
pub async fn ensure(nl: &Netlink, spec: &DeviceSpec) -> anyhow::Result<Vec<String>> {
    let want = spec.desired();
    let have = kernel::observe(nl, Some(&spec.name), Sweep::None, spec.network, None).await?;
    if have.device.is_none() {
        bail!("device {} is gone: restart the udp data path to recreate it", spec.name);
    }
    let ops = plan::plan(&want, &have);
    if let Some(Op::RecreateDevice(why)) = ops.first() {
        bail!("device {}: {}", spec.name, why.join("; "));
    }
    let errors = kernel::apply(nl, &want, &have, &ops).await;
    if let Some(e) = errors.into_iter().next() {
        return Err(e).with_context(|| format!("bring {} in line", spec.name));
    }
    Ok(ops.iter().map(|op| op.as_ip(&spec.name)).collect())
}

/// Runs [`ensure`] inside `ns` from any thread (also from inside a tokio
/// runtime): on a short-lived thread with its own small runtime, and a
/// netlink socket opened in `ns`.
pub fn ensure_in(ns: &NetNs, spec: &DeviceSpec) -> anyhow::Result<Vec<String>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let nl = Netlink::connect_in(ns)?;
                ensure(&nl, spec).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("netlink thread panicked")))
    })
}

/// Deletes the device (`ip link del`), inside `ns`; true if it existed.
pub fn delete_in(ns: &NetNs, name: &str) -> anyhow::Result<bool> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let nl = Netlink::connect_in(ns)?;
                Ok(nl.del_link_by_name(name).await?)
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("netlink thread panicked")))
    })
}
