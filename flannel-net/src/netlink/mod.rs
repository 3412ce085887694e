//! The one netlink facade. Every kernel change flannel-rs makes goes through the
//! typed operations here; rtnetlink's builders and quirks stay inside this file.
//!
//! Errors name the operation and the object (`add address 10.244.1.5/24 on
//! eth0: File exists (os error 17)`) and expose the errno so callers can treat
//! "already there" and "already gone" as success where that is the intent.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, IntoRawFd};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::netns::NetNs;
use crate::MacAddr;

mod overlay;
pub use overlay::{Fdb, Neigh, VxlanLink, VxlanSpec, DEFAULT_VXLAN_PORT};

/// A failed netlink operation: what was attempted, on what, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {detail}")]
pub struct NlError {
    /// The operation and its object, in `ip` words.
    pub op: String,
    /// The kernel's errno, when the kernel answered with one.
    pub errno: Option<i32>,
    detail: String,
}

impl NlError {
    pub(crate) fn new(op: impl Into<String>, err: rtnetlink::Error) -> NlError {
        let (errno, detail) = match &err {
            rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => {
                let code = -msg.raw_code();
                (Some(code), std::io::Error::from_raw_os_error(code).to_string())
            }
            other => (None, other.to_string()),
        };
        NlError { op: op.into(), errno, detail }
    }

    pub(crate) fn io(op: impl Into<String>, err: std::io::Error) -> NlError {
        NlError { op: op.into(), errno: err.raw_os_error(), detail: err.to_string() }
    }

    /// The object already exists (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno == Some(libc::EEXIST)
    }

    /// The object (or the device it hangs off) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno, Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL))
    }
}

/// Result of a netlink operation.
pub type NlResult<T> = Result<T, NlError>;

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when the link has an Ethernet one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, `vxlan`...), when it has one.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Has carrier (`LOWER_UP`): for a veth, its peer is up.
    pub lower_up: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            master: None,
            kind: None,
            peer_index: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            lower_up: msg.header.flags.contains(LinkFlags::LowerUp),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = MacAddr::from_slice(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::Link(i) => link.peer_index = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

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
}

impl Route {
    fn from_message(msg: &RouteMessage) -> Option<Route> {
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
        Some(Route { dst, gateway, oif, onlink })
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A handle on one namespace's routing netlink socket.
#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: rtnetlink::Handle,
}

impl Netlink {
    /// A socket in the calling thread's namespace. Must be called inside a
    /// tokio runtime: the connection task is spawned onto it.
    pub fn connect() -> NlResult<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NlError::io("open netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A socket inside namespace `ns` (see [`NetNs::netlink_socket`]).
    pub fn connect_in(ns: &NetNs) -> NlResult<Netlink> {
        let op = || format!("open netlink socket in {}", ns.path().display());
        let fd = ns.netlink_socket().map_err(|e| NlError::io(op(), e))?;
        // SAFETY: we own the descriptor and pass ownership on.
        let sock = unsafe { <netlink_sys::TokioSocket as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The raw message of the link called `name`, or `None`.
    pub(crate) async fn link_message(&self, name: &str) -> NlResult<Option<LinkMessage>> {
        let mut req = self.handle.link().get().match_name(name.to_string()).execute();
        match req.try_next().await {
            Ok(found) => Ok(found),
            Err(e) => {
                let e = NlError::new(format!("get link {name}"), e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link called `name`, or `None`.
    pub async fn link_by_name(&self, name: &str) -> NlResult<Option<Link>> {
        Ok(self.link_message(name).await?.as_ref().map(Link::from_message))
    }

    /// The link with index `index`, or `None`.
    pub async fn link_by_index(&self, index: u32) -> NlResult<Option<Link>> {
        let mut req = self.handle.link().get().match_index(index).execute();
        match req.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = NlError::new(format!("get link #{index}"), e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// All links (`ip link show`).
    pub async fn links(&self) -> NlResult<Vec<Link>> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| NlError::new("dump links", e))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates bridge `name` with `mtu` and hardware address `mac`, up (`ip
    /// link add NAME mtu MTU address MAC type bridge; ip link set NAME up`).
    /// `EEXIST` is returned as an error so the caller can decide how to treat a
    /// concurrent creator.
    pub async fn add_bridge(&self, name: &str, mtu: u32, mac: MacAddr) -> NlResult<()> {
        let msg = LinkBridge::new(name).mtu(mtu).address(mac.0.to_vec()).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("add bridge {name} mtu {mtu} address {mac}"), e))
    }

    /// Creates a veth pair in one request: `host_name` here, enslaved to
    /// `master` and up; `peer_name` created directly inside `peer_ns` (it never
    /// appears in this namespace, so a crash cannot strand it here). The peer
    /// cannot be brought up in the same request: the kernel configures it
    /// before the pair is joined, and opening a veth without a peer fails with
    /// `ENOTCONN`; the caller sets it up from inside the namespace. The peer
    /// gets hardware address `peer_mac`, so the caller knows it without asking.
    /// `ip link add HOST mtu MTU master M up type veth peer name PEER netns NS`.
    pub async fn add_veth_into_netns(
        &self,
        host_name: &str,
        peer_name: &str,
        peer_mac: MacAddr,
        mtu: u32,
        master: u32,
        peer_ns: &NetNs,
    ) -> NlResult<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(mtu)
            .address(peer_mac.0.to_vec())
            .setns_by_fd(peer_ns.fd().as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host_name.to_string())
            .mtu(mtu)
            .controller(master)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NlError::new(
                format!("add veth {host_name} (peer {peer_name} in {}) mtu {mtu}", peer_ns.path().display()),
                e,
            )
        })
    }

    /// Sets hairpin mode on bridge port `index` (`ip link set DEV type
    /// bridge_slave hairpin on`), so a pod can reach itself through a service IP.
    pub async fn set_hairpin(&self, index: u32, name: &str, on: bool) -> NlResult<()> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.handle.link().set_port(msg).execute().await.map_err(|e| {
            NlError::new(format!("set hairpin {} on bridge port {name}", if on { "on" } else { "off" }), e)
        })
    }

    /// Brings link `index` up (`ip link set DEV up`).
    pub async fn set_up(&self, index: u32, name: &str) -> NlResult<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle.link().set(msg).execute().await.map_err(|e| NlError::new(format!("set link {name} up"), e))
    }

    /// Brings link `index` down and takes it off its bridge, in one request
    /// (`ip link set DEV down nomaster`).
    pub async fn set_down_detached(&self, index: u32, name: &str) -> NlResult<()> {
        let msg = LinkUnspec::new_with_index(index).down().nocontroller().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("set link {name} down nomaster"), e))
    }

