//! The reachability matrix of the Kubernetes network-policy e2e tests, on
//! real pods: pods a, b, c in namespaces x, y, z spread over two nodes, each
//! serving TCP and UDP on ports 80 and 81; every ordered pair is probed on
//! every port and protocol, and the observed matrix is compared with the
//! expected one.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netns_fixtures::Netns;
use serde_json::json;

use crate::kube::KubeOverlay;

/// Namespaces of the lab.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pods in every namespace.
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Probed ports.
pub const PORTS: [u16; 2] = [80, 81];

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// TCP: a connect and one echoed line.
    Tcp,
    /// UDP: one datagram and its echo.
    Udp,
}

/// One lab pod.
pub struct LabPod {
    /// `x/a`.
    pub id: String,
    /// Its network namespace.
    pub netns: Netns,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its node.
    pub node: usize,
}

/// The lab: a Kubernetes-mode overlay whose daemons enforce policy, and nine pods.
pub struct Lab {
    /// Cluster, API server, daemons.
    pub ko: KubeOverlay,
    /// `x/a` ... `z/c`.
    pub pods: Vec<LabPod>,
    stop: Arc<AtomicBool>,
}

/// A probe's outcome per (from, to, port, proto).
pub type Matrix = BTreeMap<(String, String, u16, Proto), bool>;

impl Lab {
    /// Two nodes, namespaces x, y, z labelled `ns=<name>`, pods labelled
    /// `pod=<name>` with container ports named `serve-80-tcp` and so on, and
    /// daemons started with `--network-policy` (and the RBAC that needs).
    pub fn new() -> Lab {
        let mut ko = KubeOverlay::new(2);
        let rbac = std::fs::read_to_string(crate::kube::manifest_path().with_file_name("network-policy.yml"))
            .expect("deploy/network-policy.yml");
        ko.api.apply(&rbac);
        for i in 0..2 {
            ko.create_node(i);
            let mut flags = ko.o.flags(i);
            flags.push("--network-policy".into());
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            ko.o.set_flags(i, &flags);
            ko.o.start(i);
        }
        for ns in NAMESPACES {
            ko.api.apply(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}})
                    .to_string(),
            );
            // What kube-controller-manager (not run here) would create.
            let sa =
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}});
            ko.api.apply(&sa.to_string());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut pods = Vec::new();
        for (k, (ns, name)) in NAMESPACES.iter().flat_map(|n| PODS.iter().map(move |p| (*n, *p))).enumerate() {
            let node = k % 2;
            let (netns, ip) = ko.o.add_pod(node, &format!("{ns}{name}"));
            let ports: Vec<_> = PORTS
                .iter()
                .flat_map(|p| {
                    [("TCP", "tcp"), ("UDP", "udp")].map(|(proto, lower)| {
                        json!({"name": format!("serve-{p}-{lower}"), "containerPort": p, "protocol": proto})
                    })
                })
                .collect();
            ko.api.apply(
                &json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                    "spec": {
                        "nodeName": KubeOverlay::node_name(node), "automountServiceAccountToken": false,
                        "containers": [{"name": "c", "image": "serve", "ports": ports}]
                    }
                })
                .to_string(),
            );
            ko.api.kubectl_ok(&[
                "patch",
                "pod",
                name,
                "-n",
                ns,
                "--subresource=status",
                "--type=merge",
                "-p",
                &json!({"status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "phase": "Running"}})
                    .to_string(),
            ]);
            for port in PORTS {
                serve(&netns, SocketAddr::new(ip.into(), port), &stop);
            }
            pods.push(LabPod { id: format!("{ns}/{name}"), netns, ip, node });
        }
        Lab { ko, pods, stop }
    }

    /// Applies a manifest (policies, label changes) as the admin.
    pub fn apply(&self, yaml: &str) {
        self.ko.api.apply(yaml);
    }

    /// Probes every ordered pair of distinct pods on every port and protocol,
    /// in parallel.
    pub fn probe_all(&self) -> Matrix {
        let mut jobs = Vec::new();
        for from in &self.pods {
            for to in &self.pods {
                if from.id == to.id {
                    continue;
                }
                for port in PORTS {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        jobs.push((from, to, port, proto));
                    }
                }
            }
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .chunks(jobs.len().div_ceil(24))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(from, to, port, proto)| {
                                let ok = probe(&from.netns, SocketAddr::new(to.ip.into(), *port), *proto);
                                ((from.id.clone(), to.id.clone(), *port, *proto), ok)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }

    /// The expected matrix: `allowed(from, to, port, proto)` for every cell.
    pub fn expect(&self, allowed: impl Fn(&str, &str, u16, Proto) -> bool) -> Matrix {
        let mut m = Matrix::new();
        for from in &self.pods {
            for to in &self.pods {
                if from.id != to.id {
                    for port in PORTS {
                        for proto in [Proto::Tcp, Proto::Udp] {
                            m.insert(
                                (from.id.clone(), to.id.clone(), port, proto),
                                allowed(&from.id, &to.id, port, proto),
                            );
                        }
                    }
                }
            }
        }
        m
    }

    /// Probes until the observed matrix equals `want` (policy takes effect
    /// within a second or so); panics with the differences after `timeout`.
    pub fn wait_for(&self, what: &str, want: &Matrix, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.probe_all();
            if &got == want {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let diff: Vec<String> = want
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(v))
                    .map(|((f, t, p, pr), v)| {
                        format!("{f} -> {t} {pr:?}/{p}: want {}", if *v { "allowed" } else { "denied" })
                    })
                    .collect();
                panic!("{what}: {} cells differ:\n{}", diff.len(), diff.join("\n"));
            }
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves TCP (echo one line) and UDP (echo datagrams) on `addr` inside `ns`
/// until `stop`.
fn serve(ns: &Netns, addr: SocketAddr, stop: &Arc<AtomicBool>) {
    let tcp = ns.in_thread(|| TcpListener::bind(addr)).unwrap();
    tcp.set_nonblocking(false).unwrap();
    let udp = ns.in_thread(|| UdpSocket::bind(addr)).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let s = stop.clone();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            if s.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(mut c) = conn {
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = c.read(&mut buf) {
                        let _ = c.write_all(&buf[..n]);
                    }
                });
            }
        }
    });
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
}

/// One probe from inside `ns`: true when the echo came back.
pub fn probe(ns: &Netns, to: SocketAddr, proto: Proto) -> bool {
    const WAIT: Duration = Duration::from_millis(400);
    ns.in_thread(|| match proto {
        Proto::Tcp => {
            let Ok(mut s) = TcpStream::connect_timeout(&to, WAIT) else { return false };
            let _ = s.set_read_timeout(Some(WAIT));
            let mut buf = [0u8; 8];
            s.write_all(b"probe").is_ok() && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"probe")
        }
        Proto::Udp => {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { return false };
            let _ = s.set_read_timeout(Some(WAIT));
            let mut buf = [0u8; 8];
            // Two tries: a first datagram may race a policy update.
            (0..2).any(|_| s.send_to(b"probe", to).is_ok() && s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"probe"))
        }
    })
}
