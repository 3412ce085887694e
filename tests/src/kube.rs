//! A real Kubernetes API server for the tests: Debian's `kubernetes` source
//! package built once by `scripts/lib/kube-binaries.sh` and cached outside
//! the repository, run on the overlay's outside host (192.0.2.200) against
//! the overlay's etcd. TLS with a CA made here, token authentication, and
//! Node+RBAC authorization, so that RBAC in tests is the real thing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use netns_fixtures::{wait_until, Netns};
use serde_json::Value;

use crate::overlay::{Proc, ETCD};

/// The outside host's address, where the API server listens.
pub const HOST: &str = "192.0.2.200";
/// The outside host's IPv6 address in a dual-stack cluster
/// ([`netns_fixtures::OUTSIDE_IPV6`]), where an API server started with
/// [`ApiServer::start_at`] on it listens (for IPv6-only nodes).
pub const HOST6: &str = "2001:db8::200";
/// The admin's bearer token (group system:masters).
const ADMIN_TOKEN: &str = "flannel-rs-test-admin";

/// Debian's package version the binaries are built from (see
/// `scripts/lib/kube-binaries.sh`).
pub const KUBE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";

/// Where the cached Kubernetes binaries are: `$FLANNEL_RS_KUBE_DIR`, else
/// the cache directory of `scripts/lib/kube-binaries.sh`.
pub fn kube_dir() -> PathBuf {
    std::env::var_os("FLANNEL_RS_KUBE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/var/cache/flannel-rs/kubernetes-{KUBE_VERSION}")))
}

/// `kubectl`: on `$PATH`, else built into the cache.
pub fn kubectl_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file());
    on_path.or_else(|| Some(kube_dir().join("kubectl")).filter(|p| p.is_file()))
}

/// Whether the API server and kubectl are here. Without them a test skips on
/// a developer's machine and fails under `CI=true` (scripts/test.sh builds
/// them first).
pub fn require_kube() -> bool {
    require_kube_bins(&[])
}

/// [`require_kube`], and also the Kubernetes binaries `more` (e.g.
/// `kube-proxy`) in [`kube_dir`].
pub fn require_kube_bins(more: &[&str]) -> bool {
    let missing: Vec<String> = ["kube-apiserver"]
        .iter()
        .chain(more)
        .map(|b| (kube_dir().join(b).is_file(), format!("{}/{b}", kube_dir().display())))
        .chain([(kubectl_bin().is_some(), "kubectl".to_string()), (which("openssl"), "openssl".to_string())])
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| what)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let cmds: Vec<String> = ["kube-apiserver"].iter().chain(more).map(|b| format!("cmd/{b}")).collect();
    netns_fixtures::skip_or_fail(&format!(
        "this test needs a real kube-apiserver: missing {} (run scripts/lib/kube-binaries.sh {})",
        missing.join(", "),
        cmds.join(" ")
    ))
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A running kube-apiserver.
pub struct ApiServer {
    proc: Proc,
    /// Its files: certificates, keys, kubeconfigs, log.
    pub dir: PathBuf,
    /// `https://192.0.2.200:<port>` (or `https://[2001:db8::200]:<port>`).
    pub url: String,
    /// The admin's kubeconfig.
    pub admin: PathBuf,
    ns_path: PathBuf,
    args: Vec<String>,
}

