//! [`Netns`]: one owned, named network namespace and ways to run things in it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use serde_json::Value;

use crate::PREFIX;

/// Where `ip netns add` bind-mounts named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Longest role, pod name or tag we accept. Namespace names have no hard
/// limit below NAME_MAX, but long names make `ip netns list` and failure
/// messages unreadable.
const MAX_PART: usize = 48;

/// Per-process counter; together with the pid it makes auto names unique
/// across test threads and across concurrently running test processes.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A tag unique among live processes: `<pid>x<n>`. It starts with a digit,
/// which user tags ([`check_user_tag`]) may not, so [`crate::cleanup_leftovers`]
/// can tell the two apart and never mistakes a kept cluster for a leftover.
pub(crate) fn unique_tag() -> String {
    format!("{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Checks one dash-separated part of a name (role, pod name). Dashes are
/// allowed inside roles and pod names; only tags must be dash-free.
pub(crate) fn check_part(what: &str, part: &str) -> io::Result<()> {
    let ok = !part.is_empty()
        && part.len() <= MAX_PART
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {part:?}: want 1-{MAX_PART} characters of [A-Za-z0-9._-]"),
        ))
    }
}

/// Checks a tag given by a user (`Cluster::new_named`, the CLI's `--name`).
/// It must start with a letter (auto tags start with the pid, see
/// [`unique_tag`]) and contain no dash, so that `flt-<tag>-` never is a
/// prefix of another tag's names and `down` cannot remove someone else's.
pub(crate) fn check_user_tag(tag: &str) -> io::Result<()> {
    let ok = tag.len() <= 24
        && tag.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tag {tag:?}: want a letter followed by up to 23 of [A-Za-z0-9_]"),
        ))
    }
}

/// Turns a failed `Output` into an error that says what ran and what it said.
pub(crate) fn check_output(what: &dyn std::fmt::Display, out: Output) -> io::Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )))
    }
}

/// Runs `ip args` in the caller's namespace. Only used for `ip netns add` and
/// `ip netns delete`, which manage the /run/netns mounts and configure no
/// network object, so the root namespace stays untouched.
pub(crate) fn ip_netns(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").arg("netns").args(args).stdin(Stdio::null()).output()?;
    check_output(&format_args!("ip netns {}", args.join(" ")), out).map(drop)
}

/// An owned network namespace, bind-mounted at `/run/netns/<name>` by
/// `ip netns add` so that `ip -n`, `ip netns exec` and CNI plugins
/// (`CNI_NETNS`) can find it. Dropping it deletes it, also while a test
/// unwinds from a panic.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Opened once at creation: [`Netns::command`] enters the namespace with
    /// `setns` on a duplicate of it, which avoids resolving the path (and
    /// `ip netns exec`'s mount-namespace dance) on every command.
    fd: OwnedFd,
    /// Set by [`Netns::keep`]: leave the namespace in place on drop.
    keep: bool,
}