    /// Deletes link `index` (`ip link del DEV`). Returns `false` when there was
    /// no such link.
    pub async fn del_link(&self, index: u32, name: &str) -> NlResult<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NlError::new(format!("delete link {name}"), e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes link `name`. Returns `false` when there was no such link.
    pub async fn del_link_by_name(&self, name: &str) -> NlResult<bool> {
        match self.link_by_name(name).await? {
            None => Ok(false),
            Some(link) => self.del_link(link.index, name).await,
        }
    }

    /// Addresses on link `index` (`ip addr show dev DEV`), as address/prefix.
    pub async fn addrs(&self, index: u32) -> NlResult<Vec<IpNet>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new(format!("dump addresses of link #{index}"), e))?;
        let mut out = Vec::new();
        for msg in msgs.iter().filter(|m| m.header.index == index) {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                if let Ok(net) = IpNet::new(ip, msg.header.prefix_len) {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// Every address in the namespace with its link index (`ip addr show`).
    pub async fn all_addrs(&self) -> NlResult<Vec<(u32, IpNet)>> {
        let msgs: Vec<AddressMessage> =
            self.handle.address().get().execute().try_collect().await.map_err(|e| NlError::new("dump addresses", e))?;
        let mut out = Vec::new();
        for msg in &msgs {
            let addr = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    msg.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
            if let Some(ip) = addr {
                if let Ok(net) = IpNet::new(ip, msg.header.prefix_len) {
                    out.push((msg.header.index, net));
                }
            }
        }
        Ok(out)
    }

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

    /// Adds `addr` to link `index` (`ip addr add ADDR dev DEV`). IPv6 addresses
    /// skip duplicate address detection: IPAM already made them unique, and a
    /// tentative address would delay the pod's first packets.
    pub async fn add_addr(&self, index: u32, name: &str, addr: IpNet) -> NlResult<()> {
        let mut req = self.handle.address().add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(|e| NlError::new(format!("add address {addr} on {name}"), e))
    }

    /// Removes `addr` from link `index` (`ip addr del ADDR dev DEV`).
    pub async fn del_addr(&self, index: u32, name: &str, addr: IpNet) -> NlResult<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = match addr {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        msg.header.index = index;
        msg.header.prefix_len = addr.prefix_len();
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("delete address {addr} from {name}"), e))
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

    async fn dump_routes(&self, msg: RouteMessage, op: &str) -> NlResult<Vec<Route>> {
        let msgs: Vec<RouteMessage> =
            self.handle.route().get(msg).execute().try_collect().await.map_err(|e| NlError::new(op, e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.table == libc::RT_TABLE_MAIN && m.header.kind == RouteType::Unicast)
            .filter_map(Route::from_message)
            .collect())
    }

    /// Adds a unicast route in the main table (`ip route add DST [via GW] dev DEV [onlink]`).
    pub async fn add_route(&self, route: &Route, dev_name: &str) -> NlResult<()> {
        let msg = route_message(route, &route_op("add", route, dev_name))?;
        self.handle.route().add(msg).execute().await.map_err(|e| NlError::new(route_op("add", route, dev_name), e))
    }

    /// Adds or replaces a route (`ip route replace ...`).
    pub async fn replace_route(&self, route: &Route, dev_name: &str) -> NlResult<()> {
        let msg = route_message(route, &route_op("replace", route, dev_name))?;
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
        let msg = route_message(route, &route_op("delete", route, dev_name))?;
        self.handle.route().del(msg).execute().await.map_err(|e| NlError::new(route_op("delete", route, dev_name), e))
    }
}

fn route_op(verb: &str, route: &Route, dev_name: &str) -> String {
    let via = route.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    let onlink = if route.onlink { " onlink" } else { "" };
    format!("{verb} route {}{via} dev {dev_name}{onlink}", route.dst)
}

fn route_message(route: &Route, op: &str) -> NlResult<RouteMessage> {
    let bad = |e: String| NlError::io(op, std::io::Error::other(e));
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
    let scope = if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link };
    Ok(b.protocol(RouteProtocol::Boot).scope(scope).build())
}

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
/// monitor`). Must be called inside a tokio runtime.
pub fn monitor() -> NlResult<tokio::sync::mpsc::UnboundedReceiver<Change>> {
    use futures_util::StreamExt;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    use rtnetlink::MulticastGroup as G;
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[G::Link, G::Ipv4Ifaddr, G::Ipv4Route, G::Neigh])
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
