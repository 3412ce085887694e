//! CHECK: does the pod's network still look like the prevResult says?

use flannel_net::netlink::Netlink;

use super::{open_netns, veth_name};
use crate::config::{NetConf, DEFAULT_BRIDGE};
use crate::env::CniEnv;
use crate::error::{code, CniError};
use crate::ipam::Store;
use crate::result::CniResult;

/// Runs CHECK; the error lists every difference found.
pub async fn run(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network configuration: CHECK needs prevResult"))?;
    let prev = CniResult::decode(prev)?;
    let netns = open_netns(&env.netns)?;
    let mut problems: Vec<String> = Vec::new();

    let pod = Netlink::connect_in(&netns)?;
    let pod_if_index = prev.interfaces.iter().position(|i| i.name == env.ifname && i.sandbox.is_some());
    match pod.link_by_name(&env.ifname).await? {
        None => problems.push(format!("interface {} is missing from {}", env.ifname, env.netns)),
        Some(link) => {
            if let Some(want) = pod_if_index.and_then(|i| prev.interfaces[i].mac.as_deref()) {
                let have = link.mac.map(|m| m.to_string()).unwrap_or_default();
                if !have.eq_ignore_ascii_case(want) {
                    problems.push(format!("{} in {} has MAC {have}, prevResult says {want}", env.ifname, env.netns));
                }
            }
            let addrs = pod.addrs(link.index).await?;
            for ip in prev.ips.iter().filter(|ip| ip.interface.is_none() || ip.interface == pod_if_index) {
                if !addrs.contains(&ip.address) {
                    problems.push(format!("address {} is missing from {} in {}", ip.address, env.ifname, env.netns));
                }
            }
            let routes = pod.routes().await?;
            for r in &prev.routes {
                let found = routes.iter().any(|have| have.dst == r.dst && (r.gw.is_none() || have.gateway == r.gw));
                if !found {
                    let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
                    problems.push(format!("route {}{via} is missing in {}", r.dst, env.netns));
                }
            }
        }
    }

    let host = Netlink::connect()?;
    let bridge_name = conf.delegate.bridge.clone().unwrap_or_else(|| DEFAULT_BRIDGE.into());
    let veth = veth_name(&env.container_id, &env.ifname);
    let bridge = host.link_by_name(&bridge_name).await?;
    match (host.link_by_name(&veth).await?, &bridge) {
        (None, _) => problems.push(format!("host interface {veth} is missing")),
        (Some(_), None) => problems.push(format!("bridge {bridge_name} is missing")),
        (Some(v), Some(b)) if v.master != Some(b.index) => {
            problems.push(format!("host interface {veth} is not attached to bridge {bridge_name}"))
        }
        _ => {}
    }

    match Store::open_existing(&conf.data_dir(), &conf.name)? {
        None => problems.push(format!("no IPAM state for network {:?}", conf.name)),
        Some(store) => {
            let held = store.find(&env.container_id, &env.ifname)?;
            for ip in &prev.ips {
                if !held.iter().any(|r| r.ip == ip.address.addr()) {
                    problems.push(format!(
                        "address {} is not allocated to {}/{} in {}",
                        ip.address.addr(),
                        env.container_id,
                        env.ifname,
                        store.dir().display()
                    ));
                }
            }
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(code::INTERNAL, format!("CHECK: {}", problems.join("; "))))
    }
}
