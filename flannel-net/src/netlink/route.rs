//! Routes in the main table: the kernel's choice for a destination (`ip route
//! get`), dumps, add, replace and delete.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, NlError, NlResult};

/// A route in the main table, as far as flannel-rs cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination prefix (`0.0.0.0/0` for the default route).
    pub dst: IpNet,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// The next hop is on the link even though no address covers it
    /// (`onlink`): how flannel routes to a peer's VTEP address.
    pub onlink: bool,
    /// The route's scope (`ip route`'s `scope link` or the default global).
    pub scope: Scope,
}

/// A route's scope, the two flannel-rs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `scope global` (universe): routes through a gateway, and flannel's
    /// route to the Network through the udp backend's TUN.
    Global,
    /// `scope link`: a destination on the link itself (what `ip route add
    /// DST dev DEV` makes).
    Link,
}

impl Scope {
    /// `Link` without a gateway, `Global` with one: `ip route add`'s default.
    pub fn usual(gateway: Option<IpAddr>) -> Scope {
        if gateway.is_some() {
            Scope::Global
        } else {
            Scope::Link
        }
    }
}

impl Route {
    /// Reads a dumped route; `None` for a family we do not handle.
    pub(super) fn from_message(msg: &RouteMessage) -> Option<Route> {
        let mut dst = None;
        let mut gateway = None;
        let mut oif = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = route_addr(a),
                RouteAttribute::Gateway(a) => gateway = route_addr(a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let len = msg.header.destination_prefix_length;
        let dst = match (dst, msg.header.address_family) {
            (Some(a), _) => IpNet::new(a, len).ok()?,
            (None, AddressFamily::Inet) => IpNet::new(IpAddr::V4(0.into()), 0).ok()?,
            (None, AddressFamily::Inet6) => IpNet::new(IpAddr::V6(0.into()), 0).ok()?,
            _ => return None,
        };
        let onlink = msg.header.flags.contains(RouteFlags::Onlink);
        let scope = if msg.header.scope == RouteScope::Link { Scope::Link } else { Scope::Global };
        Some(Route { dst, gateway, oif, onlink, scope })
    }
}

/// Whether `msg` is a route of type `kind` in the main table: flannel-rs
/// reads and owns unicast and blackhole routes there only.
pub(super) fn in_main_table(msg: &RouteMessage, kind: RouteType) -> bool {
    msg.header.table == libc::RT_TABLE_MAIN && msg.header.kind == kind
}

/// The address in a route attribute, for the two families we use.
fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Netlink {
    /// The route the kernel would take to `dst` (`ip route get DST`): output
    /// interface and preferred source address.
    pub async fn route_get(&self, dst: IpAddr) -> NlResult<Option<(u32, Option<IpAddr>)>> {
        let op = || format!("route get {dst}");
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, if dst.is_ipv4() { 32 } else { 128 })
            .map_err(|e| NlError::io(op(), std::io::Error::other(e.to_string())))?
            .build();
        let mut stream = self.handle.route().get(msg).execute();
        match stream.try_next().await {
            Ok(Some(m)) => {
                let mut oif = None;
                let mut src = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::PrefSource(p) => src = route_addr(p),
                        _ => {}
                    }
                }
                Ok(oif.map(|o| (o, src)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                let e = NlError::new(op(), e);
                if e.errno == Some(libc::ENETUNREACH) || e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Routes of the main table in both families (`ip route show; ip -6 route show`).
    pub async fn routes(&self) -> NlResult<Vec<Route>> {
        let mut out = self.routes_v4().await?;
        out.extend(
            self.dump_routes(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(), "dump IPv6 routes").await?,
        );
        Ok(out)
    }

    /// IPv4 routes of the main table only (`ip route show`): what the daemon
    /// reconciles, without the cost of an IPv6 dump on every run.
    pub async fn routes_v4(&self) -> NlResult<Vec<Route>> {
        self.dump_routes(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(), "dump IPv4 routes").await
    }

    /// IPv4 routes of the main table (`ip route show`) in one dump: the
    /// unicast ones, and the destinations of the blackhole ones (`blackhole
    /// DST`, what flannel's `--ip-blackhole-route` adds).
    pub async fn routes_v4_and_blackholes(&self) -> NlResult<(Vec<Route>, Vec<IpNet>)> {
        self.routes_and_blackholes(false).await
    }

    /// [`Netlink::routes_v4_and_blackholes`] for IPv4 (`v6` false) or IPv6
    /// (`ip -6 route show`).
    pub async fn routes_and_blackholes(&self, v6: bool) -> NlResult<(Vec<Route>, Vec<IpNet>)> {
        let msgs = if v6 {
            self.dump(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(), "dump IPv6 routes").await?
        } else {
            self.dump(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(), "dump IPv4 routes").await?
        };
        let of_kind =
            |kind: RouteType| msgs.iter().filter(move |m| in_main_table(m, kind)).filter_map(Route::from_message);
        Ok((of_kind(RouteType::Unicast).collect(), of_kind(RouteType::BlackHole).map(|r| r.dst).collect()))
    }

    /// Adds `blackhole DST` to the main table (`ip route add blackhole DST`),
    /// as flannel does: protocol boot, no replace. `EEXIST` when another route
    /// (a blackhole, or e.g. a bridge's connected route) holds its place; the
    /// error says so.
    pub async fn add_blackhole_route(&self, dst: IpNet) -> NlResult<()> {
        let op = format!("add route blackhole {dst}");
        let msg = blackhole_message(dst, &op)?;
        self.handle.route().add(msg).execute().await.map_err(|e| {
            let e = NlError::new(op.clone(), e);
            if e.is_exists() {
                NlError::io(
                    format!("{op} (another route to {dst} in the main table, e.g. a bridge's, holds its place)"),
                    std::io::Error::from_raw_os_error(libc::EEXIST),
                )
            } else {
                e
            }
        })
    }

    /// Deletes `blackhole DST` from the main table (`ip route del blackhole DST`).
    pub async fn del_blackhole_route(&self, dst: IpNet) -> NlResult<()> {
        let op = format!("delete route blackhole {dst}");
        let msg = blackhole_message(dst, &op)?;
        self.handle.route().del(msg).execute().await.map_err(|e| NlError::new(op, e))
    }

    /// Dumps the routes of `msg`'s family and keeps the main table's unicast
    /// ones, the only ones flannel-rs reads or owns besides blackholes.
    async fn dump_routes(&self, msg: RouteMessage, op: &str) -> NlResult<Vec<Route>> {
        Ok(self
            .dump(msg, op)
            .await?
            .iter()
            .filter(|m| in_main_table(m, RouteType::Unicast))
            .filter_map(Route::from_message)
            .collect())
    }

    async fn dump(&self, msg: RouteMessage, op: &str) -> NlResult<Vec<RouteMessage>> {
        self.handle.route().get(msg).execute().try_collect().await.map_err(|e| NlError::new(op, e))
    }

    /// Adds a unicast route in the main table (`ip route add DST [via GW] dev DEV [onlink]`).
    pub async fn add_route(&self, route: &Route, dev_name: &str) -> NlResult<()> {
        let msg = route_message(route, || route_op("add", route, dev_name))?;
        self.handle.route().add(msg).execute().await.map_err(|e| NlError::new(route_op("add", route, dev_name), e))
    }

    /// Adds or replaces a route (`ip route replace ...`).
    pub async fn replace_route(&self, route: &Route, dev_name: &str) -> NlResult<()> {
        let msg = route_message(route, || route_op("replace", route, dev_name))?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::new(route_op("replace", route, dev_name), e))
    }

    /// Deletes a route (`ip route del ...`).
    pub async fn del_route(&self, route: &Route, dev_name: &str) -> NlResult<()> {
        let msg = route_message(route, || route_op("delete", route, dev_name))?;
        self.handle.route().del(msg).execute().await.map_err(|e| NlError::new(route_op("delete", route, dev_name), e))
    }
}

/// The request for `blackhole DST` in the main table.
fn blackhole_message(dst: IpNet, op: &str) -> NlResult<RouteMessage> {
    let msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| NlError::io(op, std::io::Error::other(e.to_string())))?
        .kind(RouteType::BlackHole)
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::Universe)
        .table_id(libc::RT_TABLE_MAIN.into())
        .build();
    Ok(msg)
}

/// The operation in `ip route` words, for error messages.
pub(super) fn route_op(verb: &str, route: &Route, dev_name: &str) -> String {
    let via = route.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    let onlink = if route.onlink { " onlink" } else { "" };
    format!("{verb} route {}{via} dev {dev_name}{onlink}", route.dst)
}

/// The request for `route`; `op` names it in the error if it cannot be built.
pub(super) fn route_message(route: &Route, op: impl Fn() -> String) -> NlResult<RouteMessage> {
    let bad = |e: String| NlError::io(op(), std::io::Error::other(e));
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())
        .map_err(|e| bad(e.to_string()))?;
    if let Some(gw) = route.gateway {
        b = b.gateway(gw).map_err(|e| bad(e.to_string()))?;
    }
    if let Some(oif) = route.oif {
        b = b.output_interface(oif);
    }
    if route.onlink {
        b = b.onlink();
    }
    let scope = match route.scope {
        Scope::Global => RouteScope::Universe,
        Scope::Link => RouteScope::Link,
    };
    Ok(b.protocol(RouteProtocol::Boot).scope(scope).build())
}
