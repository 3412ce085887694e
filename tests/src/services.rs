//! Services over the overlay: the real kube-proxy (v1.20.2, built from the
//! same Debian `kubernetes` source package as the API server) on every node
//! of a [`KubeOverlay`], in iptables mode through iptables-nft, started the
//! way kubeadm runs it: its own ServiceAccount `kube-system/kube-proxy`
//! bound to the ClusterRole `system:node-proxier`, `--cluster-cidr`, and
//! `--hostname-override` with the Node's name. Selector-less Services with
//! hand-written EndpointSlices name the pods our plugin plugged in (there is
//! no kubelet to make Pod objects Ready for the endpoint controllers), and
//! small servers in those pods say who answered and whom they saw.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netns_fixtures::Netns;
use serde_json::{json, Value};

use crate::kube::{kube_dir, KubeOverlay};
use crate::overlay::Proc;

/// The pods' servers' ports: TCP and UDP.
pub const TCP_PORT: u16 = 8080;
/// See [`TCP_PORT`].
pub const UDP_PORT: u16 = 8081;
/// The pods' HTTP servers' port (see [`PodServer`]).
pub const HTTP_PORT: u16 = 8082;
/// The cluster CIDR kube-proxy is told (kubeadm's `--pod-network-cidr` for flannel).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Whether the API server, the kube-proxy binary ([`crate::kube::require_kube_bins`]),
/// `conntrack` (which kube-proxy runs to clear UDP flows) and `ethtool` (the
/// tests read and flip the VTEP's offload with it) are here; skips, or
/// fails under `CI=true`, when not.
pub fn require_kube_proxy() -> bool {
    if !crate::kube::require_kube_bins(&["kube-proxy"]) {
        return false;
    }
    for (tool, package) in [("conntrack", "conntrack"), ("ethtool", "ethtool")] {
        let there = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        if !there {
            return netns_fixtures::skip_or_fail(&format!("this test needs {tool} (Debian package {package})"));
        }
    }
    true
}

/// A server in a pod: every TCP connection on [`TCP_PORT`] and every UDP
/// datagram on [`UDP_PORT`] is answered with `<name> <peer address>`, every
/// HTTP request on [`HTTP_PORT`] with a 200 whose body is `<name> <peer
/// address> <Host header> <request path>` (what an ingress sent on); stopped
/// on drop.
pub struct PodServer {
    stop: Arc<AtomicBool>,
    sockets: Vec<std::os::fd::OwnedFd>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PodServer {
    /// Starts the server in `pod`, answering as `name`.
    pub fn start(pod: &Netns, name: &str) -> PodServer {
        let tcp = pod.in_thread(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT))).expect("bind the TCP server");
        let udp = pod.in_thread(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT))).expect("bind the UDP server");
        let http =
            pod.in_thread(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, HTTP_PORT))).expect("bind the HTTP server");
        let sockets = vec![
            std::os::fd::OwnedFd::from(tcp.try_clone().unwrap()),
            std::os::fd::OwnedFd::from(udp.try_clone().unwrap()),
            std::os::fd::OwnedFd::from(http.try_clone().unwrap()),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, n1) = (stop.clone(), name.to_string());
        let t = std::thread::spawn(move || {
            for conn in tcp.incoming() {
                if s1.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let peer = c.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = c.write_all(format!("{n1} {peer}").as_bytes());
            }
        });
        let (s2, n2) = (stop.clone(), name.to_string());
        let u = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                let _ = udp.send_to(format!("{n2} {}", peer.ip()).as_bytes(), peer);
            }
        });
        let (s3, n3) = (stop.clone(), name.to_string());
        let h = std::thread::spawn(move || {
            for conn in http.incoming() {
                if s3.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(c) = conn else { continue };
                // One connection at a time: the ingress sends its request at once.
                let _ = answer_http(c, &n3);
            }
        });
        PodServer { stop, sockets, threads: vec![t, u, h] }
    }
}

/// Reads one HTTP request from `c` (2-s timeout) and answers it with a 200
/// whose body is `<name> <peer> <Host> <path>`, or a 400 naming what was wrong.
fn answer_http(mut c: TcpStream, name: &str) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = c.peer_addr()?.ip().to_string();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 || head.len() > 16 * 1024 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    let (status, body) = if path.is_empty() || host.is_empty() {
        ("400 Bad Request", format!("{name}: no path or no Host in {head:?}"))
    } else {
        ("200 OK", format!("{name} {peer} {host} {path}"))
    };
    c.write_all(
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    )
}

