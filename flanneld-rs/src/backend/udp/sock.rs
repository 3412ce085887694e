//! The UDP side: a socket bound to our underlay address and port, a send
//! batch that becomes one `sendmmsg` (each message a UDP GSO train of equal
//! segments to one peer), and a receive batch filled by one `recvmmsg` (each
//! message possibly a UDP GRO train of equal segments from one peer).
//! IPv4 by default; [`UdpSocket::bind_ip`] opens an IPv6 one (the
//! wireguard backend's `flannel-wg-v6`), and the batches take either.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Messages in one `sendmmsg`.
pub const TX_MSGS: usize = 64;
/// iovecs of all messages of one `sendmmsg` (each segment takes one or two).
pub const TX_IOVS: usize = 1024;
/// Header slots for cut segments; each holds one IP+TCP header.
pub const HDR_SLOTS: usize = 512;
/// Size of a header slot: the largest IP+TCP header, rounded up.
pub const HDR_SLOT: usize = 128;
/// Segments in one UDP GSO message: the kernel's limit was 64 before 6.x
/// raised it to 128; 64 works everywhere.
pub const GSO_SEGS: usize = 64;
/// Bytes in one UDP GSO message: a UDP datagram's payload limit (65507)
/// applies to the train as a whole, less some slack.
pub const GSO_BYTES: usize = 65_000;
/// Size of a receive buffer: the largest UDP payload, which is also the
/// largest train UDP GRO builds.
pub const RX_BUF: usize = 65_536;

/// Socket buffer sizes we ask for: a GRO train is charged as ~64 KB, so
/// the default (~200 KB) would hold three and drop the rest of a burst.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// `setsockopt(2)` with `value` as the option's bytes.
pub(crate) fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to `value` and its size; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    setsockopt(fd, level, name, &value)
}

fn sockaddr(ip: u32, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: ip.to_be() },
        sin_zero: [0; 8],
    }
}

/// A sockaddr of either family in the room of the larger one, and its length.
pub fn sockaddr_of(ip: IpAddr, port: u16) -> (libc::sockaddr_in6, libc::socklen_t) {
    match ip {
        IpAddr::V4(v4) => {
            // SAFETY: sockaddr_in6 is plain data for which all-zero is valid.
            let mut room: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            let sa = sockaddr(u32::from(v4), port);
            // SAFETY: a sockaddr_in (16 bytes) fits in a sockaddr_in6 (28).
            unsafe { std::ptr::write_unaligned((&mut room as *mut libc::sockaddr_in6).cast(), sa) };
            (room, mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        IpAddr::V6(v6) => (
            libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.octets() },
                sin6_scope_id: 0,
            },
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ),
    }
}

/// The address in a sockaddr of either family that the kernel wrote.
fn address_in(sa: &libc::sockaddr_in6) -> SocketAddr {
    if i32::from(sa.sin6_family) == libc::AF_INET6 {
        // An IPv4 sender on a dual-stack socket comes as ::ffff:a.b.c.d.
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr).to_canonical();
        SocketAddr::new(ip, u16::from_be(sa.sin6_port))
    } else {
        // SAFETY: an AF_INET address, which is a sockaddr_in at the start.
        let v4: libc::sockaddr_in = unsafe { std::ptr::read_unaligned((sa as *const libc::sockaddr_in6).cast()) };
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))), u16::from_be(v4.sin_port))
    }
}

/// Our UDP socket. Blocking for sends (a full send buffer is back-pressure,
/// not a reason to drop); receives never block (`MSG_DONTWAIT`).
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
}

impl UdpSocket {
    /// Binds `addr:port`, with `SO_REUSEPORT` so that each worker has its own
    /// socket on the same port (the kernel spreads peers over them, or
    /// [`super::steer`]'s program spreads flows).
    pub fn bind(addr: Ipv4Addr, port: u16) -> io::Result<UdpSocket> {
        Self::bind_ip(IpAddr::V4(addr), port)
    }

    /// [`UdpSocket::bind`] for either family; an IPv6 socket is IPv6 only.
    pub fn bind_ip(addr: IpAddr, port: u16) -> io::Result<UdpSocket> {
        Self::bind_with(addr, port, true)
    }

