//! A node namespace with a lease, and a way to run the real plugin binary in it.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

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
        let mut cmd = self.ns.command(PLUGIN);
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
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("plugin printed non-JSON {text:?}: {e}"))
        };
        Outcome { ok: out.status.success(), stdout, stderr: String::from_utf8_lossy(&out.stderr).to_string() }
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
