//! The overlay's VXLAN device (the VTEP): the spec we want, what the kernel
//! reports, which differences need a new device, and creating it.

use std::net::IpAddr;

use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::LinkVxlan;

use super::{Link, Netlink, NlError, NlResult};
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
    /// Local tunnel address: the node's public IP (IPv6 for flannel's
    /// `flannel-v6.<VNI>`).
    pub local: IpAddr,
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
    /// Transmit checksum offload (`ethtool -K NAME tx`) to keep: `Some(false)`
    /// keeps it off (NAT of encapsulated packets and checksum offload do
    /// not mix on some kernels), `None` leaves it as the kernel or the
    /// administrator has it (flannel's way). Kept by the reconcile, not an
    /// attribute of the create request.
    pub tx_checksum: Option<bool>,
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
    pub local: Option<IpAddr>,
    /// Underlay device.
    pub dev: Option<u32>,
    /// UDP port.
    pub port: Option<u16>,
    /// Learning.
    pub learning: Option<bool>,
    /// GBP.
    pub gbp: bool,
    /// Transmit checksum offload, when read (`ethtool -k`; not part of the
    /// link message: [`Netlink::vxlan_by_name`] asks for it).
    pub tx_checksum: Option<bool>,
}

impl VxlanLink {
    /// Reads the generic link attributes and the VXLAN ones.
    fn from_message(msg: &LinkMessage) -> VxlanLink {
        let base = Link::from_message(msg);
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
            tx_checksum: None,
        };
        for attr in &msg.attributes {
            let LinkAttribute::LinkInfo(infos) = attr else { continue };
            for info in infos {
                let LinkInfo::Data(InfoData::Vxlan(items)) = info else { continue };
                for item in items {
                    match item {
                        InfoVxlan::Id(id) => v.vni = Some(*id),
                        InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(*ip)),
                        InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(*ip)),
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

/// An optional attribute in words, `unset` when the kernel did not report it.
fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
}

impl Netlink {
    /// The VXLAN device called `name`, or `None`.
    /// Its transmit checksum offload is read too (`None` when that fails:
    /// the device went between the two requests).
    pub async fn vxlan_by_name(&self, name: &str) -> NlResult<Option<VxlanLink>> {
        let mut link = self.link_message(name).await?.as_ref().map(VxlanLink::from_message);
        if let Some(l) = link.as_mut() {
            l.tx_checksum = self.tx_checksum(name).ok();
        }
        Ok(link)
    }

    /// Creates the VTEP, up (`ip link add NAME address MAC mtu MTU type vxlan
    /// id VNI local IP dev DEV dstport PORT [nolearning] [gbp] txqueuelen 0; ip link set up`).
    pub async fn add_vxlan(&self, spec: &VxlanSpec) -> NlResult<()> {
        let b = LinkVxlan::new(&spec.name, spec.vni);
        let b = match spec.local {
            IpAddr::V4(v4) => b.local(v4),
            IpAddr::V6(v6) => b.local6(v6),
        };
        let mut b =
            b.dev(spec.dev).port(spec.port).learning(spec.learning).mtu(spec.mtu).address(spec.mac.0.to_vec()).up();
        if spec.gbp {
            b = b.gbp();
        }
        let mut msg = b.build();
        // Upstream flannel creates its VTEP with a transmit queue length of
        // 0 (IFLA_TXQLEN 0), where the kernel's default for a new link is
        // 1000: the same device on both, so a mixed cluster's nodes match.
        msg.attributes.push(LinkAttribute::TxQueueLen(0));
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NlError::new(
                format!(
                    "add vxlan {} id {} local {} dev #{} dstport {} mtu {}",
                    spec.name, spec.vni, spec.local, spec.dev, spec.port, spec.mtu
                ),
                e,
            )
        })
    }
}
