//! Many kernel changes per system call, for the reconcile's bulk entries
//! (neighbours, FDB entries, routes). Each op is the same request with the
//! same flags as its one-at-a-time method (both build it with the functions
//! of `neighbour`, `fdb` and `route`); a batch serializes them back to back
//! into one buffer, sends it in one `sendmsg` on a plain blocking routing
//! socket, and reads the acks many per `recvmmsg`, matching each to its op
//! by sequence number.
//!
//! The kernel handles every request of a `sendmsg` inside that call, one
//! after the other, acking each (an error does not stop the rest), so all
//! the acks are queued when it returns. What this saves against one request
//! at a time is the system calls and the async machinery per request
//! (rtnetlink's connection task, its futures and channels), which at 5000
//! peers cost more than the kernel's own work: `ip -batch`'s way, with fewer
//! calls still.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::fdb::{del_fdb_op, del_fdb_request, set_fdb_op, set_fdb_request};
use super::neighbour::{del_neigh_op, del_neigh_request, set_neigh_op, set_neigh_request};
use super::route::{route_message, route_op};
use super::{Fdb, Neigh, Netlink, NlError, NlResult, Route};
use crate::netns::NetNs;

/// One change of a batch ([`Netlink::apply_bulk`]), the same request as the
/// method it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkOp {
    /// [`Netlink::set_neigh`].
    SetNeigh(Neigh),
    /// [`Netlink::del_neigh`].
    DelNeigh(Neigh),
    /// [`Netlink::set_fdb`].
    SetFdb(Fdb),
    /// [`Netlink::del_fdb`].
    DelFdb(Fdb),
    /// [`Netlink::replace_route`] (the route names its output interface).
    ReplaceRoute(Route),
    /// [`Netlink::del_route`].
    DelRoute(Route),
}

impl BulkOp {
    /// The request on link `index` and its flags, or why it cannot be built.
    fn request(&self, index: u32, dev: &str) -> NlResult<(RouteNetlinkMessage, u16)> {
        Ok(match self {
            BulkOp::SetNeigh(n) => set_neigh_request(index, n),
            BulkOp::DelNeigh(n) => del_neigh_request(index, n),
            BulkOp::SetFdb(f) => set_fdb_request(index, f),
            BulkOp::DelFdb(f) => del_fdb_request(index, f),
            BulkOp::ReplaceRoute(r) => (
                RouteNetlinkMessage::NewRoute(route_message(r, || self.op(dev))?),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE,
            ),
            BulkOp::DelRoute(r) => {
                (RouteNetlinkMessage::DelRoute(route_message(r, || self.op(dev))?), NLM_F_REQUEST | NLM_F_ACK)
            }
        })
    }

    /// The change in `ip` or `bridge` words, as its method's errors name it.
    pub fn op(&self, dev: &str) -> String {
        match self {
            BulkOp::SetNeigh(n) => set_neigh_op(dev, n),
            BulkOp::DelNeigh(n) => del_neigh_op(dev, n),
            BulkOp::SetFdb(f) => set_fdb_op(dev, f),
            BulkOp::DelFdb(f) => del_fdb_op(dev, f),
            BulkOp::ReplaceRoute(r) => route_op("replace", r, dev),
            BulkOp::DelRoute(r) => route_op("delete", r, dev),
        }
    }
}

/// Bytes of requests per `sendmsg`: about 600 of ours (48 to 60 bytes each),
/// well under the kernel's send buffer.
const SEND_BYTES: usize = 32 * 1024;
/// The receive buffer asked for (the kernel doubles it): room for the acks of
/// a whole send.
const RCVBUF: libc::c_int = 1 << 20;
/// What one ack is charged against the receive buffer, at most: its 36 bytes
/// sit in a socket buffer of about 768 bytes (x86-64). An ack that does not
/// fit is dropped, so a send carries no more requests than the buffer holds
/// acks.
const ACK_CHARGE: usize = 1024;
/// Acks read per `recvmmsg`.
const ACKS_PER_RECV: usize = 64;
/// Room for one ack: 36 bytes with `NETLINK_CAP_ACK`; without it an error
/// echoes its request (under 200 bytes), and only the headers are read.
const ACK_ROOM: usize = 256;

