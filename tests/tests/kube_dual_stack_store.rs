//! The Kubernetes lease store in a dual-stack network, against a real
//! kube-apiserver: Nodes with podCIDRs of both families (set through the
//! API, as kube-controller-manager sets them), flannel's IPv6 annotations
//! written and read byte for byte, and the errors for Nodes that do not fit.
//!
//! The store runs in this process (in node0's namespace, which reaches the
//! API server); one test in this file, because the store learns its node
//! from `NODE_NAME`.

use std::collections::BTreeMap;

use e2e_tests::kube::{require_kube, KubeOverlay, PREFIX};
use flannel_net::netns::NetNs;
use flanneld_rs::lease::{BackendType, LeaseAttrs, VxlanData};
use flanneld_rs::subnet::kube::{KubeOptions, KubeStore};
use flanneld_rs::subnet::LeaseStore;
use netns_fixtures::require_root;
use serde_json::json;

const DUAL_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#;

fn node(ko: &KubeOverlay, name: &str, cidrs: &[&str], annotations: &[(&str, &str)]) {
    let ann: serde_json::Map<String, serde_json::Value> =
        annotations.iter().map(|(k, v)| (format!("{PREFIX}/{k}"), json!(v))).collect();
    ko.api.apply(
        &json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "annotations": ann },
            "spec": { "podCIDR": cidrs[0], "podCIDRs": cidrs }
        })
        .to_string(),
    );
}

fn ours(ko: &KubeOverlay, node: &str) -> BTreeMap<String, String> {
    let n = ko.api.get_json(&["node", node]);
    let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    a.into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k[PREFIX.len() + 1..].to_string(), v.as_str().unwrap().to_string()))
        .collect()
}

fn attrs() -> LeaseAttrs {
    LeaseAttrs {
        public_ip: Some("192.0.2.10".parse().unwrap()),
        backend: BackendType::Vxlan,
        vxlan: Some(VxlanData { vni: 1, vtep_mac: "02:00:00:00:00:0a".parse().unwrap() }),
        public_ipv6: Some("2001:db8::a".parse().unwrap()),
        vxlan6: Some(VxlanData { vni: 1, vtep_mac: "02:00:00:00:06:0a".parse().unwrap() }),
        wireguard: None,
        wireguard6: None,
    }
}