impl Drop for PodServer {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::Relaxed);
        // shutdown(2) wakes a thread blocked in accept (EINVAL) or recvfrom
        // (an empty read) on the same socket.
        for s in &self.sockets {
            // SAFETY: a socket we own.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a server answered: who (`p1`) and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The answering pod's name.
    pub who: String,
    /// The source address the server saw.
    pub seen: String,
}

fn parse(text: &str) -> std::io::Result<Answer> {
    let (who, seen) =
        text.split_once(' ').ok_or_else(|| std::io::Error::other(format!("unexpected answer {text:?}")))?;
    Ok(Answer { who: who.to_string(), seen: seen.to_string() })
}

/// One TCP request from inside `ns` to `addr` (1-s connect and read timeouts).
pub fn ask_tcp(ns: &Netns, addr: SocketAddr) -> std::io::Result<Answer> {
    let mut s = ns.in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse(&text)
}

/// One UDP request from inside `ns` to `addr`, from a new source port (a new
/// conntrack flow), waiting 1 s for the answer.
pub fn ask_udp(ns: &Netns, addr: SocketAddr) -> std::io::Result<Answer> {
    let s = ns.in_thread(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send_to(b"who", addr)?;
    let mut buf = [0u8; 128];
    let (n, _) = s.recv_from(&mut buf)?;
    parse(&String::from_utf8_lossy(&buf[..n]))
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Both.
    pub const BOTH: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// One request over this protocol.
    pub fn ask(self, ns: &Netns, addr: SocketAddr) -> std::io::Result<Answer> {
        match self {
            Proto::Tcp => ask_tcp(ns, addr),
            Proto::Udp => ask_udp(ns, addr),
        }
    }

    /// The Service port name (`tcp`, `udp`).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Asks until an answer comes (kube-proxy programs a new Service within a
/// second or so), at most 20 s; panics naming `what` and the last error.
pub fn ask_eventually(proto: Proto, ns: &Netns, addr: SocketAddr, what: &str) -> Answer {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match proto.ask(ns, addr) {
            Ok(a) => return a,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("{what}: no {proto:?} answer from {addr} within 20 s: {e}")
            }
            // The request's own timeout paces the retries; a refusal (no
            // rule yet: the Service's REJECT) comes at once, so wait a bit.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A Service port as created: the cluster IP's port and the node port (0
/// for a ClusterIP Service).
#[derive(Debug, Clone, Copy)]
pub struct SvcPort {
    /// The Service port.
    pub port: u16,
    /// The node port.
    pub node_port: u16,
}

/// A Service as created: its cluster IP and, per protocol, its ports.
#[derive(Debug, Clone)]
pub struct Svc {
    /// Its name (namespace `default`).
    pub name: String,
    /// `spec.clusterIP`.
    pub cluster_ip: Ipv4Addr,
    /// TCP port.
    pub tcp: SvcPort,
    /// UDP port.
    pub udp: SvcPort,
    /// The HTTP port (to the pods' [`HTTP_PORT`]), if made ([`SvcSpec::http`]).
    pub http: Option<SvcPort>,
}

impl Svc {
    /// The cluster IP address for `proto`.
    pub fn cluster(&self, proto: Proto) -> SocketAddr {
        let p = match proto {
            Proto::Tcp => self.tcp.port,
            Proto::Udp => self.udp.port,
        };
        SocketAddr::new(self.cluster_ip.into(), p)
    }

    /// The cluster IP address of the HTTP port; panics if it has none.
    pub fn cluster_http(&self) -> SocketAddr {
        let p = self.http.unwrap_or_else(|| panic!("Service {} has no HTTP port", self.name));
        SocketAddr::new(self.cluster_ip.into(), p.port)
    }

    /// Node address `node`'s node port for `proto`.
    pub fn node_port(&self, node: Ipv4Addr, proto: Proto) -> SocketAddr {
        let p = match proto {
            Proto::Tcp => self.tcp.node_port,
            Proto::Udp => self.udp.node_port,
        };
        SocketAddr::new(node.into(), p)
    }
}

/// How a Service is made.
#[derive(Debug, Clone, Default)]
pub struct SvcSpec<'a> {
    /// `NodePort` instead of `ClusterIP`.
    pub node_port: bool,
    /// `sessionAffinity: ClientIP`.
    pub affinity: bool,
    /// `externalTrafficPolicy: Local` (NodePort only).
    pub local: bool,
    /// The endpoints: (pod address, its node's name).
    pub endpoints: Vec<(Ipv4Addr, &'a str)>,
    /// A third port, `http` (TCP 82), to the pods' [`HTTP_PORT`].
    pub http: bool,
}

/// kube-proxy on every node of a [`KubeOverlay`].
pub struct KubeProxies {
    procs: Vec<Proc>,
    /// kube-proxy's kubeconfig (its ServiceAccount's token).
    pub kubeconfig: PathBuf,
    /// Per node, its log.
    pub logs: Vec<PathBuf>,
}

impl KubeProxies {
    /// kubeadm's objects for kube-proxy (ServiceAccount `kube-system/kube-proxy`,
    /// ClusterRoleBinding `kubeadm:node-proxier` to `system:node-proxier`) and
    /// a kubeconfig with that ServiceAccount's token; nothing started yet.
    pub fn new(ko: &KubeOverlay) -> KubeProxies {
        ko.api.apply(
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "kube-proxy", "namespace": "kube-system"}})
            .to_string(),
        );
        ko.api.apply(
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": "kubeadm:node-proxier"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-proxier"},
                    "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}]})
            .to_string(),
        );
        let token = ko.api.service_account_token("kube-system", "kube-proxy");
        let kubeconfig = ko.o.dir.path().join("kube-proxy.kubeconfig");
        ko.api.kubeconfig_for_token(&kubeconfig, &token);
        let n = ko.o.daemons.len();
        let logs = (0..n).map(|i| ko.o.dir.path().join(format!("kube-proxy{i}.log"))).collect();
        KubeProxies { procs: (0..n).map(|_| Proc(None)).collect(), kubeconfig, logs }
    }

    /// Starts kube-proxy on node `i` and waits until its first sync wrote
    /// its chains (`KUBE-SERVICES` in table nat).
    pub fn start(&mut self, ko: &KubeOverlay, i: usize) {
        self.start_with_cidr(ko, i, CLUSTER_CIDR);
    }

    /// [`KubeProxies::start`] with `--cluster-cidr=<cidr>` (a node of
    /// another pod network, e.g. a benchmark's reference).
    pub fn start_with_cidr(&mut self, ko: &KubeOverlay, i: usize, cidr: &str) {
        let node = ko.o.cluster.node(i);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.logs[i]).unwrap();
        let child = node
            .ns
            .command(kube_dir().join("kube-proxy"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--hostname-override={}", KubeOverlay::node_name(i)))
            .arg(format!("--cluster-cidr={cidr}"))
            .arg(format!("--bind-address={}", node.underlay_ip))
            .arg("--proxy-mode=iptables")
            // Leave the global nf_conntrack_max and the nf_conntrack module's
            // hashsize alone (they are the host's, not the namespace's).
            .arg("--conntrack-max-per-core=0")
            .args(["--v=2", "--profiling=false"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs[i] = Proc(Some(child));
        crate::wait_until_or(Duration::from_secs(30), &|| nat_rules(&node.ns).contains(":KUBE-SERVICES"), &|| {
            format!("kube-proxy on node{i} to write its chains; its log ends:\n{}", self.tail(i))
        });
    }

    /// Starts kube-proxy on every node.
    pub fn start_all(&mut self, ko: &KubeOverlay) {
        for i in 0..self.procs.len() {
            self.start(ko, i);
        }
    }

    /// Stops node `i`'s kube-proxy (SIGTERM, as a DaemonSet rollout does).
    pub fn stop(&mut self, i: usize) {
        self.procs[i].stop();
    }

    /// The last 30 lines of node `i`'s kube-proxy log.
    pub fn tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `iptables-save -t nat` in `ns`.
pub fn nat_rules(ns: &Netns) -> String {
    ns.run("iptables-save", &["-t", "nat"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Creates Service `name` (namespace `default`, no selector) with a TCP
/// port 80 and a UDP port 81 to the pods' servers (and with
/// [`SvcSpec::http`] a TCP port 82 to their HTTP server), and its EndpointSlice
/// (`discovery.k8s.io/v1beta1`, what kube-proxy 1.20 reads: its
/// EndpointSliceProxying is on by default) naming each endpoint's node in
/// the `kubernetes.io/hostname` topology key, as the EndpointSlice
/// controller does (kube-proxy decides "local" by it). Returns the Service
/// as the API server allocated it.
pub fn create_service(ko: &KubeOverlay, name: &str, spec: &SvcSpec) -> Svc {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": if spec.node_port { "NodePort" } else { "ClusterIP" },
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT},
                {"name": "udp", "protocol": "UDP", "port": 81, "targetPort": UDP_PORT}
            ],
            "sessionAffinity": if spec.affinity { "ClientIP" } else { "None" }
        }
    });
    let mut slice_ports = vec![
        json!({"name": "tcp", "protocol": "TCP", "port": TCP_PORT}),
        json!({"name": "udp", "protocol": "UDP", "port": UDP_PORT}),
    ];
    if spec.http {
        s["spec"]["ports"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "http", "protocol": "TCP", "port": 82, "targetPort": HTTP_PORT}));
        slice_ports.push(json!({"name": "http", "protocol": "TCP", "port": HTTP_PORT}));
    }
    if spec.node_port {
        s["spec"]["externalTrafficPolicy"] = if spec.local { "Local" } else { "Cluster" }.into();
    }
    ko.api.apply(&s.to_string());
    let endpoints: Vec<Value> = spec
        .endpoints
        .iter()
        .map(|(ip, node)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "topology": {"kubernetes.io/hostname": node}})
        })
        .collect();
    ko.api.apply(
        &json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": slice_ports,
            "endpoints": endpoints
        })
        .to_string(),
    );
    let got = ko.api.get_json(&["service", name, "-n", "default"]);
    let port = |i: usize| SvcPort {
        port: got["spec"]["ports"][i]["port"].as_u64().unwrap() as u16,
        node_port: got["spec"]["ports"][i]["nodePort"].as_u64().unwrap_or(0) as u16,
    };
    Svc {
        name: name.to_string(),
        cluster_ip: got["spec"]["clusterIP"].as_str().unwrap().parse().unwrap(),
        tcp: port(0),
        udp: port(1),
        http: spec.http.then(|| port(2)),
    }
}

