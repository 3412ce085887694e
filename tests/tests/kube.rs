//! Kubernetes mode end to end: a real kube-apiserver (built from Debian's
//! `kubernetes` source package) on a real etcd, the shipped deploy bundle
//! applied with kubectl, flanneld-rs on three node namespaces with
//! `--kube-subnet-mgr` and the shipped ServiceAccount's token, pods plugged
//! in by the real plugin, real traffic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use e2e_tests::kube::{require_kube, ApiServer, KubeOverlay, PREFIX};
use e2e_tests::{echo_server, tcp_round_trip};
use netns_fixtures::{require_root, wait_until};
use serde_json::json;

fn ready() -> bool {
    require_root() && require_kube()
}

fn annotations(ko: &KubeOverlay, node: &str) -> BTreeMap<String, String> {
    let n = ko.api.get_json(&["node", node]);
    let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    a.into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k[PREFIX.len() + 1..].to_string(), v.as_str().unwrap().to_string()))
        .collect()
}

fn vtep_mac(ko: &KubeOverlay, i: usize) -> String {
    ko.o.cluster.node(i).ns.ip_json(&["link", "show", "flannel.1"])[0]["address"].as_str().unwrap().to_string()
}

#[test]
fn kube_mode_pods_talk_across_nodes_with_the_shipped_rbac() {
    if !ready() {
        return;
    }
    let mut ko = KubeOverlay::new(3);

    // The shipped RBAC, read back from the server: exactly what the daemon needs.
    let role = ko.api.get_json(&["clusterrole", "flannel-rs"]);
    let mut rules = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for res in r["resources"].as_array().unwrap() {
            for v in r["verbs"].as_array().unwrap() {
                rules.push(format!("{}:{}", res.as_str().unwrap(), v.as_str().unwrap()));
            }
        }
    }
    rules.sort();
    assert_eq!(rules, ["nodes/status:patch", "nodes:get", "nodes:list", "nodes:watch", "pods:get"]);
    let binding = ko.api.get_json(&["clusterrolebinding", "flannel-rs"]);
    assert_eq!(binding["roleRef"]["name"], "flannel-rs");
    assert_eq!(
        binding["subjects"][0],
        json!({"kind": "ServiceAccount", "name": "flannel-rs", "namespace": "kube-flannel-rs"})
    );

    // The token can read nodes and cannot do more.
    assert!(ko.kubectl_as_daemon(&["get", "nodes"]).status.success());
    let pods = ko.kubectl_as_daemon(&["get", "pods", "-A"]);
    assert!(!pods.status.success());
    assert!(String::from_utf8_lossy(&pods.stderr).contains("forbidden"), "{:?}", pods);
    let del = ko.kubectl_as_daemon(&["delete", "node", "node0"]);
    assert!(String::from_utf8_lossy(&del.stderr).contains("forbidden"), "{:?}", del);

    for i in 0..3 {
        ko.create_node(i);
    }
    ko.o.start_all();
    for i in 0..3 {
        ko.wait_converged(i);
        assert_eq!(ko.o.vtep_state(i).routes.len(), 2, "node{i}: {:?}", ko.o.vtep_state(i));
        let env = std::fs::read_to_string(&ko.o.daemons[i].subnet_file).unwrap();
        assert!(env.contains(&format!("FLANNEL_SUBNET=10.244.{}.1/24\n", i + 1)), "{env}");
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
    }

    // Each Node carries flannel's annotations, in flannel's exact formats.
    for i in 0..3 {
        let name = KubeOverlay::node_name(i);
        let want = BTreeMap::from([
            ("backend-data".to_string(), format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", vtep_mac(&ko, i))),
            ("backend-type".to_string(), "vxlan".to_string()),
            ("kube-subnet-manager".to_string(), "true".to_string()),
            ("public-ip".to_string(), format!("192.0.2.{}", 10 + i)),
        ]);
        assert_eq!(annotations(&ko, &name), want, "{name}");
        let node = ko.api.get_json(&["node", &name]);
        let cond = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "NetworkUnavailable")
            .cloned()
            .unwrap_or_else(|| panic!("{name} has no NetworkUnavailable condition: {node}"));
        assert_eq!(cond["status"], "False", "{cond}");
    }

    // Pods on every node reach pods on every other node.
    let pods: Vec<_> = (0..3).map(|i| ko.o.add_pod(i, &format!("k{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7100);

    // diagnose in Kubernetes mode agrees.
    let (ok, report) = ko.o.diagnose(0, &[]);
    assert!(ok, "{report}");

    // A restart reuses the VTEP MAC and the annotations stay as they were;
    // so does a restart after the device is gone (a reboot): the MAC then
    // comes from our own backend-data annotation.
    let mac = vtep_mac(&ko, 0);
    let before = annotations(&ko, "node0");
    ko.o.stop(0);
    ko.o.start(0);
    ko.wait_converged(0);
    assert_eq!(vtep_mac(&ko, 0), mac);
    assert_eq!(annotations(&ko, "node0"), before);
    ko.o.stop(0);
    ko.o.cluster.node(0).ns.run_ok("ip", &["link", "del", "flannel.1"]);
    ko.o.start(0);
    ko.wait_converged(0);
    assert_eq!(vtep_mac(&ko, 0), mac);
    assert_eq!(annotations(&ko, "node0"), before);

    // Deleting a Node removes its entries on the others.
    ko.api.kubectl_ok(&["delete", "node", "node2"]);
    for i in 0..2 {
        ko.wait_converged(i);
        let st = ko.o.vtep_state(i);
        assert_eq!(st.routes.len(), 1, "node{i}: {st:?}");
        assert!(!st.routes.iter().any(|r| r.contains("10.244.3.0")), "node{i}: {st:?}");
    }
}

#[test]
fn nodes_annotated_by_flannel_are_read_and_ours_have_flannels_formats() {
    if !ready() {
        return;
    }
    let mut ko = KubeOverlay::new(1);
    // A node running flannel (Go), annotated the way flannel annotates it.
    let p = |k: &str| format!("{PREFIX}/{k}");
    let go = [
        (p("backend-data"), r#"{"VNI":1,"VtepMAC":"6e:5c:3a:00:11:22"}"#),
        (p("backend-type"), "vxlan"),
        (p("kube-subnet-manager"), "true"),
        (p("public-ip"), "192.0.2.31"),
    ];
    let go: Vec<(&str, &str)> = go.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ko.api.create_node("flannel-go", Some("10.244.31.0/24"), &go);
    // A node that does not take part, and one whose annotation is broken.
    ko.api.create_node("other-cni", Some("10.244.32.0/24"), &[(&p("public-ip"), "192.0.2.32")]);
    let mut broken = go.clone();
    broken[0].1 = r#"{"VNI":1,"VtepMAC":"not-a-mac"}"#;
    broken[3].1 = "192.0.2.33";
    ko.api.create_node("broken", Some("10.244.33.0/24"), &broken);
    // Our node: advertise another address (public-ip-overwrite).
    ko.api.create_node("node0", Some("10.244.1.0/24"), &[(&p("public-ip-overwrite"), "198.51.100.7")]);
    ko.o.start(0);

    let want = ko.o.expected_state_for(
        0,
        [("10.244.31.0/24".to_string(), "6e:5c:3a:00:11:22".to_string(), "192.0.2.31".to_string())],
    );
    wait_until(Duration::from_secs(10), "node0 to program the flannel node", || ko.o.vtep_state(0) == want);
    // Neither the broken Node nor the one of another CNI reached the kernel.
    let routes = ko.o.vtep_state(0).routes;
    assert!(!routes.iter().any(|r| r.starts_with("10.244.32.") || r.starts_with("10.244.33.")), "{routes:?}");
    let log = ko.o.log(0);
    assert!(log.contains("node broken") && log.contains("not-a-mac"), "{log}");
    assert!(!log.contains("other-cni"), "{log}");
    // Advertised: the overwrite; the VTEP itself still sends from the interface address.
    let a = annotations(&ko, "node0");
    assert_eq!(a["public-ip"], "198.51.100.7");
    assert_eq!(a["backend-type"], "vxlan");
    let link = &ko.o.cluster.node(0).ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
    assert_eq!(link["linkinfo"]["info_data"]["local"], "192.0.2.10");

    // A flannel node changing its VTEP MAC is followed.
    let mut moved = go.clone();
    moved[0].1 = r#"{"VNI":1,"VtepMAC":"6e:5c:3a:00:11:33"}"#;
    ko.api.create_node("flannel-go", Some("10.244.31.0/24"), &moved);
    let want = ko.o.expected_state_for(
        0,
        [("10.244.31.0/24".to_string(), "6e:5c:3a:00:11:33".to_string(), "192.0.2.31".to_string())],
    );
    wait_until(Duration::from_secs(10), "node0 to follow the new MAC", || ko.o.vtep_state(0) == want);
}

#[test]
fn waits_for_a_pod_cidr_and_refuses_one_outside_the_network() {
    if !ready() {
        return;
    }
    let ko = KubeOverlay::new(2);
    // node0 exists without a podCIDR: the daemon says what it waits for.
    ko.api.create_node("node0", None, &[]);
    let log = std::fs::File::create(&ko.o.daemons[0].log).unwrap();
    let flags = ["--kube-subnet-mgr", "--kubeconfig-file"];
    // --kube-api-url replaces the kubeconfig's server (here a wrong one).
    let text = std::fs::read_to_string(&ko.kubeconfig).unwrap();
    let wrong = ko.o.dir.path().join("wrong-server.kubeconfig");
    std::fs::write(&wrong, text.replace(&ko.api.url, "https://192.0.2.200:1")).unwrap();
    let mut cmd = ko.o.daemon_command(0);
    cmd.args(flags)
        .arg(&wrong)
        .args(["--kube-api-url", &ko.api.url])
        .arg("--net-config-path")
        .arg(&ko.net_conf)
        .env("NODE_NAME", "node0");
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let mut proc = e2e_tests::overlay::Proc(Some(child));
    wait_until(Duration::from_secs(15), "the daemon to say it waits for a podCIDR", || {
        ko.o.log(0).contains("waiting for node node0")
    });
    assert!(!ko.o.daemons[0].subnet_file.exists());
    // Waiting, as the rest of the system sees it: the process is alive, and
    // the API server holds no annotation of ours on node0.
    assert!(proc.0.as_mut().unwrap().try_wait().unwrap().is_none(), "the daemon exited: {}", ko.o.log(0));
    assert_eq!(annotations(&ko, "node0"), BTreeMap::new(), "annotated before it has a podCIDR");
    ko.api.kubectl_ok(&["patch", "node", "node0", "-p", r#"{"spec":{"podCIDR":"10.244.7.0/24"}}"#]);
    wait_until(Duration::from_secs(15), "subnet.env after the podCIDR appears", || {
        std::fs::read_to_string(&ko.o.daemons[0].subnet_file).is_ok_and(|t| t.contains("FLANNEL_SUBNET=10.244.7.1/24"))
    });
    proc.stop();

    // A podCIDR outside Network: a clear error, and nothing written.
    ko.api.create_node("node1", Some("10.9.0.0/24"), &[]);
    let out =
        ko.o.daemon_command(1)
            .args(flags)
            .arg(&ko.kubeconfig)
            .arg("--net-config-path")
            .arg(&ko.net_conf)
            .env("NODE_NAME", "node1")
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node node1") && err.contains("10.9.0.0/24") && err.contains("10.244.0.0/16"), "{err}");
    assert!(!ko.o.daemons[1].subnet_file.exists());
    assert!(annotations(&ko, "node1").is_empty());

    // No node name: a clear error.
    let out =
        ko.o.daemon_command(1)
            .args(flags)
            .arg(&ko.kubeconfig)
            .arg("--net-config-path")
            .arg(&ko.net_conf)
            .output()
            .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE_NAME"), "{out:?}");
}

#[test]
fn a_node_deleted_while_the_watch_is_down_is_removed_after_the_relist() {
    if !ready() {
        return;
    }
    let mut ko = KubeOverlay::new(3);
    for i in 0..3 {
        ko.create_node(i);
    }
    ko.o.start_all();
    for i in 0..3 {
        ko.wait_converged(i);
    }
    // A second API server on the same etcd: the control plane stays up while
    // the one the daemons watch is down.
    let other = ApiServer::start(ko.o.outside(), ko.o.dir.path(), 6444);
    ko.api.stop();
    let (pa, a) = ko.o.add_pod(0, "wa");
    let (pb, b) = ko.o.add_pod(1, "wb");
    other.kubectl_ok(&["delete", "node", "node2"]);
    // Without the API server, the overlay keeps working on what it knows.
    let target = SocketAddr::new(b.into(), 7300);
    let server = echo_server(&pb, target);
    assert_eq!(tcp_round_trip(&pa, target), "ping\n");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(a));
    assert_eq!(ko.o.vtep_state(0).routes.len(), 2);

    ko.api.restart(ko.o.outside());
    for i in 0..2 {
        ko.wait_converged(i);
        assert_eq!(ko.o.vtep_state(i).routes.len(), 1, "node{i}: {:?}", ko.o.vtep_state(i));
    }
}

#[test]
fn in_cluster_configuration_and_the_node_found_through_our_pod() {
    if !ready() {
        return;
    }
    let ko = KubeOverlay::new(1);
    ko.create_node(0);
    // Our pod, bound to node0 (no kubelet runs it; the daemon only reads its spec.nodeName).
    ko.api.apply(
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "kube-flannel-rs-ds-abcde", "namespace": "kube-flannel-rs" },
            "spec": {
                "nodeName": "node0", "serviceAccountName": "flannel-rs", "automountServiceAccountToken": false,
                "containers": [{ "name": "flanneld-rs", "image": "flannel-rs:0.1.0" }]
            }
        })
        .to_string(),
    );
    // The service account files where in-cluster clients look for them, in a
    // private mount namespace (a tmpfs over /run), and the Service's address
    // in the environment, as the kubelet provides them.
    let sa = ko.o.dir.path().join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), ko.api.service_account_token("kube-flannel-rs", "flannel-rs")).unwrap();
    std::fs::copy(ko.api.dir.join("ca.crt"), sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), "kube-flannel-rs").unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io && cp -r {} /run/secrets/kubernetes.io/serviceaccount && exec \"$@\"",
        sa.display()
    );
    let d = &ko.o.daemons[0];
    let log = std::fs::File::create(&d.log).unwrap();
    let child =
        ko.o.cluster
            .node(0)
            .ns
            .command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
            .arg(e2e_tests::workspace_bin("flanneld-rs"))
            .args(["--kube-subnet-mgr", "--net-config-path"])
            .arg(&ko.net_conf)
            .arg("--subnet-file")
            .arg(&d.subnet_file)
            .envs([
                ("KUBERNETES_SERVICE_HOST", "192.0.2.200"),
                ("KUBERNETES_SERVICE_PORT", "6443"),
                ("POD_NAME", "kube-flannel-rs-ds-abcde"),
                ("POD_NAMESPACE", "kube-flannel-rs"),
            ])
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
    let mut proc = e2e_tests::overlay::Proc(Some(child));
    wait_until(Duration::from_secs(20), "the in-cluster daemon to be ready", || {
        e2e_tests::overlay::ready_lines(&ko.o.log(0)) > 0
    });
    assert!(ko.o.log(0).contains("node node0"), "{}", ko.o.log(0));
    assert_eq!(annotations(&ko, "node0")["public-ip"], "192.0.2.10");
    // It took node0's podCIDR and told the API server about the VTEP it
    // really has (read with `ip -j`), and the CNI plugin's file says so.
    let want = format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", vtep_mac(&ko, 0));
    assert_eq!(annotations(&ko, "node0")["backend-data"], want);
    let env = std::fs::read_to_string(&d.subnet_file).unwrap();
    assert!(env.contains("FLANNEL_SUBNET=10.244.1.1/24\n"), "{env}");
    proc.stop();
}

