//! A node namespace with a lease, and a way to run the real plugin binary in it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use netns_fixtures::Netns;
use serde_json::{json, Value};

/// The plugin binary cargo built for these tests.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_flannel");

/// The lease every test node gets unless it asks for another.
pub const LEASE: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

/// One node: a namespace, a subnet.env and an IPAM directory of its own.
pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

/// What a plugin call returned.
pub struct Outcome {
    pub ok: bool,
    pub stdout: Value,
    pub stderr: String,
}

impl Outcome {
    /// Parses what a finished plugin process printed.
    pub fn from_output(out: Output) -> Outcome {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("plugin printed non-JSON {text:?}: {e}"))
        };
        Outcome { ok: out.status.success(), stdout, stderr: String::from_utf8_lossy(&out.stderr).to_string() }
    }

    /// Panics unless the call failed with `code` and a message containing `text`.
    pub fn expect_error(&self, code: u64, text: &str) {
        assert!(!self.ok, "expected error {code}, got success: {}", self.stdout);
        assert_eq!(self.stdout["code"], json!(code), "wrong code: {}", self.stdout);
        let msg = self.stdout["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(text), "message {msg:?} lacks {text:?}");
        assert!(self.stdout["cniVersion"].is_string(), "error lacks cniVersion: {}", self.stdout);
    }
}

impl Node {
    /// A node with the default lease, or `None` when not root (outside CI).
    pub fn new() -> Option<Node> {
        Self::with_lease(LEASE)
    }

