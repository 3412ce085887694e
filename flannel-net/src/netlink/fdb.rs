//! Forwarding database entries: which remote (a peer's public IP) the VTEP
//! sends a peer's VTEP MAC to (`bridge fdb`). The kernel keeps them as
//! neighbours of family `AF_BRIDGE`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::neighbour::{address_of, is_permanent};
use super::{Netlink, NlError, NlResult};
use crate::MacAddr;

/// A forwarding entry: `bridge fdb replace MAC dev DEV dst IP self permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    /// The peer's VTEP MAC.
    pub mac: MacAddr,
    /// The peer's public IP (IPv6 on `flannel-v6.<VNI>`).
    pub dst: IpAddr,
}

/// The MAC and remote an `AF_BRIDGE` neighbour message names (`None`
/// without either: an entry without a remote is not one of ours).
pub(super) fn fdb_of(m: &NeighbourMessage) -> Option<Fdb> {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            // netlink-packet-route cannot tell an AF_BRIDGE entry's
            // remote's family from the header, so it hands back bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                dst = Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 16 => {
                let octets: [u8; 16] = b.as_slice().try_into().expect("16 bytes");
                dst = Some(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
            _ => {}
        }
    }
    Some(Fdb { mac: mac?, dst: dst? })
}

impl Netlink {
    /// Permanent FDB entries with a remote on link `index` (`bridge fdb show dev DEV`).
    pub async fn fdbs(&self, index: u32) -> NlResult<Vec<Fdb>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new(format!("dump fdb of link #{index}"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index && is_permanent(m.header.state))
            .filter_map(fdb_of)
            .collect())
    }

    /// Adds or replaces a permanent FDB entry with a remote.
    pub async fn set_fdb(&self, index: u32, dev: &str, f: &Fdb) -> NlResult<()> {
        let (msg, flags) = set_fdb_request(index, f);
        self.acked(msg, flags).await.map_err(|e| NlError::new(set_fdb_op(dev, f), e))
    }

    /// Deletes an FDB entry.
    pub async fn del_fdb(&self, index: u32, dev: &str, f: &Fdb) -> NlResult<()> {
        let (msg, flags) = del_fdb_request(index, f);
        self.acked(msg, flags).await.map_err(|e| NlError::new(del_fdb_op(dev, f), e))
    }
}

/// `bridge fdb replace MAC dev DEV dst IP self permanent` as a request and
/// its flags (what rtnetlink's `neighbours().add_bridge(..).replace()` sends).
pub(super) fn set_fdb_request(index: u32, f: &Fdb) -> (RouteNetlinkMessage, u16) {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(address_of(f.dst)));
    (RouteNetlinkMessage::NewNeighbour(msg), NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE)
}

/// `bridge fdb del MAC dev DEV dst IP self` as a request and its flags.
pub(super) fn del_fdb_request(index: u32, f: &Fdb) -> (RouteNetlinkMessage, u16) {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(address_of(f.dst)));
    (RouteNetlinkMessage::DelNeighbour(msg), NLM_F_REQUEST | NLM_F_ACK)
}

/// The replace in `bridge` words, for errors.
pub(super) fn set_fdb_op(dev: &str, f: &Fdb) -> String {
    format!("replace fdb {} dev {dev} dst {} self permanent", f.mac, f.dst)
}

/// The delete in `bridge` words, for errors.
pub(super) fn del_fdb_op(dev: &str, f: &Fdb) -> String {
    format!("delete fdb {} dev {dev} dst {}", f.mac, f.dst)
}
