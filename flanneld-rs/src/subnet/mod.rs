//! Lease stores ("subnet managers"): etcd, and the Kubernetes API, behind one
//! interface ([`LeaseStore`]), so that start-up, the reconcile loop and
//! `diagnose` never ask which store they talk to.
//!
//! A store does four things: it gives the network configuration, it takes
//! (and, where leases expire, renews) this node's lease and publishes what
//! the node advertises, and it watches the lease set, handing the reconcile
//! loop a full snapshot after every change.

pub mod etcd;
pub mod etcd_tls;
pub mod kube;
pub mod kube_annotations;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use flannel_net::MacAddr;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseSet};

/// What can go wrong talking to a lease store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd did not answer or refused the request.
    #[error("etcd at {endpoints}: {op}: {source}")]
    Etcd {
        /// The endpoints, comma separated.
        endpoints: String,
        /// What was being done, naming the key (`get /coreos.com/network/config`).
        op: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd at {endpoints}: {op}: no answer within {after:?}")]
    Timeout {
        /// The endpoints, comma separated.
        endpoints: String,
        /// What was being done, naming the key.
        op: String,
        /// How long we waited.
        after: Duration,
    },
    /// The Kubernetes API server did not answer or refused the request.
    #[error("{op}: {source}")]
    Kube {
        /// What was being done, naming the object (`patch node worker-1 (nodes/status)`).
        op: String,
        /// The client's error.
        #[source]
        source: ::kube::Error,
    },
    /// The options, the lease attributes or an object in the store cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// `<prefix>/config` does not exist.
    #[error("etcd at {endpoints}: the network configuration key {key} does not exist (write it first, e.g. etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')")]
    ConfigMissing {
        /// The endpoints, comma separated.
        endpoints: String,
        /// The configuration key.
        key: String,
    },
    /// The network configuration is unusable (the error names the source and the field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Every subnet is taken.
    #[error("out of subnets: all {count} subnets of Network {network} between SubnetMin {min} and SubnetMax {max} are leased")]
    OutOfSubnets {
        /// How many subnets the range holds.
        count: usize,
        /// `Network`.
        network: Ipv4Net,
        /// `SubnetMin`.
        min: Ipv4Addr,
        /// `SubnetMax`.
        max: Ipv4Addr,
    },
    /// Every IPv6 subnet is taken (dual-stack).
    #[error("out of IPv6 subnets: all {count} subnets of IPv6Network {network} between IPv6SubnetMin {min} and IPv6SubnetMax {max} are leased")]
    OutOfSubnets6 {
        /// How many subnets the range holds.
        count: u128,
        /// `IPv6Network`.
        network: Ipv6Net,
        /// `IPv6SubnetMin`.
        min: Ipv6Addr,
        /// `IPv6SubnetMax`.
        max: Ipv6Addr,
    },
    /// Other nodes won every race for the subnets we picked.
    #[error("no subnet lease after {attempts} attempts: other nodes kept creating the keys picked (last {last_key})")]
    Contention {
        /// How many times we picked.
        attempts: usize,
        /// The last key we lost.
        last_key: String,
    },
    /// Our lease is gone from the store (deleted, expired, or taken over).
    #[error("lease {key} was revoked: {why}")]
    Revoked {
        /// The lease's key.
        key: String,
        /// What we found instead.
        why: String,
    },
}

impl StoreError {
    /// Whether trying again later may work: the server is not reachable
    /// (yet), did not answer, is overloaded, or (etcd) the network
    /// configuration is not written yet. Bad options, refused credentials
    /// and unusable configurations are not.
    pub fn is_transient(&self) -> bool {
        use etcd_client::Error as E;
        use tonic::Code;
        match self {
            StoreError::Timeout { .. } | StoreError::ConfigMissing { .. } => true,
            StoreError::Etcd { source, .. } => match source {
                E::TransportError(_) | E::IoError(_) => true,
                E::GRpcStatus(s) => matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Unknown
                        | Code::Aborted
                        | Code::ResourceExhausted
                ),
                _ => false,
            },
            StoreError::Kube { source, .. } => match source {
                ::kube::Error::HyperError(_) | ::kube::Error::Service(_) => true,
                ::kube::Error::Api(s) => s.code >= 500 || s.code == 429,
                _ => false,
            },
            _ => false,
        }
    }
}

/// Start-up's patience with a server that is not there yet: a step that
/// fails with a [transient](StoreError::is_transient) error is tried again
/// after the [`Backoff`]'s next wait, forever. What it waits for is said
/// (with the last error) at the first failure and then every
/// [`Waiter::SAY_EVERY`]; each try is logged at debug level.
#[derive(Debug)]
pub struct Waiter {
    what: String,
    backoff: Backoff,
    tries: u32,
    started: Option<std::time::Instant>,
    said: Option<std::time::Instant>,
}

