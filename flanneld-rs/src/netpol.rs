//! The NetworkPolicy agent (`--network-policy`): watches NetworkPolicies,
//! Pods and Namespaces, and keeps this node's nftables policy table in line
//! with them. The compiler in [`crate::policy`] turns the three lists into one
//! ruleset; this module only feeds it and applies the result.
//!
//! Every change to any of the three wakes the agent; changes arriving within
//! [`DEBOUNCE`] of each other are handled by one compile. The ruleset replaces
//! the previous one in a single `nft -f` transaction, and is not applied at all
//! when its text did not change (most Pod updates, status heartbeats among
//! them, change nothing policy cares about), so established flows are never
//! disturbed by unrelated changes: conntrack's `established` verdict comes
//! first in every chain and the table's replacement is atomic.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use log::{error, info, warn};
use tokio::sync::Notify;

/// Changes this close together are compiled once.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// How often the table's presence is checked when nothing changes.
const RESYNC: Duration = Duration::from_secs(10);

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct PolicyMetrics {
    /// Rulesets applied.
    pub applied: AtomicU64,
    /// Compiles whose result equalled the applied ruleset.
    pub unchanged: AtomicU64,
    /// `nft -f` failures.
    pub errors: AtomicU64,
    /// Time spent compiling and applying, microseconds.
    pub micros: AtomicU64,
}

/// The three stores, read whole at every compile.
#[derive(Clone)]
pub struct Stores {
    /// NetworkPolicies of every namespace.
    pub policies: Store<NetworkPolicy>,
    /// Pods of every namespace (peers may live on any node).
    pub pods: Store<Pod>,
    /// Namespaces (their labels select peers).
    pub namespaces: Store<Namespace>,
}

fn spawn_reflector<K>(api: Api<K>, wake: Arc<Notify>, what: &'static str) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    // Only what policy needs is kept: managed fields are large and unused.
    let stream = watcher::watcher(api, crate::subnet::kube::watch_config())
        .modify(|o: &mut K| {
            o.meta_mut().managed_fields = None;
        })
        .default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(reflector::reflector(writer, stream));
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => wake.notify_one(),
                Err(e) => warn!("watch {what}: {e}; retrying"),
            }
        }
    });
    reader
}

/// Starts the three watches.
pub fn watch_all(client: &Client, wake: Arc<Notify>) -> Stores {
    Stores {
        policies: spawn_reflector(Api::all(client.clone()), wake.clone(), "networkpolicies"),
        pods: spawn_reflector(Api::all(client.clone()), wake.clone(), "pods"),
        namespaces: spawn_reflector(Api::all(client.clone()), wake, "namespaces"),
    }
}

/// Removes the policy table left by an earlier run with `--network-policy`
/// (the flag is now off).
pub fn remove_leftover_table() {
    if flannel_net::host::nft_table_exists("inet", crate::policy::TABLE) {
        match flannel_net::host::nft_apply(&crate::policy::teardown_script()) {
            Ok(()) => info!("network policy is off: removed the table inet {}", crate::policy::TABLE),
            Err(e) => error!("network policy is off, but removing table inet {} failed: {e}", crate::policy::TABLE),
        }
    }
}

/// Runs the agent for `node` forever: compile on every change, apply when
/// the ruleset text changed.
pub async fn run(client: Client, node: String, node_ips: Vec<IpAddr>, metrics: Arc<PolicyMetrics>) {
    // Same-node pod-to-pod traffic is bridged; it passes the inet hooks
    // (and gets conntrack) only with these on (see crate::policy).
    for (sysctl, family) in
        [(crate::policy::BRIDGE_NF_CALL_IPTABLES, "IPv4"), (crate::policy::BRIDGE_NF_CALL_IP6TABLES, "IPv6")]
    {
        if let Err(e) = flannel_net::host::ensure_sysctl_on(sysctl) {
            error!("network policy: {e}; {family} pod-to-pod traffic on this node is not filtered");
        }
    }
    let wake = Arc::new(Notify::new());
    let stores = watch_all(&client, wake.clone());
    for (what, ready) in [
        ("networkpolicies", stores.policies.wait_until_ready().await.is_ok()),
        ("pods", stores.pods.wait_until_ready().await.is_ok()),
        ("namespaces", stores.namespaces.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            error!("network policy: the {what} watch stopped before its first list");
            return;
        }
    }
    info!("network policy: enforcing for pods on node {node}");
    let node_ips: Arc<[IpAddr]> = node_ips.into();
    let mut pass = Pass::default();
    loop {
        // Compiling and `nft -f` are blocking work: off the async runtime.
        // The stores hand out shared references; nothing is copied.
        let (policies, pods, namespaces) = (stores.policies.state(), stores.pods.state(), stores.namespaces.state());
        let (node, node_ips, m) = (node.clone(), node_ips.clone(), metrics.clone());
        pass = tokio::task::spawn_blocking(move || pass.run(&policies, &pods, &namespaces, &node, &node_ips, &m))
            .await
            .expect("a NetworkPolicy pass panicked");
        // Wait for a change; after a failure, or every RESYNC, apply again
        // anyway (the table may have been removed by hand).
        let wait = if pass.applied.is_some() { RESYNC } else { Duration::from_secs(5) };
        tokio::select! {
            _ = wake.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = tokio::time::sleep(wait) => {
                let present = tokio::task::spawn_blocking(|| flannel_net::host::nft_table_exists("inet", crate::policy::TABLE))
                    .await
                    .unwrap_or(false);
                if !present {
                    warn!("network policy: the table is gone; applying it again");
                    pass.applied = None;
                }
            }
        }
    }
}

/// What one compile remembers for the next.
#[derive(Default)]
struct Pass {
    /// The ruleset text last applied.
    applied: Option<String>,
    /// The compiler's notes last logged.
    notes: Vec<String>,
}

impl Pass {
    /// Compiles, logs new notes, and applies the ruleset if its text changed.
    fn run(
        mut self,
        policies: &[Arc<NetworkPolicy>],
        pods: &[Arc<Pod>],
        namespaces: &[Arc<Namespace>],
        node: &str,
        node_ips: &[IpAddr],
        metrics: &PolicyMetrics,
    ) -> Pass {
        let start = Instant::now();
        let input = crate::policy::model_from_k8s(policies, pods, namespaces, node, node_ips);
        let ruleset = crate::policy::compile(&input);
        if ruleset.notes != self.notes {
            for n in ruleset.notes.iter().filter(|n| !self.notes.contains(n)) {
                warn!("network policy: {n}");
            }
            self.notes = ruleset.notes.clone();
        }
        let text = ruleset.render();
        if self.applied.as_deref() == Some(text.as_str()) {
            metrics.unchanged.fetch_add(1, Ordering::Relaxed);
        } else {
            match flannel_net::host::nft_apply(&text) {
                Ok(()) => {
                    metrics.applied.fetch_add(1, Ordering::Relaxed);
                    info!(
                        "network policy: ruleset applied ({} policies, {} pods, {:.1} ms)",
                        policies.len(),
                        pods.len(),
                        start.elapsed().as_secs_f64() * 1000.0
                    );
                    self.applied = Some(text);
                }
                Err(e) => {
                    metrics.errors.fetch_add(1, Ordering::Relaxed);
                    error!("network policy: nft -f failed: {e}");
                }
            }
        }
        metrics.micros.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        self
    }
}
