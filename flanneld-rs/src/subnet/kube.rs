//! The Kubernetes subnet manager (`--kube-subnet-mgr`): the node's lease is
//! its `spec.podCIDR` (allocated by kube-controller-manager), the rest of the
//! lease is flannel's annotations on the Node (formats in `kube_annotations`),
//! and the lease set is every Node that carries them.
//!
//! A watch on all Nodes keeps a store of the few fields that matter (podCIDR
//! and our annotations), parsed once per Node change; after every change that
//! alters a lease it hands the reconcile loop a full snapshot, exactly as the
//! etcd manager does. When the watch breaks or expires (410 Gone),
//! kube-runtime's watcher lists again and the store is replaced as a whole at
//! the end of that list, so a Node deleted while the watch was down
//! disappears from the next snapshot.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use log::{debug, info, warn};
use serde_json::json;
use tokio::sync::mpsc;

use super::kube_annotations::{self as ann, keys};
use super::{Backoff, StoreError, Waiter};
use crate::config::NetworkConfig;
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseSet};

/// How long the API server keeps one of our watches open
/// (`timeoutSeconds`) before we watch again; below [`READ_TIMEOUT`].
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a response may stay silent before its connection counts as dead.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The watch settings of every watch the daemon keeps (Nodes here, and the
/// NetworkPolicy agent's): the server ends each within [`WATCH_TIMEOUT`].
/// Lists are kube-rs's: pages of 500 read through from etcd. flannel's
/// informers list with `resourceVersion=0` and no limit, which the API
/// server answers from its watch cache in one piece; at 10,000 Nodes that
/// answer was no faster here (321 ms against 263 ms for the 20 pages) and
/// holding the whole list at once raised the daemon's resident size from
/// 33.5 to 39.6 MB (README, "Kubernetes mode at 10,000 nodes").
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT.as_secs() as u32)
}

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

/// A Node as the Node watch reads it: its name, resource version,
/// annotations and pod CIDRs. The rest (managed fields, labels, status with
/// its images and conditions) is skipped while parsing instead of being built
/// and dropped for every Node of every list.
#[derive(Clone, Debug)]
pub struct PeerNode(pub Node);

impl<'de> serde::Deserialize<'de> for PeerNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PeerNode, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            resource_version: Option<String>,
            annotations: Option<BTreeMap<String, String>>,
        }
        #[derive(serde::Deserialize)]
        struct Spec {
            #[serde(rename = "podCIDR")]
            pod_cidr: Option<String>,
            #[serde(rename = "podCIDRs")]
            pod_cidrs: Option<Vec<String>>,
        }
        #[derive(serde::Deserialize)]
        struct Slim {
            metadata: Option<Meta>,
            spec: Option<Spec>,
        }
        let slim = Slim::deserialize(d)?;
        let meta = slim.metadata.map(|m| kube::api::ObjectMeta {
            name: m.name,
            resource_version: m.resource_version,
            annotations: m.annotations,
            ..Default::default()
        });
        let spec = slim.spec.map(|s| k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: s.pod_cidr,
            pod_cidrs: s.pod_cidrs,
            ..Default::default()
        });
        Ok(PeerNode(Node { metadata: meta.unwrap_or_default(), spec, status: None }))
    }
}

impl kube::Resource for PeerNode {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Node::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Node::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Node::version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Node::plural(dt)
    }

    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.0.metadata
    }
}

fn view(node: &Node, prefix: &ann::Prefix, cfg: &NetworkConfig) -> Option<(String, NodeLease)> {
    let name = node.metadata.name.clone()?;
    let cidr = pod_cidr(node);
    let cidr6 = pod_cidr6(node);
    let empty = BTreeMap::new();
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let lease = ann::lease_from_node(&name, cidr.as_deref(), cidr6.as_deref(), annotations, prefix, cfg);
    Some((name, lease))
}

/// The node's IPv4 pod CIDR: `spec.podCIDR`, else the first IPv4 entry of
/// `spec.podCIDRs` (dual-stack clusters list both families there).
pub fn pod_cidr(node: &Node) -> Option<String> {
    let spec = node.spec.as_ref()?;
    let first_v4 = || spec.pod_cidrs.iter().flatten().find(|c| !c.contains(':')).cloned();
    spec.pod_cidr.clone().filter(|c| !c.is_empty() && !c.contains(':')).or_else(first_v4)
}

