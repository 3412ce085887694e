//! Change notifications (`ip monitor`), which trigger the daemon's reconcile.

use rtnetlink::packet_route::route::RouteAttribute;

use super::{NlError, NlResult};

/// What a change notification is about, as far as a reconcile loop cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A link appeared, changed or vanished (its index).
    Link(u32),
    /// A route through this output interface changed.
    Route(Option<u32>),
    /// A neighbour or FDB entry on this link changed.
    Neigh(u32),
    /// An address on this link changed.
    Addr(u32),
    /// The kernel dropped notifications (`ENOBUFS`): anything may have changed.
    Overrun,
}

/// Subscribes to link, IPv4 address, IPv4 route and neighbour (which carries
/// FDB changes too) notifications of the calling thread's namespace (`ip
/// monitor`), and with `ipv6` to IPv6 address and route ones. Must be
/// called inside a tokio runtime.
pub fn monitor(ipv6: bool) -> NlResult<tokio::sync::mpsc::UnboundedReceiver<Change>> {
    use futures_util::StreamExt;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    use rtnetlink::MulticastGroup as G;
    let mut groups = vec![G::Link, G::Ipv4Ifaddr, G::Ipv4Route, G::Neigh];
    if ipv6 {
        groups.extend([G::Ipv6Ifaddr, G::Ipv6Route]);
    }
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)
        .map_err(|e| NlError::io("subscribe to netlink notifications", e))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let change = match msg.payload {
                NetlinkPayload::InnerMessage(M::NewLink(l) | M::DelLink(l)) => Some(Change::Link(l.header.index)),
                NetlinkPayload::InnerMessage(M::NewAddress(a) | M::DelAddress(a)) => Some(Change::Addr(a.header.index)),
                NetlinkPayload::InnerMessage(M::NewRoute(r) | M::DelRoute(r)) => {
                    Some(Change::Route(r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })))
                }
                NetlinkPayload::InnerMessage(M::NewNeighbour(n) | M::DelNeighbour(n)) => {
                    Some(Change::Neigh(n.header.ifindex))
                }
                NetlinkPayload::Overrun(_) => Some(Change::Overrun),
                _ => None,
            };
            if let Some(c) = change {
                if tx.send(c).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}
