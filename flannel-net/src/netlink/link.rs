//! Links: look-ups and dumps, the CNI bridge, veth pairs into a pod's
//! namespace, and setting a link up, down, its MTU or its bridge-port flags.

use std::os::fd::AsRawFd;

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};

use super::{Netlink, NlError, NlResult};
use crate::netns::NetNs;
use crate::MacAddr;

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
    /// Reads the attributes we use; the VXLAN view builds on it.
    pub(super) fn from_message(msg: &LinkMessage) -> Link {
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

impl Netlink {
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
    ///
    /// Returns the host end as the kernel announces it when it echoes the
    /// creation (`NLM_F_ECHO`, honoured for links since Linux 6.2): its
    /// index, MAC and peer index without a second request. `None` from an
    /// older kernel; the caller then asks for the link by name.
    pub async fn add_veth_into_netns(
        &self,
        host_name: &str,
        peer_name: &str,
        peer_mac: MacAddr,
        mtu: u32,
        master: u32,
        peer_ns: &NetNs,
    ) -> NlResult<Option<Link>> {
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
        let op = || format!("add veth {host_name} (peer {peer_name} in {}) mtu {mtu}", peer_ns.path().display());
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewLink(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO;
        let mut answers = self.handle.clone().request(req).map_err(|e| NlError::new(op(), e))?;
        let mut echoed = None;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::Error(e) if e.raw_code() != 0 => {
                    return Err(NlError::new(op(), rtnetlink::Error::NetlinkError(e)))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    let link = Link::from_message(&m);
                    // Only the link we made (the echo names it); the
                    // connection delivers nothing else to this request.
                    if link.name == host_name {
                        echoed = Some(link);
                    }
                }
                _ => {}
            }
        }
        Ok(echoed)
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

    /// Sets the MTU of link `index` (`ip link set DEV mtu MTU`).
    pub async fn set_mtu(&self, index: u32, name: &str, mtu: u32) -> NlResult<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle.link().set(msg).execute().await.map_err(|e| NlError::new(format!("set link {name} mtu {mtu}"), e))
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
}