/// The node's IPv6 pod CIDR (dual-stack): the first IPv6 entry of
/// `spec.podCIDRs`, else `spec.podCIDR` when it is IPv6 (flannel reads
/// `spec.podCIDR` alone only when `spec.podCIDRs` is empty).
pub fn pod_cidr6(node: &Node) -> Option<String> {
    let spec = node.spec.as_ref()?;
    let first_v6 = spec.pod_cidrs.iter().flatten().find(|c| c.contains(':')).cloned();
    first_v6.or_else(|| spec.pod_cidr.clone().filter(|c| c.contains(':')))
}

/// Our Node's IPv6 subnet when the configuration has `EnableIPv6`: the
/// error names the node and the field when it has none or a bad one.
pub fn own_subnet6(node: &Node, name: &str, cfg: &NetworkConfig) -> Result<Option<ipnet::Ipv6Net>, StoreError> {
    let Some(c6) = &cfg.ipv6 else { return Ok(None) };
    let Some(cidr) = pod_cidr6(node) else {
        let have = node.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        return Err(StoreError::Invalid(format!(
            "node {name}: spec.podCIDRs {have:?} has no IPv6 CIDR, and net-conf.json has EnableIPv6 (IPv6Network {}): \
             kube-controller-manager must allocate both families (--cluster-cidr=<IPv4>,<IPv6> with dual-stack on)",
            c6.network
        )));
    };
    ann::subnet6_of(name, &cidr, c6.network).map(Some).map_err(StoreError::Invalid)
}

/// All annotations of a Node.
pub fn annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

/// An error and its causes, `: ` between them (the Kubernetes client's
/// errors say little without their sources).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn invalid(what: impl std::fmt::Display) -> impl FnOnce(&(dyn std::error::Error + 'static)) -> StoreError {
    move |e| StoreError::Invalid(format!("{what}: {}", chain(e)))
}

/// A failed API request, naming what it did.
fn api(op: impl Into<String>) -> impl FnOnce(kube::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Kube { op, source }
}

/// The client configuration: `--kubeconfig-file`, else in-cluster (service
/// account), else `$KUBECONFIG`/`~/.kube/config`; `--kube-api-url` replaces
/// the server address of whichever was found (or is used alone, without
/// credentials, when none was).
pub async fn client_config(opts: &KubeOptions) -> Result<Config, StoreError> {
    let url = match &opts.api_url {
        Some(u) => Some(u.parse::<http::Uri>().map_err(|e| StoreError::Invalid(format!("--kube-api-url {u:?}: {e}")))?),
        None => None,
    };
    let mut config = if let Some(path) = &opts.kubeconfig {
        let what = format!("--kubeconfig-file {}", path.display());
        let kc = Kubeconfig::read_from(path).map_err(|e| invalid(&what)(&e))?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| invalid(&what)(&e))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        Config::incluster()
            .map_err(|e| invalid("in-cluster configuration (service account token and KUBERNETES_SERVICE_HOST)")(&e))?
    } else if let Some(u) = &url {
        Config::new(u.clone())
    } else {
        Config::infer().await.map_err(|e| {
            invalid(
                "no Kubernetes API configuration: give --kubeconfig-file or --kube-api-url, or run in a pod with a \
                 service account",
            )(&e)
        })?
    };
    if let Some(u) = url {
        config.cluster_url = u;
    }
    // A connection that went dead (a partition, a server restarted meanwhile)
    // sends no FIN and no RST: without this, a watch on it would wait for
    // TCP's retransmissions to give up, minutes. Watches end on the server's
    // side within WATCH_TIMEOUT, so an answer idle for longer is dead.
    config.read_timeout = Some(READ_TIMEOUT);
    Ok(config)
}

/// Our node's name: `NODE_NAME`, else the node of the pod `POD_NAME` in
/// `POD_NAMESPACE` (flannel's order).
pub async fn node_name(client: &Client) -> Result<String, StoreError> {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        return Err(StoreError::Invalid(
            "set NODE_NAME (the downward API's spec.nodeName), or POD_NAME and POD_NAMESPACE, to name this node".into(),
        ));
    };
    let p = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pod)
        .await
        .map_err(api(format!("get pod {ns}/{pod} (POD_NAMESPACE/POD_NAME) to learn our node")))?;
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| StoreError::Invalid(format!("pod {ns}/{pod} has no spec.nodeName yet")))
}

