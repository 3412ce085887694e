//! IP address management on disk, safe across concurrent plugin processes.
//!
//! Layout (host-local's, so operators' habits and tools carry over):
//! `<dataDir>/networks/<network name>/` holds one file per allocated address,
//! named by the address, containing `<container id>\r\n<ifname>` (plus a line
//! `masq` when the pod's traffic is masqueraded by the plugin); `last_reserved_ip.0`
//! (IPv4) and `last_reserved_ip.1` (IPv6) remember where the last allocation
//! stopped, so a just-freed address is not handed out again at once (a new pod
//! must not receive traffic meant for the old one); `lock` is taken with
//! `flock` by every process that reads or changes the directory.
//!
//! `attachments/<container id>:<ifname>` is an index, so ADD and DEL cost the
//! same with 200 pods on the node as with one, instead of reading every
//! record: a hard link to the attachment's first record, whose extended
//! attribute `user.flannel-rs.addresses` lists the attachment's addresses
//! (`10.244.1.5` or `10.244.1.5,fc00::5`). A link is a directory entry where
//! a file of its own is a new inode (the dearest file operation of an ADD).
//! Earlier versions wrote a symlink whose target is that list; such entries
//! are read as they are, and a file system without user extended attributes
//! still gets symlinks. `:` can appear in neither a container ID nor an
//! interface name, so the name is unambiguous.
//!
//! `spare/<address>` holds records released since, kept for the next ADD to
//! rewrite and rename into place instead of creating a file (see
//! [`Store::retire`]); they are no records, and nothing else reads them.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::error::{code, CniError};

/// How long to wait for another plugin process to release the lock before
/// telling the runtime to try again later.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Our directory in `dataDir`, holding one directory per network.
pub const NETWORKS_DIR: &str = "networks";

/// How many addresses ADD tries one by one from the hint before it lists
/// the stores (see [`Store::claim_next`]).
const FAST_PROBES: u128 = 32;

/// Subdirectory holding the attachment index.
const INDEX_DIR: &str = "attachments";

/// Subdirectory holding released records kept for reuse.
const SPARE_DIR: &str = "spare";

/// The extended attribute of an index entry that lists its addresses.
const INDEX_XATTR: &std::ffi::CStr = c"user.flannel-rs.addresses";

/// The addresses a node may hand to pods: its subnet less the network address,
/// the gateway and (IPv4) the broadcast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The subnet (host bits zero).
    pub subnet: IpNet,
    /// The bridge's address, never given to a pod.
    pub gateway: IpAddr,
    /// Index of the range set in host-local's `ranges` (names the hint file).
    pub set: usize,
}

impl Range {
    /// From a lease as written in subnet.env (gateway address / prefix),
    /// as range set `set`.
    pub fn from_lease(lease: IpNet, set: usize) -> Range {
        Range { subnet: lease.trunc(), gateway: lease.addr(), set }
    }

    fn base(&self) -> u128 {
        to_u128(self.subnet.network())
    }

    fn size(&self) -> u128 {
        let bits = self.subnet.max_prefix_len() - self.subnet.prefix_len();
        if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        }
    }

    /// Whether `ip` may be given to a pod.
    pub fn is_usable(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip)
            && ip != self.subnet.network()
            && ip != self.gateway
            && !(ip.is_ipv4() && ip == self.subnet.broadcast())
    }

    /// How many addresses pods can get in all.
    pub fn capacity(&self) -> u128 {
        let reserved = if self.subnet.addr().is_ipv4() { 3 } else { 2 };
        self.size().saturating_sub(reserved)
    }

    fn slot_file(&self) -> String {
        format!("last_reserved_ip.{}", self.set)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// One allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The address.
    pub ip: IpAddr,
    /// Container that holds it.
    pub container_id: String,
    /// Interface in that container.
    pub ifname: String,
    /// The plugin masquerades this pod's traffic (remove the rule on release).
    pub masq: bool,
}

/// IPAM failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A file operation failed.
    #[error("IPAM: {op}: {source}")]
    Io {
        /// What was attempted, with the path.
        op: String,
        /// The error.
        source: io::Error,
    },
    /// Another process held the lock for too long.
    #[error("IPAM: {dir} is locked by another plugin process for more than {secs} s", secs = LOCK_TIMEOUT.as_secs())]
    Busy {
        /// The locked directory.
        dir: PathBuf,
    },
    /// No address left.
    #[error("IPAM: no free address in {range}: all {capacity} pod addresses are allocated (see {dir})")]
    Exhausted {
        /// The subnet.
        range: IpNet,
        /// How many addresses pods can get.
        capacity: u128,
        /// The state directory.
        dir: PathBuf,
    },
    /// A specific address was asked for (`CNI_ARGS` IP=) and cannot be given.
    #[error("IPAM: requested address {ip} {reason}")]
    Unavailable {
        /// The address.
        ip: IpAddr,
        /// Why not.
        reason: String,
    },
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let c = match &e {
            IpamError::Io { .. } => code::IO,
            // Both clear up by themselves: the lock holder finishes, pods go away.
            IpamError::Busy { .. } | IpamError::Exhausted { .. } => code::TRY_AGAIN,
            IpamError::Unavailable { .. } => code::INVALID_ENV,
        };
        CniError::new(c, e.to_string())
    }
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> IpamError {
    let op = op.into();
    move |source| IpamError::Io { op, source }
}

/// Creates `path` if it does not exist (`O_EXCL`); `None` when it does.
fn create_new(path: &Path) -> Result<Option<File>, IpamError> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(io_err(format!("create {}", path.display()))(e)),
    }
}

/// The locked state directory of one network. The lock is held until drop.
pub struct Store {
    dir: PathBuf,
    _lock: File,
    host_local: Option<HostLocal>,
    /// Spare records not yet used by this process, listed at the first
    /// claim (`None` before), each with the content written into it so far.
    spares: std::cell::RefCell<Option<Vec<Spare>>>,
}

/// A spare record's path, and the content written into it by this process.
type Spare = (PathBuf, Option<String>);

/// host-local's directory for the same network (`/var/lib/cni/networks/<name>`
/// with flannel's defaults), locked with host-local's own lock (`flock` on
/// `lock`, as ours). Its address files are taken as used, so we never hand
/// out an address a pod that flannel's plugin added still holds; and every
/// address we allocate gets a host-local reservation file there too
/// (`<container id>\r\n<ifname>`, host-local's exact format), so that
/// host-local, after a rollback to flannel's plugin, never hands out one of
/// ours, and its DEL of our pod finds and releases the file.
struct HostLocal {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// The directory for `network` under `data_dir`.
    pub fn dir_for(data_dir: &Path, network: &str) -> PathBuf {
        data_dir.join(NETWORKS_DIR).join(network)
    }

