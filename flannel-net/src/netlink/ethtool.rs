//! Transmit checksum offload of a device (`ethtool -k`/`-K DEV tx`), through
//! the `SIOCETHTOOL` ioctl on an `AF_INET` socket of the handle's namespace.
//! Not netlink, but it belongs with the device it changes: the reconcile
//! keeps it as it keeps the VTEP's MTU.

use std::os::fd::AsRawFd;

use super::{Netlink, NlError, NlResult};

/// `SIOCETHTOOL` (linux/sockios.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GTXCSUM`: whether any transmit checksum feature is on (linux/ethtool.h).
const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `ETHTOOL_STXCSUM`: turns every transmit checksum feature on or off.
const ETHTOOL_STXCSUM: u32 = 0x17;

/// linux/ethtool.h `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// linux/if.h `struct ifreq`, with the `ifr_data` member of its union
/// (padded to the union's 24 bytes).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

impl Netlink {
    fn ethtool(&self, name: &str, cmd: u32, data: u32, op: impl Fn() -> String) -> NlResult<u32> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(NlError::io(op(), std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
        }
        let mut value = EthtoolValue { cmd, data };
        let mut req = IfreqData { name: [0; libc::IFNAMSIZ], data: &mut value, _pad: [0; 16] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `req` and `value` outlive the call; the kernel reads the
        // name and reads/writes `value` through the pointer.
        let fd = self.ioctl_fd()?.as_raw_fd();
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(NlError::io(op(), std::io::Error::last_os_error()));
        }
        Ok(value.data)
    }

    /// Whether transmit checksum offload is on for device `name`
    /// (`ethtool -k NAME`'s `tx-checksumming`).
    pub fn tx_checksum(&self, name: &str) -> NlResult<bool> {
        self.ethtool(name, ETHTOOL_GTXCSUM, 0, || format!("ethtool -k {name} (read tx-checksumming)")).map(|v| v != 0)
    }

    /// Turns transmit checksum offload of device `name` on or off
    /// (`ethtool -K NAME tx on|off`).
    pub fn set_tx_checksum(&self, name: &str, on: bool) -> NlResult<()> {
        let word = if on { "on" } else { "off" };
        self.ethtool(name, ETHTOOL_STXCSUM, on as u32, || format!("ethtool -K {name} tx {word}")).map(|_| ())
    }
}