/// Our Node's IPv4 subnet when the configuration runs IPv4 (`None` in an
/// IPv6-only cluster): `cidr` (its IPv4 podCIDR) must lie inside `Network`;
/// the error names the node and the field.
pub fn own_subnet(node: &str, cidr: Option<&str>, cfg: &NetworkConfig) -> Result<Option<Ipv4Net>, StoreError> {
    let Some(c4) = &cfg.ipv4 else { return Ok(None) };
    let bad = |msg: String| StoreError::Invalid(format!("node {node}: {msg}"));
    let Some(cidr) = cidr else {
        return Err(bad(format!(
            "spec.podCIDR(s) has no IPv4 CIDR, and net-conf.json's Network is {}: kube-controller-manager's \
             --cluster-cidr must hold an IPv4 range (or set EnableIPv4 false for an IPv6-only cluster)",
            c4.network
        )));
    };
    let subnet: Ipv4Net = cidr.parse().map_err(|_| bad(format!("spec.podCIDR {cidr:?} is not an IPv4 CIDR")))?;
    if subnet != subnet.trunc() {
        return Err(bad(format!("spec.podCIDR {cidr} has host bits set")));
    }
    if !c4.network.contains(&subnet) {
        return Err(bad(format!(
            "spec.podCIDR {subnet} is not inside Network {} (net-conf.json); kube-controller-manager's \
             --cluster-cidr must match Network",
            c4.network
        )));
    }
    Ok(Some(subnet))
}

/// Whether `node` has the podCIDRs the configuration needs to lease from:
/// an IPv4 one, or in an IPv6-only cluster an IPv6 one (a dual-stack
/// cluster's missing IPv6 one is an error when the lease is taken, as
/// flannel's: kube-controller-manager gives both at once).
fn has_pod_cidr(node: &Node, cfg: &NetworkConfig) -> bool {
    if cfg.ipv4.is_some() {
        pod_cidr(node).is_some()
    } else {
        pod_cidr6(node).is_some()
    }
}

/// The Kubernetes subnet manager of one node.
pub struct KubeSubnetManager {
    client: Client,
    nodes: Api<Node>,
    /// This node's name.
    pub node_name: String,
    prefix: ann::Prefix,
    server: String,
}

impl KubeSubnetManager {
    /// Connects and learns our node's name (no request to the server unless
    /// the name comes from our pod).
    pub async fn connect(opts: &KubeOptions) -> Result<KubeSubnetManager, StoreError> {
        let prefix = ann::Prefix::new(&opts.prefix).map_err(StoreError::Invalid)?;
        let config = client_config(opts).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(api(format!("Kubernetes client for {server}")))?;
        let node_name = node_name(&client).await?;
        info!("Kubernetes API {server}, node {node_name}");
        Ok(KubeSubnetManager { nodes: Api::all(client.clone()), client, node_name, prefix, server })
    }

    /// The API client (shared with the NetworkPolicy agent).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Our Node.
    pub async fn own_node(&self) -> Result<Node, StoreError> {
        self.nodes.get(&self.node_name).await.map_err(api(format!("get node {}", self.node_name)))
    }