    /// Opens (creating it if needed) and locks the directory.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        let dir = Self::dir_for(data_dir, network);
        // The directory exists but on a node's first ADD: try the lock first.
        match Self::flock(&dir) {
            Ok(lock) => return Ok(Store::locked(dir, lock)),
            Err(IpamError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        Self::lock(dir)
    }

    /// Opens and locks the directory if it exists; `None` means nothing was
    /// ever allocated (DEL and GC must not create state).
    pub fn open_existing(data_dir: &Path, network: &str) -> Result<Option<Store>, IpamError> {
        let dir = Self::dir_for(data_dir, network);
        if !dir.is_dir() {
            return Ok(None);
        }
        Self::lock(dir).map(Some)
    }

    fn lock(dir: PathBuf) -> Result<Store, IpamError> {
        let lock = Self::flock(&dir)?;
        Ok(Store::locked(dir, lock))
    }

    fn locked(dir: PathBuf, lock: File) -> Store {
        Store { dir, _lock: lock, host_local: None, spares: Default::default() }
    }

    /// Also locks host-local's directory `dir` (after ours: every process
    /// takes the two in this order, and host-local only takes its own) and
    /// takes it into account from now on. With `create`, a missing directory
    /// is created and every address we hold gets its reservation file there
    /// (a node that ran an earlier flannel-rs); without, a missing directory
    /// means there is nothing of host-local's to consider.
    pub fn with_host_local(mut self, dir: PathBuf, create: bool) -> Result<Store, IpamError> {
        // The common case, an existing directory, costs the lock alone.
        let (lock, existed) = match Self::flock(&dir) {
            Ok(lock) => (lock, true),
            Err(IpamError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(self);
                }
                std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
                (Self::flock(&dir)?, false)
            }
            Err(e) => return Err(e),
        };
        self.host_local = Some(HostLocal { dir, _lock: lock });
        if !existed {
            for r in self.records()? {
                self.reserve_in_host_local(&r.ip, &r.container_id, &r.ifname)?;
            }
        }
        Ok(self)
    }

    /// Writes host-local's reservation file for `ip`; an existing one (ours,
    /// from a retried call) is left as it is.
    fn reserve_in_host_local(&self, ip: &IpAddr, container_id: &str, ifname: &str) -> Result<(), IpamError> {
        let Some(h) = &self.host_local else { return Ok(()) };
        write_new(&h.dir.join(ip.to_string()), &format!("{container_id}\r\n{ifname}")).map(|_| ())
    }

    /// Removes host-local's reservation file for `ip` if it is this
    /// attachment's (never another pod's). A file holding only the start of
    /// ours (empty included) is ours too, cut short by a kill mid-write: we
    /// hold the address, so host-local cannot have written it.
    fn release_in_host_local(&self, ip: &IpAddr, container_id: &str, ifname: &str) -> Result<(), IpamError> {
        let Some(h) = &self.host_local else { return Ok(()) };
        let path = h.dir.join(ip.to_string());
        let ours = format!("{container_id}\r\n{ifname}");
        match std::fs::read_to_string(&path) {
            Ok(t) if t.trim() == ours || ours.starts_with(t.as_str()) => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", path.display()))(e)),
        }
    }

    /// Locks `dir` with `flock` on `dir/lock`, host-local's lock too.
    fn flock(dir: &Path) -> Result<File, IpamError> {
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        match lock_within(&file, LOCK_TIMEOUT) {
            Ok(true) => Ok(file),
            Ok(false) => Err(IpamError::Busy { dir: dir.to_path_buf() }),
            Err(err) => Err(IpamError::Io { op: format!("lock {}", path.display()), source: err }),
        }
    }

    /// Whether the index lists the attachment (no lock: a hint for DEL,
    /// which the runtime never runs twice at once for one attachment).
    pub fn indexes(data_dir: &Path, network: &str, container_id: &str, ifname: &str) -> bool {
        let path = Self::dir_for(data_dir, network).join(INDEX_DIR).join(format!("{container_id}:{ifname}"));
        std::fs::symlink_metadata(path).is_ok()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(INDEX_DIR).join(format!("{container_id}:{ifname}"))
    }

    /// The addresses the index lists for an attachment.
    fn indexed(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let path = self.index_path(container_id, ifname);
        let parse = |list: &str| list.split(',').filter_map(|ip| ip.parse().ok()).collect();
        // A hard link with its list in an extended attribute; a symlink
        // (earlier versions, or no user extended attributes) has none.
        match get_xattr(&path, INDEX_XATTR) {
            Ok(Some(list)) => return Ok(parse(&list)),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        }
        match std::fs::read_link(&path) {
            Ok(target) => Ok(parse(&target.to_string_lossy())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            // A file without its list (copied without extended attributes):
            // the records say which addresses are the attachment's.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(self
                .records()?
                .into_iter()
                .filter(|r| r.container_id == container_id && r.ifname == ifname)
                .map(|r| r.ip)
                .collect()),
            Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
        }
    }

