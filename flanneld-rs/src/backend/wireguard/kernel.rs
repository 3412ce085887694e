//! The kernel path: when the kernel has WireGuard (`ip link add flannel-wg
//! type wireguard` works), flannel's own way: a kernel `wireguard` link
//! configured over generic netlink (`WG_CMD_SET_DEVICE`: private key,
//! listen port, and per peer its public key, PSK, endpoint, allowed IPs and
//! keepalive). Keys, lease data and the peer table are the user-space
//! path's; only the device differs. When the link cannot be made
//! (EOPNOTSUPP and the like: no module), the caller falls back to user
//! space.
//!
//! The messages are built here by hand (a few attributes, laid out as the
//! kernel's `include/uapi/linux/wireguard.h` says) and sent on plain
//! netlink sockets, synchronously: the reconcile starts the data path and
//! hands it peers under `block_in_place`, and each change is one small
//! request.
//!
//! The kernels this project is tested on have no WireGuard module, so this
//! path has not run here: the message encoding is unit-tested, the fallback
//! runs for real in every wireguard test.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use ipnet::IpNet;
use log::{info, warn};

use super::WireguardSpec;
use crate::backend::{DataPath, TunnelPeer};

// include/uapi/linux/wireguard.h
const WG_GENL_NAME: &str = "wireguard";
const WG_GENL_VERSION: u8 = 1;
const WG_CMD_SET_DEVICE: u8 = 1;
const WGDEVICE_F_REPLACE_PEERS: u32 = 1 << 0;
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_FLAGS: u16 = 5;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_F_REMOVE_ME: u32 = 1 << 0;
const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 1 << 1;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_FLAGS: u16 = 3;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