/// Waits until every node's kube-proxy has rules for every port of `svc`
/// (its comment `default/<name>:tcp` in table nat).
pub fn wait_programmed(ko: &KubeOverlay, svc: &Svc) {
    for i in 0..ko.o.daemons.len() {
        let ns = &ko.o.cluster.node(i).ns;
        crate::wait_until_or(
            Duration::from_secs(20),
            &|| {
                let r = nat_rules(ns);
                Proto::BOTH.iter().all(|p| r.contains(&format!("default/{}:{}", svc.name, p.name())))
                    && (svc.http.is_none() || r.contains(&format!("default/{}:http", svc.name)))
            },
            &|| format!("node{i}'s kube-proxy to program Service {}", svc.name),
        );
    }
}

/// The IPv4 addresses of namespace `ns`.
pub fn addresses(ns: &Netns) -> Vec<String> {
    ns.ip_json(&["-4", "addr", "show"])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

/// The RBAC of `--network-policy` (`deploy/network-policy.yml`) and the
/// ServiceAccount `default/default` that kube-controller-manager (not run
/// here) would create, which the API server's admission wants for Pods.
pub fn allow_network_policy(ko: &KubeOverlay) {
    let rbac = std::fs::read_to_string(crate::kube::manifest_path().with_file_name("network-policy.yml"))
        .expect("deploy/network-policy.yml");
    ko.api.apply(&rbac);
    ko.api.apply(
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "default"}})
            .to_string(),
    );
}