    /// An IPv6 socket on every address of both families (`IPV6_V6ONLY`
    /// off): it takes IPv4 destinations as they are, and IPv4 senders
    /// arrive as IPv4 addresses ([`Received::from`]).
    pub fn bind_dual(port: u16) -> io::Result<UdpSocket> {
        Self::bind_with(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port, false)
    }

    fn bind_with(addr: IpAddr, port: u16, v6only: bool) -> io::Result<UdpSocket> {
        let domain = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        if addr.is_ipv6() {
            setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only.into())?;
        }
        for (force, plain) in [(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF), (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)] {
            // The FORCE variants ignore net.core.[rw]mem_max but need
            // CAP_NET_ADMIN; without it, take what the limit allows.
            if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        let (sa, len) = sockaddr_of(addr, port);
        // SAFETY: `sa` is a valid sockaddr of the given length.
        let rc = unsafe { libc::bind(raw, &sa as *const libc::sockaddr_in6 as *const libc::sockaddr, len) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("bind UDP {}: {e}", SocketAddr::new(addr, port))));
        }
        Ok(UdpSocket { fd })
    }

    /// Turns on UDP GRO (`UDP_GRO`, Linux 5.0): trains of equal datagrams
    /// from one sender arrive as one message. False when the kernel lacks it.
    pub fn enable_gro(&self) -> bool {
        setsockopt_int(self.fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
    }

    /// Whether the kernel knows UDP GSO (`UDP_SEGMENT`, Linux 4.18).
    pub fn gso_supported(&self) -> bool {
        setsockopt_int(self.fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
    }

    /// The descriptor, for poll.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One message being assembled.
#[derive(Debug, Clone, Copy)]
struct Msg {
    dest: IpAddr,
    port: u16,
    iov_start: usize,
    /// iovecs per segment (1: a packet as read; 2: cut header + payload).
    iov_per_seg: usize,
    /// Size of each segment but the last, which may be shorter.
    seg: usize,
    segs: usize,
    bytes: usize,
    /// A shorter segment ended the train.
    closed: bool,
    /// The flow its segments belong to ([`TxBatch::set_flow`]).
    flow: u64,
}

/// What a flush achieved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Inner packets that left.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Inner packets the kernel refused (unreachable peer, no buffer...).
    pub errors: u64,
}

/// A batch of datagrams for one `sendmmsg`. The iovecs point into buffers
/// the caller owns (see [`TxBatch::push`]) and into this batch's header
/// slots; all memory is allocated once, here.
pub struct TxBatch {
    port: u16,
    gso: bool,
    msgs: Vec<Msg>,
    iovs: Box<[libc::iovec]>,
    niov: usize,
    /// The messages' iovecs as sent: those of `iovs`, with neighbours in
    /// memory joined into one.
    joined: Box<[libc::iovec]>,
    hdrs: Box<[u8]>,
    nhdr: usize,
    mmsgs: Box<[libc::mmsghdr]>,
    addrs: Box<[libc::sockaddr_in6]>,
    cmsgs: Box<[[u64; 4]]>,
    /// Totals since the caller last took them.
    pub sent: Sent,
    /// Set when the kernel refused a GSO send, so GSO was turned off.
    pub gso_failed: Option<io::Error>,
    /// The flow of the segments pushed from now on.
    flow: u64,
}

impl TxBatch {
    /// An empty batch for peers listening on `port`, using UDP GSO if `gso`.
    pub fn new(port: u16, gso: bool) -> TxBatch {
        let empty_iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        TxBatch {
            port,
            gso,
            msgs: Vec::with_capacity(TX_MSGS),
            iovs: vec![empty_iov; TX_IOVS].into_boxed_slice(),
            niov: 0,
            joined: vec![empty_iov; TX_IOVS].into_boxed_slice(),
            hdrs: vec![0u8; HDR_SLOTS * HDR_SLOT].into_boxed_slice(),
            nhdr: 0,
            // SAFETY: mmsghdr is plain data for which all-zero is valid.
            mmsgs: (0..TX_MSGS).map(|_| unsafe { mem::zeroed() }).collect(),
            addrs: vec![sockaddr_of(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).0; TX_MSGS].into_boxed_slice(),
            cmsgs: vec![[0u64; 4]; TX_MSGS].into_boxed_slice(),
            sent: Sent::default(),
            gso_failed: None,
            flow: 0,
        }
    }

    /// Bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.msgs.iter().map(|m| m.bytes).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Says that the segments pushed from now on belong to `flow` (any
    /// number that differs between flows): a GSO train never holds two
    /// flows, because the receiver picks a worker per train, by its first
    /// packet ([`super::steer`]). Without a call, everything is one flow.
    pub fn set_flow(&mut self, flow: u64) {
        self.flow = flow;
    }

    /// Makes room for one more segment (a message, two iovecs and a header
    /// slot), sending what is queued if needed.
    pub fn reserve(&mut self, sock: &UdpSocket) {
        if self.msgs.len() == TX_MSGS || self.niov + 2 > TX_IOVS || self.nhdr == HDR_SLOTS {
            self.flush(sock);
        }
    }

    /// The next free header slot. Call [`TxBatch::reserve`] first; the slot
    /// is used by the next [`TxBatch::push`] with a non-zero `hdr_len`.
    pub fn header(&mut self) -> &mut [u8] {
        &mut self.hdrs[self.nhdr * HDR_SLOT..][..HDR_SLOT]
    }

    /// Queues one inner packet for `dest`: `hdr_len` bytes of the header slot
    /// (0 for none) followed by `data`. Joins the previous message as one more
    /// GSO segment when it goes to the same peer with the same layout and
    /// size (or is shorter, which closes that train).
    ///
    /// # Safety
    ///
    /// `data` must stay valid and unchanged until the next flush (the next
    /// [`TxBatch::flush`], or a [`TxBatch::reserve`] that flushes): only a
    /// pointer to it is kept. Call [`TxBatch::reserve`] before each push.
    pub unsafe fn push(&mut self, dest: u32, hdr_len: usize, data: &[u8]) {
        // SAFETY: the caller keeps the contract of `push_to`.
        unsafe { self.push_to(IpAddr::V4(Ipv4Addr::from(dest)), self.port, hdr_len, data) }
    }

    /// [`TxBatch::push`] to a peer listening on `port` rather than the
    /// batch's port (WireGuard peers each have theirs), of either family
    /// (the socket's).
    ///
    /// # Safety
    ///
    /// As for [`TxBatch::push`].
    pub unsafe fn push_to(&mut self, dest: IpAddr, port: u16, hdr_len: usize, data: &[u8]) {
        let len = hdr_len + data.len();
        let per_seg = if hdr_len > 0 { 2 } else { 1 };
        if hdr_len > 0 {
            let slot = self.hdrs[self.nhdr * HDR_SLOT..].as_mut_ptr();
            self.iovs[self.niov] = libc::iovec { iov_base: slot.cast(), iov_len: hdr_len };
            self.niov += 1;
            self.nhdr += 1;
        }
        self.iovs[self.niov] = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        self.niov += 1;
        let joins = self.gso
            && self.msgs.last().is_some_and(|m| {
                m.dest == dest
                    && m.port == port
                    && m.flow == self.flow
                    && !m.closed
                    && m.iov_per_seg == per_seg
                    && len <= m.seg
                    && m.segs < GSO_SEGS
                    && m.bytes + len <= GSO_BYTES
            });
        if joins {
            let m = self.msgs.last_mut().expect("checked");
            m.segs += 1;
            m.bytes += len;
            m.closed = len < m.seg;
        } else {
            self.msgs.push(Msg {
                dest,
                port,
                iov_start: self.niov - per_seg,
                iov_per_seg: per_seg,
                seg: len,
                segs: 1,
                bytes: len,
                closed: false,
                flow: self.flow,
            });
        }
    }

    /// Sends everything queued with as few `sendmmsg` calls as the kernel
    /// allows, and empties the batch.
    pub fn flush(&mut self, sock: &UdpSocket) {
        let n = self.msgs.len();
        let mut joined = 0;
        for (i, m) in self.msgs.iter().enumerate() {
            let (sa, len) = sockaddr_of(m.dest, m.port);
            self.addrs[i] = sa;
            // Segments laid out back to back (gso::spread_in_place, the
            // wireguard backend's arena) go as one iovec: the kernel's copy
            // costs tens of ns per iovec.
            let start = joined;
            let iovs = &self.iovs[m.iov_start..m.iov_start + m.segs * m.iov_per_seg];
            joined += join_adjacent(iovs, &mut self.joined[start..]);
            let hdr = &mut self.mmsgs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            hdr.msg_namelen = len;
            hdr.msg_iov = self.joined[start..].as_mut_ptr();
            hdr.msg_iovlen = joined - start;
            if m.segs > 1 {
                let buf = self.cmsgs[i].as_mut_ptr() as *mut u8;
                // SAFETY: `buf` has room for CMSG_SPACE(2) = 24 bytes (it is
                // 32) and is 8-byte aligned, as cmsghdr requires.
                unsafe {
                    let c = buf as *mut libc::cmsghdr;
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, m.seg as u16);
                    hdr.msg_control = buf.cast();
                    hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                }
            } else {
                hdr.msg_control = std::ptr::null_mut();
                hdr.msg_controllen = 0;
            }
        }
        let mut i = 0;
        while i < n {
            // SAFETY: mmsgs[i..n] were filled above; every pointer in them
            // points into this batch or into buffers the caller keeps alive
            // until now (the contract of `push`).
            let rc = unsafe { libc::sendmmsg(sock.raw(), self.mmsgs[i..].as_mut_ptr(), (n - i) as libc::c_uint, 0) };
            if rc > 0 {
                for m in &self.msgs[i..i + rc as usize] {
                    self.sent.packets += m.segs as u64;
                    self.sent.bytes += m.bytes as u64;
                }
                i += rc as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let m = self.msgs[i];
            // A device without checksum offload refuses GSO with EIO (older
            // kernels); a path MTU below a segment makes it EMSGSIZE (EINVAL
            // on older kernels). Send that train packet by packet (the
            // kernel fragments if it must) and stop using GSO.
            if m.segs > 1 && matches!(err.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)) {
                self.gso = false;
                self.gso_failed.get_or_insert(err);
                self.send_one_by_one(sock, i);
            } else {
                self.sent.errors += m.segs as u64;
            }
            i += 1;
        }
        self.msgs.clear();
        self.niov = 0;
        self.nhdr = 0;
    }

    fn send_one_by_one(&mut self, sock: &UdpSocket, i: usize) {
        let m = self.msgs[i];
        for s in 0..m.segs {
            let hdr = &mut self.mmsgs[i].msg_hdr;
            hdr.msg_iov = self.iovs[m.iov_start + s * m.iov_per_seg..].as_mut_ptr();
            hdr.msg_iovlen = m.iov_per_seg;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            let len: usize = (0..m.iov_per_seg).map(|k| self.iovs[m.iov_start + s * m.iov_per_seg + k].iov_len).sum();
            // SAFETY: as in `flush`.
            let rc = unsafe { libc::sendmsg(sock.raw(), hdr, 0) };
            if rc < 0 {
                self.sent.errors += 1;
            } else {
                self.sent.packets += 1;
                self.sent.bytes += len as u64;
            }
        }
    }
}