impl ApiServer {
    /// The API server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.proc.0.as_ref().map(std::process::Child::id)
    }

    /// Starts kube-apiserver in `ns` (the outside host) on `port`, with its
    /// files in `dir`, against the overlay's etcd; waits for `/readyz`.
    /// Several servers on the same etcd form one control plane.
    pub fn start(ns: &Netns, dir: &Path, port: u16) -> ApiServer {
        Self::start_at(ns, dir, port, HOST)
    }

    /// As [`ApiServer::start`], listening on `host` only: [`HOST`], or
    /// [`HOST6`] for nodes that reach the outside host over IPv6 alone (the
    /// outside host of a dual-stack cluster has both; the server still
    /// advertises [`HOST`], of the family of its service range).
    pub fn start_at(ns: &Netns, dir: &Path, port: u16, host: &str) -> ApiServer {
        let dir = dir.join(format!("apiserver-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        make_pki(&dir);
        std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n")).unwrap();
        let url = match host.contains(':') {
            true => format!("https://[{host}]:{port}"),
            false => format!("https://{host}:{port}"),
        };
        let p = |f: &str| dir.join(f).display().to_string();
        let args: Vec<String> = [
            format!("--etcd-servers={ETCD}"),
            format!("--bind-address={host}"),
            format!("--advertise-address={HOST}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("server.crt")),
            format!("--tls-private-key-file={}", p("server.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
        ]
        .into();
        let admin = dir.join("admin.kubeconfig");
        write_kubeconfig(&admin, &url, &dir.join("ca.crt"), ADMIN_TOKEN);
        let mut s = ApiServer { proc: Proc(None), dir, url, admin, ns_path: ns.path().to_path_buf(), args };
        s.restart(ns);
        s
    }

    /// (Re)starts the server process and waits for `/readyz`.
    pub fn restart(&mut self, ns: &Netns) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("apiserver.log")).unwrap();
        let bin = kube_dir().join("kube-apiserver");
        let child = ns.command(&bin).args(&self.args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.proc = Proc(Some(child));
        wait_until(Duration::from_secs(60), &format!("kube-apiserver at {} to be ready", self.url), || {
            self.kubectl(&["get", "--raw", "/readyz"]).status.success()
        });
        // The bootstrap RBAC roles (system:node and friends) are in place once
        // the default ClusterRoles answer.
        wait_until(Duration::from_secs(30), "bootstrap RBAC", || {
            self.kubectl(&["get", "clusterrole", "system:node"]).status.success()
        });
    }

    /// Restarts the server with dual-stack allowed (`--feature-gates=
    /// IPv6DualStack=true`; without it Kubernetes 1.20 keeps only the first
    /// of a Node's `spec.podCIDRs`).
    pub fn enable_dual_stack(&mut self, ns: &Netns) {
        self.stop();
        self.args.push("--feature-gates=IPv6DualStack=true".into());
        self.restart(ns);
    }

    /// Stops the server (SIGTERM).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts kube-controller-manager in `ns` (the outside host) with only
    /// `controllers` (e.g. `daemonset,serviceaccount-token`), as the admin; stopped when the
    /// returned process is dropped. No kubelet or scheduler runs: the
    /// DaemonSet controller's pods stay unbound, each naming its node in its
    /// node affinity (`matchFields metadata.name`).
    pub fn start_controller_manager(&self, ns: &Netns, controllers: &str) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller-manager.log"))
            .unwrap();
        let child = ns
            .command(kube_dir().join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", self.admin.display()))
            .arg(format!("--controllers={controllers}"))
            .args(["--leader-elect=false", "--port=0", "--secure-port=0", "--profiling=false"])
            // For the serviceaccount-token controller (pods need their
            // ServiceAccount's token secret before they are admitted).
            .arg(format!("--service-account-private-key-file={}", self.dir.join("sa.key").display()))
            .arg(format!("--root-ca-file={}", self.dir.join("ca.crt").display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(Some(child))
    }

    /// Runs kubectl as the admin, from inside the outside host.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.admin, args, None)
    }

    /// Runs kubectl with a given kubeconfig, optionally feeding stdin.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display())).arg(kubectl_bin().expect("kubectl"));
        cmd.arg("--kubeconfig").arg(kubeconfig).args(["--request-timeout", "10s"]).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run kubectl");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// kubectl as the admin; must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of a JSON or YAML text as the admin.
    pub fn apply(&self, text: &str) {
        let out = self.kubectl_as(&self.admin, &["apply", "-f", "-"], Some(text));
        let shown: String = text.chars().take(600).collect();
        assert!(out.status.success(), "kubectl apply: {}\n{shown}", String::from_utf8_lossy(&out.stderr));
    }

    /// `kubectl get <what> -o json`.
    pub fn get_json(&self, what: &[&str]) -> Value {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&args)).unwrap()
    }

    /// Creates a Node object (no kubelet behind it) with a podCIDR and
    /// annotations.
    pub fn create_node(&self, name: &str, pod_cidr: Option<&str>, annotations: &[(&str, &str)]) {
        let ann: serde_json::Map<String, Value> =
            annotations.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        let mut node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "annotations": ann },
            "spec": {}
        });
        if let Some(c) = pod_cidr {
            node["spec"]["podCIDR"] = c.into();
            node["spec"]["podCIDRs"] = serde_json::json!([c]);
        }
        self.apply(&node.to_string());
    }

    /// A kubeconfig for a bearer token (a ServiceAccount's), written to `path`.
    pub fn kubeconfig_for_token(&self, path: &Path, token: &str) {
        write_kubeconfig(path, &self.url, &self.dir.join("ca.crt"), token);
    }

    /// A token of ServiceAccount `ns/name` from the TokenRequest API.
    pub fn service_account_token(&self, ns: &str, name: &str) -> String {
        self.kubectl_ok(&["create", "token", name, "-n", ns, "--duration", "1h"]).trim().to_string()
    }
}