    /// Waits until our Node exists and has the podCIDR `cfg` needs (see
    /// [`has_pod_cidr`]); says what it waits for every 30 seconds. While
    /// the API server does not answer, the requests are tried again with
    /// the [`Backoff`] (see [`Waiter`]).
    pub async fn wait_for_pod_cidr(&self, cfg: &NetworkConfig) -> Result<Node, StoreError> {
        let mut said = false;
        let what = format!("node {} from the Kubernetes API server {}", self.node_name, self.server);
        let family = if cfg.ipv4.is_some() { "an IPv4" } else { "an IPv6" };
        // An API server that refuses connections fails both requests at
        // once: without a pause between tries this loop would spin.
        let mut waiter = Waiter::new(what.clone());
        loop {
            match self.nodes.get_opt(&self.node_name).await {
                Ok(Some(n)) => {
                    if has_pod_cidr(&n, cfg) {
                        waiter.done();
                        return Ok(n);
                    }
                    if let (Some(c4), None, Some(c6)) = (&cfg.ipv4, pod_cidr(&n), pod_cidr6(&n)) {
                        // Only an IPv6 podCIDR: waiting would never end.
                        return Err(StoreError::Invalid(format!(
                            "node {}: spec.podCIDRs has no IPv4 CIDR, only {c6}, and net-conf.json's Network is \
                             {}: kube-controller-manager's --cluster-cidr must hold an IPv4 range (or set \
                             EnableIPv4 false for an IPv6-only cluster)",
                            self.node_name, c4.network
                        )));
                    }
                    if let (None, Some(c4)) = (&cfg.ipv4, pod_cidr(&n)) {
                        // IPv6-only configuration, IPv4-only node: the same.
                        return Err(StoreError::Invalid(format!(
                            "node {}: spec.podCIDRs has no IPv6 CIDR, only {c4}, and net-conf.json has EnableIPv4 \
                             false (IPv6-only): kube-controller-manager's --cluster-cidr must hold an IPv6 range",
                            self.node_name
                        )));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    waiter.failed(&api(format!("get node {}", self.node_name))(e)).await;
                    continue;
                }
            }
            waiter.done();
            waiter = Waiter::new(what.clone());
            if !said {
                info!(
                    "waiting for node {} to exist and have {family} spec.podCIDR (kube-controller-manager \
                     --allocate-node-cidrs, or set by hand)",
                    self.node_name
                );
                said = true;
            }
            let cond = |n: Option<&Node>| n.is_some_and(|n| has_pod_cidr(n, cfg));
            let waited = kube::runtime::wait::await_condition(self.nodes.clone(), &self.node_name, cond);
            match tokio::time::timeout(Duration::from_secs(30), waited).await {
                // Say again what we wait for.
                Err(_) => said = false,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let e = StoreError::Invalid(format!("watch node {}: {e}", self.node_name));
                    waiter.failed(&e).await;
                }
            }
        }
    }

    /// A user's `node-public-ip` or `public-ip-overwrite` on our Node.
    pub fn user_ip(&self, node: &Node, name: &str) -> Result<Option<Ipv4Addr>, StoreError> {
        ann::user_ip(&self.prefix, name, &annotations(node))
            .map_err(|e| StoreError::Invalid(format!("node {}: {e}", self.node_name)))
    }

    /// `node-public-ip` and `public-ip-overwrite` of our Node.
    pub fn user_ips(&self, node: &Node) -> Result<(Option<Ipv4Addr>, Option<Ipv4Addr>), StoreError> {
        Ok((self.user_ip(node, keys::NODE_PUBLIC_IP)?, self.user_ip(node, keys::PUBLIC_IP_OVERWRITE)?))
    }

    /// `node-public-ipv6` and `public-ipv6-overwrite` of our Node.
    pub fn user_ipv6s(&self, node: &Node) -> Result<(Option<Ipv6Addr>, Option<Ipv6Addr>), StoreError> {
        let get = |name: &str| {
            ann::user_ipv6(&self.prefix, name, &annotations(node))
                .map_err(|e| StoreError::Invalid(format!("node {}: {e}", self.node_name)))
        };
        Ok((get(keys::NODE_PUBLIC_IPV6)?, get(keys::PUBLIC_IPV6_OVERWRITE)?))
    }