/// The batch socket of a [`Netlink`] handle.
pub(crate) struct BulkSocket {
    sock: Socket,
    /// The next sequence number.
    seq: u32,
    /// Requests per `sendmsg`, so that their acks fit the receive buffer.
    per_send: usize,
}

impl BulkSocket {
    /// A routing socket in namespace `ns` (the calling thread's for `None`).
    fn open(ns: Option<&NetNs>) -> io::Result<BulkSocket> {
        let new = || Socket::new(NETLINK_ROUTE);
        let mut sock = match ns {
            None => new()?,
            Some(ns) => ns.in_place(new)?,
        };
        sock.bind_auto()?;
        // An error ack carries its code, not a copy of the request (4.3+).
        let _ = sock.set_cap_ack(true);
        // Past net.core.rmem_max with CAP_NET_ADMIN (which changing routes
        // needs anyway), else up to it.
        if set_int(&sock, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            let _ = set_int(&sock, libc::SO_RCVBUF, RCVBUF);
        }
        let per_send = (sock.get_rx_buf_sz()? / ACK_CHARGE).max(1);
        Ok(BulkSocket { sock, seq: 1, per_send })
    }

    /// Sends the ops `which` (indices into `ops`), at most `per_send` per
    /// `sendmsg`, and records each answer in `results`; an op the kernel did
    /// not answer keeps `None`.
    fn run(
        &mut self,
        index: u32,
        dev: &str,
        ops: &[BulkOp],
        which: &[usize],
        per_send: usize,
        results: &mut [Option<NlResult<()>>],
    ) {
        let mut buf = Vec::with_capacity(SEND_BYTES + 256);
        let mut sent: Vec<usize> = Vec::with_capacity(per_send.min(which.len()));
        let mut room = AckRoom::new();
        let mut rest = which;
        while !rest.is_empty() {
            buf.clear();
            sent.clear();
            let first_seq = self.seq;
            let mut taken = 0;
            for &i in rest {
                if sent.len() == per_send || buf.len() >= SEND_BYTES {
                    break;
                }
                taken += 1;
                match ops[i].request(index, dev) {
                    Ok((msg, flags)) => {
                        emit(&mut buf, msg, flags, first_seq.wrapping_add(sent.len() as u32));
                        sent.push(i);
                    }
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            rest = &rest[taken..];
            if sent.is_empty() {
                continue;
            }
            self.seq = first_seq.wrapping_add(sent.len() as u32);
            if let Err(e) = self.send(&buf) {
                for &i in &sent {
                    results[i] = Some(Err(NlError::io(ops[i].op(dev), copy(&e))));
                }
                continue;
            }
            self.read_acks(first_seq, &sent, ops, dev, results, &mut room);
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.sock.send_to(buf, &kernel, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(drop),
            }
        }
    }

    /// Reads the acks of the requests `sent` (sequence numbers from
    /// `first_seq` on) until each has one or none is left. They are all
    /// queued by now, so the reads do not wait: a request the kernel did not
    /// ack (an ack dropped on a full receive buffer, which the next read
    /// reports as `ENOBUFS`) must not hang the caller.
    fn read_acks(
        &self,
        first_seq: u32,
        sent: &[usize],
        ops: &[BulkOp],
        dev: &str,
        results: &mut [Option<NlResult<()>>],
        room: &mut AckRoom,
    ) {
        let mut answered = 0;
        while answered < sent.len() {
            let n = match room.recv(self.sock.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ENOBUFS)) => continue,
                Err(_) => break,
            };
            for (seq, code) in (0..n).filter_map(|k| room.ack(k)) {
                let Some(&i) = sent.get(seq.wrapping_sub(first_seq) as usize) else { continue };
                if results[i].is_none() {
                    answered += 1;
                }
                results[i] = Some(if code == 0 { Ok(()) } else { Err(NlError::kernel(ops[i].op(dev), -code)) });
            }
        }
    }
}

