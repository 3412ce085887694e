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

/// One way the device differs from its [`DeviceSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Another MTU (the one it has).
    Mtu(u32),
    /// An IPv4 address that is not ours (an earlier lease's).
    StaleAddr(IpNet),
    /// Our address is missing.
    MissingAddr,
    /// The device is down.
    Down,
    /// The route to the whole Network through the device is missing.
    MissingRoute,
}

impl Fault {
    /// What differs, and the `ip` command that fixes it.
    pub fn describe(&self, spec: &DeviceSpec) -> (String, String) {
        let name = &spec.name;
        match self {
            Fault::Mtu(have) => {
                (format!("{name} has MTU {have}, want {}", spec.mtu), format!("ip link set {name} mtu {}", spec.mtu))
            }
            Fault::StaleAddr(a) => {
                (format!("{name} carries address {a}, which is not our lease's"), format!("ip addr del {a} dev {name}"))
            }
            Fault::MissingAddr => {
                let a = spec.address();
                (format!("{name} lacks address {a}"), format!("ip addr add {a} dev {name}"))
            }
            Fault::Down => (format!("{name} is down"), format!("ip link set {name} up")),
            Fault::MissingRoute => (
                format!("route {} dev {name} is missing", spec.network),
                format!("ip route replace {} dev {name}", spec.network),
            ),
        }
    }
}

/// Compares the device with `spec`: `None` when it does not exist, else its
/// index and the faults, in the order [`ensure`] fixes them.
pub async fn inspect(nl: &Netlink, spec: &DeviceSpec) -> anyhow::Result<Option<(u32, Vec<Fault>)>> {
    let Some(link) = nl.link_by_name(&spec.name).await? else {
        return Ok(None);
    };
    let index = link.index;
    let mut faults = Vec::new();
    if link.mtu != spec.mtu {
        faults.push(Fault::Mtu(link.mtu));
    }
    let want = IpNet::V4(spec.address());
    let addrs = nl.addrs(index).await?;
    // The device is ours alone: any other IPv4 address is an earlier lease's.
    faults.extend(addrs.iter().filter(|a| a.addr().is_ipv4() && **a != want).map(|a| Fault::StaleAddr(*a)));
    if !addrs.contains(&want) {
        faults.push(Fault::MissingAddr);
    }
    if !link.up {
        faults.push(Fault::Down);
    }
    // Last: the kernel refuses a route through a device that is down.
    let dst = IpNet::V4(spec.network);
    let routes = nl.routes_v4().await?;
    if !routes.iter().any(|r| r.dst == dst && r.oif == Some(index) && r.gateway.is_none()) {
        faults.push(Fault::MissingRoute);
    }
    Ok(Some((index, faults)))
}

/// Brings the device in line with `spec` and says what it changed, in `ip`
/// words. Fails when the device does not exist (the TUN queues own it; the
/// data path must be restarted to recreate it).
pub async fn ensure(nl: &Netlink, spec: &DeviceSpec) -> anyhow::Result<Vec<String>> {
    let (_, fixed) = repair(nl, spec)
        .await?
        .with_context(|| format!("device {} is gone: restart the udp data path to recreate it", spec.name))?;
    Ok(fixed)
}

/// [`ensure`] for a caller that handles a missing device itself: `None`
/// when it does not exist, else its index and what was fixed.
pub async fn repair(nl: &Netlink, spec: &DeviceSpec) -> anyhow::Result<Option<(u32, Vec<String>)>> {
    let name = &spec.name;
    let Some((index, faults)) = inspect(nl, spec).await? else {
        return Ok(None);
    };
    let mut fixed = Vec::new();
    for fault in faults {
        match &fault {
            Fault::Mtu(_) => nl.set_mtu(index, name, spec.mtu).await?,
            Fault::StaleAddr(a) => nl.del_addr(index, name, *a).await?,
            Fault::MissingAddr => nl.add_addr(index, name, IpNet::V4(spec.address())).await?,
            Fault::Down => nl.set_up(index, name).await?,
            Fault::MissingRoute => {
                let route = Route { dst: IpNet::V4(spec.network), gateway: None, oif: Some(index), onlink: false };
                nl.replace_route(&route, name).await?
            }
        }
        fixed.push(fault.describe(spec).1);
    }
    Ok(Some((index, fixed)))
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
