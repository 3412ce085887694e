//! ARP neighbours: the permanent entries that map a peer's VTEP address to
//! its VTEP MAC (`ip neigh`).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::AddressFamily;

use super::{Netlink, NlError, NlResult};
use crate::MacAddr;

/// A permanent ARP (IPv4) or neighbour discovery (IPv6) entry:
/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// The peer's VTEP address (`<peer subnet>.0`, `<peer IPv6 subnet>::`).
    pub ip: IpAddr,
    /// The peer's VTEP MAC.
    pub mac: MacAddr,
}

/// `NUD_PERMANENT` is one bit of the state; `bridge fdb append` sets
/// `NUD_NOARP` beside it, which the typed enum reports as "other".
pub(super) fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & 0x80 != 0
}

/// The address and MAC a neighbour message names (`None` without either).
pub(super) fn neigh_of(m: &NeighbourMessage) -> Option<Neigh> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
            _ => {}
        }
    }
    Some(Neigh { ip: ip?, mac: mac? })
}

impl Netlink {
    /// Permanent neighbours of both families on link `index` (`ip neigh
    /// show dev DEV nud permanent`, `ip -6 neigh ...`).
    pub async fn neighs(&self, index: u32) -> NlResult<Vec<Neigh>> {
        let mut out = self.neighs_of(index, false).await?;
        out.extend(self.neighs_of(index, true).await?);
        Ok(out)
    }

    /// Permanent neighbours of one family (IPv6 with `v6`) on link `index`.
    pub async fn neighs_of(&self, index: u32, v6: bool) -> NlResult<Vec<Neigh>> {
        let family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new(format!("dump neighbours of link #{index}"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index && is_permanent(m.header.state))
            .filter_map(neigh_of)
            .collect())
    }

    /// Adds or replaces a permanent neighbour.
    pub async fn set_neigh(&self, index: u32, dev: &str, n: &Neigh) -> NlResult<()> {
        self.handle
            .neighbours()
            .add(index, n.ip)
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
        msg.header.ifindex = index;
        match n.ip {
            IpAddr::V4(v4) => {
                msg.header.family = AddressFamily::Inet;
                msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)));
            }
            IpAddr::V6(v6) => {
                msg.header.family = AddressFamily::Inet6;
                msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)));
            }
        }
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("delete neigh {} dev {dev}", n.ip), e))
    }
}