impl Netlink {
    /// Applies `ops` on link `index` (named `dev` in errors; a route names
    /// its own output interface), in order, many per system call, and
    /// returns each op's result in order: the same request and the same
    /// error as the op's own method. Blocks while the kernel works (about a
    /// millisecond per hundred routes): call it off the async workers for
    /// more than a few ops.
    ///
    /// An op whose ack the kernel dropped (a full receive buffer; the sends
    /// are sized so that this does not happen) is sent again on its own.
    /// Every op here is a replace or a delete, so the repeat leaves what the
    /// first left, but a repeated delete of an entry the first one removed
    /// answers "not found".
    pub fn apply_bulk(&self, index: u32, dev: &str, ops: &[BulkOp]) -> Vec<NlResult<()>> {
        let mut guard = self.bulk.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            match BulkSocket::open(self.ns.as_deref()) {
                Ok(s) => *guard = Some(s),
                Err(e) => return ops.iter().map(|op| Err(NlError::io(op.op(dev), copy(&e)))).collect(),
            }
        }
        let sock = guard.as_mut().expect("opened above");
        let mut results: Vec<Option<NlResult<()>>> = (0..ops.len()).map(|_| None).collect();
        let all: Vec<usize> = (0..ops.len()).collect();
        sock.run(index, dev, ops, &all, sock.per_send, &mut results);
        let unanswered: Vec<usize> = (0..ops.len()).filter(|&i| results[i].is_none()).collect();
        for i in unanswered {
            sock.run(index, dev, ops, &[i], 1, &mut results);
        }
        results
            .into_iter()
            .zip(ops)
            .map(|(r, op)| {
                r.unwrap_or_else(|| Err(NlError::io(op.op(dev), io::Error::other("the kernel sent no answer"))))
            })
            .collect()
    }
}

/// Appends `msg` with `flags` and sequence number `seq` to `buf`, padded to
/// the 4 bytes the kernel steps by between messages.
fn emit(buf: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut m = NetlinkMessage::from(msg);
    m.header.flags = flags;
    m.header.sequence_number = seq;
    m.finalize();
    let len = m.buffer_len();
    let at = buf.len();
    buf.resize(at + len.next_multiple_of(4), 0);
    m.serialize(&mut buf[at..at + len]);
}

/// The sequence number and code (0, or a negated errno) of an ack
/// (`NLMSG_ERROR`); `None` for anything else. Reads the headers only, so an
/// ack cut short (an echoed request longer than its room) still counts.
fn parse_ack(d: &[u8]) -> Option<(u32, i32)> {
    if d.len() < 20 {
        return None;
    }
    let header = NetlinkBuffer::new(d);
    if header.message_type() != libc::NLMSG_ERROR as u16 {
        return None;
    }
    let code = ErrorBuffer::new(&d[16..]).code().map_or(0, |c| c.get());
    Some((header.sequence_number(), code))
}

/// Receive room for [`ACKS_PER_RECV`] acks.
struct AckRoom {
    buf: Vec<u8>,
    lens: [usize; ACKS_PER_RECV],
}

impl AckRoom {
    fn new() -> AckRoom {
        AckRoom { buf: vec![0; ACKS_PER_RECV * ACK_ROOM], lens: [0; ACKS_PER_RECV] }
    }

    /// Receives the queued acks, up to [`ACKS_PER_RECV`], without waiting
    /// (`EAGAIN` when there is none).
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: plain C structs, all-zero is their empty value.
        let mut iov: [libc::iovec; ACKS_PER_RECV] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; ACKS_PER_RECV] = unsafe { std::mem::zeroed() };
        for (k, v) in iov.iter_mut().enumerate() {
            v.iov_base = self.buf[k * ACK_ROOM..].as_mut_ptr().cast();
            v.iov_len = ACK_ROOM;
        }
        for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at its own iovec, every iovec at its
        // own ACK_ROOM bytes of `buf`; all outlive the call.
        let n = unsafe {
            libc::recvmmsg(fd, hdrs.as_mut_ptr(), ACKS_PER_RECV as _, libc::MSG_DONTWAIT as _, std::ptr::null_mut())
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs).take(n) {
            *len = (h.msg_len as usize).min(ACK_ROOM);
        }
        Ok(n)
    }

    /// The `k`th ack of the last [`AckRoom::recv`].
    fn ack(&self, k: usize) -> Option<(u32, i32)> {
        parse_ack(&self.buf[k * ACK_ROOM..k * ACK_ROOM + self.lens[k]])
    }
}

