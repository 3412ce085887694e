//! The TUN device, with the three ioctls it takes written here directly
//! (`TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`, plus `TUNSETPERSIST`).
//!
//! Why not a crate: tun-tap (the starting crate list's) has neither
//! multi-queue nor offloads. tun-rs has both, but its offload path copies
//! every segment of a super-packet into a separate buffer on read and every
//! payload into one buffer on write (its API hands out contiguous packets),
//! and configures addresses with ioctls beside our netlink facade. Our
//! data path needs the raw descriptors, so
//! that a segment can be sent straight out of the read buffer and a merged
//! packet written straight from the receive buffers by scatter/gather; the
//! ioctls that give us those descriptors are the few dozen lines below.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The TUN character device.
const CLONE_DEV: &CStr = c"/dev/net/tun";

/// What to ask of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunOptions {
    /// `IFF_MULTI_QUEUE`: one descriptor (queue) per worker.
    pub multi_queue: bool,
    /// `IFF_VNET_HDR` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`: the
    /// kernel hands us TCP super-packets and accepts them from us (IPv6 ones
    /// only on a device that carries IPv6: wireguard's `flannel-wg-v6`).
    pub offload: bool,
}

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ioctl(fd: &File, req: libc::Ioctl, arg: libc::c_ulong, what: &str, dev: &str) -> io::Result<()> {
    // SAFETY: `fd` is an open TUN descriptor; every request used here takes
    // an integer argument by value.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what} on {dev}: {e}")));
    }
    Ok(())
}

/// Opens one queue of TUN device `name` (creating the device when it does
/// not exist) with `IFF_TUN | IFF_NO_PI` and `opts`. The descriptor is
/// non-blocking and close-on-exec; the device lives in the network namespace
/// of the calling thread.
///
/// Fails with `InvalidInput` (EINVAL) when a device of that name exists with
/// different queue flags or is not a TUN device.
pub fn open_queue(name: &str, opts: TunOptions) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(CLONE_DEV.to_str().expect("ASCII path"))
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", CLONE_DEV.to_string_lossy())))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if opts.multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    if opts.offload {
        flags |= libc::IFF_VNET_HDR;
    }
    req.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) a `struct ifreq`, which
    // `IfReq` lays out (name, then the flags union member, padded to 40).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    // The header size is per device and survives reopening: always set it.
    if opts.offload {
        let size: libc::c_int = super::vnet::LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ on {name}: {e}")));
        }
    }
    // Offloads are per device too: turn them off explicitly without a
    // virtio header, or the kernel would hand us super-packets we cannot
    // tell apart from plain ones.
    let offloads = if opts.offload { libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 } else { 0 };
    ioctl(&file, libc::TUNSETOFFLOAD, offloads.into(), "TUNSETOFFLOAD", name)?;
    Ok(OwnedFd::from(file))
}

/// Makes the device outlive our descriptors (`TUNSETPERSIST`), so that a
/// restart of the data path finds its address and route in place and the
/// Network's traffic never falls through to the default route meanwhile.
pub fn set_persist(queue: &OwnedFd, name: &str, on: bool) -> io::Result<()> {
    let file = File::from(queue.try_clone()?);
    ioctl(&file, libc::TUNSETPERSIST, on.into(), "TUNSETPERSIST", name)
}