    /// A node with `lease` as its subnet.env.
    pub fn with_lease(lease: &str) -> Option<Node> {
        if !netns_fixtures::require_root() {
            return None;
        }
        let ns = netns_fixtures::single_node().expect("node namespace");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("subnet.env"), lease).unwrap();
        Some(Node { ns, dir })
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// flannel's CNI configuration, pointed at this node's files.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
            "delegate": { "hairpinMode": true, "isDefaultGateway": true }
        })
    }

    /// Runs the plugin inside the node with `env` and `stdin`.
    pub fn call(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        let child = self.spawn(&[], env, stdin);
        Outcome::from_output(child.wait_with_output().unwrap())
    }

    /// Starts the plugin inside the node, behind `wrapper` (a program and its
    /// arguments that end by running the plugin, e.g. `nsenter --mount=...
    /// --`; empty for none), with `env` and `stdin`; stdout and stderr piped.
    pub fn spawn(&self, wrapper: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Child {
        let mut cmd = match wrapper.split_first() {
            None => self.ns.command(PLUGIN),
            Some((program, args)) => {
                let mut c = self.ns.command(program);
                c.args(args).arg(PLUGIN);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child
    }

    /// Like [`Node::call`], but a plugin still running after `limit` is
    /// killed and the test fails saying it hung.
    pub fn call_within(&self, limit: Duration, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        let mut child = self.spawn(&[], env, stdin);
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the plugin still ran after {limit:?}: it hangs");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Outcome::from_output(child.wait_with_output().unwrap())
    }

    /// A verb on a container with `conf`.
    pub fn verb(&self, verb: &str, id: &str, netns: &str, ifname: &str, conf: &Value) -> Outcome {
        let env = [
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        self.call(&env, conf.to_string().as_bytes())
    }

    /// ADD that must succeed; returns the result.
    pub fn add(&self, id: &str, pod: &Netns) -> Value {
        let out = self.verb("ADD", id, pod.path().to_str().unwrap(), "eth0", &self.conf("1.0.0"));
        assert!(out.ok, "ADD {id} failed: {} {}", out.stdout, out.stderr);
        out.stdout
    }

    /// DEL that must succeed.
    pub fn del(&self, id: &str, pod: &Netns) {
        let out = self.verb("DEL", id, pod.path().to_str().unwrap(), "eth0", &self.conf("1.0.0"));
        assert!(out.ok, "DEL {id} failed: {} {}", out.stdout, out.stderr);
    }

    /// Names of the veths on the node.
    pub fn veths(&self) -> Vec<String> {
        self.ns
            .ip_json(&["-d", "link", "show", "type", "veth"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// Addresses with an allocation record on disk.
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir().join("networks/cbr0");
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        out.sort();
        out
    }

    /// Panics unless the node holds no allocation and, once DEL's detached
    /// teardown has finished, no veth.
    pub fn assert_clean(&self) {
        assert_eq!(self.allocations(), Vec::<String>::new(), "allocations left behind");
        netns_fixtures::wait_until(Duration::from_secs(10), "the node's veths to be deleted", || {
            self.veths().is_empty()
        });
    }
}

/// Waits until the pod has no interface but `lo` (DEL deletes in the background).
pub fn wait_pod_empty(pod: &Netns) {
    netns_fixtures::wait_until(Duration::from_secs(10), "the pod's interface to be deleted", || {
        pod_links(pod).is_empty()
    });
}

/// The pod's interfaces as `ip -j addr` shows them, excluding `lo`.
pub fn pod_links(pod: &Netns) -> Vec<Value> {
    pod.ip_json(&["addr", "show"]).as_array().unwrap().iter().filter(|l| l["ifname"] != "lo").cloned().collect()
}

/// The IPv4 address (with prefix) of `dev` in `ns`.
pub fn ipv4_of(ns: &Netns, dev: &str) -> Vec<String> {
    ns.ip_json(&["-4", "addr", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().unwrap().clone())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The IPAM directory of the test network (`cbr0`).
pub fn store_dir(node: &Node) -> PathBuf {
    node.data_dir().join("networks/cbr0")
}

/// The attachment index, `attachments/<id>:<ifname>` -> the addresses it
/// lists, as the files on disk say: the extended attribute
/// `user.flannel-rs.addresses` of a hard link, or an earlier version's
/// symlink target.
pub fn index_entries(node: &Node) -> BTreeMap<String, String> {
    let Ok(entries) = std::fs::read_dir(store_dir(node).join("attachments")) else { return BTreeMap::new() };
    entries
        .map(|e| {
            let e = e.unwrap();
            let list = index_xattr(&e.path())
                .or_else(|| std::fs::read_link(e.path()).ok().map(|t| t.to_string_lossy().into_owned()));
            (e.file_name().to_string_lossy().into_owned(), list.unwrap_or_else(|| "<no address list>".into()))
        })
        .collect()
}

fn index_xattr(path: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(p.as_ptr(), c"user.flannel-rs.addresses".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

/// Whether `nft` runs in `ns`; if not, says so (and fails in CI).
pub fn have_nft(ns: &Netns) -> bool {
    match ns.run("nft", &["list", "tables"]) {
        Ok(out) if out.status.success() => true,
        Ok(out) => netns_fixtures::skip_or_fail(&format!(
            "`nft list tables` fails: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => netns_fixtures::skip_or_fail(&format!("`nft` (nftables) cannot run: {e}")),
    }
}

/// The elements of our masquerade set (`ip flannel-rs-cni pods`) as
/// `nft -j` lists them; none when the table or the set does not exist.
pub fn masq_members(ns: &Netns) -> BTreeSet<String> {
    let out = ns.run("nft", &["-j", "list", "set", "ip", "flannel-rs-cni", "pods"]).expect("run nft");
    if !out.status.success() {
        return BTreeSet::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
    let mut members = BTreeSet::new();
    for item in v["nftables"].as_array().unwrap() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            // A plain element is a string; one with options is {"elem": {"val": ...}}.
            let val = if e.is_string() { e } else { &e["elem"]["val"] };
            members.insert(val.as_str().unwrap_or_else(|| panic!("unexpected set element {e}")).to_string());
        }
    }
    members
}

/// Links (`name kind master`), IPv4 addresses (`dev addr/len`) and IPv4
/// routes (`dst via gw dev`) of a namespace as `ip -j` shows them. IPv4
/// only: the test leases have no IPv6, and the IPv6 link-local addresses the
/// kernel adds by itself would only blur the picture.
pub fn net_state(ns: &Netns) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in ns.ip_json(&["-d", "link", "show"]).as_array().unwrap() {
        out.insert(format!(
            "link {} {} {}",
            l["ifname"].as_str().unwrap(),
            l["linkinfo"]["info_kind"].as_str().unwrap_or("-"),
            l["master"].as_str().unwrap_or("-")
        ));
    }
    for l in ns.ip_json(&["-4", "addr", "show"]).as_array().unwrap() {
        for a in l["addr_info"].as_array().unwrap() {
            out.insert(format!(
                "addr {} {}/{}",
                l["ifname"].as_str().unwrap(),
                a["local"].as_str().unwrap(),
                a["prefixlen"]
            ));
        }
    }
    for r in ns.ip_json(&["-4", "route", "show", "table", "all"]).as_array().unwrap() {
        // The local table changes with addresses, which are compared already.
        if r["table"] == "local" {
            continue;
        }
        out.insert(format!(
            "route {} via {} dev {}",
            r["dst"].as_str().unwrap(),
            r["gateway"].as_str().unwrap_or("-"),
            r["dev"].as_str().unwrap_or("-")
        ));
    }
    out
}

/// Everything an ADD could leave behind, seen from outside the plugin: links,
/// addresses and routes of node and pod, the IPAM records and index on disk,
/// and the masquerade set.
#[derive(Debug, PartialEq, Eq)]
pub struct Footprint {
    pub node: BTreeSet<String>,
    pub pod: BTreeSet<String>,
    pub records: Vec<String>,
    pub index: BTreeMap<String, String>,
    pub masq: BTreeSet<String>,
}

impl Footprint {
    pub fn of(node: &Node, pod: &Netns) -> Footprint {
        Footprint {
            node: net_state(&node.ns),
            pod: net_state(pod),
            records: node.allocations(),
            index: index_entries(node),
            masq: masq_members(&node.ns),
        }
    }
}

/// Pids of the processes whose network namespace is `ns`.
pub fn processes_in(ns: &Netns) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(ns.path()).expect("stat the namespace");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.dev() == target.dev() && m.ino() == target.ino() {
                pids.push(pid);
            }
        }
    }
    pids
}

/// A tmpfs mounted at a directory only inside a private mount namespace,
/// which a `sleep` process holds open: the root namespace never sees the
/// mount, and when the holder dies (drop, or the test process dying, through
/// PR_SET_PDEATHSIG) the namespace and the tmpfs go with it.
pub struct PrivateTmpfs {
    holder: Child,
    mountpoint: PathBuf,
}

impl PrivateTmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax, `16k`) at `mountpoint`,
    /// which must exist. `None` (or a panic in CI) when `unshare` or
    /// `nsenter` are missing.
    pub fn new(mountpoint: &std::path::Path, size: &str) -> Option<PrivateTmpfs> {
        Self::with(mountpoint, &["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
    }

    /// Mounts a ramfs at `mountpoint`: a file system that keeps no user
    /// extended attributes.
    pub fn ramfs(mountpoint: &std::path::Path) -> Option<PrivateTmpfs> {
        Self::with(mountpoint, &["-t", "ramfs", "-o", "mode=0755", "ramfs"])
    }

    fn with(mountpoint: &std::path::Path, mount_args: &[&str]) -> Option<PrivateTmpfs> {
        for tool in ["unshare", "nsenter", "mount"] {
            let found = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
            if !found && !netns_fixtures::skip_or_fail(&format!("`{tool}` (util-linux) is missing")) {
                return None;
            }
        }
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sleep", "infinity"]).stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let holder = cmd.spawn().expect("start unshare");
        let fs = PrivateTmpfs { holder, mountpoint: mountpoint.to_path_buf() };
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let ns_link = format!("/proc/{}/ns/mnt", fs.holder.id());
        netns_fixtures::wait_until(Duration::from_secs(10), "unshare to enter its mount namespace", || {
            std::fs::read_link(&ns_link).is_ok_and(|l| l != own)
        });
        fs.mount(mount_args);
        Some(fs)
    }

    /// Runs `mount ARGS MOUNTPOINT` inside the private namespace.
    pub fn mount(&self, args: &[&str]) {
        let ns = format!("--mount=/proc/{}/ns/mnt", self.holder.id());
        let out = std::process::Command::new("nsenter")
            .arg(&ns)
            .arg("--")
            .arg("mount")
            .args(args)
            .arg(&self.mountpoint)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Makes the tmpfs read-only.
    pub fn remount_ro(&self) {
        self.mount(&["-o", "remount,ro"]);
    }

    /// Makes the tmpfs writable again.
    pub fn remount_rw(&self) {
        self.mount(&["-o", "remount,rw"]);
    }

    /// `rel` below the mount point, as this process reaches it (through the
    /// holder's root, which resolves paths in the private namespace).
    pub fn path(&self, rel: &str) -> PathBuf {
        let inside = self.mountpoint.join(rel);
        PathBuf::from(format!("/proc/{}/root{}", self.holder.id(), inside.display()))
    }

    /// Arguments for [`Node::spawn`] that run the plugin inside the namespace.
    pub fn wrapper(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--mount=/proc/{}/ns/mnt", self.holder.id()), "--".into()]
    }

    /// Every file below the mount point (relative path, and the target of a
    /// symlink or the size of a file).
    pub fn tree(&self) -> BTreeMap<String, String> {
        fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<String, String>) {
            for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
                let path = e.path();
                let rel = path.strip_prefix(base).unwrap().display().to_string();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    out.insert(rel + "/", String::new());
                    walk(base, &path, out);
                } else if meta.file_type().is_symlink() {
                    out.insert(rel, format!("-> {}", std::fs::read_link(&path).unwrap().display()));
                } else {
                    out.insert(rel, format!("{} bytes", meta.len()));
                }
            }
        }
        let base = self.path("");
        let mut out = BTreeMap::new();
        walk(&base, &base, &mut out);
        out
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
