//! Network namespaces: opening them and making netlink sockets inside them.
//!
//! A netlink socket belongs to the namespace of the thread that created it, for
//! its whole life. So to talk to a pod's namespace the calling thread steps
//! into it, creates the socket and steps back at once, with nothing else run
//! in between (no `.await`: no other task can run on the thread meanwhile);
//! a thread that could not step back is not left running in the wrong
//! namespace (the process aborts, see [`NetNs::netlink_socket`]).

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

    /// Another handle on the same namespace (a duplicate of the descriptor,
    /// not a reopening of the path: `/proc/thread-self/ns/net` names a
    /// different namespace on another thread).
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs { file: self.file.try_clone()?, path: self.path.clone() })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file descriptor (for `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Creates a `NETLINK_ROUTE` socket that lives in this namespace: the
    /// calling thread enters the namespace, creates the socket and returns
    /// to its own namespace (three system calls, where a helper thread cost
    /// a clone and a join: about 100 µs of every CNI ADD). Should the return
    /// fail, which needs the thread's own namespace to refuse it, the process
    /// aborts rather than go on with a thread whose later sockets, sysctl
    /// writes and child processes would all land in the wrong namespace.
    pub fn netlink_socket(&self) -> io::Result<OwnedFd> {
        self.in_place(|| {
            let sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
            // SAFETY: into_raw_fd transfers ownership of a valid descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) })
        })
    }

    /// Runs `f` (which must not block or wait: it makes a socket) on the
    /// calling thread inside this namespace, then returns the thread to
    /// its own; see [`NetNs::netlink_socket`] for why this aborts when the
    /// return fails.
    pub fn in_place<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        if same_namespace(&self.file, &home)? {
            // No setns: it needs CAP_SYS_ADMIN even into one's own namespace.
            return f();
        }
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("cannot return to this thread's network namespace after working in {}: {e}", self.path.display());
            std::process::abort();
        }
        out
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
    let target = File::from(fd.try_clone_to_owned()?);
    if same_namespace(&target, &File::open("/proc/thread-self/ns/net")?)? {
        return Ok(());
    }
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Whether two namespace files name the same namespace.
fn same_namespace(a: &File, b: &File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
}
