//! Network namespaces: opening them and making netlink sockets inside them.
//!
//! A netlink socket belongs to the namespace of the thread that created it, for
//! its whole life. So to talk to a pod's namespace we create the socket on a
//! short-lived dedicated thread that has `setns`-ed into it, and hand the file
//! descriptor back. No thread that runs async tasks ever changes namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// An open handle on a network namespace (a file such as `/run/netns/x` or
/// `/proc/<pid>/ns/net`). The namespace stays alive while the handle is open.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path`. `NotFound` when the path does not exist.
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<NetNs> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file descriptor (for `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Creates a `NETLINK_ROUTE` socket that lives in this namespace.
    pub fn netlink_socket(&self) -> io::Result<OwnedFd> {
        let fd = self.file.try_clone()?;
        std::thread::scope(|s| {
            s.spawn(move || -> io::Result<OwnedFd> {
                // This thread is ours alone and ends right after, so switching
                // its namespace affects nothing else.
                enter(fd.as_fd())?;
                let sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
                // SAFETY: into_raw_fd transfers ownership of a valid descriptor.
                Ok(unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) })
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netlink socket thread panicked")))
        })
    }

    /// Runs `f` on a dedicated thread inside this namespace and returns its
    /// result; for the rare operations that have no netlink form (sysctls).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || -> io::Result<T> {
                // SAFETY: the descriptor outlives the scoped thread.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                enter(fd)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        })
    }
}

/// Moves the calling thread into the namespace `fd`, unless it is in it
/// already: `setns` needs CAP_SYS_ADMIN even then, which a daemon in a
/// container with only NET_ADMIN lacks.
fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let target = File::from(fd.try_clone_to_owned()?).metadata()?;
    let here = std::fs::metadata("/proc/thread-self/ns/net")?;
    if (target.dev(), target.ino()) == (here.dev(), here.ino()) {
        return Ok(());
    }
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}
