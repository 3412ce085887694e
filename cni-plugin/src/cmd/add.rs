//! ADD: plug a pod into the bridge, with an address from the node's lease.

use std::net::IpAddr;

use flannel_net::netlink::{Link, Netlink, NlError, Route, Scope};
use flannel_net::netns::NetNs;
use flannel_net::MacAddr;
use ipnet::IpNet;

use super::{load_lease, networks, open_netns, ranges, veth_name};
use crate::config::{BridgeSettings, NetConf};
use crate::env::CniEnv;
use crate::error::{code, CniError};
use crate::ipam::{Range, Store};
use crate::masq;
use crate::result::{CniResult, Interface, IpConfig, RouteEntry};

/// Runs ADD. On failure, everything this call created is removed again.
pub async fn run(conf: &NetConf, env: &CniEnv, raw: &serde_json::Value) -> Result<CniResult, CniError> {
    let lease = load_lease(&conf.subnet_file())?;
    let settings = conf.bridge_settings(lease.mtu, lease.ipmasq);
    let ranges = ranges(&lease);
    let networks = networks(&lease);
    let netns = open_netns(&env.netns)?;
    let host = Netlink::connect()?;

    let bridge = ensure_bridge(&host, &settings, &ranges).await?;
    if settings.is_gateway {
        enable_forwarding(&ranges)?;
    }

    // Allocate first: undoing an allocation is a file removal, while a link
    // made before a failed allocation would need netlink to clean up.
    let allocated = {
        let store = Store::open(&conf.data_dir(), &conf.name)?.with_host_local(conf.host_local_dir(), true)?;
        let mut ips = Vec::new();
        // CNI_ARGS IP=: each range gets the requested address of its family
        // (host-local gives each range set the requested address it holds).
        let mut requested = env.args.ips.clone();
        for r in &ranges {
            let want =
                requested.iter().position(|ip| ip.is_ipv4() == r.subnet.addr().is_ipv4()).map(|i| requested.remove(i));
            match store.allocate(r, &env.container_id, &env.ifname, settings.ip_masq, want) {
                Ok(ip) => ips.push((ip, *r)),
                Err(e) => {
                    let _ = store.release(&env.container_id, &env.ifname);
                    return Err(e.into());
                }
            }
        }
        if let Some(ip) = requested.first() {
            let _ = store.release(&env.container_id, &env.ifname);
            let held: Vec<String> = ranges.iter().map(|r| r.subnet.to_string()).collect();
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_ARGS: IP={ip} cannot be given: the node's pod ranges are {} (one address per range)",
                    held.join(", ")
                ),
            ));
        }
        ips
    };

    let veth = veth_name(&env.container_id, &env.ifname);
    let plugged = plug(&host, &netns, env, &settings, &bridge, &veth, &allocated, &networks, conf)
        .await
        .and_then(|r| crate::delegate::save_for_rollback(raw, &lease, &conf.data_dir(), &env.container_id).map(|()| r));
    match plugged {
        Ok(result) => Ok(result),
        Err(err) => {
            undo(&host, conf, env, &veth, &allocated, settings.ip_masq).await;
            Err(err)
        }
    }
}