impl Waiter {
    /// How often a wait is said again at info level.
    pub const SAY_EVERY: Duration = Duration::from_secs(30);

    /// For a step described by `what` ("the network configuration from
    /// etcd at ...").
    pub fn new(what: impl Into<String>) -> Waiter {
        Waiter { what: what.into(), backoff: Backoff::default(), tries: 0, started: None, said: None }
    }

    /// After a transient failure: says so when due, then sleeps.
    pub async fn failed(&mut self, e: &StoreError) {
        let e = with_causes(e);
        let now = std::time::Instant::now();
        self.tries += 1;
        let wait = self.backoff.next_delay();
        let started = *self.started.get_or_insert(now);
        match self.said {
            None => {
                log::warn!(
                    "waiting for {}: {e}; trying again with backoff ({:?} up to {:?}), said again every {:?}",
                    self.what,
                    Backoff::MIN,
                    Backoff::MAX,
                    Self::SAY_EVERY
                );
                self.said = Some(now);
            }
            Some(t) if now.duration_since(t) >= Self::SAY_EVERY => {
                log::info!(
                    "still waiting for {} ({:.0?}, {} tries): {e}",
                    self.what,
                    now.duration_since(started),
                    self.tries
                );
                self.said = Some(now);
            }
            Some(_) => {}
        }
        log::debug!("try {} for {} failed: {e}; next try in {wait:?}", self.tries, self.what);
        tokio::time::sleep(wait).await;
    }

    /// After the step worked: says so if it had to wait.
    pub fn done(&self) {
        if let Some(started) = self.started {
            log::info!("got {} after {:.1?} ({} failed tries)", self.what, started.elapsed(), self.tries);
        }
    }
}

/// `e` and what caused it ("transport error: ... : connection refused"):
/// the clients' top-level messages alone ("transport error") do not say why.
fn with_causes(e: &StoreError) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Runs a store call until it works or fails for good (see [`Waiter`]):
/// `waiting!("what", store.call(...).await)`.
#[macro_export]
macro_rules! waiting {
    ($what:expr, $call:expr) => {{
        let mut waiter = $crate::subnet::Waiter::new($what);
        loop {
            match $call {
                Err(e) if e.is_transient() => waiter.failed(&e).await,
                r => {
                    waiter.done();
                    break r;
                }
            }
        }
    }};
}

/// What a store says about this node before it takes a lease: addresses a
/// user set on the node (Kubernetes: the `node-public-ip` and
/// `public-ip-overwrite` annotations) and the VTEP MAC the node advertised
/// before (kept across restarts, so that peers' FDB entries stay valid).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeHints {
    /// Use this address instead of `--public-ip` when choosing the interface.
    pub public_ip: Option<Ipv4Addr>,
    /// Advertise this address instead of the chosen one.
    pub advertise: Option<Ipv4Addr>,
    /// Dual-stack: use this IPv6 address instead of `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Dual-stack: advertise this IPv6 address instead of the chosen one
    /// (Kubernetes: `public-ipv6-overwrite`).
    pub advertise_ipv6: Option<Ipv6Addr>,
}

/// The VTEP MACs this node advertised before, per family (kept across
/// restarts so that peers' FDB entries stay valid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VtepMacs {
    /// `flannel.<VNI>`'s (`BackendData`, `backend-data`).
    pub v4: Option<MacAddr>,
    /// `flannel-v6.<VNI>`'s (`BackendV6Data`, `backend-v6-data`).
    pub v6: Option<MacAddr>,
}

impl VtepMacs {
    /// The MACs a lease advertises.
    pub fn of(lease: &Lease) -> VtepMacs {
        VtepMacs {
            v4: lease.ipv4.and_then(|v4| v4.vxlan).map(|d| d.vtep_mac),
            v6: lease.ipv6.and_then(|v6| v6.vxlan).map(|d| d.vtep_mac),
        }
    }
}

/// One listing of the lease set, for `diagnose`.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Every usable lease, sorted by subnet.
    pub leases: Vec<Lease>,
    /// Why each unusable entry is not a lease (naming it and the value).
    pub unusable: Vec<String>,
}

