//! ARP neighbours: the permanent entries that map a peer's VTEP address to
//! its VTEP MAC (`ip neigh`).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::AddressFamily;

use super::{Netlink, NlError, NlResult};
use crate::MacAddr;

/// A permanent ARP entry: `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// The peer's VTEP address (`<peer subnet>.0`).
    pub ip: Ipv4Addr,
    /// The peer's VTEP MAC.
    pub mac: MacAddr,
}

/// `NUD_PERMANENT` is one bit of the state; `bridge fdb append` sets
/// `NUD_NOARP` beside it, which the typed enum reports as "other".
pub(super) fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & 0x80 != 0
}

impl Netlink {
    /// Permanent IPv4 neighbours on link `index` (`ip neigh show dev DEV nud permanent`).
    pub async fn neighs(&self, index: u32) -> NlResult<Vec<Neigh>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new(format!("dump neighbours of link #{index}"), e))?;
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.ifindex == index && is_permanent(m.header.state)) {
            let mut ip = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(*v4),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push(Neigh { ip, mac });
            }
        }
        Ok(out)
    }

    /// Adds or replaces a permanent neighbour.
    pub async fn set_neigh(&self, index: u32, dev: &str, n: &Neigh) -> NlResult<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(n.ip))
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::new(format!("replace neigh {} lladdr {} dev {dev} nud permanent", n.ip, n.mac), e))
    }

    /// Deletes the neighbour of `ip` on link `index`.
    pub async fn del_neigh(&self, index: u32, dev: &str, n: &Neigh) -> NlResult<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(n.ip)));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("delete neigh {} dev {dev}", n.ip), e))
    }
}