    /// Writes our annotations on `nodes/status` when they differ from what
    /// the Node carries; returns whether it patched.
    pub async fn publish(&self, node: &Node, attrs: &LeaseAttrs) -> Result<bool, StoreError> {
        let want = ann::own_annotations(&self.prefix, attrs, None);
        let have = annotations(node);
        if want.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return Ok(false);
        }
        let patch = json!({ "metadata": { "annotations": want } });
        self.nodes
            .patch_status(&self.node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api(format!("patch node {} (nodes/status) with our annotations", self.node_name)))?;
        Ok(true)
    }

    /// Sets the Node's `NetworkUnavailable` condition to False, in flannel's
    /// exact words (reason `FlannelIsUp`, message "Flannel is running on this
    /// node"), which tools watching Nodes may match.
    pub async fn set_network_available(&self) -> Result<(), StoreError> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({ "status": { "conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.nodes
            .patch_status(&self.node_name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(api(format!("set condition NetworkUnavailable=False on node {}", self.node_name)))?;
        Ok(())
    }

    /// Every Node's lease, and a message for each Node whose lease does not
    /// parse.
    pub async fn list_leases(&self, cfg: &NetworkConfig) -> Result<(Vec<Lease>, Vec<String>), StoreError> {
        let list = self.nodes.list(&Default::default()).await.map_err(api("list nodes"))?;
        let store: BTreeMap<String, NodeLease> = list.items.iter().filter_map(|n| view(n, &self.prefix, cfg)).collect();
        Ok(leases_of(&store))
    }

    /// Watches all Nodes and sends a full lease snapshot whenever the lease
    /// set changes (and once after every complete list).
    pub fn spawn_watcher(&self, cfg: NetworkConfig, tx: mpsc::Sender<LeaseEvent>) -> tokio::task::JoinHandle<()> {
        let api: Api<PeerNode> = Api::all(self.client.clone());
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            let mut watch = NodeWatch::default();
            let mut listing: Option<BTreeMap<String, NodeLease>> = None;
            // When the current list was asked for, and when its first Node came.
            let mut listed: Option<(Instant, Option<Duration>)> = None;
            let stream = watcher::watcher(api, watch_config()).backoff(Backoff::default());
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let changed = match ev {
                    Err(e) => {
                        warn!("watch nodes: {e}; the watch restarts (and lists again if it must)");
                        false
                    }
                    Ok(Event::Init) => {
                        listing = Some(BTreeMap::new());
                        listed = Some((Instant::now(), None));
                        false
                    }
                    Ok(Event::InitApply(n)) => {
                        if let Some((t, first @ None)) = listed.as_mut() {
                            *first = Some(t.elapsed());
                        }
                        if let (Some(l), Some((k, v))) = (listing.as_mut(), view(&n.0, &prefix, &cfg)) {
                            l.insert(k, v);
                        }
                        false
                    }
                    Ok(Event::InitDone) => {
                        if let Some((t, first)) = listed.take() {
                            let n = listing.as_ref().map_or(0, BTreeMap::len);
                            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                            let first = first.map_or(String::new(), |f| format!(", the first after {:.1} ms", ms(f)));
                            debug!("node watch: listed {n} Nodes in {:.1} ms{first}", ms(t.elapsed()));
                        }
                        watch.replace(listing.take().unwrap_or_default());
                        // After a relist, always hand over a snapshot.
                        true
                    }
                    Ok(Event::Apply(n)) => match view(&n.0, &prefix, &cfg) {
                        Some((k, v)) => watch.apply(k, v),
                        None => false,
                    },
                    Ok(Event::Delete(n)) => n.0.metadata.name.is_some_and(|k| watch.delete(&k)),
                };
                if changed && !super::send_snapshot(&tx, &watch.leases).await {
                    return;
                }
            }
        })
    }
}

/// The watcher's state: each Node's parsed lease, and the lease set they
/// make, both updated per event in O(log n).
#[derive(Default)]
struct NodeWatch {
    nodes: BTreeMap<String, NodeLease>,
    leases: LeaseSet,
}

impl NodeWatch {
    /// A Node added or changed; whether the lease set changed.
    fn apply(&mut self, name: String, lease: NodeLease) -> bool {
        if self.nodes.get(&name) == Some(&lease) {
            return false;
        }
        if let Err(e) = &lease {
            warn!("lease not usable: {e}");
        }
        let changed = match &lease {
            Ok(Some(l)) => self.leases.upsert(&name, l.clone()),
            _ => self.leases.remove(&name),
        };
        self.nodes.insert(name, lease);
        changed
    }

    /// A Node deleted; whether the lease set changed.
    fn delete(&mut self, name: &str) -> bool {
        self.nodes.remove(name);
        self.leases.remove(name)
    }

    /// The store replaced after a complete list.
    fn replace(&mut self, nodes: BTreeMap<String, NodeLease>) {
        for (name, lease) in &nodes {
            if let Err(e) = lease {
                if self.nodes.get(name) != Some(lease) {
                    warn!("lease not usable: {e}");
                }
            }
        }
        self.leases = nodes
            .iter()
            .filter_map(|(name, l)| match l {
                Ok(Some(l)) => Some((name, l)),
                _ => None,
            })
            .fold(LeaseSet::new(), |mut set, (name, l)| {
                set.upsert(name, l.clone());
                set
            });
        self.nodes = nodes;
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
    leases.sort_by_key(|l| (l.subnet4(), l.subnet6(), l.public_ip4()));
    (leases, errors)
}

/// The Kubernetes store as the daemon uses it: the manager, our Node as
/// last read, and our subnet once taken.
pub struct KubeStore {
    mgr: KubeSubnetManager,
    /// The network configuration, read from `--net-config-path` first
    /// (before the API server is asked anything, as flannel does).
    cfg: NetworkConfig,
    /// Whether to wait for our Node to have a podCIDR (the daemon does;
    /// `diagnose` reports what it finds instead).
    wait: bool,
    node: Option<Node>,
}

impl KubeStore {
    /// Connects (see [`KubeSubnetManager::connect`]); the network
    /// configuration comes from `net_config_path` (`--net-config-path`).
    pub async fn connect(opts: &KubeOptions, net_config_path: PathBuf) -> Result<KubeStore, StoreError> {
        let cfg = read_net_conf(&net_config_path)?;
        let mgr = KubeSubnetManager::connect(opts).await?;
        Ok(KubeStore { mgr, cfg, wait: true, node: None })
    }