/// A lease store: etcd or the Kubernetes API.
///
/// Start-up calls the methods in order: [`network_config`], [`hints`],
/// [`advertised_mac`], [`acquire`], [`watch`]; then the reconcile loop
/// renews when [`renew_at`] says so and calls [`node_ready`] once the node
/// is set up.
///
/// [`network_config`]: LeaseStore::network_config
/// [`hints`]: LeaseStore::hints
/// [`advertised_mac`]: LeaseStore::advertised_mac
/// [`acquire`]: LeaseStore::acquire
/// [`watch`]: LeaseStore::watch
/// [`renew_at`]: LeaseStore::renew_at
/// [`node_ready`]: LeaseStore::node_ready
#[allow(async_fn_in_trait)] // used generically by our own binary, never through dyn or across tasks
pub trait LeaseStore {
    /// The store, for messages (`etcd at http://127.0.0.1:2379`).
    fn describe(&self) -> String;

    /// The network configuration (`<prefix>/config`, or `--net-config-path`).
    async fn network_config(&mut self) -> Result<NetworkConfig, StoreError>;

    /// What the store says about this node before it has a lease; the
    /// Kubernetes store waits here for its Node to have a podCIDR.
    async fn hints(&mut self, cfg: &NetworkConfig) -> Result<NodeHints, StoreError>;

    /// The VTEP MACs of this node's lease, if the store has one (the lease
    /// with our public IP, or our Node's `backend-data` and
    /// `backend-v6-data`).
    async fn advertised_macs(
        &mut self,
        cfg: &NetworkConfig,
        public_ip: Option<Ipv4Addr>,
    ) -> Result<VtepMacs, StoreError>;

    /// Takes this node's lease (etcd: the one with our public IP, else
    /// `previous` (and `previous6`, dual-stack), else a free subnet;
    /// Kubernetes: the podCIDRs) and publishes `attrs`. With `EnableIPv6`
    /// the lease has an IPv6 subnet too.
    async fn acquire(
        &mut self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<Lease, StoreError>;

    /// Changes what our lease advertises (the underlay address changed):
    /// same subnet, same lease, new attributes.
    async fn publish(&mut self, cfg: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Lease, StoreError>;

    /// Starts watching the lease set: a [`LeaseEvent::Snapshot`] after the
    /// first complete list and after every change, and
    /// [`LeaseEvent::Revoked`] when our own lease disappears. The watch
    /// retries by itself and stops when the receiver is dropped.
    fn watch(&mut self, cfg: &NetworkConfig) -> mpsc::Receiver<LeaseEvent>;

    /// When the lease must be renewed next; `None` when it never expires.
    fn renew_at(&self, margin: Duration) -> Option<std::time::SystemTime>;

    /// Renews the lease (on failure the caller retries later).
    async fn renew(&mut self) -> Result<(), StoreError>;

    /// Tells the store the node's network is up (Kubernetes:
    /// `NetworkUnavailable=False`, when `set_unavailable` is on).
    async fn node_ready(&mut self, set_unavailable: bool) -> Result<(), StoreError>;

    /// Lists the lease set once (for `diagnose`).
    async fn list(&mut self, cfg: &NetworkConfig) -> Result<Listing, StoreError>;

    /// This node's lease among `leases`, for a node advertising `public_ip`.
    fn own<'a>(&self, leases: &'a [Lease], public_ip: Option<Ipv4Addr>) -> Option<&'a Lease>;

    /// What is missing, and how to fix it, when [`LeaseStore::own`] finds
    /// no lease (for `diagnose`).
    fn own_missing(&self, public_ip: Option<Ipv4Addr>) -> (String, String);

    /// The Kubernetes client and our node's name, for the NetworkPolicy
    /// agent; `None` for stores without one.
    fn kube_client(&self) -> Option<(::kube::Client, String)>;
}

/// Waits between retries of a request to a server: doubling from 200 ms to
/// at most 5 s, back to the start once a request works. Both stores use it.
#[derive(Debug, Clone)]
pub struct Backoff(Duration);

impl Backoff {
    /// The first wait.
    pub const MIN: Duration = Duration::from_millis(200);
    /// The longest wait: a server that comes back is noticed within this.
    pub const MAX: Duration = Duration::from_secs(5);

    /// The next wait (and doubles the one after).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(Self::MAX);
        d
    }

    /// Starts over from the shortest wait.
    pub fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Self::MIN)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl ::kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self)
    }
}

/// The channel a watcher sends on: small, because each snapshot is the whole
/// set and only the newest matters.
pub(crate) fn channel() -> (mpsc::Sender<LeaseEvent>, mpsc::Receiver<LeaseEvent>) {
    mpsc::channel(16)
}

/// Hands `set` to the reconcile loop; false when the receiver is gone.
pub(crate) async fn send_snapshot(tx: &mpsc::Sender<LeaseEvent>, set: &LeaseSet) -> bool {
    // A clone of the persistent map shares its nodes: O(1), not a copy.
    tx.send(LeaseEvent::Snapshot(set.clone())).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (&mut b).take(7).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::MIN);
    }
}
