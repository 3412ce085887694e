//! DEL: unplug a pod and release its addresses. Idempotent: a second DEL, a
//! DEL without a namespace, or one for a container we never saw succeeds.

use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;

use super::veth_name;
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::CniError;
use crate::ipam::Store;
use crate::masq;

/// Runs DEL. Needs no subnet.env: pods must be deletable while the daemon is down.
pub async fn run(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let host = Netlink::connect()?;
    let veth = veth_name(&env.container_id, &env.ifname);
    // Links first, addresses after: an address must not be handed to a new pod
    // while the old pod's interface could still be holding it.
    let removed = host.del_link_by_name(&veth).await?;
    if !removed && !env.netns.is_empty() {
        // The host end is gone but the pod end may survive if someone renamed or
        // moved it; clean it up when the namespace still exists.
        if let Ok(ns) = NetNs::open(&env.netns) {
            let pod = Netlink::connect_in(&ns)?;
            if let Some(link) = pod.link_by_name(&env.ifname).await? {
                if link.kind.as_deref() == Some("veth") {
                    pod.del_link_by_name(&env.ifname).await?;
                }
            }
        }
    }
    let released = match Store::open_existing(&conf.data_dir(), &conf.name)? {
        Some(store) => store.release(&env.container_id, &env.ifname)?,
        None => Vec::new(),
    };
    let masqueraded: Vec<_> = released.iter().filter(|r| r.masq).map(|r| r.ip).collect();
    masq::apply(&masq::remove_script(&masqueraded))
}