/// "A daemon started while the API server is not up waits for it with a
/// bounded backoff, says what it waits for, and carries on when it comes":
/// the API server is stopped, the daemon started, the server started again
/// `FLANNEL_RS_LATE_START_SECS` (default 20) later. The tries (logged at
/// debug level) stay within what the Backoff allows in that time, and the
/// wait is said once, then every 30 s.
#[test]
fn a_daemon_started_before_the_api_server_waits_for_it_and_carries_on() {
    if !ready() {
        return;
    }
    let delay = Duration::from_secs(e2e_tests::faults::knob("FLANNEL_RS_LATE_START_SECS", 20));
    let mut ko = KubeOverlay::new(2);
    ko.create_node(0);
    ko.create_node(1);
    ko.api.stop();
    let mut env = vec![("NODE_NAME".to_string(), KubeOverlay::node_name(0))];
    env.push(("FLANNELD_LOG".into(), "warn,flanneld_rs=info,flanneld_rs::subnet=debug".into()));
    ko.o.set_env(0, &env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    let started = std::time::Instant::now();
    ko.o.spawn(0);
    let what = "node node0 from the Kubernetes API server";
    wait_until(delay.max(Duration::from_secs(10)), "the daemon to say what it waits for", || {
        ko.o.log(0).contains(&format!("waiting for {what}"))
    });
    // The late API server: the test's premise, not a wait for a condition.
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    let log = ko.o.log(0);
    let elapsed = started.elapsed();
    let lines = |needles: &[&str]| log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).count();
    let said = lines(&[&format!("waiting for {what}")]);
    let said_bound = 1 + (elapsed.as_secs() / 30) as usize;
    assert!((1..=said_bound).contains(&said), "said {said} times that it waits (at most {said_bound}):\n{log}");
    let tries = lines(&["DEBUG", " try ", &format!(" for {what}"), " failed: "]);
    let bound = e2e_tests::faults::max_tries(elapsed);
    assert!(tries >= 2 && tries <= bound, "{tries} tries in {elapsed:?} (the Backoff allows {bound}):\n{log}");
    eprintln!("waited {elapsed:?}: {tries} tries (bound {bound}), said {said} times");

    let outside = ko.o.cluster.outside().unwrap();
    ko.api.restart(outside);
    ko.o.wait_ready(0);
    ko.o.start(1);
    ko.wait_converged(0);
    ko.wait_converged(1);
}