    /// Points the attachment's index entry at `ips` (removes it when empty).
    fn set_index(&self, container_id: &str, ifname: &str, ips: &[IpAddr]) -> Result<(), IpamError> {
        let path = self.index_path(container_id, ifname);
        if ips.is_empty() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(format!("remove {}", path.display()))(e)),
            };
        }
        let list = ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(",");
        // The list goes on the first record's inode before the index names
        // it, so an entry appears only complete. The common case, a new
        // attachment, costs a setxattr(2) and a link(2), no new inode.
        let record = self.dir.join(ips[0].to_string());
        let put = match set_xattr(&record, INDEX_XATTR, &list) {
            Ok(()) => self.put_index(&path, |to| std::fs::hard_link(&record, to), || same_file(&path, &record)),
            // No user extended attributes here (or none allowed on this
            // file): a symlink whose target is the list, as earlier versions
            // wrote. Every caller passes records it holds, under the lock.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM)) => self.put_index(
                &path,
                |to| std::os::unix::fs::symlink(&list, to),
                || std::fs::read_link(&path).is_ok_and(|t| t.as_os_str() == list.as_str()),
            ),
            Err(e) => Err(e),
        };
        put.map_err(io_err(format!("create {}", path.display())))
    }

    /// Makes the index entry `path` what `make` creates (a hard link to the
    /// first record, or a symlink), creating the index directory when it is
    /// missing. An entry that exists already (the second family of a
    /// dual-stack ADD, GC releasing one of two records, an earlier version's
    /// symlink) is replaced with a rename, unless `current` says it is what
    /// `make` makes already, so that a failure (a full disk) leaves the old
    /// entry, and the addresses it lists, indexed.
    fn put_index(
        &self,
        path: &Path,
        make: impl Fn(&Path) -> io::Result<()>,
        current: impl FnOnce() -> bool,
    ) -> io::Result<()> {
        let index = self.dir.join(INDEX_DIR);
        let make = |to: &Path| match make(to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !index.is_dir() => {
                std::fs::create_dir_all(&index)?;
                make(to)
            }
            other => other,
        };
        match make(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => return other,
        }
        if current() {
            return Ok(());
        }
        // One temporary name suffices, since only the lock holder writes; a
        // kill before the rename leaves it for the next replacement to clear.
        let tmp = index.join(".new");
        let _ = std::fs::remove_file(&tmp);
        let replaced = make(&tmp).and_then(|()| std::fs::rename(&tmp, path));
        if replaced.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        replaced
    }

    /// The addresses that have a record, ours or host-local's (file names
    /// only: no record is read).
    fn used(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let mut out = HashSet::new();
        Self::addresses_in(&self.dir, &mut out)?;
        if let Some(h) = &self.host_local {
            Self::addresses_in(&h.dir, &mut out)?;
        }
        Ok(out)
    }

    fn addresses_in(dir: &Path, out: &mut HashSet<IpAddr>) -> Result<(), IpamError> {
        let entries = std::fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
            if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) {
                out.insert(ip);
            }
        }
        Ok(())
    }

    /// The addresses with a record of ours.
    fn ours(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let mut out = HashSet::new();
        Self::addresses_in(&self.dir, &mut out)?;
        Ok(out)
    }

    fn read_record(&self, ip: IpAddr) -> Result<Option<Record>, IpamError> {
        let path = self.dir.join(ip.to_string());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        };
        let mut lines = text.split(['\r', '\n']).filter(|l| !l.is_empty());
        Ok(Some(Record {
            ip,
            container_id: lines.next().unwrap_or_default().trim().to_string(),
            ifname: lines.next().unwrap_or_default().trim().to_string(),
            masq: lines.any(|l| l.trim() == "masq"),
        }))
    }

    /// Every allocation. Reads every record: for GC, never on ADD or DEL.
    pub fn records(&self) -> Result<Vec<Record>, IpamError> {
        let mut out = Vec::new();
        for ip in self.ours()? {
            out.extend(self.read_record(ip)?);
        }
        Ok(out)
    }

    /// Allocations of one attachment, found through the index.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Vec<Record>, IpamError> {
        let mut out = Vec::new();
        for ip in self.indexed(container_id, ifname)? {
            // The record is the truth: an index entry whose address now
            // belongs to another attachment is ignored.
            if let Some(r) = self.read_record(ip)? {
                if r.container_id == container_id && r.ifname == ifname {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Allocates an address in `range` for the attachment. Returns the address
    /// it already holds in the range, if any (a retried ADD), so one attachment
    /// never holds two.
    pub fn allocate(
        &self,
        range: &Range,
        container_id: &str,
        ifname: &str,
        masq: bool,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr, IpamError> {
        let held = self.find(container_id, ifname)?;
        if let Some(r) = held.iter().find(|r| range.subnet.contains(&r.ip)) {
            return Ok(r.ip);
        }
        let v4 = range.subnet.addr().is_ipv4();
        let mut content = format!("{container_id}\r\n{ifname}");
        if masq {
            content.push_str("\r\nmasq");
        }
        let chosen = if let Some(ip) = requested.filter(|ip| ip.is_ipv4() == v4) {
            if !range.is_usable(ip) {
                return Err(IpamError::Unavailable {
                    ip,
                    reason: format!("is not a pod address of {} (gateway {})", range.subnet, range.gateway),
                });
            }
            if !self.claim(ip, &content, container_id, ifname)? {
                return Err(IpamError::Unavailable { ip, reason: "is already allocated".into() });
            }
            ip
        } else {
            self.claim_next(range, &content, container_id, ifname)?
        };
        let path = self.dir.join(chosen.to_string());
        let mut ips: Vec<IpAddr> = held.iter().map(|r| r.ip).collect();
        ips.push(chosen);
        // A record that is not indexed must go again (a full disk): the
        // caller's clean-up finds records through the index, so nothing
        // would ever release it.
        if let Err(e) = self.set_index(container_id, ifname, &ips) {
            let _ = std::fs::remove_file(&path);
            if let Some(h) = &self.host_local {
                let _ = std::fs::remove_file(h.dir.join(chosen.to_string()));
            }
            return Err(e);
        }
        self.write_hint(range, chosen)?;
        Ok(chosen)
    }

    /// Records where the last allocation in `range` stopped. A plugin killed
    /// half way (the runtime's timeout) must not leave the hint empty, which
    /// would restart the walk at the start of the range and hand out
    /// just-freed addresses again. So the file is never truncated: the
    /// address is written over the old one in place, padded with spaces to
    /// the longest address's length (readers trim), in one `pwrite` of a few
    /// bytes, which a kill cannot cut in half. That keeps ADD at one data
    /// write where a temporary file and a rename cost two metadata
    /// operations (about 0.4 ms on ext4 here).
    ///
    /// host-local's directory gets the same hint as host-local writes it
    /// (the bare address: host-local does not trim what it reads), so that
    /// after a rollback to flannel's plugin host-local walks on from our
    /// last allocation instead of handing out an address a pod just left.
    fn write_hint(&self, range: &Range, ip: IpAddr) -> Result<(), IpamError> {
        use std::os::unix::fs::FileExt;
        let slot = self.dir.join(range.slot_file());
        let text = format!("{:<39}", ip.to_string());
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&slot)
            .and_then(|f| f.write_all_at(text.as_bytes(), 0))
            .map_err(io_err(format!("write {}", slot.display())))?;
        if let Some(h) = &self.host_local {
            // host-local reads the file whole and does not trim: it must hold
            // the bare address. Truncating it to nothing first (O_TRUNC) cost
            // a quarter of a millisecond on ext4 here, the data block freed
            // and allocated again; so the address is written over the old one
            // and the file cut only when the new address is shorter (a kill
            // in between leaves a hint further on, never an empty one).
            let theirs = h.dir.join(range.slot_file());
            let text = ip.to_string();
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&theirs)
                .and_then(|f| {
                    f.write_all_at(text.as_bytes(), 0)?;
                    if f.metadata()?.len() > text.len() as u64 {
                        f.set_len(text.len() as u64)?;
                    }
                    Ok(())
                })
                .map_err(io_err(format!("write {}", theirs.display())))?;
        }
        Ok(())
    }

    /// The last allocation in `range`: host-local's hint first (we mirror
    /// ours there, and flannel's plugin may have allocated since), else ours.
    fn last_reserved(&self, range: &Range) -> Option<IpAddr> {
        let read = |dir: &Path| {
            std::fs::read_to_string(dir.join(range.slot_file()))
                .ok()
                .and_then(|t| t.trim().parse::<IpAddr>().ok())
                .filter(|ip| range.subnet.contains(ip))
        };
        self.host_local.as_ref().and_then(|h| read(&h.dir)).or_else(|| read(&self.dir))
    }

    /// Takes `ip` if nobody holds it: creates our record (`O_EXCL`, so an
    /// existing one means taken) and writes it, then, with host-local's
    /// directory, its reservation file there (an existing one is a pod of
    /// flannel's plugin: ours goes again). `false` when the address is
    /// taken. No directory is listed: host-local itself allocates this way.
    fn claim(&self, ip: IpAddr, content: &str, container_id: &str, ifname: &str) -> Result<bool, IpamError> {
        let name = ip.to_string();
        let path = self.dir.join(&name);
        if !self.place_record(&path, content)? {
            return Ok(false);
        }
        // The record goes again when the mirror fails or is taken.
        let mirrored = (|| {
            let Some(h) = &self.host_local else { return Ok(true) };
            let (mirror, text) = (h.dir.join(&name), format!("{container_id}\r\n{ifname}"));
            if content != text {
                // A `masq` line: host-local's word is shorter, a file of its own.
                return write_new(&mirror, &text);
            }
            // The usual record is host-local's reservation word for word: the
            // mirror is a second name for the same file. A hard link costs a
            // directory entry, where a file of its own costs a new inode
            // (about 0.1 ms on ext4 here); and it appears complete, the
            // record written first.
            match std::fs::hard_link(&path, &mirror) {
                Ok(()) => Ok(true),
                // Taken in host-local's directory (a pod of flannel's plugin).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                // Another file system, or links refused: a file of its own.
                Err(_) => write_new(&mirror, &text),
            }
        })();
        if !matches!(mirrored, Ok(true)) {
            let _ = self.retire(&path);
        }
        mirrored
    }

    /// Puts a record holding `content` at `path`; `false` when the name is
    /// taken. A spare record (see [`Store::retire`]) is rewritten and renamed
    /// into place with `RENAME_NOREPLACE`, which fails on an existing name
    /// as an exclusive create does; without a spare, or where the file
    /// system cannot rename without replacing, a new file is created
    /// (`O_EXCL`). A record is never left half written: a failed write
    /// removes the new file, and a spare is renamed only once rewritten.
    fn place_record(&self, path: &Path, content: &str) -> Result<bool, IpamError> {
        while let Some(spare) = self.next_spare(content) {
            match rename_noreplace(&spare, path) {
                Ok(()) => {
                    self.take_spare();
                    return Ok(true);
                }
                // Taken: the spare, rewritten already, serves the next address.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.take_spare(),
                // No RENAME_NOREPLACE on this file system: new files only.
                Err(_) => *self.spares.borrow_mut() = Some(Vec::new()),
            }
        }
        write_new(path, content)
    }

    /// A spare record holding `content`, rewriting the next one if needed.
    /// One that cannot be rewritten is removed, and the next one tried.
    fn next_spare(&self, content: &str) -> Option<PathBuf> {
        let mut spares = self.spares.borrow_mut();
        let list = spares.get_or_insert_with(|| list_names(&self.dir.join(SPARE_DIR)));
        loop {
            let (path, written) = list.last_mut()?;
            if written.as_deref() == Some(content) {
                return Some(path.clone());
            }
            if rewrite(path, content).is_ok() {
                *written = Some(content.to_string());
                return Some(path.clone());
            }
            let _ = std::fs::remove_file(path);
            list.pop();
        }
    }

    /// Drops the spare [`Store::next_spare`] returned last from the list.
    fn take_spare(&self) {
        if let Some(list) = self.spares.borrow_mut().as_mut() {
            list.pop();
        }
    }

    /// Takes the record at `path` out of use: renamed into `spare/`, where
    /// the next ADD finds it, or removed when that fails. A record reused
    /// costs ADD a rewrite and a rename where a new one costs an inode: on
    /// this benchmark machine's ext4 (no journal) allocating one walks past
    /// every inode freed in the last minutes, 0.1 to 0.3 ms of an ADD under
    /// pod churn; and DEL frees none. There are never more spares than the
    /// node once had records. Callers have removed the record's other
    /// names (host-local's reservation, the index entry) or are about to.
    /// An error only when the record is still there.
    fn retire(&self, path: &Path) -> io::Result<()> {
        let Some(name) = path.file_name() else { return Err(io::ErrorKind::InvalidInput.into()) };
        let spares = self.dir.join(SPARE_DIR);
        let spare = spares.join(name);
        let moved = match std::fs::rename(path, &spare) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !spares.is_dir() => {
                std::fs::create_dir(&spares).and_then(|()| std::fs::rename(path, &spare))
            }
            other => other,
        };
        match moved {
            Ok(()) => {
                if let Some(list) = self.spares.borrow_mut().as_mut() {
                    list.push((spare, None));
                }
                Ok(())
            }
            // Not found with spare/ there: the record is gone already.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(_) => match std::fs::remove_file(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        }
    }

    /// Takes the first free address after the last allocation, wrapping
    /// around, as [`Store::next_free`] picks it. The common case, a free
    /// address at or near the hint, costs one `O_EXCL` create per store;
    /// after [`FAST_PROBES`] taken addresses in a row (a nearly full range)
    /// the used addresses are listed once, which bounds the walk through a
    /// huge IPv6 range and tells exhaustion exactly.
    fn claim_next(&self, range: &Range, content: &str, container_id: &str, ifname: &str) -> Result<IpAddr, IpamError> {
        let v4 = range.subnet.addr().is_ipv4();
        let size = range.size();
        let base = range.base();
        let start = match self.last_reserved(range) {
            Some(ip) => (to_u128(ip) - base + 1) % size,
            None => 0,
        };
        for step in 0..size.min(FAST_PROBES) {
            let candidate = from_u128(base + (start + step) % size, v4);
            if range.is_usable(candidate) && self.claim(candidate, content, container_id, ifname)? {
                return Ok(candidate);
            }
        }
        let mut used = self.used()?;
        loop {
            let candidate = self.next_free(range, &used)?;
            if self.claim(candidate, content, container_id, ifname)? {
                return Ok(candidate);
            }
            // A file the listing did not show as an address: taken all the same.
            used.insert(candidate);
        }
    }

    /// Walks the range from just after the last allocation, wrapping around.
    fn next_free(&self, range: &Range, used: &HashSet<IpAddr>) -> Result<IpAddr, IpamError> {
        let v4 = range.subnet.addr().is_ipv4();
        let size = range.size();
        let base = range.base();
        let last = self.last_reserved(range);
        let start = match last {
            Some(ip) => (to_u128(ip) - base + 1) % size,
            None => 0,
        };
        // Every probe that fails hits a used or reserved address, so after
        // used + 4 probes one must have succeeded unless the range is full:
        // this bounds the walk through a huge IPv6 range.
        let in_range = used.iter().filter(|ip| range.subnet.contains(*ip)).count() as u128;
        let probes = size.min(in_range + 4);
        for step in 0..probes {
            let candidate = from_u128(base + (start + step) % size, v4);
            if range.is_usable(candidate) && !used.contains(&candidate) {
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted { range: range.subnet, capacity: range.capacity(), dir: self.dir.clone() })
    }

    /// Releases every address of the attachment; returns what was released.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Record>, IpamError> {
        let found = self.find(container_id, ifname)?;
        for r in &found {
            self.release_in_host_local(&r.ip, container_id, ifname)?;
            self.remove_record(r.ip)?;
        }
        self.set_index(container_id, ifname, &[])?;
        Ok(found)
    }

    /// Releases one record found by [`Store::records`] (GC): the record and
    /// its attachment's index entry. The entry keeps the attachment's other
    /// records only, as [`Store::find`] confirms them: an address it lists
    /// may since belong to another attachment (a DEL killed between its
    /// records and its entry), whose record, and so whose own entry's
    /// address list, must not be touched.
    pub fn release_record(&self, r: &Record) -> Result<(), IpamError> {
        self.release_in_host_local(&r.ip, &r.container_id, &r.ifname)?;
        self.remove_record(r.ip)?;
        let rest: Vec<IpAddr> = self.find(&r.container_id, &r.ifname)?.into_iter().map(|f| f.ip).collect();
        self.set_index(&r.container_id, &r.ifname, &rest)
    }

    fn remove_record(&self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        self.retire(&path).map_err(io_err(format!("remove {}", path.display())))
    }

    /// Whether at least one pod address in `range` is free.
    pub fn has_free(&self, range: &Range) -> Result<bool, IpamError> {
        let used = self.used()?.iter().filter(|ip| range.is_usable(**ip)).count() as u128;
        Ok(used < range.capacity())
    }
}

/// Writes `text` at `path` as a new file (`O_EXCL`): a record, or
/// host-local's reservation as a file of its own; `false` when the name is
/// taken. A failed write removes the file again, so none is left half written.
fn write_new(path: &Path, text: &str) -> Result<bool, IpamError> {
    let Some(mut f) = create_new(path)? else { return Ok(false) };
    let written = f.write_all(text.as_bytes()).map_err(io_err(format!("write {}", path.display())));
    if written.is_err() {
        drop(f);
        let _ = std::fs::remove_file(path);
    }
    written.map(|()| true)
}

/// The entries of `dir` (none if it cannot be listed), none rewritten yet.
fn list_names(dir: &Path) -> Vec<Spare> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok()).map(|e| (e.path(), None)).collect()
}

