//! The Kubernetes bundle and the image: `deploy/kube-flannel-rs.yml` checked
//! against Kubernetes' own API schemas and read for the facts the daemon and
//! the plugin depend on; its configuration fed to the real binaries; the OCI
//! archive from `scripts/build-image.sh` taken apart blob by blob; and a
//! private containerd importing and running it (`scripts/check-image.sh`).
//!
//! Tests whose tools are missing (python3's venv, PyPI, nft, root) skip with a
//! message on a laptop and fail with `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use clap::Parser;
use e2e_tests::{cni, cni_env, workspace_bin};
use serde_json::{json, Value};

const MANIFEST: &str = "deploy/kube-flannel-rs.yml";
/// The extra RBAC of `--network-policy`.
const POLICY_RBAC: &str = "deploy/network-policy.yml";
const NAMESPACE: &str = "kube-flannel-rs";
/// The node label that moves a node from flannel's DaemonSet to ours.
const LABEL: &str = "flannel-rs.io/enabled";
/// The API server the Kubernetes tests run, and a current release.
const K8S_VERSIONS: [&str; 2] = ["1.20.0", "1.30.0"];
/// Where the image keeps the plugin the init container copies onto the host.
const IMAGE_PLUGIN: &str = "/usr/lib/flannel-rs/flannel";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// A prerequisite is missing: skip on a laptop, fail under CI.
fn missing(what: &str) -> bool {
    netns_fixtures::skip_or_fail(what)
}