#[test]
fn dual_stack_nodes_leases_and_annotations_are_flannels() {
    if !(require_root() && require_kube()) {
        return;
    }
    let mut ko = KubeOverlay::with_conf(1, DUAL_CONF);
    ko.api.enable_dual_stack(ko.o.outside());
    // Our node, with a user's public-ipv6-overwrite.
    node(&ko, "node0", &["10.244.1.0/24", "2001:db8:10:1::/64"], &[("public-ipv6-overwrite", "2001:db8:99::a")]);
    // A node running upstream flannel dual-stack, annotated as it annotates.
    node(
        &ko,
        "flannel-go",
        &["10.244.31.0/24", "2001:db8:10:1f::/64"],
        &[
            ("backend-data", r#"{"VNI":1,"VtepMAC":"6e:5c:3a:00:11:22"}"#),
            ("backend-type", "vxlan"),
            ("backend-v6-data", r#"{"VNI":1,"VtepMAC":"6e:5c:3a:00:11:66"}"#),
            ("kube-subnet-manager", "true"),
            ("public-ip", "192.0.2.31"),
            ("public-ipv6", "2001:db8::31"),
        ],
    );
    let managed = |ip: &str, ip6: &str| {
        vec![
            ("backend-data", r#"{"VNI":1,"VtepMAC":"6e:5c:3a:00:11:23"}"#.to_string()),
            ("backend-type", "vxlan".to_string()),
            ("kube-subnet-manager", "true".to_string()),
            ("public-ip", ip.to_string()),
            ("public-ipv6", ip6.to_string()),
        ]
    };
    let as_refs = |v: &[(&'static str, String)]| v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let outside = as_refs(&managed("192.0.2.32", "2001:db8::32"));
    let outside: Vec<(&str, &str)> = outside.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node(&ko, "outside6", &["10.244.32.0/24", "2001:db8:99:1::/64"], &outside);
    let ll = as_refs(&managed("192.0.2.33", "fe80::33"));
    let ll: Vec<(&str, &str)> = ll.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node(&ko, "linklocal", &["10.244.33.0/24", "2001:db8:10:21::/64"], &ll);
    node(&ko, "v4only", &["10.244.34.0/24"], &[]);
    node(&ko, "v6only", &["2001:db8:10:23::/64"], &[]);

    let opts = KubeOptions { kubeconfig: Some(ko.kubeconfig.clone()), prefix: PREFIX.into(), ..Default::default() };
    let net_conf = ko.net_conf.clone();
    let ns = NetNs::open(ko.o.cluster.node(0).ns.path()).unwrap();
    let (hints, lease, listing, v4only_err) = ns
        .run(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                std::env::set_var("NODE_NAME", "node0");
                let mut store = KubeStore::connect(&opts, net_conf.clone()).await.unwrap();
                let cfg = store.network_config().await.unwrap();
                let hints = store.hints(&cfg).await.unwrap();
                let lease = store.acquire(&cfg, &attrs(), None, None).await.unwrap();
                let listing = store.list(&cfg).await.unwrap();
                std::env::set_var("NODE_NAME", "v4only");
                let mut other = KubeStore::connect(&opts, net_conf.clone()).await.unwrap();
                let net_conf2 = net_conf;
                let e = other.acquire(&cfg, &attrs(), None, None).await.unwrap_err().to_string();
                std::env::set_var("NODE_NAME", "v6only");
                let mut v6only = KubeStore::connect(&opts, net_conf2).await.unwrap();
                let e6 = v6only.hints(&cfg).await.unwrap_err().to_string();
                (hints, lease, listing, format!("{e}\n{e6}"))
            })
        })
        .unwrap();

    // public-ipv6-overwrite is a hint: what the node advertises.
    assert_eq!(hints.advertise_ipv6, Some("2001:db8:99::a".parse().unwrap()));
    assert_eq!((hints.public_ipv6, hints.advertise), (None, None));
    // Our lease: both podCIDRs.
    assert_eq!(lease.subnet4().unwrap().to_string(), "10.244.1.0/24");
    assert_eq!(lease.subnet6().unwrap().to_string(), "2001:db8:10:1::/64");
    // Our annotations, byte for byte as flannel writes them.
    let a = ours(&ko, "node0");
    assert_eq!(a["backend-v6-data"], r#"{"VNI":1,"VtepMAC":"02:00:00:00:06:0a"}"#);
    assert_eq!(a["public-ipv6"], "2001:db8::a");
    assert_eq!(a["backend-data"], r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:0a"}"#);
    assert_eq!(a["public-ip"], "192.0.2.10");
    assert_eq!(a["public-ipv6-overwrite"], "2001:db8:99::a", "the user's annotation stays");
    // Upstream's node is read with its IPv6 half.
    let go = listing.leases.iter().find(|l| l.source == "node flannel-go").expect("flannel-go's lease");
    let go6 = go.ipv6.unwrap();
    assert_eq!(
        (go6.subnet.to_string(), go6.public_ip.unwrap().to_string(), go6.vxlan.unwrap().vtep_mac.to_string()),
        ("2001:db8:10:1f::/64".into(), "2001:db8::31".into(), "6e:5c:3a:00:11:66".into())
    );
    // The ones that do not fit are named with field and value.
    let u = listing.unusable.join("\n");
    assert!(
        u.contains("node outside6") && u.contains("2001:db8:99:1::/64 is outside IPv6Network 2001:db8:10::/56"),
        "{u}"
    );
    assert!(u.contains("node linklocal") && u.contains("public-ipv6 = fe80::33 is link-local"), "{u}");
    assert!(!listing.leases.iter().any(|l| l.source == "node outside6" || l.source == "node linklocal"));
    // A node with no IPv6 podCIDR cannot take a dual-stack lease.
    assert!(
        v4only_err.contains("node v4only")
            && v4only_err.contains("spec.podCIDRs")
            && v4only_err.contains("no IPv6 CIDR"),
        "{v4only_err}"
    );
    assert!(ours(&ko, "v4only").is_empty(), "nothing written on a node that cannot take the lease");
    // Only an IPv6 podCIDR: a clear error, not an endless wait.
    assert!(
        v4only_err.contains("node v6only: spec.podCIDRs has no IPv4 CIDR, only 2001:db8:10:23::/64"),
        "{v4only_err}"
    );
}