// include/uapi/linux/genetlink.h, netlink.h, rtnetlink.h, if_link.h
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// A netlink message under construction: header, fixed part, attributes
/// (each padded to 4 bytes, nests closed with their length).
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(fixed);
        Msg { buf, nests: Vec::new() }
    }

    fn genl(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Msg {
        Msg::new(family, flags, seq, &[cmd, version, 0, 0])
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn u8(&mut self, kind: u16, v: u8) -> &mut Msg {
        self.attr(kind, &[v])
    }

    fn u16(&mut self, kind: u16, v: u16) -> &mut Msg {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn u32(&mut self, kind: u16, v: u32) -> &mut Msg {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut z = s.as_bytes().to_vec();
        z.push(0);
        self.attr(kind, &z)
    }

    fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Msg {
        let start = self.nests.pop().expect("end without begin");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nest");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One peer as the kernel device gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConf {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Remove it (only the key is sent).
    pub remove: bool,
    /// `PSK`.
    pub psk: Option<[u8; 32]>,
    /// Its lease's public IP (of the device's family) and port.
    pub endpoint: SocketAddr,
    /// `PersistentKeepaliveInterval` (0: off).
    pub keepalive: u16,
    /// Its subnets (replacing what it had).
    pub allowed: Vec<IpNet>,
}

/// `WG_CMD_SET_DEVICE` for device `ifname`: with `key` our private key and
/// listen port, replacing every peer (as flannel does when it makes the
/// device); then `peers` added, changed or removed.
pub fn set_device_msg(
    family: u16,
    seq: u32,
    ifname: &str,
    key: Option<(&[u8; 32], u16)>,
    peers: &[PeerConf],
) -> Vec<u8> {
    let mut m = Msg::genl(family, NLM_F_REQUEST | NLM_F_ACK, seq, WG_CMD_SET_DEVICE, WG_GENL_VERSION);
    m.str(WGDEVICE_A_IFNAME, ifname);
    if let Some((private, port)) = key {
        m.attr(WGDEVICE_A_PRIVATE_KEY, private)
            .u16(WGDEVICE_A_LISTEN_PORT, port)
            .u32(WGDEVICE_A_FLAGS, WGDEVICE_F_REPLACE_PEERS);
    }
    if !peers.is_empty() {
        m.begin(WGDEVICE_A_PEERS);
        for (i, p) in peers.iter().enumerate() {
            // Array elements: the kernel reads the nests in order, their
            // type is their index.
            m.begin(i as u16).attr(WGPEER_A_PUBLIC_KEY, &p.public_key);
            if p.remove {
                m.u32(WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME).end();
                continue;
            }
            m.u32(WGPEER_A_FLAGS, WGPEER_F_REPLACE_ALLOWEDIPS);
            if let Some(psk) = &p.psk {
                m.attr(WGPEER_A_PRESHARED_KEY, psk);
            }
            m.attr(WGPEER_A_ENDPOINT, &sockaddr(p.endpoint))
                .u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, p.keepalive)
                .begin(WGPEER_A_ALLOWEDIPS);
            for (j, net) in p.allowed.iter().enumerate() {
                let (af, addr) = match net {
                    IpNet::V4(n) => (libc::AF_INET, n.network().octets().to_vec()),
                    IpNet::V6(n) => (libc::AF_INET6, n.network().octets().to_vec()),
                };
                m.begin(j as u16)
                    .u16(WGALLOWEDIP_A_FAMILY, af as u16)
                    .attr(WGALLOWEDIP_A_IPADDR, &addr)
                    .u8(WGALLOWEDIP_A_CIDR_MASK, net.prefix_len())
                    .end();
            }
            m.end().end();
        }
        m.end();
    }
    m.finish()
}

/// `struct sockaddr_in` (16 bytes) or `struct sockaddr_in6` (28) as the
/// kernel lays them out (port and address in network order; flow info and
/// scope 0).
fn sockaddr(a: SocketAddr) -> Vec<u8> {
    match a {
        SocketAddr::V4(a) => {
            let mut b = vec![0u8; 16];
            b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            b
        }
        SocketAddr::V6(a) => {
            let mut b = vec![0u8; 28];
            b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b
        }
    }
}

/// `CTRL_CMD_GETFAMILY` for `name`.
fn get_family_msg(seq: u32, name: &str) -> Vec<u8> {
    let mut m = Msg::genl(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1);
    m.str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// `struct ifinfomsg` (16 bytes) with all fields zero.
const IFINFOMSG: [u8; 16] = [0; 16];

/// `ip link add <name> mtu <mtu> type wireguard`.
fn new_link_msg(seq: u32, name: &str, mtu: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, &IFINFOMSG);
    m.str(IFLA_IFNAME, name).u32(IFLA_MTU, mtu).begin(IFLA_LINKINFO).str(IFLA_INFO_KIND, "wireguard").end();
    m.finish()
}

fn link_msg(kind: u16, seq: u32, name: &str) -> Vec<u8> {
    let mut m = Msg::new(kind, NLM_F_REQUEST | NLM_F_ACK, seq, &IFINFOMSG);
    m.str(IFLA_IFNAME, name);
    m.finish()
}

/// The attributes of a message body `b` (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// Sends `msg` on a fresh netlink socket of `protocol` and returns the
/// replies' bodies (after the netlink header) up to the kernel's
/// acknowledgement; an error reply is the errno it carries.
fn request(protocol: i32, msg: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    // SAFETY: SO_RCVTIMEO takes a timeval, given with its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // SAFETY: zeroed sockaddr_nl is the kernel's address.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and to are valid for their lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut b = &buf[..n as usize];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            if len < 16 || len > b.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink reply"));
            }
            let body = &b[16..len];
            match kind {
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                    return if errno == 0 { Ok(replies) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                NLMSG_DONE => return Ok(replies),
                _ => replies.push((kind, body.to_vec())),
            }
            b = &b[((len + 3) & !3).min(b.len())..];
        }
    }
}

/// The generic netlink id of the `wireguard` family; ENOENT when the kernel
/// has none (no module).
fn wireguard_family() -> io::Result<u16> {
    family_id(WG_GENL_NAME)
}