/// Makes the spare at `path` hold exactly `content`: written over in place
/// and cut to its length, so that no data block is freed and allocated
/// again. Refused for a file with another name too: a DEL killed between
/// retiring an attachment's first record and removing its index entry
/// leaves the entry linked to the spare, and its retry finds the
/// attachment's other records through the entry's address list, which
/// rewriting the spare for another pod would overwrite (also any name
/// elsewhere, such as host-local's). Such a spare only loses its spare name.
fn rewrite(path: &Path, content: &str) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
    // Never through a symlink: a spare is a file we renamed there.
    let file = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let meta = file.metadata()?;
    if meta.nlink() != 1 {
        return Err(io::Error::other("the spare has other names"));
    }
    file.write_all_at(content.as_bytes(), 0)?;
    if meta.len() > content.len() as u64 {
        file.set_len(content.len() as u64)?;
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths; the descriptors are AT_FDCWD.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether two names (not followed if symlinks) are one file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Sets extended attribute `name` of `path` (not following a symlink) to `value`.
fn set_xattr(path: &Path, name: &std::ffi::CStr, value: &str) -> io::Result<()> {
    let p = c_path(path)?;
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Extended attribute `name` of `path` (not following a symlink); `None`
/// when it has none, or the file system keeps none.
fn get_xattr(path: &Path, name: &std::ffi::CStr) -> io::Result<Option<String>> {
    let p = c_path(path)?;
    // Two addresses and a comma fit with room to spare.
    let mut buf = [0u8; 128];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Some(String::from_utf8_lossy(&buf[..n as usize]).into_owned()));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA | libc::EOPNOTSUPP | libc::ERANGE) => Ok(None),
        _ => Err(e),
    }
}

