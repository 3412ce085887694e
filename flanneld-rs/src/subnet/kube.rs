//! The Kubernetes subnet manager (`--kube-subnet-mgr`): the node's lease is
//! its `spec.podCIDR` (allocated by kube-controller-manager), the rest of the
//! lease is flannel's annotations on the Node (formats in `kube_annotations`),
//! and the lease set is every Node that carries them.
//!
//! A watch on all Nodes keeps a store of the few fields that matter (podCIDR
//! and our annotations); after every change that alters a lease it hands the
//! reconcile loop a full snapshot, exactly as the etcd manager does. When the
//! watch breaks or expires (410 Gone), kube-runtime's watcher lists again and
//! the store is replaced as a whole at the end of that list, so a Node deleted
//! while the watch was down disappears from the next snapshot.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use log::{info, warn};
use serde_json::json;

use super::kube_annotations::{self as ann, keys};
use crate::config::NetworkConfig;
use crate::lease::{Lease, LeaseAttrs, LeaseEvent};

/// How to reach the API server and which node we are.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// `--kube-api-url`: overrides the server of the kubeconfig or in-cluster configuration.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`.
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`.
    pub prefix: String,
}

/// What the store keeps of a Node: its lease, parsed once when the Node
/// changes (`Ok(None)` for Nodes that do not take part, `Err` with the message
/// for ones whose annotations do not parse).
type NodeLease = Result<Option<Lease>, String>;

fn view(node: &Node, prefix: &str, cfg: &NetworkConfig) -> Option<(String, NodeLease)> {
    let name = node.metadata.name.clone()?;
    let cidr = pod_cidr(node);
    let empty = BTreeMap::new();
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let lease = ann::lease_from_node(&name, cidr.as_deref(), annotations, prefix, cfg);
    Some((name, lease))
}

/// The node's IPv4 pod CIDR: `spec.podCIDR`, else the first IPv4 entry of
/// `spec.podCIDRs` (dual-stack clusters list both families there).
pub fn pod_cidr(node: &Node) -> Option<String> {
    let spec = node.spec.as_ref()?;
    let first_v4 = || spec.pod_cidrs.iter().flatten().find(|c| !c.contains(':')).cloned();
    spec.pod_cidr.clone().filter(|c| !c.is_empty() && !c.contains(':')).or_else(first_v4)
}

/// All annotations of a Node.
pub fn annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

/// The client configuration: `--kubeconfig-file`, else in-cluster (service
/// account), else `$KUBECONFIG`/`~/.kube/config`; `--kube-api-url` replaces
/// the server address of whichever was found (or is used alone, without
/// credentials, when none was).
pub async fn client_config(opts: &KubeOptions) -> anyhow::Result<Config> {
    let url = match &opts.api_url {
        Some(u) => Some(u.parse::<http::Uri>().map_err(|e| anyhow!("--kube-api-url {u:?}: {e}"))?),
        None => None,
    };
    let mut config = if let Some(path) = &opts.kubeconfig {
        let kc = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig-file {}", path.display()))?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("--kubeconfig-file {}", path.display()))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        Config::incluster().context("in-cluster configuration (service account token and KUBERNETES_SERVICE_HOST)")?
    } else if let Some(u) = &url {
        Config::new(u.clone())
    } else {
        Config::infer().await.context(
            "no Kubernetes API configuration: give --kubeconfig-file or --kube-api-url, or run in a pod with a \
             service account",
        )?
    };
    if let Some(u) = url {
        config.cluster_url = u;
    }
    // A watch that the server keeps open longer than this is idle anyway; a
    // dead connection must not hang the daemon forever.
    config.read_timeout = Some(Duration::from_secs(330));
    Ok(config)
}

/// Our node's name: `NODE_NAME`, else the node of the pod `POD_NAME` in
/// `POD_NAMESPACE` (flannel's order).
pub async fn node_name(client: &Client) -> anyhow::Result<String> {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        bail!("set NODE_NAME (the downward API's spec.nodeName), or POD_NAME and POD_NAMESPACE, to name this node");
    };
    let p = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pod)
        .await
        .with_context(|| format!("get pod {ns}/{pod} (POD_NAMESPACE/POD_NAME) to learn our node"))?;
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("pod {ns}/{pod} has no spec.nodeName yet"))
}

/// Parses a podCIDR that must lie inside the cluster network.
pub fn own_subnet(node: &str, cidr: &str, cfg: &NetworkConfig) -> anyhow::Result<Ipv4Net> {
    let subnet: Ipv4Net =
        cidr.parse().map_err(|_| anyhow!("node {node}: spec.podCIDR {cidr:?} is not an IPv4 CIDR"))?;
    if subnet != subnet.trunc() {
        bail!("node {node}: spec.podCIDR {cidr} has host bits set");
    }
    if !cfg.network.contains(&subnet) {
        bail!(
            "node {node}: spec.podCIDR {subnet} is not inside Network {} (net-conf.json); kube-controller-manager's \
             --cluster-cidr must match Network",
            cfg.network
        );
    }
    Ok(subnet)
}

/// The Kubernetes subnet manager of one node.
pub struct KubeSubnetManager {
    client: Client,
    nodes: Api<Node>,
    /// This node's name.
    pub node_name: String,
    prefix: String,
}

impl KubeSubnetManager {
    /// Connects and learns our node's name (no request to the server unless
    /// the name comes from our pod).
    pub async fn connect(opts: &KubeOptions) -> anyhow::Result<KubeSubnetManager> {
        let config = client_config(opts).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).with_context(|| format!("Kubernetes client for {server}"))?;
        let node_name = node_name(&client).await?;
        info!("Kubernetes API {server}, node {node_name}");
        Ok(KubeSubnetManager { nodes: Api::all(client.clone()), client, node_name, prefix: opts.prefix.clone() })
    }

    /// The API client (shared with the NetworkPolicy agent).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Our Node.
    pub async fn own_node(&self) -> anyhow::Result<Node> {
        self.nodes.get(&self.node_name).await.with_context(|| format!("get node {}", self.node_name))
    }

    /// Waits until our Node exists and has a podCIDR; says what it waits
    /// for every 30 seconds.
    pub async fn wait_for_pod_cidr(&self) -> anyhow::Result<(Node, String)> {
        let mut said = false;
        loop {
            match self.nodes.get_opt(&self.node_name).await {
                Ok(Some(n)) => {
                    if let Some(c) = pod_cidr(&n) {
                        return Ok((n, c));
                    }
                }
                Ok(None) => {}
                Err(e) => warn!("get node {}: {e}", self.node_name),
            }
            if !said {
                info!(
                    "waiting for node {} to exist and have spec.podCIDR (kube-controller-manager \
                     --allocate-node-cidrs, or set by hand)",
                    self.node_name
                );
                said = true;
            }
            let cond = |n: Option<&Node>| n.is_some_and(|n| pod_cidr(n).is_some());
            let waited = kube::runtime::wait::await_condition(self.nodes.clone(), &self.node_name, cond);
            if tokio::time::timeout(Duration::from_secs(30), waited).await.is_err() {
                said = false;
            }
        }
    }

    /// A user's `node-public-ip` or `public-ip-overwrite` on our Node.
    pub fn user_ip(&self, node: &Node, name: &str) -> anyhow::Result<Option<Ipv4Addr>> {
        ann::user_ip(&self.prefix, name, &annotations(node)).map_err(|e| anyhow!("node {}: {e}", self.node_name))
    }

    /// `node-public-ip` and `public-ip-overwrite` of our Node.
    pub fn user_ips(&self, node: &Node) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv4Addr>)> {
        Ok((self.user_ip(node, keys::NODE_PUBLIC_IP)?, self.user_ip(node, keys::PUBLIC_IP_OVERWRITE)?))
    }

    /// Writes our annotations on `nodes/status` when they differ from what
    /// the Node carries; returns whether it patched.
    pub async fn publish(&self, node: &Node, attrs: &LeaseAttrs) -> anyhow::Result<bool> {
        let want = ann::own_annotations(&self.prefix, attrs, None);
        let have = annotations(node);
        if want.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return Ok(false);
        }
        let patch = json!({ "metadata": { "annotations": want } });
        self.nodes
            .patch_status(&self.node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patch node {} (nodes/status) with our annotations", self.node_name))?;
        Ok(true)
    }

    /// Sets the Node's `NetworkUnavailable` condition to False.
    pub async fn set_network_available(&self) -> anyhow::Result<()> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({ "status": { "conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "flanneld-rs is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.nodes
            .patch_status(&self.node_name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .with_context(|| format!("set condition NetworkUnavailable=False on node {}", self.node_name))?;
        Ok(())
    }

    /// Every Node's lease, and a message for each Node whose lease does not
    /// parse.
    pub async fn list_leases(&self, cfg: &NetworkConfig) -> anyhow::Result<(Vec<Lease>, Vec<String>)> {
        let list = self.nodes.list(&Default::default()).await.context("list nodes")?;
        let store: BTreeMap<String, NodeLease> = list.items.iter().filter_map(|n| view(n, &self.prefix, cfg)).collect();
        Ok(leases_of(&store))
    }

    /// Watches all Nodes and sends a full lease snapshot whenever the lease
    /// set changes (and once after every complete list).
    pub fn spawn_watcher(
        &self,
        cfg: NetworkConfig,
        tx: tokio::sync::mpsc::Sender<LeaseEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let api = self.nodes.clone();
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            let mut store: BTreeMap<String, NodeLease> = BTreeMap::new();
            let mut listing: Option<BTreeMap<String, NodeLease>> = None;
            let mut last: Option<Vec<Lease>> = None;
            let mut reported: Vec<String> = Vec::new();
            let stream = watcher::watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let changed = match ev {
                    Err(e) => {
                        warn!("watch nodes: {e}; the watch restarts (and lists again if it must)");
                        false
                    }
                    Ok(Event::Init) => {
                        listing = Some(BTreeMap::new());
                        false
                    }
                    Ok(Event::InitApply(n)) => {
                        if let (Some(l), Some((k, v))) = (listing.as_mut(), view(&n, &prefix, &cfg)) {
                            l.insert(k, v);
                        }
                        false
                    }
                    Ok(Event::InitDone) => {
                        store = listing.take().unwrap_or_default();
                        // After a relist, always hand over a snapshot.
                        last = None;
                        true
                    }
                    Ok(Event::Apply(n)) => match view(&n, &prefix, &cfg) {
                        Some((k, v)) => store.insert(k, v.clone()) != Some(v),
                        None => false,
                    },
                    Ok(Event::Delete(n)) => n.metadata.name.is_some_and(|k| store.remove(&k).is_some()),
                };
                if !changed {
                    continue;
                }
                let (leases, errors) = leases_of(&store);
                for e in errors.iter().filter(|e| !reported.contains(e)) {
                    warn!("lease not usable: {e}");
                }
                reported = errors;
                if last.as_ref() != Some(&leases) {
                    last = Some(leases.clone());
                    if tx.send(LeaseEvent::Snapshot(leases)).await.is_err() {
                        return;
                    }
                }
            }
        })
    }
}

/// Retry delays after a watch error: 0.2 s doubling up to 5 s, back to
/// 0.2 s once a watch works again. kube-runtime's default climbs to 30 s,
/// which after an API server restart would leave peers' changes unseen for
/// that long; one list and watch every 5 s is cheap for the server.
#[derive(Debug)]
struct WatchBackoff(Duration);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff(Duration::from_millis(200))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (d * 2).min(Duration::from_secs(5));
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = WatchBackoff::default();
    }
}

/// The leases of a store of Nodes, sorted by subnet, and the parse errors.
fn leases_of(store: &BTreeMap<String, NodeLease>) -> (Vec<Lease>, Vec<String>) {
    let mut leases = Vec::new();
    let mut errors = Vec::new();
    for lease in store.values() {
        match lease {
            Ok(Some(l)) => leases.push(l.clone()),
            Ok(None) => {}
            Err(e) => errors.push(e.clone()),
        }
    }
    leases.sort_by_key(|l| (l.subnet, l.public_ip));
    (leases, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;

    fn node(name: &str, cidr: Option<&str>, cidrs: &[&str], ann: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(str::to_string),
                pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, "net-conf.json").unwrap()
    }

    #[test]
    fn pod_cidr_prefers_the_ipv4_one() {
        assert_eq!(pod_cidr(&node("a", Some("10.244.1.0/24"), &[], &[])).as_deref(), Some("10.244.1.0/24"));
        let dual = node("a", Some("fd00:1::/64"), &["fd00:1::/64", "10.244.2.0/24"], &[]);
        assert_eq!(pod_cidr(&dual).as_deref(), Some("10.244.2.0/24"));
        assert_eq!(pod_cidr(&node("a", Some(""), &[], &[])), None);
    }

    #[test]
    fn own_subnet_must_lie_inside_network() {
        assert_eq!(own_subnet("n", "10.244.3.0/24", &cfg()).unwrap().to_string(), "10.244.3.0/24");
        let e = own_subnet("n", "10.9.0.0/24", &cfg()).unwrap_err().to_string();
        assert!(e.contains("node n") && e.contains("10.9.0.0/24") && e.contains("10.244.0.0/16"), "{e}");
        assert!(own_subnet("n", "10.244.3.1/24", &cfg()).unwrap_err().to_string().contains("host bits"));
        assert!(own_subnet("n", "x", &cfg()).unwrap_err().to_string().contains("\"x\""));
    }

    #[test]
    fn the_store_keeps_leases_parsed_once_and_yields_them_sorted() {
        let good = [
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/backend-data", r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}"#),
            ("flannel.alpha.coreos.com/public-ip", "192.0.2.11"),
            ("node.alpha.kubernetes.io/ttl", "0"),
        ];
        let p = ann::DEFAULT_PREFIX;
        let (k, v) = view(&node("b", Some("10.244.2.0/24"), &[], &good), p, &cfg()).unwrap();
        assert_eq!(k, "b");
        // Annotations of others do not make a Node differ.
        let mut other = good;
        other[4].1 = "30";
        assert_eq!(view(&node("b", Some("10.244.2.0/24"), &[], &other), p, &cfg()).unwrap().1, v);
        let mut store = BTreeMap::from([(k, v)]);
        let mut a = good;
        a[3].1 = "192.0.2.10";
        store.insert("a".into(), view(&node("a", Some("10.244.1.0/24"), &[], &a), p, &cfg()).unwrap().1);
        let mut bad = good;
        bad[2].1 = "{";
        store.insert("c".into(), view(&node("c", Some("10.244.5.0/24"), &[], &bad), p, &cfg()).unwrap().1);
        store.insert("d".into(), view(&node("d", Some("10.244.6.0/24"), &[], &[]), p, &cfg()).unwrap().1);
        let (leases, errors) = leases_of(&store);
        let subnets: Vec<String> = leases.iter().map(|l| l.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.1.0/24", "10.244.2.0/24"]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("node c") && errors[0].contains("backend-data"), "{errors:?}");
    }
}