/// Removes what a failed ADD made; keeps going past errors, which are
/// reported on stderr (the runtime shows the original error).
async fn undo(host: &Netlink, conf: &NetConf, env: &CniEnv, veth: &str, allocated: &[(IpAddr, Range)], masq_on: bool) {
    // Deleting the host end destroys the pod end with it.
    if let Err(e) = host.del_link_by_name(veth).await {
        eprintln!("flannel: rollback: {e}");
    }
    match Store::open(&conf.data_dir(), &conf.name).and_then(|s| s.with_host_local(conf.host_local_dir(), false)) {
        Ok(store) => {
            if let Err(e) = store.release(&env.container_id, &env.ifname) {
                eprintln!("flannel: rollback: {e}");
            }
        }
        Err(e) => eprintln!("flannel: rollback: {e}"),
    }
    if masq_on {
        let ips: Vec<IpAddr> = allocated.iter().map(|(ip, _)| *ip).collect();
        if let Err(e) = masq::apply(&masq::remove_script(&ips)) {
            eprintln!("flannel: rollback: {e}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn plug(
    host: &Netlink,
    netns: &NetNs,
    env: &CniEnv,
    settings: &BridgeSettings,
    bridge: &Link,
    veth: &str,
    allocated: &[(IpAddr, Range)],
    networks: &[IpNet],
    conf: &NetConf,
) -> Result<CniResult, CniError> {
    let pod_mac = pod_mac(allocated);
    // The kernel's echo of the creation describes the host end; an older
    // kernel (before 6.2) does not echo, and we ask.
    let host_link = match create_veth(host, netns, env, settings, bridge, veth, pod_mac).await? {
        Some(link) => link,
        None => host
            .link_by_name(veth)
            .await?
            .ok_or_else(|| CniError::new(code::INTERNAL, format!("veth {veth} vanished right after it was created")))?,
    };
    let pod = Netlink::connect_in(netns)?;
    // The host end names its peer's index; no need to ask the pod's namespace.
    let pod_index = match host_link.peer_index {
        Some(i) => i,
        None => pod.link_by_name(&env.ifname).await?.map(|l| l.index).ok_or_else(|| {
            CniError::new(
                code::INTERNAL,
                format!("{} vanished from {} right after it was created", env.ifname, env.netns),
            )
        })?,
    };

    let addrs: Vec<IpNet> = allocated
        .iter()
        .map(|(ip, range)| IpNet::new(*ip, range.subnet.prefix_len()).expect("prefix from a valid subnet"))
        .collect();
    let routes = pod_routes(settings, allocated, networks, conf);
    let nl_routes: Vec<Route> = routes
        .iter()
        .map(|r| Route { dst: r.dst, gateway: r.gw, oif: Some(pod_index), onlink: false, scope: Scope::usual(r.gw) })
        .collect();
    // One batch: every request is sent before the first answer is read (the
    // kernel handles a socket's requests in order, so the link is up before
    // its addresses and the addresses before the routes through them), and
    // the host end's hairpin flag goes out on the host socket meanwhile.
    let hairpin = async {
        match settings.hairpin {
            true => host.set_hairpin(host_link.index, veth, true).await,
            false => Ok(()),
        }
    };
    let (hairpin, up, added, routed) = futures_util::future::join4(
        hairpin,
        pod.set_up(pod_index, &env.ifname),
        futures_util::future::join_all(addrs.iter().map(|a| pod.add_addr(pod_index, &env.ifname, *a))),
        futures_util::future::join_all(nl_routes.iter().map(|r| pod.add_route(r, &env.ifname))),
    )
    .await;
    hairpin?;
    up?;
    let mut ips = Vec::new();
    let mut retry_routes = false;
    for ((addr, res), (_, range)) in addrs.iter().zip(added).zip(allocated) {
        match res {
            // IPv6 is turned off in the pod (disable_ipv6, as some runtimes
            // set it): turn it on for lo and the pod's interface, as the
            // reference IPAM code does before it adds an IPv6 address; the
            // routes through it failed too and go again.
            Err(e) if addr.addr().is_ipv6() && e.errno == Some(libc::EACCES) => {
                enable_ipv6_in_pod(netns, &env.ifname)?;
                pod.add_addr(pod_index, &env.ifname, *addr).await?;
                retry_routes = true;
            }
            other => other?,
        }
        ips.push(IpConfig { address: *addr, gateway: Some(range.gateway), interface: Some(2) });
    }
    for (route, res) in nl_routes.iter().zip(routed) {
        let res = match res {
            Err(e) if retry_routes && !e.is_exists() => pod.add_route(route, &env.ifname).await,
            other => other,
        };
        match res {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(e.into()),
        }
    }

    if settings.ip_masq {
        let pod_ips: Vec<IpAddr> = allocated.iter().map(|(ip, _)| *ip).collect();
        masq::apply(&masq::add_script(&pod_ips, networks))?;
    }

    let iface = |l: &Link, sandbox: Option<String>| Interface {
        name: l.name.clone(),
        mac: l.mac.map(|m| m.to_string()),
        sandbox,
        mtu: Some(l.mtu),
    };
    Ok(CniResult {
        interfaces: vec![
            iface(bridge, None),
            iface(&host_link, None),
            Interface {
                name: env.ifname.clone(),
                mac: Some(pod_mac.to_string()),
                sandbox: Some(env.netns.clone()),
                mtu: Some(settings.mtu),
            },
        ],
        ips,
        routes,
    })
}

/// Sets `disable_ipv6` to 0 for `lo` and `ifname` in the pod's namespace
/// (the only sysctls ADD writes there; reached only when an IPv6 address
/// was refused because IPv6 is off).
fn enable_ipv6_in_pod(netns: &NetNs, ifname: &str) -> Result<(), CniError> {
    let write = |dev: &str| -> Result<(), String> {
        let path = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "0" => Ok(()),
            _ => std::fs::write(&path, "0").map_err(|e| format!("enable IPv6 in the pod: write {path}: {e}")),
        }
    };
    netns
        .run(|| write("lo").and_then(|()| write(ifname)))
        .map_err(|e| CniError::new(code::IO, format!("enter {}: {e}", netns.path().display())))?
        .map_err(|msg| CniError::new(code::IO, msg))
}

/// Creates the veth pair with the pod end directly in the pod's namespace. A
/// host end of the same name is a leftover of an interrupted ADD of this very
/// attachment (the name is derived from it): it is replaced.
async fn create_veth(
    host: &Netlink,
    netns: &NetNs,
    env: &CniEnv,
    settings: &BridgeSettings,
    bridge: &Link,
    veth: &str,
    pod_mac: MacAddr,
) -> Result<Option<Link>, CniError> {
    let attempt = || host.add_veth_into_netns(veth, &env.ifname, pod_mac, settings.mtu, bridge.index, netns);
    match attempt().await {
        Ok(link) => Ok(link),
        Err(e) if e.is_exists() => {
            if host.del_link_by_name(veth).await? || wait_for_pending_teardown(netns, env).await? {
                attempt().await.map_err(|e| exists_in_pod(e, env))
            } else {
                Err(exists_in_pod(e, env))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// DEL leaves the deletion of a veth to a detached child (see `cmd::del`), so
/// a runtime that reuses a namespace right away can find the old pod end still
/// there, without carrier (its host end is down). Such an interface goes away
/// by itself within tens of milliseconds: wait for it (up to two seconds).
/// Returns whether the name became free; an interface that is up and running
/// is somebody else's and is left alone.
async fn wait_for_pending_teardown(netns: &NetNs, env: &CniEnv) -> Result<bool, CniError> {
    let pod = Netlink::connect_in(netns)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match pod.link_by_name(&env.ifname).await? {
            None => return Ok(true),
            Some(l) if l.kind.as_deref() == Some("veth") && !l.lower_up => {}
            Some(_) => return Ok(false),
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        // A plain sleep: nothing else runs on this single-threaded runtime
        // meanwhile, and it spares every ADD the runtime's timer driver.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn exists_in_pod(e: NlError, env: &CniEnv) -> CniError {
    if e.is_exists() {
        CniError::new(code::INTERNAL, format!("{}: interface {} already exists in {}", e.op, env.ifname, env.netns))
    } else {
        e.into()
    }
}

/// The pod's routes: every cluster network via the gateway, a default route
/// when `isDefaultGateway`, then `ipam.routes`; no destination twice.
fn pod_routes(
    settings: &BridgeSettings,
    allocated: &[(IpAddr, Range)],
    networks: &[IpNet],
    conf: &NetConf,
) -> Vec<RouteEntry> {
    let gateway_for =
        |dst: &IpNet| allocated.iter().find(|(ip, _)| ip.is_ipv4() == dst.addr().is_ipv4()).map(|(_, r)| r.gateway);
    let mut out: Vec<RouteEntry> = Vec::new();
    let mut push = |dst: IpNet, gw: Option<IpAddr>| {
        if gw.is_some() && !out.iter().any(|r| r.dst == dst) {
            out.push(RouteEntry { dst, gw });
        }
    };
    for n in networks {
        push(*n, gateway_for(n));
    }
    if settings.is_default_gateway {
        for (ip, r) in allocated {
            let default: IpNet = if ip.is_ipv4() { "0.0.0.0/0".parse().unwrap() } else { "::/0".parse().unwrap() };
            push(default, Some(r.gateway));
        }
    }
    for r in conf.ipam.iter().flat_map(|i| i.routes.iter()) {
        push(r.dst, r.gw.or_else(|| gateway_for(&r.dst)));
    }
    out
}

/// Makes sure the bridge exists, is up and (with `isGateway`) holds the
/// gateway address of every range.
async fn ensure_bridge(host: &Netlink, settings: &BridgeSettings, ranges: &[Range]) -> Result<Link, CniError> {
    let name = &settings.bridge;
    let link = match host.link_by_name(name).await? {
        Some(l) => l,
        None => {
            match host.add_bridge(name, settings.mtu, bridge_mac(ranges)).await {
                Ok(()) => {
                    // The bridge's routes are ours, not a router's on the
                    // link: no router advertisements (the bridge plugin's
                    // setting too, which it also does not insist on).
                    let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
                    match std::fs::write(&path, "0") {
                        Ok(()) => {}
                        // No IPv6 on this node (ipv6.disable=1): nothing to turn off.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => eprintln!("flannel: write {path}: {e} (router advertisements stay accepted)"),
                    }
                }
                // Another ADD running at the same moment created it.
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e.into()),
            }
            host.link_by_name(name).await?.ok_or_else(|| {
                CniError::new(code::INTERNAL, format!("bridge {name} vanished right after it was created"))
            })?
        }
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(CniError::new(
            code::INTERNAL,
            format!(
                "{name} exists but is a {} device, not a bridge: rename it or set delegate.bridge",
                link.kind.as_deref().unwrap_or("plain")
            ),
        ));
    }
    if !link.up {
        host.set_up(link.index, name).await?;
    }
    if settings.is_gateway {
        ensure_gateway_addrs(host, &link, ranges).await?;
    }
    Ok(link)
}

/// Gives the bridge the gateway address of each range. An address left from an
/// earlier lease is replaced when no pod is attached any more; with pods still
/// attached that would cut them off, so ADD fails and says why.
async fn ensure_gateway_addrs(host: &Netlink, bridge: &Link, ranges: &[Range]) -> Result<(), CniError> {
    for r in ranges {
        let want = IpNet::new(r.gateway, r.subnet.prefix_len()).expect("valid prefix");
        // The common case costs one request and no dump: the address is
        // already there (EEXIST). Only when we just added it can an address of
        // an earlier lease be on the bridge too.
        match host.add_addr(bridge.index, &bridge.name, want).await {
            Ok(()) => {}
            Err(e) if e.is_exists() => continue,
            Err(e) => return Err(e.into()),
        }
        let stale: Vec<IpNet> = host
            .addrs(bridge.index)
            .await?
            .into_iter()
            .filter(|a| *a != want && a.addr().is_ipv4() == want.addr().is_ipv4() && !is_link_local(a.addr()))
            .collect();
        if stale.is_empty() {
            continue;
        }
        let attached: Vec<String> =
            host.links().await?.into_iter().filter(|l| l.master == Some(bridge.index)).map(|l| l.name).collect();
        if !attached.is_empty() {
            // Pods still use the old gateway: take our address back off and refuse.
            match host.del_addr(bridge.index, &bridge.name, want).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            let stale_list: Vec<String> = stale.iter().map(|a| a.to_string()).collect();
            return Err(CniError::new(
                code::INTERNAL,
                format!(
                    "bridge {} carries {} from an earlier lease but the node's lease is now {want}, and {} pod interface(s) are still attached ({}): delete those pods (or the bridge) and retry",
                    bridge.name,
                    stale_list.join(", "),
                    attached.len(),
                    attached.join(", ")
                ),
            ));
        }
        for a in stale {
            match host.del_addr(bridge.index, &bridge.name, a).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The pod's MAC: `0a:58:` and its IPv4 address (the reference plugins' old
/// habit). Known before the link exists, so nobody has to read it back, and a
/// person can tell a pod's address from its MAC in `ip neigh` or a capture.
fn pod_mac(allocated: &[(IpAddr, Range)]) -> MacAddr {
    let tail = match allocated.first().map(|(ip, _)| *ip) {
        Some(IpAddr::V4(v4)) => v4.octets(),
        Some(IpAddr::V6(v6)) => {
            let o = v6.octets();
            [o[12], o[13], o[14], o[15]]
        }
        None => [0, 0, 0, 2],
    };
    MacAddr([0x0a, 0x58, tail[0], tail[1], tail[2], tail[3]])
}

/// A fixed MAC for the bridge, `0a:58:` and the gateway's IPv4 address. Left to
/// itself a bridge takes its MAC from its ports and changes it as pods come
/// and go, which makes every pod's ARP entry for the gateway go stale; an
/// explicitly set address never changes. The prefix is the locally
/// administered one the reference CNI plugins use for the same purpose.
fn bridge_mac(ranges: &[Range]) -> MacAddr {
    let tail = match ranges.first().map(|r| r.gateway) {
        Some(IpAddr::V4(v4)) => v4.octets(),
        Some(IpAddr::V6(v6)) => {
            let o = v6.octets();
            [o[12], o[13], o[14], o[15]]
        }
        None => [0, 0, 0, 1],
    };
    MacAddr([0x0a, 0x58, tail[0], tail[1], tail[2], tail[3]])
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A gateway forwards: turn on forwarding for each family in use, writing only
/// when it is off (the common case costs one read).
fn enable_forwarding(ranges: &[Range]) -> Result<(), CniError> {
    use flannel_net::host::{ensure_sysctl_on, IPV4_FORWARD, IPV6_FORWARD};
    for r in ranges {
        let path = if r.subnet.addr().is_ipv4() { IPV4_FORWARD } else { IPV6_FORWARD };
        ensure_sysctl_on(path).map_err(|e| CniError::new(code::IO, format!("enable forwarding: {e}")))?;
    }
    Ok(())
}
