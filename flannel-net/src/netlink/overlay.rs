//! The overlay's kernel objects: the VXLAN VTEP, ARP neighbours and FDB
//! entries on it. Part of the one netlink facade.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::{Netlink, NlError, NlResult};
use crate::MacAddr;

/// The kernel's VXLAN port when none is given (Linux's historical 8472, which
/// is what flannel uses, not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// The VTEP we want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// `flannel.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local tunnel address: the node's public IP.
    pub local: Ipv4Addr,
    /// Underlay interface index.
    pub dev: u32,
    /// UDP port.
    pub port: u16,
    /// Kernel FDB learning.
    pub learning: bool,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Device MTU.
    pub mtu: u32,
    /// Hardware address.
    pub mac: MacAddr,
}

/// A VXLAN device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanLink {
    /// Interface index.
    pub index: u32,
    /// Hardware address.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_INFO_KIND` (`vxlan` unless someone took the name).
    pub kind: Option<String>,
    /// VNI.
    pub vni: Option<u32>,
    /// Local address.
    pub local: Option<Ipv4Addr>,
    /// Underlay device.
    pub dev: Option<u32>,
    /// UDP port.
    pub port: Option<u16>,
    /// Learning.
    pub learning: Option<bool>,
    /// GBP.
    pub gbp: bool,
}

impl VxlanLink {
    fn from_message(msg: &LinkMessage) -> VxlanLink {
        let base = super::Link::from_message(msg);
        let mut v = VxlanLink {
            index: base.index,
            mac: base.mac,
            mtu: base.mtu,
            up: base.up,
            kind: base.kind,
            vni: None,
            local: None,
            dev: None,
            port: None,
            learning: None,
            gbp: false,
        };
        for attr in &msg.attributes {
            let LinkAttribute::LinkInfo(infos) = attr else { continue };
            for info in infos {
                let LinkInfo::Data(InfoData::Vxlan(items)) = info else { continue };
                for item in items {
                    match item {
                        InfoVxlan::Id(id) => v.vni = Some(*id),
                        InfoVxlan::Local(ip) => v.local = Some(*ip),
                        InfoVxlan::Link(dev) => v.dev = Some(*dev),
                        InfoVxlan::Port(p) => v.port = Some(*p),
                        InfoVxlan::Learning(l) => v.learning = Some(*l),
                        InfoVxlan::Gbp => v.gbp = true,
                        _ => {}
                    }
                }
            }
        }
        v
    }

    /// What makes this device unusable as `spec` without recreating it (the
    /// kernel cannot change these on a live VXLAN device), in words.
    pub fn incompatibilities(&self, spec: &VxlanSpec) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind.as_deref() != Some("vxlan") {
            out.push(format!("{} is a {} device, not vxlan", spec.name, self.kind.as_deref().unwrap_or("plain")));
            return out;
        }
        let mut check = |what: &str, have: String, want: String| {
            if have != want {
                out.push(format!("{what} is {have}, want {want}"));
            }
        };
        check("VNI", fmt_opt(self.vni), spec.vni.to_string());
        check("local address", fmt_opt(self.local), spec.local.to_string());
        check("underlay device index", fmt_opt(self.dev), spec.dev.to_string());
        check("UDP port", fmt_opt(self.port), spec.port.to_string());
        check("learning", fmt_opt(self.learning), spec.learning.to_string());
        check("GBP", self.gbp.to_string(), spec.gbp.to_string());
        out
    }
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
}

/// A permanent ARP entry: `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// The peer's VTEP address (`<peer subnet>.0`).
    pub ip: Ipv4Addr,
    /// The peer's VTEP MAC.
    pub mac: MacAddr,
}

/// A forwarding entry: `bridge fdb replace MAC dev DEV dst IP self permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    /// The peer's VTEP MAC.
    pub mac: MacAddr,
    /// The peer's public IP.
    pub dst: Ipv4Addr,
}

/// `NUD_PERMANENT` is one bit of the state; `bridge fdb append` sets
/// `NUD_NOARP` beside it, which the typed enum reports as "other".
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & 0x80 != 0
}

impl Netlink {
    /// The VXLAN device called `name`, or `None`.
    pub async fn vxlan_by_name(&self, name: &str) -> NlResult<Option<VxlanLink>> {
        Ok(self.link_message(name).await?.as_ref().map(VxlanLink::from_message))
    }

    /// Creates the VTEP, up (`ip link add NAME address MAC mtu MTU type vxlan
    /// id VNI local IP dev DEV dstport PORT [nolearning] [gbp]; ip link set up`).
    pub async fn add_vxlan(&self, spec: &VxlanSpec) -> NlResult<()> {
        let mut b = LinkVxlan::new(&spec.name, spec.vni)
            .local(spec.local)
            .dev(spec.dev)
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .up();
        if spec.gbp {
            b = b.gbp();
        }
        self.handle.link().add(b.build()).execute().await.map_err(|e| {
            NlError::new(
                format!(
                    "add vxlan {} id {} local {} dev #{} dstport {} mtu {}",
                    spec.name, spec.vni, spec.local, spec.dev, spec.port, spec.mtu
                ),
                e,
            )
        })
    }

    /// Sets the MTU of link `index` (`ip link set DEV mtu MTU`).
    pub async fn set_mtu(&self, index: u32, name: &str, mtu: u32) -> NlResult<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle.link().set(msg).execute().await.map_err(|e| NlError::new(format!("set link {name} mtu {mtu}"), e))
    }

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
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.ifindex == index && is_permanent(m.header.state)) {
            let mut dst = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => dst = Some(*v4),
                    // netlink-packet-route cannot tell an AF_BRIDGE entry's
                    // remote's family from the header, so it hands back bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                out.push(Fdb { mac, dst });
            }
        }
        Ok(out)
    }

    /// Adds or replaces a permanent FDB entry with a remote.
    pub async fn set_fdb(&self, index: u32, dev: &str, f: &Fdb) -> NlResult<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &f.mac.0)
            .destination(IpAddr::V4(f.dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::new(format!("replace fdb {} dev {dev} dst {} self permanent", f.mac, f.dst), e))
    }

    /// Deletes an FDB entry.
    pub async fn del_fdb(&self, index: u32, dev: &str, f: &Fdb) -> NlResult<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(f.dst)));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("delete fdb {} dev {dev} dst {}", f.mac, f.dst), e))
    }
}
