//! Fault injection for the end-to-end tests (`tests/tests/faults.rs`): a
//! network partition made with nftables inside the outside host's
//! namespace, an `ip monitor` that records every change the kernel reports
//! in a node, a seeded random source, and the tests' knobs.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netns_fixtures::{wait_until, Netns};

use crate::overlay::Proc;

/// A test's knob: `$name` as a number, else `default`; printed, so that a
/// run's log says what it ran with.
pub fn knob(name: &str, default: u64) -> u64 {
    let v = match std::env::var(name) {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("{name}={s:?}: {e}")),
        Err(_) => default,
    };
    eprintln!("{name}={v}");
    v
}

/// A small seeded random source (xorshift64*): `$FLANNEL_RS_FAULT_SEED`,
/// else the clock. The seed is printed so that a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `$FLANNEL_RS_FAULT_SEED` or the clock.
    pub fn from_env() -> Rng {
        let seed = match std::env::var("FLANNEL_RS_FAULT_SEED") {
            Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("FLANNEL_RS_FAULT_SEED={s:?}: {e}")),
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        };
        eprintln!("FLANNEL_RS_FAULT_SEED={seed}");
        Rng(seed | 1)
    }

    /// The next number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The nftables table a [`Partition`] adds to the outside host.
const PARTITION_TABLE: &str = "flt_partition";

/// A network partition between some nodes and a TCP service on the outside
/// host: the outside host's own firewall (in its namespace, which the test
/// created) drops the service's packets from and to those nodes, both ways,
/// so neither side hears anything (no reset, no FIN): what a cut cable or a
/// dead switch port looks like. Programs on the outside host itself (etcdctl,
/// kubectl, the API server's own etcd traffic) and other nodes are not cut
/// off. Healed on drop, also when the test panics.
pub struct Partition {
    ns: PathBuf,
}

impl Partition {
    /// Cuts `hosts` off from TCP port `port` on the outside host `ns`.
    pub fn tcp(ns: &Netns, hosts: &[Ipv4Addr], port: u16) -> Partition {
        let set = hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", ");
        let rules = format!(
            "table inet {PARTITION_TABLE} {{\n\
             chain input {{ type filter hook input priority -200; policy accept; ip saddr {{ {set} }} tcp dport {port} drop; }}\n\
             chain output {{ type filter hook output priority -200; policy accept; ip daddr {{ {set} }} tcp sport {port} drop; }}\n\
             }}\n"
        );
        let p = Partition { ns: ns.path() };
        let out = p.nft(&["-f", "-"], Some(&rules));
        assert!(out.status.success(), "nft -f: {}\n{rules}", String::from_utf8_lossy(&out.stderr));
        p
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.display())).arg("nft").args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run nft");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Ends the partition.
    pub fn heal(self) {}
}