/// Takes an exclusive `flock` on `file`, waiting at most `timeout`; `false`
/// when the wait timed out. A contended lock is waited for in the kernel,
/// which hands it over the moment its holder lets go, rather than polled
/// with sleeps (a burst of ADDs polling every few milliseconds left the lock
/// idle between holders and woke every waiter in vain). The wait is bounded
/// by a timer of this thread's own that interrupts it with `SIGALRM` (whose
/// handler does nothing, installed without `SA_RESTART`), and re-fires every
/// 20 ms after the deadline in case its first signal came before `flock`
/// started to wait.
fn lock_within(file: &File, timeout: Duration) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err);
    }
    let timer = AlarmTimer::arm(timeout)?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: as above; the timer interrupts the wait.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            drop(timer);
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A one-shot POSIX timer that sends `SIGALRM` to the calling thread only
/// (so threads waiting at once, as in the tests, do not interrupt each
/// other); deleted on drop.
struct AlarmTimer(libc::timer_t);

impl AlarmTimer {
    fn arm(after: Duration) -> io::Result<AlarmTimer> {
        extern "C" fn interrupt(_: libc::c_int) {}
        static HANDLER: std::sync::Once = std::sync::Once::new();
        HANDLER.call_once(|| {
            // SAFETY: installs a handler that does nothing (async-signal-safe).
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
                act.sa_flags = 0;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(libc::SIGALRM, &act, std::ptr::null_mut());
            }
        });
        // SAFETY: a zeroed sigevent is valid; the fields set below are the
        // ones SIGEV_THREAD_ID reads.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGALRM;
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::syscall(libc::SYS_gettid) } as libc::c_int;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and sigevent.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let timer = AlarmTimer(timer);
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 20_000_000 },
            it_value: libc::timespec { tv_sec: after.as_secs() as libc::time_t, tv_nsec: after.subsec_nanos() as _ },
        };
        // SAFETY: a timer we created, a valid itimerspec.
        if unsafe { libc::timer_settime(timer.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(timer)
    }
}