/// The Pod object of a pod the plugin plugged in: `name` in namespace
/// `default` on node `node` with `labels`, its server's ports named
/// `tcp` and `udp`, and `status.podIP` and phase `Running` (what kubelet
/// would report), which NetworkPolicy enforcement reads.
pub fn create_pod_object(ko: &KubeOverlay, name: &str, node: usize, ip: Ipv4Addr, labels: Value) {
    ko.api.apply(
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {
                "nodeName": KubeOverlay::node_name(node), "automountServiceAccountToken": false,
                "containers": [{"name": "serve", "image": "serve", "ports": [
                    {"name": "tcp", "containerPort": TCP_PORT, "protocol": "TCP"},
                    {"name": "udp", "containerPort": UDP_PORT, "protocol": "UDP"}
                ]}]
            }
        })
        .to_string(),
    );
    ko.api.kubectl_ok(&[
        "patch",
        "pod",
        name,
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "phase": "Running"}})
            .to_string(),
    ]);
}

/// The source address node namespace `ns` picks for a packet to `dst`
/// (`ip route get`): what kube-proxy's masquerade puts on a NodePort
/// request it forwards there.
pub fn source_toward(ns: &Netns, dst: Ipv4Addr) -> Ipv4Addr {
    let r = ns.ip_json(&["-4", "route", "get", &dst.to_string()]);
    r[0]["prefsrc"].as_str().unwrap_or_else(|| panic!("no prefsrc in {r}")).parse().unwrap()
}

