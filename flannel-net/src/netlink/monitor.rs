//! Change notifications (`ip monitor`), which trigger the daemon's reconcile.
//! Each carries enough of the entry it is about (a route's destination, next
//! hop and device, a neighbour's address and MAC, an FDB entry's MAC and
//! remote) for the daemon to tell the echo of its own change, which agrees
//! with what it programmed, from someone else's.

use rtnetlink::packet_route::route::{RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;

use super::{Fdb, Neigh, NlError, NlResult, Route};

/// What a change notification is about, as far as a reconcile loop cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A link appeared, changed or vanished (its index).
    Link(u32),
    /// A route through this output interface changed.
    Route {
        /// The route's output interface.
        oif: Option<u32>,
        /// The route, when it is a unicast route of the main table (the
        /// only ones a reconcile owns); `None` for any other.
        route: Option<Route>,
        /// Whether it was deleted (else added or replaced).
        deleted: bool,
    },
    /// A neighbour or FDB entry on this link changed.
    Neigh {
        /// The link's index.
        index: u32,
        /// The entry, when the message names it completely.
        entry: Option<NeighEntry>,
        /// Whether it was deleted (else added or changed).
        deleted: bool,
    },
    /// An address on this link changed.
    Addr(u32),
    /// The kernel dropped notifications (`ENOBUFS`): anything may have changed.
    Overrun,
}

/// The entry a neighbour notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighEntry {
    /// An ARP / neighbour discovery entry, and whether it is permanent.
    Neigh(Neigh, bool),
    /// An FDB entry with a remote (family `AF_BRIDGE`), and whether it is permanent.
    Fdb(Fdb, bool),
}

impl Change {
    /// The change a route message reports.
    fn of_route(r: &RouteMessage, deleted: bool) -> Change {
        let route = Route::from_message(r);
        let oif = route.as_ref().and_then(|r| r.oif);
        let route = route.filter(|_| super::route::in_main_table(r, RouteType::Unicast));
        Change::Route { oif, route, deleted }
    }
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
                NetlinkPayload::InnerMessage(M::NewRoute(r)) => Some(Change::of_route(&r, false)),
                NetlinkPayload::InnerMessage(M::DelRoute(r)) => Some(Change::of_route(&r, true)),
                NetlinkPayload::InnerMessage(M::NewNeighbour(n)) => Some(neigh_change(&n, false)),
                NetlinkPayload::InnerMessage(M::DelNeighbour(n)) => Some(neigh_change(&n, true)),
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

fn neigh_change(n: &rtnetlink::packet_route::neighbour::NeighbourMessage, deleted: bool) -> Change {
    let permanent = super::neighbour::is_permanent(n.header.state);
    let entry = if n.header.family == AddressFamily::Bridge {
        super::fdb::fdb_of(n).map(|f| NeighEntry::Fdb(f, permanent))
    } else {
        super::neighbour::neigh_of(n).map(|x| NeighEntry::Neigh(x, permanent))
    };
    Change::Neigh { index: n.header.ifindex, entry, deleted }
}