/// A CA, a serving certificate for the API server (valid for its address
/// and the in-cluster names) and the ServiceAccount signing key pair.
fn make_pki(dir: &Path) {
    openssl(dir, &["genrsa", "-out", "ca.key", "2048"]);
    openssl(
        dir,
        &["req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=flannel-rs-test-ca", "-days", "2", "-out", "ca.crt"],
    );
    openssl(dir, &["genrsa", "-out", "server.key", "2048"]);
    openssl(dir, &["req", "-new", "-key", "server.key", "-subj", "/CN=kube-apiserver", "-out", "server.csr"]);
    std::fs::write(
        dir.join("san.ext"),
        format!(
            "subjectAltName=IP:{HOST},IP:{HOST6},IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default.svc,DNS:localhost\n\
             extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
         users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n\
         current-context: test\n",
        ca.display()
    );
    std::fs::write(path, text).unwrap();
}

/// The annotation prefix flannel uses.
pub const PREFIX: &str = "flannel.alpha.coreos.com";

/// The overlay in Kubernetes mode: the etcd-backed [`Overlay`] fixture whose
/// etcd now serves a real API server; every node's daemon runs with
/// `--kube-subnet-mgr`, authenticated by a token of the ServiceAccount that
/// `deploy/kube-flannel-rs.yml` ships, bound to the ClusterRole it ships.
pub struct KubeOverlay {
    /// Nodes, etcd, daemons.
    pub o: crate::overlay::Overlay,
    /// The API server.
    pub api: ApiServer,
    /// The daemons' kubeconfig (the ServiceAccount's token).
    pub kubeconfig: PathBuf,
    /// net-conf.json, as the shipped ConfigMap has it.
    pub net_conf: PathBuf,
}

/// The repository's `deploy/kube-flannel-rs.yml` (`$FLANNEL_RS_MANIFEST`
/// when set, to try a variant).
pub fn manifest_path() -> PathBuf {
    std::env::var_os("FLANNEL_RS_MANIFEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kube-flannel-rs.yml"))
}

impl KubeOverlay {
    /// `nodes` node namespaces, etcd and kube-apiserver on the outside host,
    /// the deploy bundle applied; no Node objects yet, daemons not started.
    pub fn new(nodes: usize) -> KubeOverlay {
        Self::build(nodes, None)
    }

    /// With this net-conf.json (also put into etcd, for daemons in etcd mode)
    /// instead of the shipped ConfigMap's.
    pub fn with_conf(nodes: usize, conf: &str) -> KubeOverlay {
        Self::build(nodes, Some(conf))
    }

    fn build(nodes: usize, conf: Option<&str>) -> KubeOverlay {
        let o = crate::overlay::Overlay::with_conf(nodes, conf.unwrap_or(crate::overlay::NET_CONF));
        Self::on(o, conf, HOST)
    }

    /// On an overlay built already (e.g. [`crate::overlay::Overlay::dual_stack`]),
    /// its net-conf.json `conf` (else the shipped ConfigMap's), the API
    /// server listening on `host` ([`HOST`] or [`HOST6`]), which is where
    /// the daemons' kubeconfig points.
    pub fn on(mut o: crate::overlay::Overlay, conf: Option<&str>, host: &str) -> KubeOverlay {
        let nodes = o.daemons.len();
        let api = ApiServer::start_at(o.outside(), o.dir.path(), 6443, host);
        let manifest = std::fs::read_to_string(manifest_path()).expect("deploy/kube-flannel-rs.yml");
        api.apply(&manifest);
        let cm = api.get_json(&["configmap", "kube-flannel-rs-cfg", "-n", "kube-flannel-rs"]);
        let net_conf = o.dir.path().join("net-conf.json");
        let shipped = cm["data"]["net-conf.json"].as_str().expect("net-conf.json in the ConfigMap");
        std::fs::write(&net_conf, conf.unwrap_or(shipped)).unwrap();
        let token = api.service_account_token("kube-flannel-rs", "flannel-rs");
        let kubeconfig = o.dir.path().join("flannel-rs.kubeconfig");
        api.kubeconfig_for_token(&kubeconfig, &token);
        for i in 0..nodes {
            let (kc, nc) = (kubeconfig.display().to_string(), net_conf.display().to_string());
            o.set_flags(i, &["--kube-subnet-mgr", "--kubeconfig-file", &kc, "--net-config-path", &nc]);
            o.set_env(i, &[("NODE_NAME", &Self::node_name(i))]);
        }
        KubeOverlay { o, api, kubeconfig, net_conf }
    }