impl Drop for AlarmTimer {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this value owns.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// host-local's DEL: removes every reservation file in `dir` that names the
/// attachment (`<container id>\r\n<ifname>`), under host-local's lock;
/// returns the addresses released. A missing directory holds nothing.
pub fn release_host_local(dir: &Path, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = Store::flock(dir)?;
    let want = format!("{}\r\n{ifname}", container_id.trim());
    let mut held = HashSet::new();
    Store::addresses_in(dir, &mut held)?;
    let mut out = Vec::new();
    for ip in held {
        let path = dir.join(ip.to_string());
        match std::fs::read_to_string(&path) {
            Ok(t) if t.trim() == want => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => out.push(ip),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("remove {}", path.display()))(e)),
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(lease: &str) -> Range {
        let net: IpNet = lease.parse().unwrap();
        Range::from_lease(net, usize::from(net.addr().is_ipv6()))
    }

    #[test]
    fn never_hands_out_network_gateway_or_broadcast_and_exhausts_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/29");
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(s.allocate(&r, &format!("c{i}"), "eth0", false, None).unwrap().to_string());
        }
        assert_eq!(got, ["10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6"]);
        let e = s.allocate(&r, "c9", "eth0", false, None).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }));
        assert!(e.to_string().contains("10.244.1.0/29"), "{e}");
        assert_eq!(CniError::from(e).code, code::TRY_AGAIN);
        assert!(!s.has_free(&r).unwrap());
    }

    #[test]
    fn a_long_run_of_taken_addresses_falls_back_to_listing_the_stores() {
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let r = range("10.244.1.1/24");
        for i in 0..40 {
            s.allocate(&r, &format!("c{i}"), "eth0", false, None).unwrap();
        }
        // One more held by a pod of flannel's plugin, in host-local's store only.
        std::fs::write(hl.join("10.244.1.42"), "upstream\r\neth0").unwrap();
        // Back to the start of the range: 41 taken addresses in a row.
        std::fs::write(hl.join("last_reserved_ip.0"), "10.244.1.1").unwrap();
        assert_eq!(s.allocate(&r, "late", "eth0", false, None).unwrap().to_string(), "10.244.1.43");
        assert_eq!(std::fs::read_to_string(hl.join("10.244.1.42")).unwrap(), "upstream\r\neth0");
        assert!(!s.dir().join("10.244.1.42").exists(), "no record of ours for host-local's address");
    }

    #[test]
    fn host_locals_reservation_is_a_second_name_for_a_plain_record() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let r = range("10.244.1.1/24");
        let plain = s.allocate(&r, "plain", "eth0", false, None).unwrap().to_string();
        let masq = s.allocate(&r, "masq", "eth0", true, None).unwrap().to_string();
        let (ours, theirs) = (s.dir().join(&plain), hl.join(&plain));
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "plain\r\neth0");
        let (a, b) = (std::fs::metadata(&ours).unwrap(), std::fs::metadata(&theirs).unwrap());
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 3), "one file: the record, host-local's name and the index entry");
        // A record with a masq line differs from host-local's word: a file of its own.
        assert_eq!(std::fs::read_to_string(hl.join(&masq)).unwrap(), "masq\r\neth0");
        assert_eq!(std::fs::metadata(hl.join(&masq)).unwrap().nlink(), 1);
        // A name host-local holds is not ours to link over: the next address.
        std::fs::write(hl.join("10.244.1.4"), "upstream\r\neth0").unwrap();
        assert_eq!(s.allocate(&r, "next", "eth0", false, None).unwrap().to_string(), "10.244.1.5");
        assert!(!s.dir().join("10.244.1.4").exists());
        assert_eq!(std::fs::read_to_string(hl.join("10.244.1.4")).unwrap(), "upstream\r\neth0");
        s.release("plain", "eth0").unwrap();
        assert!(!ours.exists() && !theirs.exists());
    }

    #[test]
    fn host_locals_hint_holds_the_bare_address_when_it_gets_shorter() {
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let r = range("10.244.1.1/24");
        std::fs::write(hl.join("last_reserved_ip.0"), "10.244.1.254").unwrap();
        assert_eq!(s.allocate(&r, "a", "eth0", false, None).unwrap().to_string(), "10.244.1.2");
        assert_eq!(std::fs::read_to_string(hl.join("last_reserved_ip.0")).unwrap(), "10.244.1.2");
        assert_eq!(s.allocate(&r, "b", "eth0", false, None).unwrap().to_string(), "10.244.1.3");
        assert_eq!(std::fs::read_to_string(hl.join("last_reserved_ip.0")).unwrap(), "10.244.1.3");
    }

    #[test]
    fn a_released_record_becomes_the_next_record_rewritten_exactly() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.1.1/24");
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let a = s.allocate(&r, "a-much-longer-container-id", "eth0", true, None).unwrap();
        let ino = std::fs::metadata(s.dir().join(a.to_string())).unwrap().ino();
        assert_eq!(s.release("a-much-longer-container-id", "eth0").unwrap().len(), 1);
        drop(s);
        let spare = dir.path().join("networks/cbr0/spare").join(a.to_string());
        assert_eq!(std::fs::metadata(&spare).unwrap().ino(), ino, "DEL keeps the inode as a spare");
        // The next process's ADD: the spare is the new record, content and
        // length exactly the new attachment's, and no record itself.
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let b = s.allocate(&r, "b", "eth0", false, None).unwrap();
        assert_ne!(a, b);
        let path = s.dir().join(b.to_string());
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "the spare was not reused");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\r\neth0");
        assert!(!spare.exists());
        assert_eq!(s.find("b", "eth0").unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [b]);
        assert_eq!(s.records().unwrap().len(), 1);
        // Released in the same process, it serves the next ADD there too.
        s.release("b", "eth0").unwrap();
        let c = s.allocate(&r, "c", "eth0", false, None).unwrap();
        assert_eq!(std::fs::metadata(s.dir().join(c.to_string())).unwrap().ino(), ino);
    }

    #[test]
    fn a_spare_still_named_by_an_index_entry_is_not_rewritten() {
        // A dual-stack DEL killed after retiring the first record (which
        // the index entry links to) and before the second: another pod's
        // ADD must not take that spare, or the retried DEL would read the
        // other pod's address list through the entry and leave the IPv6
        // record allocated.
        let dir = tempfile::tempdir().unwrap();
        let (v4, v6) = (range("10.244.1.1/24"), range("fc00:0:0:1::1/64"));
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let x = s.allocate(&v4, "a", "eth0", false, None).unwrap();
        let x6 = s.allocate(&v6, "a", "eth0", false, None).unwrap();
        s.remove_record(x).unwrap();
        drop(s);
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let z = s.allocate(&v4, "c", "eth0", false, None).unwrap();
        assert_eq!(s.find("c", "eth0").unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [z]);
        drop(s);
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let released: Vec<IpAddr> = s.release("a", "eth0").unwrap().iter().map(|r| r.ip).collect();
        assert_eq!(released, [x6], "the retried DEL missed a record");
        assert_eq!(s.records().unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [z]);
    }

    #[test]
    fn a_spare_rewritten_for_a_taken_address_serves_the_next_one() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.1.1/24");
        let s = Store::open(dir.path(), "cbr0").unwrap();
        s.allocate(&r, "a", "eth0", false, None).unwrap();
        s.release("a", "eth0").unwrap();
        drop(s);
        let ino = std::fs::metadata(dir.path().join("networks/cbr0/spare/10.244.1.2")).unwrap().ino();
        // The address after the hint is taken (a record we did not make).
        let taken = dir.path().join("networks/cbr0/10.244.1.3");
        std::fs::write(&taken, "other\r\neth0").unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let b = s.allocate(&r, "b", "eth0", false, None).unwrap();
        assert_eq!(b.to_string(), "10.244.1.4");
        assert_eq!(std::fs::metadata(s.dir().join("10.244.1.4")).unwrap().ino(), ino);
        assert_eq!(std::fs::read_to_string(&taken).unwrap(), "other\r\neth0", "a taken record was replaced");
    }

    #[test]
    fn rotates_instead_of_reusing_a_just_freed_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/24");
        let a = s.allocate(&r, "a", "eth0", false, None).unwrap();
        assert_eq!(s.release("a", "eth0").unwrap().len(), 1);
        let b = s.allocate(&r, "b", "eth0", false, None).unwrap();
        assert_ne!(a, b);
        assert_eq!(b.to_string(), "10.244.1.3");
    }

    #[test]
    fn wraps_around_to_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/29");
        std::fs::write(s.dir().join("last_reserved_ip.0"), "10.244.1.6").unwrap();
        assert_eq!(s.allocate(&r, "a", "eth0", false, None).unwrap().to_string(), "10.244.1.2");
        // Written in place over a longer hint: the rest is padding, not digits.
        std::fs::write(
            s.dir().join("last_reserved_ip.0"),
            "10.244.1.4\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
        )
        .unwrap();
        s.release("a", "eth0").unwrap();
        assert_eq!(s.allocate(&r, "b", "eth0", false, None).unwrap().to_string(), "10.244.1.5");
        assert_eq!(std::fs::read(s.dir().join("last_reserved_ip.0")).unwrap().len(), 50, "never truncated");
        assert_eq!(std::fs::read_to_string(s.dir().join("last_reserved_ip.0")).unwrap().trim(), "10.244.1.5");
        std::fs::write(s.dir().join("last_reserved_ip.0"), "10.244.1.6").unwrap();
        s.release("b", "eth0").unwrap();
        assert_eq!(s.allocate(&r, "a", "eth0", false, None).unwrap().to_string(), "10.244.1.2");
    }

    #[test]
    fn retried_add_gets_the_same_address_and_records_are_host_local_style() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/24");
        let a = s.allocate(&r, "ctr", "eth0", true, None).unwrap();
        assert_eq!(s.allocate(&r, "ctr", "eth0", true, None).unwrap(), a);
        assert_eq!(std::fs::read_to_string(s.dir().join(a.to_string())).unwrap(), "ctr\r\neth0\r\nmasq");
        assert!(s.find("ctr", "eth0").unwrap()[0].masq);
        assert!(s.find("ctr", "eth1").unwrap().is_empty());
    }

    #[test]
    fn requested_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/24");
        let want: IpAddr = "10.244.1.77".parse().unwrap();
        assert_eq!(s.allocate(&r, "a", "eth0", false, Some(want)).unwrap(), want);
        assert!(matches!(s.allocate(&r, "b", "eth0", false, Some(want)), Err(IpamError::Unavailable { .. })));
        let gw: IpAddr = "10.244.1.1".parse().unwrap();
        assert!(matches!(s.allocate(&r, "c", "eth0", false, Some(gw)), Err(IpamError::Unavailable { .. })));
    }

    #[test]
    fn ipv6_ranges_walk_without_enumerating() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("fc00:0:0:1::1/64");
        assert_eq!(s.allocate(&r, "a", "eth0", false, None).unwrap().to_string(), "fc00:0:0:1::2");
        assert_eq!(s.allocate(&r, "b", "eth0", false, None).unwrap().to_string(), "fc00:0:0:1::3");
        assert!(s.has_free(&r).unwrap());
    }

    #[test]
    fn index_finds_dual_stack_attachments_and_release_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let v4 = s.allocate(&range("10.244.1.1/24"), "c", "eth0", false, None).unwrap();
        let v6 = s.allocate(&range("fc00:0:0:1::1/64"), "c", "eth0", false, None).unwrap();
        let entry = s.dir().join("attachments/c:eth0");
        assert_eq!(get_xattr(&entry, INDEX_XATTR).unwrap().unwrap(), format!("{v4},{v6}"));
        assert!(same_file(&entry, &s.dir().join(v4.to_string())), "the index entry is the first record's second name");
        let found: Vec<IpAddr> = s.find("c", "eth0").unwrap().iter().map(|r| r.ip).collect();
        assert_eq!(found, vec![v4, v6]);
        assert_eq!(s.release("c", "eth0").unwrap().len(), 2);
        assert!(!s.dir().join("attachments/c:eth0").exists());
        assert!(s.records().unwrap().is_empty());
        assert!(s.release("c", "eth0").unwrap().is_empty());
    }

    #[test]
    fn symlinked_index_entries_of_earlier_versions_are_read_and_replaced() {
        // A node upgraded in place: the store as an earlier version left it.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let idx = s.dir().join(INDEX_DIR);
        std::fs::create_dir_all(&idx).unwrap();
        std::fs::write(s.dir().join("10.244.1.7"), "old\r\neth0").unwrap();
        std::fs::write(s.dir().join("fc00:0:0:1::7"), "old\r\neth0").unwrap();
        std::os::unix::fs::symlink("10.244.1.7,fc00:0:0:1::7", idx.join("old:eth0")).unwrap();
        std::fs::write(s.dir().join("10.244.1.8"), "gone\r\neth0").unwrap();
        std::os::unix::fs::symlink("10.244.1.8", idx.join("gone:eth0")).unwrap();
        // A retried ADD finds what the old entry lists.
        assert_eq!(s.allocate(&range("10.244.1.1/24"), "old", "eth0", false, None).unwrap().to_string(), "10.244.1.7");
        assert_eq!(s.find("old", "eth0").unwrap().len(), 2);
        // GC of one of the two: the entry now names the other, as a link.
        let v4 = s.find("old", "eth0").unwrap().into_iter().find(|r| r.ip.is_ipv4()).unwrap();
        s.release_record(&v4).unwrap();
        let entry = idx.join("old:eth0");
        assert!(same_file(&entry, &s.dir().join("fc00:0:0:1::7")));
        assert_eq!(
            s.find("old", "eth0").unwrap().iter().map(|r| r.ip.to_string()).collect::<Vec<_>>(),
            ["fc00:0:0:1::7"]
        );
        // DEL of an old attachment releases it and its entry.
        assert_eq!(s.release("gone", "eth0").unwrap().len(), 1);
        assert!(!idx.join("gone:eth0").exists() && !s.dir().join("10.244.1.8").exists());
        assert_eq!(s.release("old", "eth0").unwrap().len(), 1);
        assert!(std::fs::read_dir(&idx).unwrap().next().is_none(), "index empty");
        assert!(s.records().unwrap().is_empty());
    }

    #[test]
    fn gc_never_rewrites_the_index_entry_of_an_attachment_that_took_a_listed_address() {
        // A DEL of "a" killed after its IPv4 record went, before its IPv6
        // one and its entry: the entry still lists both. "b" then gets the
        // IPv4 address, as its first record, so its entry is that file.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let (r4, r6) = (range("10.244.1.1/24"), range("fc00:0:0:1::1/64"));
        let a4 = s.allocate(&r4, "a", "eth0", false, None).unwrap();
        let a6 = s.allocate(&r6, "a", "eth0", false, None).unwrap();
        s.remove_record(a4).unwrap();
        s.allocate(&r4, "b", "eth0", false, Some(a4)).unwrap();
        let b6 = s.allocate(&r6, "b", "eth0", false, None).unwrap();
        // GC releases what is left of "a".
        let left: Vec<Record> = s.records().unwrap().into_iter().filter(|r| r.container_id == "a").collect();
        assert_eq!(left.iter().map(|r| r.ip).collect::<Vec<_>>(), [a6]);
        s.release_record(&left[0]).unwrap();
        assert!(!s.dir().join("attachments/a:eth0").exists(), "nothing of a's is left to index");
        assert_eq!(get_xattr(&s.dir().join(a4.to_string()), INDEX_XATTR).unwrap().unwrap(), format!("{a4},{b6}"));
        assert_eq!(s.release("b", "eth0").unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [a4, b6]);
        assert!(s.records().unwrap().is_empty());
    }

    #[test]
    fn an_index_entry_without_its_list_falls_back_to_the_records() {
        // Copied without extended attributes (a backup restored by a tool
        // that drops them): the entry is a plain file; DEL still finds the
        // attachment's records, and only its own.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let r = range("10.244.1.1/24");
        let a = s.allocate(&r, "a", "eth0", false, None).unwrap();
        let b = s.allocate(&r, "b", "eth0", false, None).unwrap();
        let entry = s.dir().join("attachments/a:eth0");
        std::fs::remove_file(&entry).unwrap();
        std::fs::write(&entry, "a\r\neth0").unwrap();
        assert_eq!(s.find("a", "eth0").unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [a]);
        assert_eq!(s.release("a", "eth0").unwrap().len(), 1);
        assert!(!entry.exists());
        assert_eq!(s.find("b", "eth0").unwrap().iter().map(|r| r.ip).collect::<Vec<_>>(), [b]);
    }

    #[test]
    fn a_kill_between_the_address_list_and_the_index_link_leaves_what_gc_releases() {
        // The state a SIGKILL leaves after the record (and host-local's
        // name for it) got its address list but before the index names it:
        // a record nothing indexes, as a kill before the index always left.
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let r = range("10.244.1.1/24");
        let ip = s.allocate(&r, "killed", "eth0", false, None).unwrap();
        std::fs::remove_file(s.dir().join("attachments/killed:eth0")).unwrap();
        assert!(get_xattr(&s.dir().join(ip.to_string()), INDEX_XATTR).unwrap().is_some());
        // The address stays taken (no double allocation) ...
        assert_ne!(s.allocate(&r, "next", "eth0", false, None).unwrap(), ip);
        // ... DEL of the killed attachment finds nothing to release ...
        assert!(s.release("killed", "eth0").unwrap().is_empty());
        // ... and GC, which reads every record, releases it and its mirror.
        let leaked: Vec<Record> = s.records().unwrap().into_iter().filter(|r| r.container_id == "killed").collect();
        assert_eq!(leaked.len(), 1);
        s.release_record(&leaked[0]).unwrap();
        assert!(!s.dir().join(ip.to_string()).exists() && !hl.join(ip.to_string()).exists());
        assert_eq!(s.find("next", "eth0").unwrap().len(), 1, "the other attachment keeps its entry");
    }

    #[test]
    fn an_allocation_costs_one_new_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let ip = s.allocate(&range("10.244.1.1/24"), "c", "eth0", false, None).unwrap().to_string();
        // Record, host-local's reservation and the index entry: one file.
        let record = std::fs::metadata(s.dir().join(&ip)).unwrap();
        assert_eq!(record.nlink(), 3);
        assert!(same_file(&s.dir().join(&ip), &hl.join(&ip)));
        assert!(same_file(&s.dir().join(&ip), &s.dir().join("attachments/c:eth0")));
        assert_eq!(std::fs::read_to_string(hl.join(&ip)).unwrap(), "c\r\neth0", "host-local's word, unchanged");
        s.release("c", "eth0").unwrap();
        assert!(!hl.join(&ip).exists() && !s.dir().join("attachments/c:eth0").exists());
    }

    #[test]
    fn host_locals_addresses_are_taken_as_used_and_ours_are_mirrored_there() {
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("networks-hl/cbr0");
        std::fs::create_dir_all(&hl).unwrap();
        // A pod flannel's plugin added: host-local's file, content and all.
        std::fs::write(hl.join("10.244.1.2"), "upstream\r\neth0").unwrap();
        std::fs::write(hl.join("last_reserved_ip.0"), "10.244.1.2").unwrap();
        let r = range("10.244.1.1/24");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        let a = s.allocate(&r, "ours", "eth0", true, None).unwrap();
        assert_eq!(a.to_string(), "10.244.1.3");
        assert_eq!(std::fs::read_to_string(hl.join("10.244.1.3")).unwrap(), "ours\r\neth0");
        let asked: IpAddr = "10.244.1.2".parse().unwrap();
        assert!(matches!(s.allocate(&r, "b", "eth0", false, Some(asked)), Err(IpamError::Unavailable { .. })));
        // GC and DEL see only our records, and release only our files.
        assert_eq!(s.records().unwrap().len(), 1);
        assert_eq!(s.release("ours", "eth0").unwrap().len(), 1);
        assert!(!hl.join("10.244.1.3").exists());
        assert!(hl.join("10.244.1.2").exists());
        assert!(s.release("upstream", "eth0").unwrap().is_empty());
        assert!(hl.join("10.244.1.2").exists());
        // A mirror cut short by a kill mid-write is ours and goes with our
        // record. (A mirror of its own: a masq record's, or one an earlier
        // version wrote; a hard-linked mirror appears only complete.)
        let b = s.allocate(&r, "killed", "eth0", false, None).unwrap();
        std::fs::remove_file(hl.join(b.to_string())).unwrap();
        std::fs::write(hl.join(b.to_string()), "kil").unwrap();
        s.release("killed", "eth0").unwrap();
        assert!(!hl.join(b.to_string()).exists());
    }

    #[test]
    fn hints_are_named_by_range_set_and_mirrored_as_host_local_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let hl = dir.path().join("hl/cbr0");
        let s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        // IPv6-only: the IPv6 range is host-local's range set 0.
        let only6 = Range::from_lease("2001:db8:10:1::1/64".parse().unwrap(), 0);
        assert_eq!(s.allocate(&only6, "a", "eth0", false, None).unwrap().to_string(), "2001:db8:10:1::2");
        assert_eq!(std::fs::read_to_string(hl.join("last_reserved_ip.0")).unwrap(), "2001:db8:10:1::2");
        assert_eq!(std::fs::read_to_string(s.dir().join("last_reserved_ip.0")).unwrap().trim(), "2001:db8:10:1::2");
        assert!(!hl.join("last_reserved_ip.1").exists());
        // host-local allocated since (a rollback): its hint wins over ours.
        std::fs::write(hl.join("2001:db8:10:1::7"), "up\r\neth0").unwrap();
        std::fs::write(hl.join("last_reserved_ip.0"), "2001:db8:10:1::7").unwrap();
        assert_eq!(s.allocate(&only6, "b", "eth0", false, None).unwrap().to_string(), "2001:db8:10:1::8");
        // Without host-local's hint (cut short by a kill), ours is used.
        std::fs::write(hl.join("last_reserved_ip.0"), "").unwrap();
        assert_eq!(s.allocate(&only6, "c", "eth0", false, None).unwrap().to_string(), "2001:db8:10:1::9");
    }

    #[test]
    fn a_new_host_local_directory_gets_every_address_we_already_hold() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.1.1/24");
        let s = Store::open(dir.path(), "cbr0").unwrap();
        let a = s.allocate(&r, "old", "eth0", false, None).unwrap();
        drop(s);
        let hl = dir.path().join("hl/cbr0");
        assert!(Store::open(dir.path(), "cbr0")
            .unwrap()
            .with_host_local(hl.clone(), false)
            .unwrap()
            .host_local
            .is_none());
        assert!(!hl.exists());
        let _s = Store::open(dir.path(), "cbr0").unwrap().with_host_local(hl.clone(), true).unwrap();
        assert_eq!(std::fs::read_to_string(hl.join(a.to_string())).unwrap(), "old\r\neth0");
    }

    #[test]
    fn open_existing_does_not_create_state() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Store::open_existing(dir.path(), "cbr0").unwrap().is_none());
        assert!(!dir.path().join("networks").exists());
    }

    #[test]
    fn a_held_lock_is_waited_for_in_the_kernel_and_the_wait_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = File::create(&path).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let other = OpenOptions::new().write(true).open(&path).unwrap();
        assert!(!lock_within(&other, Duration::from_millis(30)).unwrap(), "taken while held");
        // A waiter gets it once the holder lets go.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| lock_within(&other, LOCK_TIMEOUT).unwrap());
            drop(held);
            assert!(waiter.join().unwrap());
        });
    }

    #[test]
    fn concurrent_processes_get_distinct_addresses() {
        // Threads stand in for processes here: flock locks belong to the open
        // file description, so each Store::open contends like a process would.
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.1.1/24");
        let ips: Vec<IpAddr> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..40)
                .map(|i| {
                    let path = dir.path();
                    scope.spawn(move || {
                        let s = Store::open(path, "cbr0").unwrap();
                        s.allocate(&r, &format!("c{i}"), "eth0", false, None).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: HashSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), 40);
    }
}