/// Copies `src` into `dst`, each iovec that starts where the one before it
/// ends joined to it; returns how many `dst` holds. `dst` must have room
/// for all of `src`.
fn join_adjacent(src: &[libc::iovec], dst: &mut [libc::iovec]) -> usize {
    let mut n = 0;
    for iov in src {
        if n > 0 && (dst[n - 1].iov_base as usize).wrapping_add(dst[n - 1].iov_len) == iov.iov_base as usize {
            dst[n - 1].iov_len += iov.iov_len;
        } else {
            dst[n] = *iov;
            n += 1;
        }
    }
    n
}

/// What one received message holds.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// The sender's address and port, of either family.
    pub from: SocketAddr,
    /// Bytes received.
    pub len: usize,
    /// Size of each datagram of a GRO train (the last may be shorter), or
    /// `len` for a single datagram.
    pub seg: usize,
}

impl Received {
    /// The sender's IPv4 address as a number (0 for an IPv6 sender).
    pub fn src(&self) -> u32 {
        match self.from.ip() {
            IpAddr::V4(v4) => u32::from(v4),
            IpAddr::V6(_) => 0,
        }
    }
}

/// Buffers and headers for one `recvmmsg`, allocated once.
pub struct RxBatch {
    bufs: Vec<Box<[u8]>>,
    mmsgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in6]>,
    cmsgs: Box<[[u64; 8]]>,
    n: usize,
}