impl Netns {
    /// Creates a uniquely named namespace `flt-<pid>x<n>-<role>` with `lo` up.
    /// `role` is a short word that says what it is for (`node`, `pod-a`).
    pub fn new(role: &str) -> io::Result<Netns> {
        check_part("role", role)?;
        // A killed process with our pid may have left a namespace of the same
        // name behind; skip such names instead of failing.
        for _ in 0..1000 {
            let name = format!("{PREFIX}{}-{role}", unique_tag());
            if !Path::new(NETNS_DIR).join(&name).exists() {
                return Self::named(&name);
            }
        }
        Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("no free namespace name for role {role:?}")))
    }

    /// Creates a namespace with exactly this name (it must start with
    /// [`PREFIX`] so that cleanup can find it), `lo` up. Fails if it exists.
    pub fn named(name: &str) -> io::Result<Netns> {
        let rest = name.strip_prefix(PREFIX).unwrap_or("");
        if rest.is_empty()
            || name.len() > 200
            || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("namespace name {name:?}: want {PREFIX}<[A-Za-z0-9._-]+>"),
            ));
        }
        ip_netns(&["add", name])?;
        // From here on `ns` owns the namespace: any error below drops it,
        // which deletes it again.
        let path = Path::new(NETNS_DIR).join(name);
        let fd = match File::open(&path) {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                let _ = ip_netns(&["delete", name]);
                return Err(io::Error::new(e.kind(), format!("open {}: {e}", path.display())));
            }
        };
        let ns = Netns { name: name.to_string(), fd, keep: false };
        // A fresh namespace's loopback is down; almost everything needs it.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (`flt-...`), as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI_NETNS and `nsenter --net=` want.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Gives up ownership: the namespace stays after this value is gone (the
    /// CLI's `up`). Remove it with `ip netns delete`, `netns-fixture down`
    /// or `netns-fixture cleanup --all`.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// A [`Command`] whose child runs inside this namespace.
    ///
    /// The child calls `setns(CLONE_NEWNET)` between fork and exec, on a
    /// duplicate of the descriptor opened at creation. That costs one system
    /// call, where `ip netns exec` costs milliseconds, which benchmarks would
    /// measure. The duplicate belongs to the returned `Command`, so it stays
    /// valid until the spawn even if this `Netns` is dropped first; it is
    /// close-on-exec, so the program itself never inherits it. Only the
    /// network namespace changes: the child still sees the caller's mounts,
    /// including the caller's `/sys` (use netlink, i.e. `ip`, not sysfs).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // If dup fails (out of descriptors) report it at spawn time, since
        // this function cannot fail.
        let fd = self.fd.try_clone().map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF));
        // SAFETY: between fork and exec the closure only calls setns(2), which
        // is async-signal-safe, and builds an io::Error from an errno, which
        // does not allocate.
        unsafe {
            cmd.pre_exec(move || match &fd {
                Ok(fd) => setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| io::Error::from_raw_os_error(e as i32)),
                Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
            });
        }
        cmd
    }

    /// Runs `program args` inside (stdin empty) and returns its output,
    /// whatever its exit status.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program).args(args).stdin(Stdio::null()).output()
    }

    /// Runs `program args` inside and returns stdout; panics with the command,
    /// the namespace, stdout and stderr when it cannot start or fails. For
    /// tests, where a failed setup step should say exactly what failed.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let what = format!("`{program} {}` in {}", args.join(" "), self.name);
        match self.run(program, args).and_then(|out| check_output(&what, out)) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `sh -c script` inside and returns its output (check
    /// `status` yourself). Panics only when `sh` cannot be started.
    pub fn sh(&self, script: &str) -> Output {
        self.run("sh", &["-c", script]).unwrap_or_else(|e| panic!("sh -c {script:?} in {}: {e}", self.name))
    }

    /// Starts `program args` inside and returns the child without waiting.
    /// Note that dropping a `Child` does not kill it; dropping this `Netns`
    /// does (see [`Drop`](#impl-Drop-for-Netns)).
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<Child> {
        self.command(program).args(args).spawn()
    }

    /// Runs `ip args` inside; the error carries the command and its stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let out = self.run("ip", args)?;
        check_output(&format_args!("ip {} in {}", args.join(" "), self.name), out).map(drop)
    }

    /// Runs several `ip` commands inside with one process (`ip -batch -`):
    /// building a cluster needs a dozen of them per node, and each fork+exec
    /// of `ip` costs about a millisecond. Stops at the first failing line.
    pub fn ip_batch(&self, lines: &[String]) -> io::Result<()> {
        let mut child = self
            .command("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let script = lines.join("\n") + "\n";
        // Write before waiting; the script is far smaller than a pipe buffer.
        child.stdin.take().expect("piped stdin").write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        check_output(&format_args!("ip -batch in {}:\n{script}", self.name), out).map(drop)
    }

    /// Waits until every link in `links` has operational state `UP` inside
    /// this namespace, or fails after `timeout`.
    ///
    /// `ip link set up` returns before the kernel's link watcher has
    /// processed the carrier change, and until it has, a veth's queue is the
    /// "noop" one that drops every packet. Under load that takes long enough
    /// for a single `ping -W1` right after setup to lose its ARP request.
    pub fn wait_oper_up(&self, links: &[&str], timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run("ip", &["-j", "link", "show"])?;
            let out = check_output(&format_args!("ip -j link show in {}", self.name), out)?;
            let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let down: Vec<&str> = links
                .iter()
                .copied()
                .filter(|want| {
                    !listed
                        .as_array()
                        .is_some_and(|all| all.iter().any(|l| l["ifname"] == *want && l["operstate"] == "UP"))
                })
                .collect();
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} not operationally up in {} after {timeout:?}", down.join(", "), self.name),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `ip -j args` inside, parsed (`ip_json(&["addr", "show", "dev", "cni0"])`).
    /// Empty output is `[]`. Panics when `ip` fails (for instance when the
    /// device does not exist: list all and filter to test for absence).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        self.json("ip", args)
    }

    /// `bridge -j args` inside, parsed (`bridge_json(&["fdb", "show"])`).
    /// Empty output is `[]`; panics when `bridge` fails.
    pub fn bridge_json(&self, args: &[&str]) -> Value {
        self.json("bridge", args)
    }

    fn json(&self, program: &str, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.run_ok(program, &full);
        // `ip -j` prints nothing at all for some empty listings.
        if text.trim().is_empty() {
            return Value::Array(Vec::new());
        }
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{program} -j {} in {}: bad JSON ({e}): {text}", args.join(" "), self.name))
    }

    /// Writes sysctl `key` (`net.ipv4.ip_forward`, or a path below
    /// /proc/sys such as `net/ipv4/conf/eth0.5/rp_filter` when a part
    /// contains dots) of this namespace.
    ///
    /// /proc/sys/net shows the namespace of the thread that opens it, so
    /// this writes from a short-lived thread that first enters the
    /// namespace. The network namespace is per thread, so the rest of the
    /// process (and the root namespace) are unaffected, and it needs
    /// neither fork nor procps' `sysctl` binary.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let rel = if key.contains('/') { key.to_string() } else { key.replace('.', "/") };
        if rel.split('/').any(|p| p.is_empty() || p == "..") {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("sysctl key {key:?}")));
        }
        let path = Path::new("/proc/sys").join(rel);
        let fd = self.fd.as_fd();
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                setns(fd, CloneFlags::CLONE_NEWNET)?;
                std::fs::write(&path, value)
            })
            .join()
        });
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("sysctl {key}={value} in {}: {e}", self.name))),
            Err(_) => Err(io::Error::other(format!("sysctl {key}={value} in {}: thread panicked", self.name))),
        }
    }

    /// Runs `f` on a short-lived thread inside the namespace and returns its
    /// result. Sockets `f` creates belong to the namespace for their whole
    /// life and can be used from any thread afterwards; this is how tests
    /// talk TCP or UDP from inside a pod without spawning a program.
    pub fn in_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd.as_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(fd, CloneFlags::CLONE_NEWNET).expect("setns into the fixture's namespace");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Device and inode of the namespace: what `/proc/<pid>/ns/net` of a
    /// process inside it resolves to.
    fn identity(&self) -> io::Result<(u64, u64)> {
        let meta = File::from(self.fd.try_clone()?).metadata()?;
        Ok((meta.dev(), meta.ino()))
    }
}

impl Drop for Netns {
    /// Kills the processes still inside (a server a failed test never
    /// stopped would otherwise keep the namespace and its links alive after
    /// the name is gone), then deletes the namespace. Errors are printed,
    /// not raised: drop may run during a panic.
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match self.identity() {
            Ok(id) => {
                crate::cleanup::kill_processes_in(id);
            }
            Err(e) => eprintln!("netns-fixtures: stat {}: {e}", self.name),
        }
        if let Err(e) = ip_netns(&["delete", &self.name]) {
            eprintln!("netns-fixtures: {e}");
        }
    }
}