/// The nodes the DaemonSet controller made pods of `ds` (in `ns`) for:
/// each pod names its node in its node affinity (no scheduler runs).
fn daemon_pod_nodes(ko: &KubeOverlay, ns: &str, app: &str) -> Vec<String> {
    let pods = ko.api.get_json(&["pods", "-n", ns, "-l", &format!("app={app}")]);
    let mut nodes: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let terms = &p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
            let field = &terms["nodeSelectorTerms"][0]["matchFields"][0];
            assert_eq!(field["key"], "metadata.name", "{p}");
            field["values"][0].as_str().unwrap().to_string()
        })
        .collect();
    nodes.sort();
    nodes
}

/// flannel's bundle (kube-flannel.yml v0.20.2) and ours in one cluster, as
/// in the README's "Migrating from flannel, node by node": with
/// `deploy/flannel-avoid-flannel-rs-nodes.yml` patched into flannel's
/// DaemonSet, the real DaemonSet controller runs exactly one of the two on
/// each node, and the label `flannel-rs.io/enabled=true` moves a node (and
/// back). Then `kubectl delete -f deploy/kube-flannel-rs.yml` leaves every
/// object of flannel's.
#[test]
fn flannels_bundle_and_ours_split_the_nodes_by_label_and_deleting_ours_leaves_flannels() {
    if !ready() {
        return;
    }
    let Some(upstream) = e2e_tests::kube::upstream_manifest() else { return };
    let ko = KubeOverlay::new(1);
    ko.api.apply(&upstream);
    let nodes = ["node0", "node1", "node2"];
    for n in nodes {
        ko.api.create_node(n, None, &[]);
    }
    ko.api.kubectl_ok(&[&["label", "node"][..], &nodes, &["kubernetes.io/os=linux"]].concat());
    let patch = e2e_tests::kube::upstream_patch_path();
    let patch = patch.to_str().unwrap();
    ko.api.kubectl_ok(&["-n", "kube-flannel", "patch", "daemonset", "kube-flannel-ds", "--patch-file", patch]);
    let ds = ko.api.get_json(&["daemonset", "kube-flannel-ds", "-n", "kube-flannel"]);
    let terms =
        &ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(
        terms["nodeSelectorTerms"],
        json!([{"matchExpressions": [
            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            {"key": "flannel-rs.io/enabled", "operator": "NotIn", "values": ["true"]}
        ]}]),
        "flannel's DaemonSet after the patch"
    );

    let outside = ko.o.cluster.outside().unwrap();
    let _cm = ko.api.start_controller_manager(outside, "daemonset,serviceaccount-token");
    let split = |ours: &[&str], theirs: &[&str], what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = (
                daemon_pod_nodes(&ko, "kube-flannel-rs", "flannel-rs"),
                daemon_pod_nodes(&ko, "kube-flannel", "flannel"),
            );
            if got.0 == ours && got.1 == theirs {
                return;
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(ko.api.dir.join("controller-manager.log")).unwrap_or_default();
                let tail: Vec<String> = log.lines().rev().take(10).map(|l| l.chars().take(300).collect()).collect();
                panic!(
                    "{what}: pods of flannel-rs on {:?}, of flannel on {:?}; controller-manager:\n{tail:#?}",
                    got.0, got.1
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    split(&[], &nodes, "flannel on every node, flannel-rs on none");
    ko.api.kubectl_ok(&["label", "node", "node0", "flannel-rs.io/enabled=true"]);
    split(&["node0"], &["node1", "node2"], "node0 moved to flannel-rs");
    ko.api.kubectl_ok(&["label", "node", "node1", "flannel-rs.io/enabled=true"]);
    split(&["node0", "node1"], &["node2"], "node1 moved to flannel-rs");
    // Rolling node0 back: the label goes, flannel comes back.
    ko.api.kubectl_ok(&["label", "node", "node0", "flannel-rs.io/enabled-"]);
    split(&["node1"], &["node0", "node2"], "node0 back on flannel");

    let ours = e2e_tests::kube::manifest_path();
    ko.api.kubectl_ok(&["delete", "--wait=false", "-f", ours.to_str().unwrap()]);
    let gone = |what: &[&str]| !ko.api.kubectl(&[&["get"][..], what].concat()).status.success();
    assert!(gone(&["daemonset", "kube-flannel-rs-ds", "-n", "kube-flannel-rs"]));
    assert!(gone(&["clusterrole", "flannel-rs"]));
    for what in [
        &["namespace", "kube-flannel"][..],
        &["serviceaccount", "flannel", "-n", "kube-flannel"],
        &["configmap", "kube-flannel-cfg", "-n", "kube-flannel"],
        &["daemonset", "kube-flannel-ds", "-n", "kube-flannel"],
        &["clusterrole", "flannel"],
        &["clusterrolebinding", "flannel"],
    ] {
        let v = ko.api.get_json(what);
        assert!(v["metadata"]["deletionTimestamp"].is_null(), "flannel's {what:?} is being deleted: {v}");
    }
    // flannel's DaemonSet keeps its pods (on node0, where ours was, again; no
    // garbage collector runs here to remove our orphaned pod on node1).
    assert_eq!(daemon_pod_nodes(&ko, "kube-flannel", "flannel"), ["node0", "node2"]);
}