impl RxBatch {
    /// Room for `msgs` messages of up to [`RX_BUF`] bytes each.
    pub fn new(msgs: usize) -> RxBatch {
        let msgs = msgs.max(1);
        let empty_iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        RxBatch {
            bufs: (0..msgs).map(|_| vec![0u8; RX_BUF].into_boxed_slice()).collect(),
            // SAFETY: mmsghdr is plain data for which all-zero is valid.
            mmsgs: (0..msgs).map(|_| unsafe { mem::zeroed() }).collect(),
            iovs: vec![empty_iov; msgs].into_boxed_slice(),
            addrs: vec![sockaddr_of(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).0; msgs].into_boxed_slice(),
            cmsgs: vec![[0u64; 8]; msgs].into_boxed_slice(),
            n: 0,
        }
    }

    /// Receives what is waiting, up to the batch size, without blocking.
    /// Returns how many messages arrived (0 when none).
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let cap = self.bufs.len();
        for i in 0..cap {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: RX_BUF };
            let hdr = &mut self.mmsgs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = mem::size_of::<[u64; 8]>() as _;
            hdr.msg_flags = 0;
        }
        loop {
            // SAFETY: every mmsghdr points into this batch's own buffers.
            let rc = unsafe {
                libc::recvmmsg(
                    sock.raw(),
                    self.mmsgs.as_mut_ptr(),
                    cap as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                self.n = rc as usize;
                return Ok(self.n);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.n = 0;
                    return Ok(0);
                }
                _ => return Err(e),
            }
        }
    }

    /// Message `i` of the last [`RxBatch::recv`].
    pub fn get(&self, i: usize) -> Received {
        let m = &self.mmsgs[i];
        let len = m.msg_len as usize;
        let from = address_in(&self.addrs[i]);
        let mut seg = len;
        // SAFETY: walks the control messages the kernel wrote into our
        // buffer, within msg_controllen, with the libc helpers.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if v > 0 {
                        seg = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
            }
        }
        Received { from, len, seg: seg.max(1) }
    }

    /// The buffer of message `i`.
    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i]
    }

    /// The buffer of message `i`, to patch packets in place.
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i]
    }

    /// Every buffer, to resolve packet references.
    pub fn bufs(&self) -> &[Box<[u8]>] {
        &self.bufs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &[u8], at: usize, len: usize) -> libc::iovec {
        libc::iovec { iov_base: buf[at..].as_ptr() as *mut libc::c_void, iov_len: len }
    }

    #[test]
    fn joins_iovecs_that_follow_each_other_in_memory() {
        let (a, b) = (vec![0u8; 100], vec![0u8; 100]);
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        let mut dst = [empty; 8];
        // Back to back, then a gap, then back to back again (an empty one
        // between), then another buffer.
        let src = [iov(&a, 0, 10), iov(&a, 10, 20), iov(&a, 40, 5), iov(&a, 45, 0), iov(&a, 45, 5), iov(&b, 0, 7)];
        let n = join_adjacent(&src, &mut dst);
        let got: Vec<(usize, usize)> =
            dst[..n].iter().map(|v| ((v.iov_base as usize).wrapping_sub(a.as_ptr() as usize), v.iov_len)).collect();
        let b_at = (b.as_ptr() as usize).wrapping_sub(a.as_ptr() as usize);
        assert_eq!(got, [(0, 30), (40, 10), (b_at, 7)]);
        // Header slots apart from their payloads: nothing joined.
        let src = [iov(&b, 0, 4), iov(&a, 0, 10), iov(&b, 8, 4), iov(&a, 20, 10)];
        assert_eq!(join_adjacent(&src, &mut dst), 4);
    }
}