/// Sets an integer socket option.
fn set_int(sock: &Socket, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One I/O error for each op it failed.
fn copy(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::{ErrorMessage, NetlinkPayload, NLM_F_EXCL};
    use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};

    use super::*;
    use crate::netlink::Scope;

    fn neigh(i: u32) -> Neigh {
        let [_, _, a, b] = i.to_be_bytes();
        Neigh { ip: format!("10.{a}.{b}.0").parse().unwrap(), mac: crate::MacAddr([2, 0, 0, 0, a, b]) }
    }

    fn fdb(i: u32) -> Fdb {
        let [_, _, a, b] = i.to_be_bytes();
        Fdb { mac: crate::MacAddr([2, 0, 0, 0, a, b]), dst: format!("192.0.2.{}", 1 + b % 200).parse().unwrap() }
    }

    fn route(i: u32, oif: u32) -> Route {
        let n = neigh(i);
        Route {
            dst: ipnet::IpNet::new(n.ip, 24).unwrap(),
            gateway: Some(n.ip),
            oif: Some(oif),
            onlink: true,
            scope: Scope::Global,
        }
    }

    /// The batch sends what rtnetlink's builders (the one-at-a-time path
    /// before this module) send, flags included.
    #[tokio::test]
    async fn requests_are_the_builders_own() {
        let (_conn, handle, _) = rtnetlink::new_connection().unwrap();
        let replace = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;
        for n in [neigh(7), Neigh { ip: "2001:db8::".parse().unwrap(), mac: crate::MacAddr([2, 0, 0, 0, 0, 9]) }] {
            let mut b = handle.neighbours().add(3, n.ip).link_layer_address(&n.mac.0).state(NeighbourState::Permanent);
            let want = RouteNetlinkMessage::NewNeighbour(b.message_mut().clone());
            assert_eq!(BulkOp::SetNeigh(n).request(3, "flannel.1").unwrap(), (want, replace));
        }
        let f = fdb(7);
        let mut b = handle
            .neighbours()
            .add_bridge(3, &f.mac.0)
            .destination(f.dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent);
        let want = RouteNetlinkMessage::NewNeighbour(b.message_mut().clone());
        assert_eq!(BulkOp::SetFdb(f).request(3, "flannel.1").unwrap(), (want, replace));
        let r = route(7, 3);
        let msg = route_message(&r, String::new).unwrap();
        let mut b = handle.route().add(msg.clone());
        let want = RouteNetlinkMessage::NewRoute(b.message_mut().clone());
        assert_eq!(BulkOp::ReplaceRoute(r.clone()).request(3, "flannel.1").unwrap(), (want, replace));
        let (del, flags) = BulkOp::DelRoute(r).request(3, "flannel.1").unwrap();
        assert_eq!((del, flags), (RouteNetlinkMessage::DelRoute(msg), NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(replace & NLM_F_EXCL, 0);
    }

    /// Requests sit back to back at 4-byte boundaries, each with its own
    /// sequence number, as the kernel walks them.
    #[test]
    fn a_batch_parses_back_into_its_requests() {
        let ops = [BulkOp::SetNeigh(neigh(1)), BulkOp::DelFdb(fdb(2)), BulkOp::ReplaceRoute(route(3, 4))];
        let mut buf = Vec::new();
        for (k, op) in ops.iter().enumerate() {
            let (msg, flags) = op.request(4, "flannel.1").unwrap();
            emit(&mut buf, msg, flags, 40 + k as u32);
        }
        let mut at = 0;
        for (k, op) in ops.iter().enumerate() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..]).unwrap();
            let (msg, flags) = op.request(4, "flannel.1").unwrap();
            assert_eq!(m.header.sequence_number, 40 + k as u32);
            assert_eq!(m.header.flags, flags);
            // (An AF_BRIDGE entry's remote parses back as bytes, so compare
            // the request's own serialization.)
            let mut alone = NetlinkMessage::from(msg);
            alone.header.flags = flags;
            alone.header.sequence_number = 40 + k as u32;
            alone.finalize();
            let mut want = vec![0; alone.buffer_len()];
            alone.serialize(&mut want);
            assert_eq!(m.header.length as usize, want.len());
            assert_eq!(&buf[at..at + want.len()], &want[..]);
            at += want.len().next_multiple_of(4);
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn acks_give_their_sequence_number_and_code() {
        let ack = |seq: u32, code: i32| {
            let mut e = ErrorMessage::default();
            e.code = std::num::NonZeroI32::new(code);
            e.header = vec![0; 16];
            let mut m = NetlinkMessage::<RouteNetlinkMessage>::new(Default::default(), NetlinkPayload::Error(e));
            m.header.sequence_number = seq;
            m.finalize();
            let mut buf = vec![0; m.buffer_len()];
            m.serialize(&mut buf);
            buf
        };
        assert_eq!(parse_ack(&ack(9, 0)), Some((9, 0)));
        assert_eq!(parse_ack(&ack(10, -libc::EEXIST)), Some((10, -libc::EEXIST)));
        // Cut short after the code: still an answer.
        assert_eq!(parse_ack(&ack(11, -libc::ENOENT)[..20]), Some((11, -libc::ENOENT)));
        assert_eq!(parse_ack(&ack(12, 0)[..19]), None);
        let mut other = ack(13, 0);
        other[4] = libc::RTM_NEWROUTE as u8;
        assert_eq!(parse_ack(&other), None);
    }

    /// The namespace of the test and a VXLAN device in it: (namespace, index).
    fn vtep() -> (netns_fixtures::Netns, u32) {
        let ns = netns_fixtures::Netns::new("bulk").unwrap();
        ns.run_ok("ip", &["link", "add", "eth0", "type", "bridge"]);
        ns.run_ok("ip", &["addr", "add", "192.0.2.5/24", "dev", "eth0"]);
        ns.run_ok("ip", &["link", "set", "eth0", "up"]);
        ns.run_ok(
            "ip",
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                "192.0.2.5",
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        );
        ns.run_ok("ip", &["link", "set", "flannel.1", "up"]);
        let idx = ns.ip_json(&["link", "show", "flannel.1"])[0]["ifindex"].as_u64().unwrap() as u32;
        (ns, idx)
    }

    /// A handle on `ns` from this test's thread, which stays in its own
    /// namespace: the batch socket must be opened in `ns`.
    fn handle(rt: &tokio::runtime::Runtime, ns: &netns_fixtures::Netns) -> Netlink {
        let _in = rt.enter();
        Netlink::connect_in(&NetNs::open(ns.path()).unwrap()).unwrap()
    }

    /// A handle made on a thread inside the namespace from
    /// `NetNs::current()` (whose path, `/proc/thread-self/ns/net`, names
    /// another namespace on every other thread), then used from this test's
    /// thread outside it: the batch socket opens in the handle's namespace,
    /// never in the caller's. (A batch socket that reopened the path once put
    /// a route into the root namespace.)
    #[test]
    fn a_handle_on_the_current_namespace_keeps_it_on_other_threads() {
        if !netns_fixtures::require_root() {
            return;
        }
        let (ns, idx) = vtep();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let inside = NetNs::open(ns.path()).unwrap();
        let nl = inside
            .run(|| {
                let _in = rt.enter();
                Netlink::connect_in(&NetNs::current().unwrap()).unwrap()
            })
            .unwrap();
        let probe = route(9, idx);
        let results = nl.apply_bulk(idx, "flannel.1", &[BulkOp::ReplaceRoute(probe.clone())]);
        assert!(results[0].is_ok(), "{results:?}");
        let dst = probe.dst.to_string();
        let here = ns.ip_json(&["route", "show", "dev", "flannel.1"]);
        assert!(here.as_array().unwrap().iter().any(|r| r["dst"] == dst.as_str()), "{here}");
        let root = std::process::Command::new("ip").args(["route", "show", &dst]).output().unwrap();
        assert!(root.stdout.is_empty(), "{dst} in the caller's namespace: {}", String::from_utf8_lossy(&root.stdout));
    }

    /// Thousands of entries in a few sends, each op's answer at its place,
    /// the errors worded as the one-at-a-time methods word them; checked
    /// with `ip -j` and `bridge -j`.
    #[test]
    fn thousands_of_entries_and_each_error_at_its_op() {
        if !netns_fixtures::require_root() {
            return;
        }
        let (ns, idx) = vtep();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let nl = handle(&rt, &ns);
        const N: u32 = 3000;
        let mut ops: Vec<BulkOp> = (0..N).map(|i| BulkOp::SetNeigh(neigh(i))).collect();
        ops.extend((0..N).map(|i| BulkOp::SetFdb(fdb(i))));
        ops.extend((0..N).map(|i| BulkOp::ReplaceRoute(route(i, idx))));
        let results = nl.apply_bulk(idx, "flannel.1", &ops);
        assert_eq!(results.len(), ops.len());
        for (r, op) in results.iter().zip(&ops) {
            assert!(r.is_ok(), "{op:?}: {r:?}");
        }
        let neighs = ns.ip_json(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"]);
        assert_eq!(neighs.as_array().unwrap().len(), N as usize);
        let fdbs = ns.bridge_json(&["fdb", "show", "dev", "flannel.1"]);
        let with_dst = fdbs.as_array().unwrap().iter().filter(|e| e.get("dst").is_some()).count();
        assert_eq!(with_dst, N as usize);
        assert_eq!(ns.ip_json(&["route", "show", "dev", "flannel.1"]).as_array().unwrap().len(), N as usize);

        // Deletes of entries that are there and that are not, a route whose
        // gateway the kernel refuses, between good ops.
        let gone = neigh(N + 5);
        let refused = Route { onlink: false, ..route(N + 6, idx) };
        let mixed = vec![
            BulkOp::DelNeigh(neigh(0)),
            BulkOp::DelNeigh(gone),
            BulkOp::DelFdb(fdb(0)),
            BulkOp::DelFdb(fdb(N + 7)),
            BulkOp::ReplaceRoute(refused.clone()),
            BulkOp::DelRoute(route(0, idx)),
            BulkOp::DelRoute(route(N + 8, idx)),
            BulkOp::SetNeigh(neigh(N + 9)),
        ];
        let results = nl.apply_bulk(idx, "flannel.1", &mixed);
        let one_at_a_time = rt.block_on(async {
            vec![
                nl.del_neigh(idx, "flannel.1", &gone).await,
                nl.del_fdb(idx, "flannel.1", &fdb(N + 7)).await,
                nl.replace_route(&refused, "flannel.1").await,
                nl.del_route(&route(N + 8, idx), "flannel.1").await,
            ]
        });
        let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, false, false, true, false, true], "{results:?}");
        let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
        let want: Vec<String> = one_at_a_time.iter().map(|r| r.as_ref().unwrap_err().to_string()).collect();
        assert_eq!(errors, want);
        assert!(errors[0].starts_with(&format!("delete neigh {} dev flannel.1: ", gone.ip)), "{}", errors[0]);
        assert!(results[1].as_ref().unwrap_err().is_not_found());
        let neighs = ns.run_ok("ip", &["neigh", "show", "dev", "flannel.1"]);
        assert!(!neighs.contains(&format!("{} ", neigh(0).ip)), "{neighs}");
        assert!(neighs.contains(&format!("{} ", neigh(N + 9).ip)), "{neighs}");
        let routes = ns.run_ok("ip", &["route", "show", "dev", "flannel.1"]);
        assert!(!routes.contains(&format!("{} ", route(0, idx).dst)), "{routes}");
    }

    /// Acks the kernel drops on a full receive buffer are made up for: the
    /// ops without an answer go again one by one.
    #[test]
    fn acks_lost_to_a_full_receive_buffer_are_asked_again() {
        if !netns_fixtures::require_root() {
            return;
        }
        let (ns, idx) = vtep();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let nl = handle(&rt, &ns);
        assert!(nl.apply_bulk(idx, "flannel.1", &[]).is_empty());
        {
            let mut guard = nl.bulk.lock().unwrap();
            let s = guard.as_mut().expect("opened by the first batch");
            set_int(&s.sock, libc::SO_RCVBUFFORCE, 4096).unwrap();
            s.per_send = 500;
        }
        let ops: Vec<BulkOp> = (0..500).map(|i| BulkOp::SetNeigh(neigh(i))).collect();
        let results = nl.apply_bulk(idx, "flannel.1", &ops);
        assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
        let neighs = ns.ip_json(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"]);
        assert_eq!(neighs.as_array().unwrap().len(), 500);
    }
}
