//! The one netlink facade. Every kernel change flannel-rs makes goes through the
//! typed operations here; rtnetlink's builders and quirks stay inside this
//! module. One file per kind of object, each adding its operations to
//! [`Netlink`]:
//!
//! - `link`: [`Link`], bridges, veth pairs, up/down, MTU, hairpin;
//! - `vxlan`: the VTEP ([`VxlanSpec`], [`VxlanLink`]);
//! - `address`: addresses on links;
//! - `route`: [`Route`]s of the main table and `ip route get`;
//! - `neighbour`: permanent ARP entries ([`Neigh`]);
//! - `fdb`: forwarding entries towards peers ([`Fdb`]);
//! - `ethtool`: transmit checksum offload (`SIOCETHTOOL`, not netlink);
//! - `monitor`: change notifications ([`monitor`], [`Change`]);
//! - `bulk`: many neighbours, FDB entries and routes per system call
//!   ([`BulkOp`], [`Netlink::apply_bulk`]);
//! - `errors`: [`NlError`] and its errno helpers.
//!
//! Errors name the operation and the object (`add address 10.244.1.5/24 on
//! eth0: File exists (os error 17)`) and expose the errno so callers can treat
//! "already there" and "already gone" as success where that is the intent.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::netns::NetNs;

mod address;
mod bulk;
mod errors;
mod ethtool;
mod fdb;
mod link;
mod monitor;
mod neighbour;
mod route;
mod vxlan;

pub use bulk::BulkOp;
pub use errors::{NlError, NlResult};
pub use fdb::Fdb;
pub use link::Link;
pub use monitor::{monitor, Change, NeighEntry};
pub use neighbour::Neigh;
pub use route::{Route, Scope};
pub use vxlan::{VxlanLink, VxlanSpec, DEFAULT_VXLAN_PORT};

/// A handle on one namespace's routing netlink socket.
#[derive(Clone)]
pub struct Netlink {
    /// rtnetlink's request handle; its connection task runs on the runtime
    /// that was current at `connect`.
    pub(crate) handle: rtnetlink::Handle,
    /// An `AF_INET` datagram socket of the same namespace, for the
    /// `SIOCETHTOOL` ioctl: opened at the first ethtool call (the CNI
    /// plugin's handles never make one), in the namespace `ns` names (the
    /// calling thread's for [`Netlink::connect`]).
    pub(crate) ioctl: Arc<OnceLock<OwnedFd>>,
    /// A plain blocking routing socket of the same namespace for
    /// [`Netlink::apply_bulk`], opened (like `ioctl`) at its first use; the
    /// lock also keeps two batches from sharing it at once.
    pub(crate) bulk: Arc<std::sync::Mutex<Option<bulk::BulkSocket>>>,
    /// The namespace of a handle made by [`Netlink::connect_in`], held by
    /// its descriptor (never reopened by path).
    ns: Option<Arc<NetNs>>,
}

impl Netlink {
    /// The ioctl socket of this handle's namespace, opened the first time.
    pub(crate) fn ioctl_fd(&self) -> NlResult<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        if let Some(fd) = self.ioctl.get() {
            return Ok(fd.as_fd());
        }
        let opened = match &self.ns {
            None => ioctl_socket(),
            Some(ns) => ns.in_place(ioctl_socket),
        };
        let fd = opened.map_err(|e| NlError::io("open an ioctl socket", e))?;
        Ok(self.ioctl.get_or_init(|| fd).as_fd())
    }

    /// Sends one request with `flags` (which ask for an ack) and waits for
    /// the kernel's answer: what rtnetlink's `execute` does for a change.
    pub(crate) async fn acked(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        use futures_util::StreamExt;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut answers = self.handle.clone().request(req)?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(rtnetlink::Error::NetlinkError(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// An `AF_INET` datagram socket in the calling thread's namespace.
fn ioctl_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Netlink {
    /// A socket in the calling thread's namespace. Must be called inside a
    /// tokio runtime: the connection task is spawned onto it.
    pub fn connect() -> NlResult<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NlError::io("open netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle, ioctl: Arc::default(), bulk: Arc::default(), ns: None })
    }

    /// A socket inside namespace `ns` (see [`NetNs::netlink_socket`]).
    pub fn connect_in(ns: &NetNs) -> NlResult<Netlink> {
        let op = || format!("open netlink socket in {}", ns.path().display());
        let fd = ns.netlink_socket().map_err(|e| NlError::io(op(), e))?;
        // SAFETY: we own the descriptor and pass ownership on.
        let sock = unsafe { <netlink_sys::TokioSocket as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        tokio::spawn(conn);
        let held = ns.try_clone().map_err(|e| NlError::io(op(), e))?;
        Ok(Netlink { handle, ioctl: Arc::default(), bulk: Arc::default(), ns: Some(Arc::new(held)) })
    }
}