    /// Node `i`'s Node object name.
    pub fn node_name(i: usize) -> String {
        format!("node{i}")
    }

    /// Creates Node `i` with podCIDR 10.244.(i+1).0/24.
    pub fn create_node(&self, i: usize) {
        self.api.create_node(&Self::node_name(i), Some(&format!("10.244.{}.0/24", i + 1)), &[]);
    }

    /// Creates (or updates) Node `i` with `spec.podCIDRs` `cidrs` and
    /// `spec.podCIDR` the first of them, as kube-controller-manager sets
    /// them (set through the API; two families need
    /// [`ApiServer::enable_dual_stack`]).
    pub fn create_node_with_cidrs(&self, i: usize, cidrs: &[String]) {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": Self::node_name(i) },
            "spec": { "podCIDR": cidrs[0], "podCIDRs": cidrs }
        });
        self.api.apply(&node.to_string());
    }

    /// Every Node's lease as the API server has it: (podCIDR, VtepMAC, public-ip)
    /// for nodes that carry `kube-subnet-manager: "true"`.
    pub fn leases(&self) -> Vec<(String, String, String)> {
        let nodes = self.api.get_json(&["nodes"]);
        let mut out = Vec::new();
        for n in nodes["items"].as_array().unwrap() {
            let a = &n["metadata"]["annotations"];
            let get = |k: &str| a[format!("{PREFIX}/{k}")].as_str().map(str::to_string);
            if get("kube-subnet-manager").as_deref() != Some("true") {
                continue;
            }
            let (Some(cidr), Some(data), Some(ip)) =
                (n["spec"]["podCIDR"].as_str(), get("backend-data"), get("public-ip"))
            else {
                continue;
            };
            let Ok(data) = serde_json::from_str::<Value>(&data) else { continue };
            let Some(mac) = data["VtepMAC"].as_str() else { continue };
            out.push((cidr.to_string(), mac.to_string(), ip));
        }
        out
    }

    /// Waits until node `i`'s flannel.1 holds exactly the Nodes' leases.
    pub fn wait_converged(&self, i: usize) {
        wait_until(Duration::from_secs(15), &format!("node{i} to match the Node objects"), || {
            self.o.vtep_state(i) == self.o.expected_state_for(i, self.leases())
        });
    }

    /// kubectl with the daemons' credentials (the ServiceAccount's token).
    pub fn kubectl_as_daemon(&self, args: &[&str]) -> Output {
        self.api.kubectl_as(&self.kubeconfig, args, None)
    }
}

/// Where flannel's own `kube-flannel.yml` (v0.20.2) is read from:
/// `$FLANNEL_RS_UPSTREAM_MANIFEST`, else the unpacked upstream source in
/// `/tmp/up`, else taken out of the upstream source archive
/// (`$FLANNEL_RS_UPSTREAM_SRC`, default
/// `/work/shared/upstream-flannel/flannel-v0.20.2.tar.gz`). `None` (after
/// [`netns_fixtures::skip_or_fail`]) when none is there.
pub fn upstream_manifest() -> Option<String> {
    const IN_ARCHIVE: &str = "flannel-v0.20.2/Documentation/kube-flannel.yml";
    if let Some(p) = std::env::var_os("FLANNEL_RS_UPSTREAM_MANIFEST") {
        return Some(std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", Path::new(&p).display())));
    }
    if let Ok(text) = std::fs::read_to_string(Path::new("/tmp/up").join(IN_ARCHIVE)) {
        return Some(text);
    }
    let archive = std::env::var("FLANNEL_RS_UPSTREAM_SRC")
        .unwrap_or_else(|_| "/work/shared/upstream-flannel/flannel-v0.20.2.tar.gz".into());
    match Command::new("tar").args(["-xzOf", &archive, IN_ARCHIVE]).output() {
        Ok(out) if out.status.success() => Some(String::from_utf8(out.stdout).expect("UTF-8 manifest")),
        _ => {
            netns_fixtures::skip_or_fail(&format!(
                "flannel's kube-flannel.yml is not available: set FLANNEL_RS_UPSTREAM_MANIFEST to it, or \
                 FLANNEL_RS_UPSTREAM_SRC to flannel's v0.20.2 source archive (tried {archive})"
            ));
            None
        }
    }
}

/// `deploy/flannel-avoid-flannel-rs-nodes.yml`: the patch for flannel's DaemonSet.
pub fn upstream_patch_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/flannel-avoid-flannel-rs-nodes.yml")
}