impl Drop for Partition {
    fn drop(&mut self) {
        let out = self.nft(&["delete", "table", "inet", PARTITION_TABLE], None);
        if !out.status.success() {
            eprintln!("heal the partition: nft: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A route on `lo` that [`Monitor::start`] adds and removes until the
/// monitor reports it (TEST-NET-2, inside the node's namespace only).
const PROBE: &str = "198.51.100.254";

/// `ip -ts monitor link route neigh` inside a node: every link, route,
/// neighbour and FDB change the kernel reports (FDB entries come as
/// neighbours of family bridge), one event per element. The kernel reports
/// changes only: replacing an entry with an identical one says nothing, so an
/// event about an entry means the entry really changed. Killed on drop.
pub struct Monitor {
    _proc: Proc,
    path: PathBuf,
}

impl Monitor {
    /// Starts it in `ns`, writing to `path`, and waits until it listens.
    pub fn start(ns: &Netns, path: &Path) -> Monitor {
        let out = File::create(path).unwrap();
        let child = ns
            .command("ip")
            .args(["-ts", "monitor", "link", "route", "neigh"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("run ip monitor");
        let m = Monitor { _proc: Proc(Some(child)), path: path.to_path_buf() };
        // Listening once it reports a change made after it started.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = format!("{PROBE}/32");
            ns.run_ok("ip", &["route", "add", &probe, "dev", "lo"]);
            let seen = Instant::now() + Duration::from_millis(300);
            while Instant::now() < seen && !m.text().contains(PROBE) {
                std::thread::sleep(Duration::from_millis(10));
            }
            ns.run_ok("ip", &["route", "del", &probe, "dev", "lo"]);
            if m.text().contains(PROBE) {
                break;
            }
            assert!(Instant::now() < deadline, "ip monitor in {} reports nothing", ns.name());
        }
        wait_until(Duration::from_secs(10), "ip monitor to report the probe's removal", || {
            m.text().contains(&format!("Deleted {PROBE}"))
        });
        m
    }

    /// Everything it printed so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// The events so far, one string each (a link event's second line joined
    /// to its first).
    pub fn events(&self) -> Vec<String> {
        let mut events: Vec<String> = Vec::new();
        for line in self.text().lines() {
            match events.last_mut() {
                Some(last) if !line.starts_with('[') => {
                    last.push(' ');
                    last.push_str(line.trim());
                }
                _ => events.push(line.to_string()),
            }
        }
        events
    }

    /// Events about device `dev` (its link, or a route, neighbour or FDB
    /// entry on it) that mention any of `words` (addresses, MACs) as a whole
    /// word.
    pub fn events_on(&self, dev: &str, words: &[String]) -> Vec<String> {
        self.events().into_iter().filter(|e| on_device(e, dev) && mentions(e, words)).collect()
    }
}

/// Whether a monitor event is about `dev` or an entry on it.
pub fn on_device(event: &str, dev: &str) -> bool {
    event.contains(&format!(" dev {dev} "))
        || event.ends_with(&format!(" dev {dev}"))
        || event.contains(&format!(": {dev}:"))
}

/// Whether `text` has any of `words` as a whole word (split at blanks and
/// `/`, so that 10.244.1.0 does not match 10.244.10.0).
pub fn mentions(text: &str, words: &[String]) -> bool {
    text.split(|c: char| c.is_whitespace() || c == '/').any(|t| words.iter().any(|w| w == t))
}

/// The interface index of `dev` in `ns`, if it exists (from `ip -j link`).
pub fn ifindex(ns: &Netns, dev: &str) -> Option<u64> {
    ns.ip_json(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["ifname"] == dev)
        .and_then(|l| l["ifindex"].as_u64())
}

/// Polls `check` every 10 ms until it returns `Ok`; panics after `timeout`
/// with `what` and the last reason it gave, so that a failure says what was
/// seen, not only that time ran out.
pub fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check() {
            Ok(()) => return,
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {why}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Names created in (or moved into) a directory, as inotify reports them
/// the moment they appear: a test can act on a file within microseconds of
/// its creation (kill the process writing it), where polling would miss it.
pub struct CreateWatch {
    fd: std::os::fd::OwnedFd,
}

impl CreateWatch {
    /// Watches `dir`.
    pub fn new(dir: &Path) -> CreateWatch {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain system calls; the descriptor is checked and then owned.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a descriptor we just opened and own from here on.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) };
        assert!(wd >= 0, "inotify_add_watch {}: {}", dir.display(), std::io::Error::last_os_error());
        CreateWatch { fd }
    }

    /// The names that appeared since the last call, waiting up to `timeout`
    /// for the first one; empty if none came.
    pub fn next(&self, timeout: Duration) -> Vec<String> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer of its size.
        let len = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let mut names = Vec::new();
        let mut off = 0usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        while len > 0 && off + header <= len as usize {
            // The name's length is the header's last field (u32 after wd, mask, cookie).
            let name_len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
            let name = &buf[off + header..off + header + name_len];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
            off += header + name_len;
        }
        names
    }
}

/// The most tries a start-up wait can make within `elapsed`: the first at
/// once, then one after each of the Backoff's waits (200 ms doubling to
/// 5 s, flanneld-rs's `subnet::Backoff`). A spinning loop makes far more.
pub fn max_tries(elapsed: Duration) -> usize {
    let (mut at, mut wait, mut tries) = (Duration::ZERO, Duration::from_millis(200), 1);
    loop {
        at += wait;
        if at > elapsed {
            return tries;
        }
        tries += 1;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