fn sha256_hex(data: &[u8]) -> String {
    // sha256sum is an independent implementation and coreutils is everywhere.
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// The manifest

/// `scripts/lib/kube-validate.sh`'s exit status when it cannot install the validator.
const VALIDATOR_UNAVAILABLE: i32 = 3;

/// The python3 of the validator's virtualenv (it has PyYAML), or None when it
/// cannot be installed here.
fn python_with_yaml() -> Option<PathBuf> {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let py = PY.get_or_init(|| {
        let out = Command::new(repo().join("scripts/lib/kube-validate.sh"))
            .arg("--python")
            .output()
            .map_err(|e| format!("run scripts/lib/kube-validate.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/lib/kube-validate.sh --python: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match py {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            missing(&format!("no python3 with PyYAML for reading {MANIFEST}: {e}"));
            None
        }
    }
}

/// Every document of the manifest, as JSON, parsed by PyYAML (not by us).
fn documents() -> Option<Vec<Value>> {
    documents_of(&repo().join(MANIFEST))
}

/// Every document of a YAML file, as JSON, parsed by PyYAML.
fn documents_of(path: &Path) -> Option<Vec<Value>> {
    let py = python_with_yaml()?;
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  json.dump(docs, sys.stdout)";
    let out = Command::new(py).args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "PyYAML cannot read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{MANIFEST} has no {kind} {name}"))
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn every_document_passes_strict_schema_validation() {
    for version in K8S_VERSIONS {
        let out = Command::new(repo().join("scripts/lib/kube-validate.sh"))
            .arg(version)
            .arg(repo().join(MANIFEST))
            .arg(repo().join(POLICY_RBAC))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.code() == Some(VALIDATOR_UNAVAILABLE) {
            missing(&format!("kubernetes-validate cannot be installed: {text}"));
            return;
        }
        assert!(out.status.success(), "{MANIFEST} against Kubernetes {version}:\n{text}");
        // A validator that saw no documents would pass too: count them.
        let minor = version.rsplit_once('.').unwrap().0;
        // Six documents in the bundle, two in the NetworkPolicy RBAC.
        assert_eq!(text.matches("passed for resource").count(), 8, "{text}");
        assert_eq!(text.matches(&format!("against version {minor}")).count(), 8, "{text}");
    }
}

#[test]
fn the_namespace_allows_privileged_pods() {
    let Some(docs) = documents() else { return };
    assert_eq!(docs.len(), 6, "{docs:#?}");
    let ns = find(&docs, "Namespace", NAMESPACE);
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");
    for d in &docs {
        if !matches!(d["kind"].as_str(), Some("Namespace" | "ClusterRole" | "ClusterRoleBinding")) {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{}", d["metadata"]);
        }
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_the_daemon_uses() {
    let Some(docs) = documents() else { return };
    let role = find(&docs, "ClusterRole", "flannel-rs");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let keys: BTreeSet<&str> = rule.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["apiGroups", "resources", "verbs"]), "no resourceNames, no URLs: {rule}");
        for group in str_list(&rule["apiGroups"]) {
            for resource in str_list(&rule["resources"]) {
                for verb in str_list(&rule["verbs"]) {
                    assert!(granted.insert((group.clone(), resource.clone(), verb)), "granted twice: {rule}");
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> =
        [("nodes", "get"), ("nodes", "list"), ("nodes", "watch"), ("nodes/status", "patch"), ("pods", "get")]
            .iter()
            .map(|(r, v)| (String::new(), r.to_string(), v.to_string()))
            .collect();
    assert_eq!(granted, want);

    let binding = find(&docs, "ClusterRoleBinding", "flannel-rs");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel-rs"})
    );
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": "flannel-rs", "namespace": NAMESPACE}]));
    find(&docs, "ServiceAccount", "flannel-rs");
    let ds = find(&docs, "DaemonSet", "kube-flannel-rs-ds");
    assert_eq!(ds["spec"]["template"]["spec"]["serviceAccountName"], "flannel-rs");
}

/// What a path inside a container is on the node.
#[derive(Debug, PartialEq, Eq)]
enum Backing {
    Host(String),
    ConfigMap(String, String),
    Image,
}

/// Resolves `path` in `container` through its volume mounts (longest mount
/// path first), as the kubelet would.
fn backing(pod: &Value, container: &Value, path: &str) -> Backing {
    let volumes: BTreeMap<&str, &Value> =
        pod["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    let mut mounts: Vec<&Value> = container["volumeMounts"].as_array().map(|m| m.iter().collect()).unwrap_or_default();
    mounts.sort_by_key(|m| std::cmp::Reverse(m["mountPath"].as_str().unwrap().len()));
    for m in mounts {
        let at = m["mountPath"].as_str().unwrap().trim_end_matches('/');
        let Some(rest) = path.strip_prefix(at).filter(|r| r.is_empty() || r.starts_with('/')) else { continue };
        let name = m["name"].as_str().unwrap();
        let vol = volumes.get(name).unwrap_or_else(|| panic!("mount of undefined volume {name}"));
        if let Some(host) = vol["hostPath"]["path"].as_str() {
            return Backing::Host(format!("{host}{rest}"));
        }
        if let Some(cm) = vol["configMap"]["name"].as_str() {
            return Backing::ConfigMap(cm.to_string(), rest.trim_start_matches('/').to_string());
        }
        panic!("volume {name} is neither hostPath nor configMap: {vol}");
    }
    Backing::Image
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn the_daemonset_runs_flanneld_rs_in_kube_mode_with_its_files_in_place() {
    let Some(docs) = documents() else { return };
    let ds = find(&docs, "DaemonSet", "kube-flannel-rs-ds");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(pod["tolerations"].as_array().unwrap().contains(&json!({"operator": "Exists", "effect": "NoSchedule"})));
    let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    assert_eq!(
        term[0]["matchExpressions"],
        json!([
            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            {"key": LABEL, "operator": "In", "values": ["true"]}
        ])
    );

    let daemon = container(&pod["containers"], "kube-flannel-rs");
    let image = format!("flannel-rs:{}", env!("CARGO_PKG_VERSION"));
    for c in pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().unwrap()) {
        assert_eq!(c["image"], image.as_str(), "the tag scripts/build-image.sh gives by default");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent", "the image is imported, not pulled");
    }

    // The daemon's own flag parser accepts the command line.
    let command = str_list(&daemon["command"]);
    assert_eq!(command[0], "/usr/bin/flanneld-rs");
    assert!(daemon.get("args").is_none());
    let cli = flanneld_rs::flags::Cli::try_parse_from(&command).unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(cli.cmd.is_none());
    let opts = cli.opts;
    assert!(opts.kube_subnet_mgr && opts.ip_masq, "{command:?}");
    assert_eq!(opts.healthz_ip.to_string(), "0.0.0.0", "probes come to the node's address");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(daemon[probe]["httpGet"]["path"], path);
        assert_eq!(daemon[probe]["httpGet"]["port"], opts.healthz_port, "{probe}");
    }

    // Its files: the configuration from the ConfigMap, subnet.env on the
    // host where the plugin looks for it by default.
    let net_conf = opts.net_config_path.to_str().unwrap();
    assert_eq!(
        backing(pod, daemon, net_conf),
        Backing::ConfigMap("kube-flannel-rs-cfg".into(), "net-conf.json".into())
    );
    let subnet = opts.subnet_file.to_str().unwrap();
    assert_eq!(backing(pod, daemon, subnet), Backing::Host("/run/flannel/subnet.env".into()));
    assert_eq!(backing(pod, daemon, "/run/xtables.lock"), Backing::Host("/run/xtables.lock".into()));
    // The udp backend opens the node's TUN device.
    assert_eq!(backing(pod, daemon, "/dev/net/tun"), Backing::Host("/dev/net/tun".into()));

    let env: BTreeMap<&str, &Value> =
        daemon["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), &e["valueFrom"])).collect();
    assert_eq!(env["NODE_NAME"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(env["POD_NAME"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(env["POD_NAMESPACE"]["fieldRef"]["fieldPath"], "metadata.namespace");

    let sc = &daemon["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(daemon["resources"]["requests"], json!({"cpu": "100m", "memory": "50Mi"}));

    // The init containers: the plugin's install mode, from the image or the
    // ConfigMap to the node's CNI directories.
    let inits = &pod["initContainers"];
    let plugin = container(inits, "install-cni-plugin");
    let cmd = str_list(&plugin["command"]);
    assert_eq!(cmd[..2], [IMAGE_PLUGIN, "install"]);
    assert_eq!(backing(pod, plugin, &cmd[2]), Backing::Image);
    assert_eq!(cmd[2], IMAGE_PLUGIN);
    assert_eq!(backing(pod, plugin, &cmd[3]), Backing::Host("/opt/cni/bin/flannel".into()));
    let conf = container(inits, "install-cni");
    let cmd = str_list(&conf["command"]);
    assert_eq!(cmd[..2], [IMAGE_PLUGIN, "install"]);
    assert_eq!(backing(pod, conf, &cmd[2]), Backing::ConfigMap("kube-flannel-rs-cfg".into(), "cni-conf.json".into()));
    assert_eq!(backing(pod, conf, &cmd[3]), Backing::Host("/etc/cni/net.d/10-flannel.conflist".into()));
}

/// The ConfigMap's two files.
fn config_map(docs: &[Value]) -> (String, String) {
    let cm = find(docs, "ConfigMap", "kube-flannel-rs-cfg");
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 2, "{data:?}");
    (data["cni-conf.json"].as_str().unwrap().to_string(), data["net-conf.json"].as_str().unwrap().to_string())
}

#[test]
fn net_conf_is_accepted_by_the_daemons_parser() {
    let Some(docs) = documents() else { return };
    let (_, net_conf) = config_map(&docs);
    let conf = flanneld_rs::config::NetworkConfig::parse(&net_conf, "net-conf.json").unwrap();
    assert_eq!(conf.ipv4.unwrap().network.to_string(), "10.244.0.0/16");
    assert_eq!(conf.ipv4.unwrap().subnet_len, 24);
    assert!(matches!(conf.backend, flanneld_rs::config::BackendConfig::Vxlan(_)), "{:?}", conf.backend);
}

/// The configuration libcni hands plugin `i` of `conflist`: the plugin's
/// object plus the list's name and version (and later `prevResult`).
fn plugin_conf(conflist: &Value, i: usize) -> Value {
    let mut c = conflist["plugins"][i].clone();
    c["name"] = conflist["name"].clone();
    c["cniVersion"] = conflist["cniVersion"].clone();
    c
}

#[test]
fn cni_conf_is_flannels_conflist_and_the_plugin_speaks_its_version() {
    let Some(docs) = documents() else { return };
    let (cni_conf, _) = config_map(&docs);
    let list: Value = serde_json::from_str(&cni_conf).unwrap();
    assert_eq!(list["name"], "cbr0");
    assert_eq!(list["cniVersion"], "0.3.1", "containerd 1.6's libcni rejects newer versions in a conflist");
    assert_eq!(list["plugins"].as_array().unwrap().len(), 2);
    assert_eq!(
        list["plugins"][0],
        json!({"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}})
    );
    assert_eq!(list["plugins"][1], json!({"type": "portmap", "capabilities": {"portMappings": true}}));

    let mut child = Command::new(workspace_bin("flannel"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), plugin_conf(&list, 0).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.3.1");
    assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("0.3.1")), "{v}");
}

#[test]
fn the_shipped_conflist_plugs_a_pod_in_and_out() {
    let Some(docs) = documents() else { return };
    if !netns_fixtures::require_root() {
        return;
    }
    let (cni_conf, _) = config_map(&docs);
    let list: Value = serde_json::from_str(&cni_conf).unwrap();
    let cluster = netns_fixtures::Cluster::new(1).unwrap();
    let node = cluster.node(0);
    let dir = tempfile::tempdir().unwrap();
    // What flanneld-rs --ip-masq writes: the daemon masquerades, the plugin does not.
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let pod = node.add_pod_netns("deploy").unwrap();
    let pod_path = pod.path().to_str().unwrap().to_string();
    // The shipped configuration, with only the node-wide paths moved into the test's directory.
    let mut flannel = plugin_conf(&list, 0);
    flannel["subnetFile"] = json!(dir.path().join("subnet.env"));
    flannel["dataDir"] = json!(dir.path().join("data"));
    let plugin = workspace_bin("flannel");
    let add = cni(&node.ns, &plugin, &cni_env("ADD", "deploy", &pod_path), &flannel.to_string());
    assert!(add.ok, "flannel ADD with the shipped conflist: {add:?}");
    assert_eq!(add.json["cniVersion"], "0.3.1");
    assert_eq!(add.json["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(add.json["ips"][0]["version"], "4", "a 0.3.1 result");
    let routes = pod.ip_json(&["-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.244.1.1", "isDefaultGateway: {routes}");
    let veths = node.ns.ip_json(&["-d", "link", "show", "type", "veth"]);
    let veth = veths.as_array().unwrap().iter().find(|v| v["master"] == "cni0").expect("a veth on cni0");
    assert_eq!(veth["linkinfo"]["info_slave_data"]["hairpin"], true, "hairpinMode: {veth}");

    // portmap, chained as the conflist says (no mappings asked for).
    let portmap = Path::new("/usr/lib/cni/portmap");
    let mut pm = plugin_conf(&list, 1);
    pm["prevResult"] = add.json.clone();
    if portmap.exists() {
        let out = cni(&node.ns, portmap, &cni_env("ADD", "deploy", &pod_path), &pm.to_string());
        assert!(out.ok, "portmap ADD after ours: {out:?}");
        let out = cni(&node.ns, portmap, &cni_env("DEL", "deploy", &pod_path), &pm.to_string());
        assert!(out.ok, "portmap DEL: {out:?}");
    } else {
        missing("/usr/lib/cni/portmap (containernetworking-plugins) is not installed");
    }
    let del = cni(&node.ns, &plugin, &cni_env("DEL", "deploy", &pod_path), &flannel.to_string());
    assert!(del.ok, "flannel DEL: {del:?}");
}

#[test]
fn install_mode_of_the_real_plugin_binary_puts_both_files_on_the_node() {
    let plugin = workspace_bin("flannel");
    let node = tempfile::tempdir().unwrap();
    let src = node.path().join("cni-conf.json");
    std::fs::write(&src, r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#).unwrap();
    let conflist = node.path().join("etc/cni/net.d/10-flannel.conflist");
    let bin = node.path().join("opt/cni/bin/flannel");
    for (from, to, mode) in [(src.as_path(), conflist.as_path(), 0o644), (plugin.as_path(), bin.as_path(), 0o755)] {
        let out = Command::new(&plugin).arg("install").arg(from).arg(to).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(to).unwrap(), std::fs::read(from).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(to).unwrap().permissions().mode() & 0o7777, mode, "{}", to.display());
    }
    // Nothing but the two files: no temporary file left next to them.
    let listing = Command::new("find").arg(node.path()).args(["-type", "f"]).output().unwrap();
    let mut files: Vec<String> = String::from_utf8_lossy(&listing.stdout).lines().map(str::to_string).collect();
    files.sort();
    let mut want = vec![src.display().to_string(), conflist.display().to_string(), bin.display().to_string()];
    want.sort();
    assert_eq!(files, want);
    // The installed copy is a working plugin.
    let out = Command::new(&bin).env_clear().env("CNI_COMMAND", "VERSION").stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));

    let out = Command::new(&plugin).args(["install", "/nonexistent/src"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error without two paths: {out:?}");
    let out = Command::new(&plugin).args(["install", "/nonexistent/src", "/nonexistent/dst"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/src") && err.contains("/nonexistent/dst"), "{err}");
}

#[test]
fn the_containerfile_puts_the_programs_where_the_manifest_runs_them() {
    // It cannot be built here (no container engine); at least its paths must
    // be the ones the DaemonSet and scripts/build-image.sh use.
    let text = std::fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let plugin = format!("COPY --from=build /out/flannel {IMAGE_PLUGIN}");
    for want in [
        plugin.as_str(),
        "COPY --from=build /out/flanneld-rs /usr/bin/flanneld-rs",
        "ENTRYPOINT [\"/usr/bin/flanneld-rs\"]",
        "nftables iptables",
        "protobuf-compiler",
        "+crt-static",
    ] {
        assert!(text.contains(want), "deploy/Containerfile lacks {want:?}");
    }
}

// ---------------------------------------------------------------------------
// The image

/// The OCI archive, built once per test run by `scripts/build-image.sh` (cargo
/// builds the release binaries the first time and finds them up to date
/// after that), or None when this machine cannot build it.
fn archive() -> Option<&'static Path> {
    static ARCHIVE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = ARCHIVE.get_or_init(|| {
        let nft = Path::new("/usr/sbin/nft").exists();
        // SAFETY: geteuid has no preconditions and cannot fail.
        if !nft && unsafe { libc::geteuid() } != 0 {
            return Err("/usr/sbin/nft is missing and only root can install it".into());
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy/flannel-rs.oci.tar");
        let status = Command::new(repo().join("scripts/build-image.sh"))
            .arg(&out)
            .status()
            .map_err(|e| format!("run scripts/build-image.sh: {e}"))?;
        if !status.success() {
            panic!("scripts/build-image.sh {} failed: {status}", out.display());
        }
        Ok(out)
    });
    match built {
        Ok(p) => Some(p.as_path()),
        Err(e) => {
            missing(e);
            None
        }
    }
}

/// The archive unpacked into a temporary directory.
fn unpack(archive: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    e2e_tests::run_ok(Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(dir.path()));
    dir
}

/// Reads blob `desc` and checks it against its descriptor's digest and size.
fn blob(layout: &Path, desc: &Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("{digest}: not sha256"));
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&data), hex, "content of blob {digest}");
    assert_eq!(desc["size"], data.len(), "size of blob {digest}");
    data
}

/// One entry of a tar stream, as Python's tarfile (not GNU tar, which made it) reads it.
#[derive(Debug)]
struct Entry {
    name: String,
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    link: String,
}

fn tar_entries(gz: &[u8]) -> Vec<Entry> {
    let script = "import json, sys, tarfile\n\
                  kinds = {tarfile.REGTYPE: 'file', tarfile.DIRTYPE: 'dir', tarfile.SYMTYPE: 'symlink'}\n\
                  t = tarfile.open(fileobj=sys.stdin.buffer, mode='r|gz')\n\
                  json.dump([dict(name=m.name, kind=kinds.get(m.type, repr(m.type)), mode=m.mode, uid=m.uid,\n\
                  gid=m.gid, mtime=int(m.mtime), link=m.linkname) for m in t], sys.stdout)";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let data = gz.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.iter()
        .map(|e| Entry {
            name: e["name"].as_str().unwrap().to_string(),
            kind: e["kind"].as_str().unwrap().to_string(),
            mode: e["mode"].as_u64().unwrap() as u32,
            uid: e["uid"].as_u64().unwrap() as u32,
            gid: e["gid"].as_u64().unwrap() as u32,
            mtime: e["mtime"].as_i64().unwrap(),
            link: e["link"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip").arg("-dc").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = gz.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// The ELF program interpreter (`PT_INTERP`) of a 64-bit little-endian
/// executable; None for a static one.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1, "not a 64-bit LE ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).map(|i| phoff + i * phentsize).find_map(|ph| {
        const PT_INTERP: u32 = 3;
        (u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == PT_INTERP).then(|| {
            let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
            String::from_utf8_lossy(&elf[off..off + size]).trim_end_matches('\0').to_string()
        })
    })
}

/// Reads `path` out of the layer (a gzipped tar) with GNU tar.
fn layer_file(gz: &[u8], path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer.tar.gz");
    std::fs::write(&layer, gz).unwrap();
    let out = Command::new("tar").arg("-xzOf").arg(&layer).arg(path).output().unwrap();
    assert!(out.status.success(), "{path} in the layer: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn the_image_archive_is_a_consistent_oci_layout_with_everything_the_pod_runs() {
    let Some(archive) = archive() else { return };
    let dir = unpack(archive);
    let layout = dir.path();
    let read_json = |p: &str| -> Value { serde_json::from_slice(&std::fs::read(layout.join(p)).unwrap()).unwrap() };
    assert_eq!(read_json("oci-layout"), json!({"imageLayoutVersion": "1.0.0"}));

    // index.json -> manifest -> config and layer, every digest and size checked.
    let index = read_json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    let desc = &manifests[0];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(desc["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(desc["annotations"]["org.opencontainers.image.ref.name"], version);
    assert_eq!(desc["annotations"]["io.containerd.image.name"], format!("docker.io/library/flannel-rs:{version}"));
    assert_eq!(desc["platform"], json!({"architecture": "amd64", "os": "linux"}));
    let manifest: Value = serde_json::from_slice(&blob(layout, desc)).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config: Value = serde_json::from_slice(&blob(layout, &manifest["config"])).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], json!(["/usr/bin/flanneld-rs"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let gz = blob(layout, &layers[0]);
    assert_eq!(
        config["rootfs"],
        json!({"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&gunzip(&gz)))]})
    );
    let blobs = std::fs::read_dir(layout.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 3, "manifest, config, layer and nothing else");

    // The layer: the programs, the libraries, all owned by root, one time stamp.
    let entries = tar_entries(&gz);
    let by_name: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.name.trim_end_matches('/'), e)).collect();
    for (path, mode) in [
        ("usr/bin/flanneld-rs", 0o755),
        (IMAGE_PLUGIN.trim_start_matches('/'), 0o755),
        ("usr/sbin/nft", 0o755),
        ("usr/sbin/xtables-nft-multi", 0o755),
    ] {
        let e = by_name.get(path).unwrap_or_else(|| panic!("{path} is not in the layer"));
        assert_eq!((e.kind.as_str(), e.mode), ("file", mode), "{path}");
    }
    for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        let e = by_name.get(link).unwrap_or_else(|| panic!("/{link} is missing"));
        assert_eq!((e.kind.as_str(), e.link.as_str()), ("symlink", target));
    }
    // The daemon runs iptables-save and iptables-restore (flannel's chains).
    for prog in ["iptables-save", "iptables-restore"] {
        let e = by_name.get(format!("usr/sbin/{prog}").as_str()).unwrap_or_else(|| panic!("{prog} is missing"));
        assert_eq!((e.kind.as_str(), e.link.as_str()), ("symlink", "xtables-nft-multi"));
    }
    assert_eq!(by_name["tmp"].mode, 0o1777);
    assert!(entries.iter().all(|e| e.uid == 0 && e.gid == 0), "owner 0 only");
    assert_eq!(entries.iter().map(|e| e.mtime).collect::<BTreeSet<_>>().len(), 1, "one time stamp");
    assert!(entries.iter().all(|e| !e.name.starts_with('/') && !e.name.starts_with("./")), "relative names");
    let resolve = |p: &str| -> String {
        let p = p.trim_start_matches('/');
        for (link, target) in
            [("lib/", "usr/lib/"), ("lib64/", "usr/lib64/"), ("bin/", "usr/bin/"), ("sbin/", "usr/sbin/")]
        {
            if let Some(rest) = p.strip_prefix(link) {
                return format!("{target}{rest}");
            }
        }
        p.to_string()
    };

    // The daemon and nft are dynamic: their loader is in the image, and so is
    // every library the host's loader resolves for them.
    for prog in ["usr/bin/flanneld-rs", "usr/sbin/nft", "usr/sbin/xtables-nft-multi"] {
        let elf = layer_file(&gz, prog);
        let interp = elf_interpreter(&elf).unwrap_or_else(|| panic!("{prog} should be dynamic"));
        assert!(by_name.contains_key(resolve(&interp).as_str()), "{prog}'s loader {interp} is not in the layer");
    }
    for host_prog in
        [workspace_release_daemon(), PathBuf::from("/usr/sbin/nft"), PathBuf::from("/usr/sbin/xtables-nft-multi")]
    {
        let ldd = e2e_tests::run_ok(Command::new("ldd").arg(&host_prog));
        for lib in ldd.lines().filter_map(|l| l.split("=>").nth(1)).filter_map(|r| r.split_whitespace().next()) {
            if lib.starts_with('/') {
                assert!(
                    by_name.contains_key(resolve(lib).as_str()),
                    "{lib} ({}) is not in the layer",
                    host_prog.display()
                );
            }
        }
    }
    // The plugin runs on the host, with whatever libc the node has: static.
    let plugin = layer_file(&gz, IMAGE_PLUGIN.trim_start_matches('/'));
    assert_eq!(elf_interpreter(&plugin), None, "the image's plugin must be statically linked");
}

/// The daemon the image was built from: `<target dir>/release/flanneld-rs`.
fn workspace_release_daemon() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("release/flanneld-rs")
}

#[test]
fn the_image_archive_is_reproducible() {
    let Some(first) = archive() else { return };
    let second = tempfile::tempdir().unwrap();
    let again = second.path().join("again.oci.tar");
    let out = Command::new(repo().join("scripts/build-image.sh"))
        .arg(&again)
        .env("FLANNEL_RS_PREBUILT", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&*again.to_string_lossy()) && stdout.contains("digest: sha256:"), "{stdout}");
    assert!(std::fs::read(first).unwrap() == std::fs::read(&again).unwrap(), "two builds of the same binaries differ");
}

#[test]
fn containerd_imports_the_archive_and_runs_its_programs() {
    let Some(archive) = archive() else { return };
    if !netns_fixtures::require_root() {
        return;
    }
    let out = Command::new(repo().join("scripts/check-image.sh")).arg(archive).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/check-image.sh:\n{text}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(text.contains(&format!("image ok: docker.io/library/flannel-rs:{version}")), "{text}");
}

/// flannel's own bundle (kube-flannel.yml v0.20.2), parsed by PyYAML.
fn upstream_documents() -> Option<Vec<Value>> {
    let text = e2e_tests::kube::upstream_manifest()?;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    documents_of(file.path())
}

/// The one object of `kind` named `name` in `docs`.
fn find_in<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {} documents", docs.len()))
}

/// `patch` applied to `target` as a JSON merge patch (RFC 7386). For the
/// patch we ship this is also what a strategic merge does: the lists it
/// sets (nodeSelectorTerms, matchExpressions) have no merge key, so both
/// replace them.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, _) if patch.is_object() => {
            *target = json!({});
            merge_patch(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

/// Whether a pod with `pod` (a pod spec) may run on a node with `labels`,
/// by Kubernetes' rules for required node affinity: the terms ORed, each
/// term's expressions ANDed; `NotIn` holds for a node without the label.
fn runs_on(pod: &Value, labels: &BTreeMap<&str, &str>) -> bool {
    assert!(pod.get("nodeSelector").is_none(), "a nodeSelector too: {}", pod["nodeSelector"]);
    let required = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    let Some(terms) = required["nodeSelectorTerms"].as_array() else { return true };
    terms.iter().any(|t| {
        t["matchExpressions"].as_array().unwrap().iter().all(|e| {
            let label = labels.get(e["key"].as_str().unwrap()).copied();
            let values = e.get("values").map(str_list).unwrap_or_default();
            let listed = label.is_some_and(|l| values.iter().any(|v| v == l));
            match e["operator"].as_str().unwrap() {
                "In" => listed,
                "NotIn" => !listed,
                "Exists" => label.is_some(),
                "DoesNotExist" => label.is_none(),
                op => panic!("operator {op} in {e}"),
            }
        })
    })
}

/// The node-by-node migration (README, "Migrating from flannel, node by
/// node"): flannel's DaemonSet with `deploy/flannel-avoid-flannel-rs-nodes.yml`
/// patched in, and ours, split the Linux nodes by the label
/// `flannel-rs.io/enabled=true`: every Linux node runs exactly one of the two
/// (both write the same files), the label alone decides which, and the
/// patch changes nothing of flannel's DaemonSet but adding that condition.
#[test]
fn flannels_patched_daemonset_and_ours_split_the_nodes_by_the_label() {
    let Some(ours) = documents() else { return };
    let Some(upstream) = upstream_documents() else { return };
    let Some(patch) = documents_of(&e2e_tests::kube::upstream_patch_path()) else { return };
    assert_eq!(patch.len(), 1, "{patch:#?}");
    let flannel = find_in(&upstream, "DaemonSet", "kube-flannel-ds");
    let mut patched = flannel.clone();
    merge_patch(&mut patched, &patch[0]);
    let terms =
        "/spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms";
    let (before, after) = (flannel.pointer(terms).unwrap(), patched.pointer(terms).unwrap());
    let mut want = before[0]["matchExpressions"].as_array().unwrap().clone();
    want.push(json!({"key": LABEL, "operator": "NotIn", "values": ["true"]}));
    assert_eq!(after, &json!([{ "matchExpressions": want }]), "flannel's own condition, and ours");
    let mut rest = patched.clone();
    *rest.pointer_mut(terms).unwrap() = before.clone();
    assert_eq!(&rest, flannel, "the patch changes more than the node affinity");

    let ours = &find(&ours, "DaemonSet", "kube-flannel-rs-ds")["spec"]["template"]["spec"];
    let flannel_pod = &patched["spec"]["template"]["spec"];
    let linux = ("kubernetes.io/os", "linux");
    // (a node's labels, which DaemonSet runs there)
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case; 6] = [
        (&[linux], Some("flannel")),
        (&[linux, (LABEL, "true")], Some("flannel-rs")),
        (&[linux, (LABEL, "false")], Some("flannel")),
        (&[linux, (LABEL, "")], Some("flannel")),
        (&[("kubernetes.io/os", "windows"), (LABEL, "true")], None),
        (&[(LABEL, "true")], None),
    ];
    for (labels, want) in cases {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let runs = [("flannel", runs_on(flannel_pod, &labels)), ("flannel-rs", runs_on(ours, &labels))];
        let got: Vec<&str> = runs.iter().filter(|(_, r)| *r).map(|(n, _)| *n).collect();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "node labels {labels:?}");
    }
    // Unpatched, flannel's DaemonSet would run beside ours: why the patch is needed.
    let moved: BTreeMap<&str, &str> = [linux, (LABEL, "true")].into_iter().collect();
    assert!(runs_on(&flannel["spec"]["template"]["spec"], &moved));
}

/// "`kubectl delete -f` of one bundle never removes the other's objects":
/// no object of ours has the kind, namespace and name of one of flannel's,
/// none lives in flannel's namespace, and our binding names our own
/// ServiceAccount.
#[test]
fn flannels_bundle_and_ours_share_no_object() {
    let Some(ours) = documents() else { return };
    let Some(upstream) = upstream_documents() else { return };
    let key = |d: &Value| {
        let m = &d["metadata"];
        (
            d["kind"].as_str().unwrap().to_string(),
            m["namespace"].as_str().unwrap_or("").to_string(),
            m["name"].as_str().unwrap().to_string(),
        )
    };
    let theirs: BTreeSet<_> = upstream.iter().map(key).collect();
    let their_namespaces: BTreeSet<String> =
        theirs.iter().filter(|k| k.0 == "Namespace").map(|k| k.2.clone()).collect();
    assert_eq!(their_namespaces, BTreeSet::from(["kube-flannel".to_string()]));
    for d in &ours {
        let k = key(d);
        assert!(!theirs.contains(&k), "{k:?} is also in flannel's bundle");
        assert!(!their_namespaces.contains(&k.1), "{k:?} lives in flannel's namespace");
        if k.0 == "Namespace" {
            assert!(!their_namespaces.contains(&k.2), "our Namespace {} is flannel's", k.2);
        }
    }
    let binding = find(&ours, "ClusterRoleBinding", "flannel-rs");
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": "flannel-rs", "namespace": NAMESPACE}]));
}