/// The generic netlink id of family `name`.
fn family_id(name: &str) -> io::Result<u16> {
    let replies = request(libc::NETLINK_GENERIC, &get_family_msg(1, name))?;
    for (_, body) in &replies {
        for (kind, v) in attrs(body.get(4..).unwrap_or_default()) {
            if kind == CTRL_ATTR_FAMILY_ID && v.len() >= 2 {
                return Ok(u16::from_ne_bytes([v[0], v[1]]));
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, format!("CTRL_CMD_GETFAMILY {name}: no family id in the reply")))
}

/// The kind (`IFLA_INFO_KIND`) of link `name`: `None` when there is no such
/// link, `Some("")` for a link without one.
fn link_kind(name: &str) -> io::Result<Option<String>> {
    match request(libc::NETLINK_ROUTE, &link_msg(RTM_GETLINK, 1, name)) {
        Ok(replies) => {
            for (_, body) in &replies {
                for (kind, v) in attrs(body.get(16..).unwrap_or_default()) {
                    if kind == IFLA_LINKINFO {
                        for (k, v) in attrs(v) {
                            if k == IFLA_INFO_KIND {
                                return Ok(Some(String::from_utf8_lossy(v).trim_end_matches('\0').to_string()));
                            }
                        }
                    }
                }
            }
            Ok(Some(String::new()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `e`, from making a `wireguard` link, means this kernel has no
/// WireGuard (rather than a fault to report).
pub fn means_no_kernel_wireguard(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENODEV | libc::ENOENT | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    )
}

/// Makes `flannel-wg` a kernel WireGuard link: `Ok(None)` when it is one
/// (made now, or left by an earlier run), `Ok(Some(why))` when the kernel
/// has none. A TUN of that name (an earlier user-space run's) is replaced
/// only when the kernel has WireGuard loaded.
pub fn create_link(name: &str, mtu: u32) -> io::Result<Option<io::Error>> {
    match request(libc::NETLINK_ROUTE, &new_link_msg(1, name, mtu)) {
        Ok(_) => return Ok(None),
        Err(e) if means_no_kernel_wireguard(&e) => return Ok(Some(e)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    match link_kind(name)?.as_deref() {
        Some("wireguard") => Ok(None),
        None => create_link(name, mtu),
        Some(other) => {
            // Without the module loaded, keep it (the user-space path takes
            // a TUN over); with it, flannel's way: delete and make anew.
            if let Err(e) = wireguard_family() {
                if means_no_kernel_wireguard(&e) {
                    let why =
                        format!("{name} exists as a {other:?} device and no wireguard netlink family is loaded ({e})");
                    return Ok(Some(io::Error::new(e.kind(), why)));
                }
                return Err(e);
            }
            warn!("{name} exists as a {other:?} device; deleting it for a kernel WireGuard device, as flannel does");
            request(libc::NETLINK_ROUTE, &link_msg(RTM_DELLINK, 1, name))?;
            request(libc::NETLINK_ROUTE, &new_link_msg(1, name, mtu)).map(|_| None)
        }
    }
}

/// The kernel device's peers as last set: public key -> its configuration.
type Peers = BTreeMap<[u8; 32], PeerConf>;

/// The kernel path as the reconcile loop sees a data path.
pub struct KernelWg {
    name: String,
    family: u16,
    psk: Option<[u8; 32]>,
    keepalive: u16,
    /// One device for both families (see [`super::OneDevice`]).
    one_device: Option<super::OneDevice>,
    peers: Mutex<Peers>,
}

impl KernelWg {
    /// Configures the kernel device `spec.name` (made by [`create_link`]):
    /// our key and port, no peers yet.
    pub fn start(spec: &WireguardSpec) -> anyhow::Result<KernelWg> {
        let family = wireguard_family().map_err(|e| anyhow::anyhow!("generic netlink family wireguard: {e}"))?;
        request(
            libc::NETLINK_GENERIC,
            &set_device_msg(family, 1, &spec.name, Some((&spec.private_key, spec.port)), &[]),
        )
        .map_err(|e| anyhow::anyhow!("WG_CMD_SET_DEVICE {} (key, ListenPort {}): {e}", spec.name, spec.port))?;
        info!(
            "wireguard backend: kernel WireGuard device {} (UDP port {}, MTU {}, {})",
            spec.name,
            spec.port,
            spec.mtu,
            if spec.psk.is_some() { "with PSK" } else { "no PSK" }
        );
        Ok(KernelWg {
            name: spec.name.clone(),
            family,
            psk: spec.psk,
            keepalive: spec.keepalive,
            one_device: spec.one_device,
            peers: Mutex::new(Peers::new()),
        })
    }

    /// What `table` asks of the device beside what it has (`have`): peers
    /// to add or change, and removals. Unchanged peers are not sent (their
    /// sessions, and an endpoint they roamed to, stay).
    pub fn changes(&self, have: &Peers, table: &[(IpNet, TunnelPeer)]) -> (Peers, Vec<PeerConf>) {
        let mut want = Peers::new();
        for g in super::group(table, self.one_device) {
            want.insert(
                g.key,
                PeerConf {
                    public_key: g.key,
                    remove: false,
                    psk: self.psk,
                    endpoint: g.endpoint,
                    keepalive: self.keepalive,
                    allowed: g.subnets,
                },
            );
        }
        let mut send: Vec<PeerConf> = want.values().filter(|p| have.get(&p.public_key) != Some(*p)).cloned().collect();
        for key in have.keys().filter(|k| !want.contains_key(*k)) {
            send.push(PeerConf { remove: true, allowed: Vec::new(), ..have[key].clone() });
        }
        (want, send)
    }
}

impl DataPath for KernelWg {
    fn running(&self) -> bool {
        // The kernel runs it; gone only with its device, which the
        // reconcile's observation sees (a device to create) and restarts
        // us for, without a netlink request of its own here.
        true
    }

    fn set_peers(&self, table: &[(IpNet, TunnelPeer)]) {
        let mut have = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let (want, send) = self.changes(&have, table);
        if send.is_empty() {
            return;
        }
        // In batches, each well below a netlink message's size limit.
        let sent = send.chunks(64).try_for_each(|batch| {
            request(libc::NETLINK_GENERIC, &set_device_msg(self.family, 1, &self.name, None, batch)).map(|_| ())
        });
        match sent {
            Ok(()) => {
                for p in &send {
                    let key = crate::config::encode_key(&p.public_key);
                    if p.remove {
                        info!("wireguard backend: removed peer key {key}");
                    } else {
                        info!("wireguard backend: peer {} via {} key {key}", join(&p.allowed), p.endpoint);
                    }
                }
                *have = want;
            }
            // Kept as it was: the next reconcile sends the changes again.
            Err(e) => warn!("wireguard backend: WG_CMD_SET_DEVICE {} ({} peers): {e}", self.name, send.len()),
        }
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([b[i], b[i + 1]])
    }

    #[test]
    fn set_device_lays_out_the_uapi_attributes() {
        let key = [7u8; 32];
        let peer = PeerConf {
            public_key: [9u8; 32],
            remove: false,
            psk: Some([5u8; 32]),
            endpoint: "192.0.2.11:51820".parse().unwrap(),
            keepalive: 25,
            allowed: vec!["10.244.1.0/24".parse().unwrap()],
        };
        let m = set_device_msg(0x1d, 42, "flannel-wg", Some((&key, 51820)), &[peer]);
        // nlmsghdr: length, family as type, request|ack, seq.
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16_at(&m, 4), 0x1d);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 42);
        // genlmsghdr: WG_CMD_SET_DEVICE, version 1.
        assert_eq!(&m[16..20], &[1, 1, 0, 0]);
        let top = attrs(&m[20..]);
        let kinds: Vec<u16> = top.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [2, 3, 6, 5, 8], "IFNAME, PRIVATE_KEY, LISTEN_PORT, FLAGS, PEERS");
        assert_eq!(top[0].1, b"flannel-wg\0");
        assert_eq!(top[1].1, &key);
        assert_eq!(top[2].1, &51820u16.to_ne_bytes());
        assert_eq!(top[3].1, &1u32.to_ne_bytes(), "WGDEVICE_F_REPLACE_PEERS");
        // The nests carry NLA_F_NESTED.
        let raw_peers_type = {
            let mut b = &m[20..];
            loop {
                let len = u16_at(b, 0) as usize;
                if u16_at(b, 2) & !NLA_F_NESTED == WGDEVICE_A_PEERS {
                    break u16_at(b, 2);
                }
                b = &b[(len + 3) & !3..];
            }
        };
        assert_eq!(raw_peers_type, WGDEVICE_A_PEERS | NLA_F_NESTED);
        let peers = attrs(top[4].1);
        assert_eq!(peers.len(), 1);
        let p = attrs(peers[0].1);
        let kinds: Vec<u16> = p.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [1, 3, 2, 4, 5, 9], "PUBLIC_KEY, FLAGS, PRESHARED_KEY, ENDPOINT, KEEPALIVE, ALLOWEDIPS");
        assert_eq!(p[0].1, &[9u8; 32]);
        assert_eq!(p[1].1, &2u32.to_ne_bytes(), "WGPEER_F_REPLACE_ALLOWEDIPS");
        assert_eq!(p[2].1, &[5u8; 32]);
        // struct sockaddr_in: AF_INET, port and address in network order, zero padding.
        let mut sin = vec![];
        sin.extend_from_slice(&2u16.to_ne_bytes());
        sin.extend_from_slice(&[0xca, 0x6c, 192, 0, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p[3].1, &sin[..]);
        assert_eq!(p[4].1, &25u16.to_ne_bytes());
        let ips = attrs(p[5].1);
        assert_eq!(ips.len(), 1);
        let ip = attrs(ips[0].1);
        assert_eq!(ip, [(1, &2u16.to_ne_bytes()[..]), (2, &[10, 244, 1, 0][..]), (3, &[24u8][..])]);
        // Every attribute length is within the message, every offset 4-aligned.
        assert!(m.len().is_multiple_of(4));
    }

    #[test]
    fn a_removal_sends_the_key_and_remove_me_only_and_peer_changes_only_what_changed() {
        let m = set_device_msg(
            0x1d,
            1,
            "flannel-wg",
            None,
            &[PeerConf {
                public_key: [3u8; 32],
                remove: true,
                psk: Some([5u8; 32]),
                endpoint: "192.0.2.12:51820".parse().unwrap(),
                keepalive: 0,
                allowed: vec![],
            }],
        );
        let top = attrs(&m[20..]);
        assert_eq!(top.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [2, 8], "no key, port or flags");
        let p = attrs(attrs(top[1].1)[0].1);
        assert_eq!(p, [(1, &[3u8; 32][..]), (3, &1u32.to_ne_bytes()[..])]);

        let kw = KernelWg {
            name: "flannel-wg".into(),
            family: 0x1d,
            psk: None,
            keepalive: 0,
            one_device: None,
            peers: Mutex::default(),
        };
        let peer = |ip: [u8; 4], key: u8| TunnelPeer {
            ip: ip.into(),
            wireguard: Some(crate::backend::WireguardPeer { public_key: [key; 32], port: 51820 }),
        };
        let a: IpNet = "10.244.1.0/24".parse().unwrap();
        let b: IpNet = "10.244.2.0/24".parse().unwrap();
        let (have, send) = kw.changes(&Peers::new(), &[(a, peer([192, 0, 2, 11], 1)), (b, peer([192, 0, 2, 12], 2))]);
        assert_eq!(send.len(), 2);
        assert!(send.iter().all(|p| !p.remove && p.allowed.len() == 1));
        let (_, send) = kw.changes(&have, &[(a, peer([192, 0, 2, 11], 1)), (b, peer([192, 0, 2, 12], 2))]);
        assert!(send.is_empty(), "unchanged peers are not sent: {send:?}");
        // Node b re-keyed: the new key added, the old one removed.
        let (_, send) = kw.changes(&have, &[(a, peer([192, 0, 2, 11], 1)), (b, peer([192, 0, 2, 12], 3))]);
        assert_eq!(send.len(), 2, "{send:?}");
        assert_eq!((send[0].public_key, send[0].remove), ([3; 32], false));
        assert_eq!((send[1].public_key, send[1].remove), ([2; 32], true));
    }

    /// The socket code against this kernel (no privileges needed): the
    /// controller family resolves to its fixed id, `wireguard` to an id or
    /// (no module) ENOENT, which counts as "no kernel WireGuard"; link
    /// kinds read back.
    #[test]
    fn requests_and_replies_round_trip_with_the_kernel() {
        assert_eq!(family_id("nlctrl").unwrap(), GENL_ID_CTRL);
        match wireguard_family() {
            Ok(id) => assert!(id > GENL_ID_CTRL, "{id}"),
            Err(e) => assert!(means_no_kernel_wireguard(&e), "{e}"),
        }
        assert_eq!(link_kind("lo").unwrap().as_deref(), Some(""));
        assert_eq!(link_kind("flt-no-such0").unwrap(), None);
    }

    #[test]
    fn an_ipv6_peer_gets_a_sockaddr_in6_endpoint_and_an_inet6_allowed_ip() {
        let peer = PeerConf {
            public_key: [9u8; 32],
            remove: false,
            psk: None,
            endpoint: "[2001:db8::11]:51821".parse().unwrap(),
            keepalive: 0,
            allowed: vec!["2001:db8:10:1::/64".parse().unwrap()],
        };
        let m = set_device_msg(0x1d, 1, "flannel-wg-v6", Some((&[7u8; 32], 51821)), &[peer]);
        let top = attrs(&m[20..]);
        assert_eq!(top[0].1, b"flannel-wg-v6\0");
        assert_eq!(top[2].1, &51821u16.to_ne_bytes());
        let p = attrs(attrs(top[4].1)[0].1);
        let kinds: Vec<u16> = p.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [1, 3, 4, 5, 9], "PUBLIC_KEY, FLAGS, ENDPOINT, KEEPALIVE, ALLOWEDIPS");
        // struct sockaddr_in6: AF_INET6, port, flow info 0, address, scope 0.
        let mut sin6 = vec![];
        sin6.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        sin6.extend_from_slice(&51821u16.to_be_bytes());
        sin6.extend_from_slice(&[0; 4]);
        sin6.extend_from_slice(&"2001:db8::11".parse::<std::net::Ipv6Addr>().unwrap().octets());
        sin6.extend_from_slice(&[0; 4]);
        assert_eq!(p[2].1, &sin6[..]);
        let ip = attrs(attrs(p[4].1)[0].1);
        let want: [u8; 16] = "2001:db8:10:1::".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(ip, [(1, &(libc::AF_INET6 as u16).to_ne_bytes()[..]), (2, &want[..]), (3, &[64u8][..])]);
    }

    #[test]
    fn new_link_asks_for_kind_wireguard() {
        let m = new_link_msg(1, "flannel-wg", 1420);
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let a = attrs(&m[32..]);
        assert_eq!(a[0], (IFLA_IFNAME, &b"flannel-wg\0"[..]));
        assert_eq!(a[1], (IFLA_MTU, &1420u32.to_ne_bytes()[..]));
        assert_eq!(attrs(a[2].1), [(IFLA_INFO_KIND, &b"wireguard\0"[..])]);
    }
}
