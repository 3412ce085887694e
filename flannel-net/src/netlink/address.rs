//! Addresses: dumps per link and for the whole namespace, add and delete.

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::AddressFamily;

use super::{Netlink, NlError, NlResult};

impl Netlink {
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
}