    /// Does not wait for our Node's podCIDR (for `diagnose`).
    pub fn without_waiting(mut self) -> KubeStore {
        self.wait = false;
        self
    }

    /// Our Node: waited for once until it has its podCIDR (unless
    /// [`KubeStore::without_waiting`]), then as read.
    async fn own_node(&mut self) -> Result<Node, StoreError> {
        if self.node.is_none() {
            self.node = Some(if self.wait {
                self.mgr.wait_for_pod_cidr(&self.cfg).await?
            } else {
                self.mgr.own_node().await?
            });
        }
        Ok(self.node.clone().expect("set above"))
    }
}

/// Kubernetes mode's network configuration: the file `--net-config-path`.
pub fn read_net_conf(path: &std::path::Path) -> Result<NetworkConfig, StoreError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::Invalid(format!("read --net-config-path {}: {e}", path.display())))?;
    Ok(NetworkConfig::parse(&text, &path.display().to_string())?)
}

impl super::LeaseStore for KubeStore {
    fn describe(&self) -> String {
        format!("Kubernetes API {}, node {}", self.mgr.server, self.mgr.node_name)
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, StoreError> {
        Ok(self.cfg.clone())
    }

    async fn hints(&mut self, cfg: &NetworkConfig) -> Result<super::NodeHints, StoreError> {
        let node = self.own_node().await?;
        let (public_ip, advertise) = self.mgr.user_ips(&node)?;
        if let Some(ip) = public_ip {
            info!("node {}: using node-public-ip {ip}", self.mgr.node_name);
        }
        if let Some(ip) = advertise {
            info!("node {}: advertising public-ip-overwrite {ip}", self.mgr.node_name);
        }
        let (public_ipv6, advertise_ipv6) = self.mgr.user_ipv6s(&node)?;
        if cfg.ipv6.is_some() {
            if let Some(ip) = public_ipv6 {
                info!("node {}: using node-public-ipv6 {ip}", self.mgr.node_name);
            }
            if let Some(ip) = advertise_ipv6 {
                info!("node {}: advertising public-ipv6-overwrite {ip}", self.mgr.node_name);
            }
        } else if public_ipv6.is_some() || advertise_ipv6.is_some() {
            warn!(
                "node {}: node-public-ipv6/public-ipv6-overwrite have no effect: the network is IPv4 only (net-conf \
                 EnableIPv6 is not set)",
                self.mgr.node_name
            );
        }
        Ok(super::NodeHints { public_ip, advertise, public_ipv6, advertise_ipv6 })
    }

    async fn advertised_macs(
        &mut self,
        cfg: &NetworkConfig,
        _public_ip: Option<Ipv4Addr>,
    ) -> Result<super::VtepMacs, StoreError> {
        let node = self.own_node().await?;
        let (cidr, cidr6) = (pod_cidr(&node), pod_cidr6(&node));
        let lease = ann::lease_from_node(
            &self.mgr.node_name,
            cidr.as_deref(),
            cidr6.as_deref(),
            &annotations(&node),
            &self.mgr.prefix,
            cfg,
        );
        Ok(lease.ok().flatten().map(|l| super::VtepMacs::of(&l)).unwrap_or_default())
    }

    async fn acquire(
        &mut self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        _previous: Option<Ipv4Net>,
        _previous6: Option<ipnet::Ipv6Net>,
    ) -> Result<Lease, StoreError> {
        let node = self.own_node().await?;
        let subnet = own_subnet(&self.mgr.node_name, pod_cidr(&node).as_deref(), cfg)?;
        let subnet6 = own_subnet6(&node, &self.mgr.node_name, cfg)?;
        if self.mgr.publish(&node, attrs).await? {
            info!("node {}: annotations written (nodes/status)", self.mgr.node_name);
        }
        Ok(attrs.lease(subnet, subnet6, format!("node {}", self.mgr.node_name)))
    }

    async fn publish(&mut self, cfg: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Lease, StoreError> {
        let node = self.mgr.own_node().await?;
        let subnet = own_subnet(&self.mgr.node_name, pod_cidr(&node).as_deref(), cfg)?;
        let subnet6 = own_subnet6(&node, &self.mgr.node_name, cfg)?;
        if self.mgr.publish(&node, attrs).await? {
            info!("node {}: annotations updated (nodes/status)", self.mgr.node_name);
        }
        self.node = Some(node);
        Ok(attrs.lease(subnet, subnet6, format!("node {}", self.mgr.node_name)))
    }

    fn watch(&mut self, cfg: &NetworkConfig) -> mpsc::Receiver<LeaseEvent> {
        let (tx, rx) = super::channel();
        // The task ends when the receiver is dropped.
        drop(self.mgr.spawn_watcher(cfg.clone(), tx));
        rx
    }

    fn renew_at(&self, _margin: Duration) -> Option<SystemTime> {
        // The podCIDR is the Node's for as long as the Node exists.
        None
    }

    async fn renew(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn node_ready(&mut self, set_unavailable: bool) -> Result<(), StoreError> {
        if set_unavailable {
            self.mgr.set_network_available().await?;
        }
        Ok(())
    }

    async fn list(&mut self, cfg: &NetworkConfig) -> Result<super::Listing, StoreError> {
        let (leases, unusable) = self.mgr.list_leases(cfg).await?;
        Ok(super::Listing { leases, unusable })
    }

    fn own<'a>(&self, leases: &'a [Lease], _public_ip: Option<Ipv4Addr>) -> Option<&'a Lease> {
        let me = format!("node {}", self.mgr.node_name);
        leases.iter().find(|l| l.source == me)
    }

    fn own_missing(&self, _public_ip: Option<Ipv4Addr>) -> (String, String) {
        (
            format!("node {} has no podCIDR or no flannel annotations ({}*)", self.mgr.node_name, self.mgr.prefix),
            "start flanneld-rs on this node (it writes them once the node has a podCIDR)".into(),
        )
    }

    fn kube_client(&self) -> Option<(Client, String)> {
        Some((self.mgr.client(), self.mgr.node_name.clone()))
    }
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

    /// A Node as a kubelet and the API server write it: managed fields,
    /// labels, a status with images and conditions.
    const FULL_NODE: &str = r#"{
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": "n1", "uid": "6b1f0c1e-0000-4000-8000-000000000001", "resourceVersion": "4242",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"kubernetes.io/hostname": "n1", "kubernetes.io/os": "linux"},
            "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"02:00:00:00:00:01\"}",
                "flannel.alpha.coreos.com/public-ip": "192.0.2.11",
                "node.alpha.kubernetes.io/ttl": "0"
            },
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/os": {}}}}}]
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "providerID": "x://n1",
                 "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "2", "memory": "24Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-12-01T10:00:00Z", "lastTransitionTime": "2026-12-01T10:00:00Z"}],
            "addresses": [{"type": "InternalIP", "address": "192.0.2.11"}],
            "images": [{"names": ["registry.example/pause@sha256:00", "registry.example/pause:3.9"], "sizeBytes": 321}],
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.18",
                "osImage": "Debian", "containerRuntimeVersion": "containerd://1.6", "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"}
        }
    }"#;

    #[test]
    fn the_watch_keeps_what_a_lease_needs_of_a_full_node_and_nothing_else() {
        let full: Node = serde_json::from_str(FULL_NODE).unwrap();
        let slim: PeerNode = serde_json::from_str(FULL_NODE).unwrap();
        let p = &ann::Prefix::default();
        let want = view(&full, p, &cfg()).unwrap();
        assert!(matches!(&want.1, Ok(Some(_))), "{want:?}");
        assert_eq!(view(&slim.0, p, &cfg()).unwrap(), want);
        use kube::{Resource, ResourceExt};
        assert_eq!(slim.resource_version().as_deref(), Some("4242"));
        assert_eq!(slim.0.metadata.annotations, full.metadata.annotations);
        assert!(slim.0.metadata.managed_fields.is_none() && slim.0.metadata.labels.is_none());
        assert!(slim.0.status.is_none());
        assert_eq!(PeerNode::url_path(&(), None), Node::url_path(&(), None));
        // A watch's bookmark carries only a resource version.
        let bookmark: PeerNode = serde_json::from_str(r#"{"metadata":{"resourceVersion":"9"}}"#).unwrap();
        assert_eq!(bookmark.resource_version().as_deref(), Some("9"));
    }

    #[test]
    fn pod_cidr_prefers_the_ipv4_one() {
        assert_eq!(pod_cidr(&node("a", Some("10.244.1.0/24"), &[], &[])).as_deref(), Some("10.244.1.0/24"));
        let dual = node("a", Some("fd00:1::/64"), &["fd00:1::/64", "10.244.2.0/24"], &[]);
        assert_eq!(pod_cidr(&dual).as_deref(), Some("10.244.2.0/24"));
        assert_eq!(pod_cidr(&node("a", Some(""), &[], &[])), None);
    }

    #[test]
    fn the_ipv6_pod_cidr_and_its_errors() {
        let dual = node("a", Some("10.244.2.0/24"), &["10.244.2.0/24", "2001:db8:10:2::/64"], &[]);
        assert_eq!(pod_cidr6(&dual).as_deref(), Some("2001:db8:10:2::/64"));
        assert_eq!(pod_cidr6(&node("a", Some("2001:db8:10:3::/64"), &[], &[])).as_deref(), Some("2001:db8:10:3::/64"));
        assert_eq!(pod_cidr6(&node("a", Some("10.244.2.0/24"), &["10.244.2.0/24"], &[])), None);
        let cfg6 = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#,
            "net-conf.json",
        )
        .unwrap();
        assert_eq!(own_subnet6(&dual, "a", &cfg6).unwrap().unwrap().to_string(), "2001:db8:10:2::/64");
        assert_eq!(own_subnet6(&dual, "a", &cfg()).unwrap(), None);
        let v4only = node("worker-3", Some("10.244.2.0/24"), &["10.244.2.0/24"], &[]);
        let e = own_subnet6(&v4only, "worker-3", &cfg6).unwrap_err().to_string();
        assert!(
            e.contains("node worker-3: spec.podCIDRs [\"10.244.2.0/24\"] has no IPv6 CIDR") && e.contains("EnableIPv6"),
            "{e}"
        );
    }

    #[test]
    fn ipv6_only_needs_no_ipv4_pod_cidr_and_a_dual_stack_one_does() {
        let v6only = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#,
            "net-conf.json",
        )
        .unwrap();
        assert_eq!(own_subnet("n", None, &v6only).unwrap(), None);
        assert_eq!(own_subnet("n", Some("10.244.3.0/24"), &v6only).unwrap(), None);
        let n6 = node("n", Some("2001:db8:10:3::/64"), &["2001:db8:10:3::/64"], &[]);
        assert!(has_pod_cidr(&n6, &v6only) && !has_pod_cidr(&n6, &cfg()));
        assert_eq!(own_subnet6(&n6, "n", &v6only).unwrap().unwrap().to_string(), "2001:db8:10:3::/64");
        let e = own_subnet("worker-2", None, &cfg()).unwrap_err().to_string();
        assert!(e.contains("node worker-2: spec.podCIDR(s) has no IPv4 CIDR") && e.contains("EnableIPv4 false"), "{e}");
    }

    #[test]
    fn own_subnet_must_lie_inside_network() {
        assert_eq!(own_subnet("n", Some("10.244.3.0/24"), &cfg()).unwrap().unwrap().to_string(), "10.244.3.0/24");
        let e = own_subnet("n", Some("10.9.0.0/24"), &cfg()).unwrap_err().to_string();
        assert!(e.contains("node n") && e.contains("10.9.0.0/24") && e.contains("10.244.0.0/16"), "{e}");
        assert!(own_subnet("n", Some("10.244.3.1/24"), &cfg()).unwrap_err().to_string().contains("host bits"));
        assert!(own_subnet("n", Some("x"), &cfg()).unwrap_err().to_string().contains("\"x\""));
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
        let p = &ann::Prefix::default();
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
        let subnets: Vec<String> = leases.iter().map(|l| l.subnet4().unwrap().to_string()).collect();
        assert_eq!(subnets, ["10.244.1.0/24", "10.244.2.0/24"]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("node c") && errors[0].contains("backend-data"), "{errors:?}");
    }
}
