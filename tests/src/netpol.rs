//! The reachability matrix of the Kubernetes network-policy e2e tests, on
//! real pods: pods a, b, c in namespaces x, y, z spread over two nodes, each
//! serving TCP and UDP on ports 80 and 81; every ordered pair is probed on
//! expected one.
//!
//! Pods are dual-stack: the CNI plugin gives each its IPv4 address from the
//! node's lease; the IPv6 address (from 2001:db8:244:<node + 1>::/64, with
//! the node's `cni0` holding `::1` of it) is added by this harness, as are
//! the IPv6 routes between the nodes over the underlay (2001:db8:ff::/64):
//! the plugin and the daemons are IPv4-only for now. Pod objects carry both
//! addresses in `status.podIPs`, and every probe is made in both families.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
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

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Both families, in probe order.
pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// The IPv6 pod subnet of node `node` (the harness's, see the module doc).
pub fn pod_subnet6(node: usize) -> String {
    format!("2001:db8:244:{}::/64", node + 1)
}

/// The node's own address on `cni0` in its IPv6 pod subnet.
fn gateway6(node: usize) -> Ipv6Addr {
    format!("2001:db8:244:{}::1", node + 1).parse().expect("an IPv6 address")
}

/// The node's IPv6 address on the underlay.
fn underlay6(node: usize) -> Ipv6Addr {
    format!("2001:db8:ff::{}", 10 + node).parse().expect("an IPv6 address")
}

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
    /// Its IPv4 address (from the CNI plugin).
    pub ip: Ipv4Addr,
    /// Its IPv6 address (from the harness).
    pub ip6: Ipv6Addr,
    /// Its node.
    pub node: usize,
}

impl LabPod {
    /// Its address of family `f`.
    pub fn addr(&self, f: Family) -> IpAddr {
        match f {
            Family::V4 => self.ip.into(),
            Family::V6 => self.ip6.into(),
        }
    }
}

/// The lab: a Kubernetes-mode overlay whose daemons enforce policy, and nine pods.
pub struct Lab {
    /// Cluster, API server, daemons.
    pub ko: KubeOverlay,
    /// `x/a` ... `z/c`.
    pub pods: Vec<LabPod>,
    stop: Arc<AtomicBool>,
}

/// A probe's outcome per (from, to, port, proto, family).
pub type Matrix = BTreeMap<(String, String, u16, Proto, Family), bool>;

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
            let ip6 = add_ipv6(&ko, node, &netns, k);
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
                &json!({"status": {"podIP": ip.to_string(),
                                   "podIPs": [{"ip": ip.to_string()}, {"ip": ip6.to_string()}], "phase": "Running"}})
                .to_string(),
            ]);
            for port in PORTS {
                serve(&netns, SocketAddr::new(ip.into(), port), &stop);
                serve(&netns, SocketAddr::new(ip6.into(), port), &stop);
            }
            pods.push(LabPod { id: format!("{ns}/{name}"), netns, ip, ip6, node });
        }
        route_ipv6_between_nodes(&ko);
        Lab { ko, pods, stop }
    }

    /// The pod `id` (`x/a`).
    pub fn pod(&self, id: &str) -> &LabPod {
        self.pods.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("no pod {id}"))
    }

    /// Applies a manifest (policies, label changes) as the admin.
    pub fn apply(&self, yaml: &str) {
        self.ko.api.apply(yaml);
    }

    /// Probes every ordered pair of distinct pods on every port and
    /// protocol, in both families, in parallel.
    pub fn probe_all(&self) -> Matrix {
        let mut jobs = Vec::new();
        for from in &self.pods {
            for to in &self.pods {
                if from.id == to.id {
                    continue;
                }
                for port in PORTS {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        for fam in FAMILIES {
                            jobs.push((from, to, port, proto, fam));
                        }
                    }
                }
            }
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .chunks(jobs.len().div_ceil(48))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(from, to, port, proto, fam)| {
                                let ok = probe(&from.netns, SocketAddr::new(to.addr(*fam), *port), *proto);
                                ((from.id.clone(), to.id.clone(), *port, *proto, *fam), ok)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }

    /// The expected matrix: `allowed(from, to, port, proto)` for every cell,
    /// the same in both families.
    pub fn expect(&self, allowed: impl Fn(&str, &str, u16, Proto) -> bool) -> Matrix {
        self.expect_by_family(|from, to, port, proto, _| allowed(from, to, port, proto))
    }

    /// The expected matrix: `allowed(from, to, port, proto, family)` for
    /// every cell.
    pub fn expect_by_family(&self, allowed: impl Fn(&str, &str, u16, Proto, Family) -> bool) -> Matrix {
        let mut m = Matrix::new();
        for from in &self.pods {
            for to in &self.pods {
                if from.id != to.id {
                    for port in PORTS {
                        for proto in [Proto::Tcp, Proto::Udp] {
                            for fam in FAMILIES {
                                m.insert(
                                    (from.id.clone(), to.id.clone(), port, proto, fam),
                                    allowed(&from.id, &to.id, port, proto, fam),
                                );
                            }
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
                    .map(|((f, t, p, pr, fam), v)| {
                        format!("{f} -> {t} {fam:?} {pr:?}/{p}: want {}", if *v { "allowed" } else { "denied" })
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

/// Gives pod number `k` (in namespace `pod`, on node `node`) its IPv6
/// address, `2001:db8:244:<node + 1>::<k + 10>/64`, with the default route
/// via the node's `cni0`, which gets `::1` of the subnet (the plugin made
/// the bridge with the node's first pod). No duplicate address detection:
/// the addresses are ours alone, and a tentative one could not be bound.
fn add_ipv6(ko: &KubeOverlay, node: usize, pod: &Netns, k: usize) -> Ipv6Addr {
    let host = ko.o.cluster.node(node);
    let gw = gateway6(node);
    let has_gw = host.ns.run_ok("ip", &["-6", "-j", "addr", "show", "dev", "cni0"]).contains(&format!("\"{gw}\""));
    if !has_gw {
        host.ns.run_ok("ip", &["-6", "addr", "add", &format!("{gw}/64"), "dev", "cni0", "nodad"]);
    }
    let ip6: Ipv6Addr = format!("2001:db8:244:{}::{}", node + 1, k + 10).parse().expect("an IPv6 address");
    pod.run_ok("ip", &["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
    pod.run_ok("ip", &["-6", "route", "add", "default", "via", &gw.to_string(), "dev", "eth0"]);
    ip6
}

/// IPv6 between the nodes: each node gets its underlay address and a route
/// to the other nodes' pod subnets through theirs, and forwards IPv6.
fn route_ipv6_between_nodes(ko: &KubeOverlay) {
    let nodes = ko.o.cluster.nodes();
    for n in nodes {
        n.ns.run_ok(
            "ip",
            &["-6", "addr", "add", &format!("{}/64", underlay6(n.index)), "dev", &n.underlay_if, "nodad"],
        );
        n.ns.sysctl("net.ipv6.conf.all.forwarding", "1").expect("IPv6 forwarding in the node");
    }
    for n in nodes {
        for other in nodes.iter().filter(|o| o.index != n.index) {
            let via = underlay6(other.index).to_string();
            n.ns.run_ok("ip", &["-6", "route", "add", &pod_subnet6(other.index), "via", &via]);
        }
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
            let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
            let Ok(s) = UdpSocket::bind(any) else { return false };
            let _ = s.set_read_timeout(Some(WAIT));
            let mut buf = [0u8; 8];
            // Two tries: a first datagram may race a policy update.
            (0..2).any(|_| s.send_to(b"probe", to).is_ok() && s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"probe"))
        }
    })
}
