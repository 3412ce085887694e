//! DEL: unplug a pod and release its addresses. Idempotent: a second DEL, a
//! DEL without a namespace, or one for a container we never saw succeeds.
//!
//! Deleting a network device is slow in the kernel, and not because of work:
//! `unregister_netdevice` waits for RCU grace periods before it returns, about
//! 20 ms on our test machines (`ip link del` alone takes as long). DEL
//! therefore takes the host veth down and off the bridge (the pod is cut off
//! from that moment), takes the pod out of the masquerade set, releases the
//! address, and leaves the deletion itself, by interface index,
//! to a detached child process, [`teardown`], so the runtime is not kept
//! waiting for the grace period. The index, unlike the name, is never reused
//! soon, so the child cannot hit a veth that a quick re-ADD of the same pod
//! created under the same name. If the child cannot be started, DEL deletes
//! the link itself.

use std::process::{Command, Stdio};

use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;

use super::veth_name;
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{code, CniError};
use crate::ipam::Store;
use crate::masq;

/// argv[1] that makes the binary delete one link and exit.
pub const TEARDOWN_ARG: &str = "--teardown-link";

/// Runs DEL. Needs no subnet.env: pods must be deletable while the daemon is down.
pub async fn run(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let host = Netlink::connect()?;
    let veth = veth_name(&env.container_id, &env.ifname);
    match host.link_by_name(&veth).await? {
        Some(link) => {
            // Down and off the bridge first: no packet crosses the pod's
            // interface after DEL returns, and the bridge has no port left for
            // it (an ADD that checks whether pods still use the bridge must
            // not count it), whether or not the deletion has finished by then.
            match host.set_down_detached(link.index, &veth).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            if spawn_teardown(link.index, &veth).is_err() {
                host.del_link(link.index, &veth).await?;
            }
        }
        None if !env.netns.is_empty() => {
            // The host end is gone but the pod end may survive if someone
            // renamed or moved the host end; clean it up while the namespace exists.
            if let Ok(ns) = NetNs::open(&env.netns) {
                let pod = Netlink::connect_in(&ns)?;
                if let Some(link) = pod.link_by_name(&env.ifname).await? {
                    if link.kind.as_deref() == Some("veth") {
                        pod.del_link(link.index, &env.ifname).await?;
                    }
                }
            }
        }
        None => {}
    }
    let Some(store) = Store::open_existing(&conf.data_dir(), &conf.name)? else {
        return Ok(());
    };
    let store = store.with_host_local(conf.host_local_dir(), false)?;
    // Out of the masquerade set first, then release, both under the lock:
    // a DEL that dies in between (killed by the runtime) or fails in nft
    // leaves the records, which a retried DEL or GC finds. The other way
    // round, a set member would outlive its record, and nothing would ever
    // know to remove it.
    let held = store.find(&env.container_id, &env.ifname)?;
    let masqueraded: Vec<_> = held.iter().filter(|r| r.masq).map(|r| r.ip).collect();
    masq::apply(&masq::remove_script(&masqueraded))?;
    store.release(&env.container_id, &env.ifname)?;
    Ok(())
}

/// Starts `flannel --teardown-link INDEX NAME` detached: its own process
/// group, no stdio (a runtime reading our stdout must see EOF when we exit).
fn spawn_teardown(index: u32, name: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .args([TEARDOWN_ARG, &index.to_string(), name])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(|_child| ())
}

/// The detached child: deletes link `index` (named `name`, for messages) in
/// the namespace it inherited. An already deleted link is success.
pub fn teardown(args: &[String]) -> Result<(), CniError> {
    let usage = || CniError::new(code::INVALID_ENV, format!("usage: flannel {TEARDOWN_ARG} IFINDEX NAME"));
    let index: u32 = args.first().and_then(|a| a.parse().ok()).ok_or_else(usage)?;
    let name = args.get(1).ok_or_else(usage)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start async runtime: {e}")))?;
    rt.block_on(async {
        let host = Netlink::connect()?;
        host.del_link(index, name).await?;
        Ok(())
    })
}