/// Whether `nginx`, `curl` and `openssl` (the ingress check's: the
/// ingress, the TLS client, the certificate) are here; skips, or fails
/// under `CI=true`, when not.
pub fn require_ingress_tools() -> bool {
    for (tool, arg, package) in
        [("nginx", "-v", "nginx"), ("curl", "--version", "curl"), ("openssl", "version", "openssl")]
    {
        let there = std::process::Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success());
        if !there {
            return netns_fixtures::skip_or_fail(&format!("this test needs {tool} (Debian package {package})"));
        }
    }
    true
}

/// What a pod's HTTP server answered ([`PodServer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The answering pod's name.
    pub who: String,
    /// The source address it saw.
    pub seen: String,
    /// The Host header it got.
    pub host: String,
    /// The request path it got.
    pub path: String,
}

fn parse_http_body(body: &str) -> std::io::Result<HttpAnswer> {
    let f: Vec<&str> = body.split(' ').collect();
    match f[..] {
        [who, seen, host, path] => {
            Ok(HttpAnswer { who: who.into(), seen: seen.into(), host: host.into(), path: path.into() })
        }
        _ => Err(std::io::Error::other(format!("unexpected answer {body:?}"))),
    }
}

/// One HTTP/1.1 GET of `path` with `Host: host` from inside `ns` to `addr`
/// (1-s connect and 10-s read timeouts); an error unless the status is 200.
pub fn ask_http(ns: &Netns, addr: SocketAddr, host: &str, path: &str) -> std::io::Result<HttpAnswer> {
    let mut s = ns.in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(std::io::Error::other(format!("HTTP answer {text:?}")));
    }
    parse_http_body(body)
}

/// What the ingress routes where (each upstream a Service's HTTP port at its
/// cluster IP), as an Ingress object's rules would say it.
#[derive(Debug, Clone)]
pub struct IngressRoutes {
    /// The default backend: any Host no rule names.
    pub default: SocketAddr,
    /// By Host header: (name, upstream).
    pub hosts: Vec<(String, SocketAddr)>,
    /// Path fan-out on one Host: the name, and (prefix, upstream) pairs;
    /// the prefix is rewritten away (`/foo/x` reaches the upstream as `/x`:
    /// ingress-nginx's `rewrite-target: /$2`).
    pub fan_out: (String, Vec<(String, SocketAddr)>),
    /// The TLS virtual host (terminated at the ingress): name, upstream.
    pub tls: (String, SocketAddr),
}

/// nginx as the ingress on a node's host network (master process off, so
/// one process), with its configuration, pid file, logs, temp directories
/// and a self-signed certificate for the TLS virtual host made at start, all
/// in a directory of its own (never the system's `/etc/nginx` or
/// `/var/log/nginx`); stopped on drop, also when a test panics.
pub struct Ingress {
    proc: Proc,
    /// Its directory (removed on drop, after nginx stops).
    pub dir: tempfile::TempDir,
    /// The address it listens on, ports 80 and 443.
    pub listen: Ipv4Addr,
    /// The TLS virtual host's name.
    pub tls_name: String,
}

