//! ARP neighbours: the permanent entries that map a peer's VTEP address to
//! its VTEP MAC (`ip neigh`).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

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
        let (msg, flags) = set_neigh_request(index, n);
        self.acked(msg, flags).await.map_err(|e| NlError::new(set_neigh_op(dev, n), e))
    }

    /// Deletes the neighbour of `ip` on link `index`.
    pub async fn del_neigh(&self, index: u32, dev: &str, n: &Neigh) -> NlResult<()> {
        let (msg, flags) = del_neigh_request(index, n);
        self.acked(msg, flags).await.map_err(|e| NlError::new(del_neigh_op(dev, n), e))
    }
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent` as a request and
/// its flags (what rtnetlink's `neighbours().add(..).replace()` sends).
pub(super) fn set_neigh_request(index: u32, n: &Neigh) -> (RouteNetlinkMessage, u16) {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family_of(n.ip);
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.attributes.push(NeighbourAttribute::Destination(address_of(n.ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
    (RouteNetlinkMessage::NewNeighbour(msg), NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE)
}

/// `ip neigh del IP dev DEV` as a request and its flags.
pub(super) fn del_neigh_request(index: u32, n: &Neigh) -> (RouteNetlinkMessage, u16) {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family_of(n.ip);
    msg.header.ifindex = index;
    msg.attributes.push(NeighbourAttribute::Destination(address_of(n.ip)));
    (RouteNetlinkMessage::DelNeighbour(msg), NLM_F_REQUEST | NLM_F_ACK)
}

/// The replace in `ip` words, for errors.
pub(super) fn set_neigh_op(dev: &str, n: &Neigh) -> String {
    format!("replace neigh {} lladdr {} dev {dev} nud permanent", n.ip, n.mac)
}

/// The delete in `ip` words, for errors.
pub(super) fn del_neigh_op(dev: &str, n: &Neigh) -> String {
    format!("delete neigh {} dev {dev}", n.ip)
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// `ip` as a neighbour's (or an FDB entry's remote's) address attribute.
pub(super) fn address_of(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}
