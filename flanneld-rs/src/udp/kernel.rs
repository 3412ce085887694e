//! The kernel side of `flannel0`, through the netlink facade: MTU, address
//! `<subnet>.0/32`, up, and a route to the whole Network through it, the
//! objects flannel's udp mode creates. Checked and repaired as a whole, so
//! start-up and self-healing are the same code.

use anyhow::Context;
use flannel_net::netlink::{Netlink, Route};
use flannel_net::netns::NetNs;
use ipnet::{IpNet, Ipv4Net};

/// What `flannel0` must look like.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device name.
    pub name: String,
    /// Our lease; the device gets its network address with a /32.
    pub subnet: Ipv4Net,
    /// The whole Network, routed through the device.
    pub network: Ipv4Net,
    /// MTU (underlay - 28).
    pub mtu: u32,
}

impl DeviceSpec {
    /// `<subnet>.0/32`: a /32 so that the kernel adds no subnet or broadcast
    /// route for it; it is the source of the node's own traffic into the
    /// overlay.
    pub fn address(&self) -> Ipv4Net {
        Ipv4Net::new(self.subnet.network(), 32).expect("32 is a valid prefix")
    }
}

/// Brings the device in line with `spec` and says what it changed, in `ip`
/// words. Fails when the device does not exist (the TUN queues own it; the
/// data path must be restarted to recreate it).
pub async fn ensure(nl: &Netlink, spec: &DeviceSpec) -> anyhow::Result<Vec<String>> {
    let name = &spec.name;
    let mut fixed = Vec::new();
    let link = nl
        .link_by_name(name)
        .await?
        .with_context(|| format!("device {name} is gone: restart the udp data path to recreate it"))?;
    let index = link.index;
    if link.mtu != spec.mtu {
        nl.set_mtu(index, name, spec.mtu).await?;
        fixed.push(format!("ip link set {name} mtu {} (was {})", spec.mtu, link.mtu));
    }
    let want = IpNet::V4(spec.address());
    let addrs = nl.addrs(index).await?;
    for stale in addrs.iter().filter(|a| a.addr().is_ipv4() && **a != want) {
        // An address of an earlier lease: the device is ours alone.
        nl.del_addr(index, name, *stale).await?;
        fixed.push(format!("ip addr del {stale} dev {name}"));
    }
    if !addrs.contains(&want) {
        nl.add_addr(index, name, want).await?;
        fixed.push(format!("ip addr add {want} dev {name}"));
    }
    if !link.up {
        nl.set_up(index, name).await?;
        fixed.push(format!("ip link set {name} up"));
    }
    // After "up": the kernel refuses a route through a device that is down.
    let dst = IpNet::V4(spec.network);
    let routes = nl.routes_v4().await?;
    if !routes.iter().any(|r| r.dst == dst && r.oif == Some(index) && r.gateway.is_none()) {
        let route = Route { dst, gateway: None, oif: Some(index), onlink: false };
        nl.replace_route(&route, name).await?;
        fixed.push(format!("ip route replace {dst} dev {name}"));
    }
    Ok(fixed)
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