impl Ingress {
    /// Starts nginx in `ns` listening on `listen` ports 80 and 443 with
    /// `routes`, and waits until it listens on both.
    pub fn start(ns: &Netns, listen: Ipv4Addr, routes: &IngressRoutes) -> Ingress {
        let dir = tempfile::Builder::new().prefix("flt-ingress").tempdir().unwrap();
        let d = dir.path().display().to_string();
        let tls_name = routes.tls.0.clone();
        let openssl = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={tls_name}")])
            .args(["-addext", &format!("subjectAltName=DNS:{tls_name}")])
            .args(["-keyout", &format!("{d}/tls.key"), "-out", &format!("{d}/tls.crt")])
            .output()
            .expect("run openssl");
        assert!(openssl.status.success(), "openssl req: {}", String::from_utf8_lossy(&openssl.stderr));
        let proxy = |to: &SocketAddr| format!("proxy_pass http://{to};");
        let hosts: String = routes
            .hosts
            .iter()
            .map(|(name, to)| {
                format!("  server {{ listen {listen}:80; server_name {name}; location / {{ {} }} }}\n", proxy(to))
            })
            .collect();
        let fan: String = routes
            .fan_out
            .1
            .iter()
            .map(|(prefix, to)| {
                format!("    location {prefix}/ {{ rewrite ^{prefix}(/.*)$ $1 break; {} }}\n", proxy(to))
            })
            .collect();
        let conf = format!(
            "master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  proxy_set_header Host $host;
  proxy_connect_timeout 3s;
  # The default backend: any other Host.
  server {{ listen {listen}:80 default_server; location / {{ {default} }} }}
  # By Host header.
{hosts}  # By path, fan-out, the prefix rewritten away.
  server {{
    listen {listen}:80; server_name {fan_host};
{fan}  }}
  # TLS, terminated here.
  server {{
    listen {listen}:443 ssl; server_name {tls_name};
    ssl_certificate {d}/tls.crt; ssl_certificate_key {d}/tls.key;
    location / {{ {tls} }}
  }}
}}
",
            default = proxy(&routes.default),
            fan_host = routes.fan_out.0,
            tls = proxy(&routes.tls.1),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let out = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        // -p and -e: nothing of the system's nginx prefix or log directory,
        // not even before the configuration is read.
        let child = ns
            .command("nginx")
            .args(["-p", &d, "-e", &format!("{d}/error.log"), "-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start nginx");
        let ingress = Ingress { proc: Proc(Some(child)), dir, listen, tls_name };
        let listening = || {
            let ss = ns.run_ok("ss", &["-ltnH"]);
            [80, 443].iter().all(|p| ss.split_whitespace().any(|w| w == format!("{listen}:{p}")))
        };
        crate::wait_until_or(Duration::from_secs(10), &listening, &|| {
            format!("nginx to listen on {listen}:80 and :443; its error log:\n{}", ingress.errors())
        });
        ingress
    }

    /// nginx's error log and stderr.
    pub fn errors(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("error.log"), read("stderr.log"))
    }

    /// An HTTP GET of `path` with `Host: host` from `ns` to port 80.
    pub fn get(&self, ns: &Netns, host: &str, path: &str) -> std::io::Result<HttpAnswer> {
        ask_http(ns, SocketAddr::new(self.listen.into(), 80), host, path)
    }

    /// An HTTPS GET of `path` from `ns` to the TLS virtual host on port 443
    /// (curl, the name resolved to the ingress's address), the server's
    /// certificate checked against the one made at start for the name.
    pub fn get_tls(&self, ns: &Netns, path: &str) -> std::io::Result<HttpAnswer> {
        let name = &self.tls_name;
        let out = ns.run(
            "curl",
            &[
                "-sS",
                "--fail",
                "--max-time",
                "10",
                "--cacert",
                &self.dir.path().join("tls.crt").display().to_string(),
                "--resolve",
                &format!("{name}:443:{}", self.listen),
                &format!("https://{name}{path}"),
            ],
        )?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!("curl: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        parse_http_body(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        // SIGTERM (nginx's fast shutdown), then wait; the directory goes after.
        self.proc.stop();
    }
}
