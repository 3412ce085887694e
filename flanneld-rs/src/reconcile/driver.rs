//! The driver: runs a full reconcile (observe, plan, apply) on every
//! trigger, a new lease snapshot, a kernel notification about what we own,
//! a timer, and keeps the store's lease and the firewall asserted meanwhile.
//! Deletes are never assumed to have been seen; a missed event is repaired
//! by the next run.
//!
//! A lease snapshot that changes a few leases, none of which involves the
//! others, runs incrementally instead ([`model`]): only those leases'
//! entries are planned, against a model of what the last full run saw and
//! the runs since applied, so its cost does not grow with the number of
//! nodes. A kernel notification that agrees with the model (the echo of our
//! own change) asks for no run. Anything else, an error included, falls back
//! to the full reconcile, and the periodic one stays the safety net.
//!
//! It knows the store and the backend only through their interfaces
//! ([`LeaseStore`], [`Backend`]), so a new store or backend never touches it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use flannel_net::netlink::{Change, Netlink};
use ipnet::IpNet;
use log::{error, info, warn};
use tokio::sync::mpsc;

use super::model::Model;
use super::{desired, kernel, plan};
use crate::backend::{Backend, DataPath, TunnelPeer};
use crate::config::NetworkConfig;
use crate::firewall::{self, FirewallSpec};
use crate::health::Metrics;
use crate::iface::{ExtIface, Selection};
use crate::lease::{Family, Lease, LeaseEvent, LeaseSet};
use crate::subnet::LeaseStore;

/// How often to reconcile when nothing else asks for it: a safety net for
/// missed notifications (netlink overruns) and hand edits.
const PERIODIC: Duration = Duration::from_secs(10);

/// Notifications arriving this close together are handled by one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// From this many leases on, each reconcile hands the memory its dumps
/// freed back to the kernel (see [`return_free_memory`]).
const TRIM_AT_PEERS: usize = 500;

/// A lease snapshot changing more leases than this runs a full reconcile
/// (one dump is then cheaper than planning each).
const INCREMENTAL_MAX: usize = 256;

/// A family's data path peers: subnet -> the peer behind it.
type Tunnel = BTreeMap<IpNet, TunnelPeer>;

/// A wait that never ends, for timers that are off.
const NEVER: Duration = Duration::from_secs(86400 * 365);

/// What the node was set up with.
pub struct Node {
    /// The network configuration.
    pub cfg: NetworkConfig,
    /// The underlay interface.
    pub ext: ExtIface,
    /// How peers are reached over IPv4 (`None` in an IPv6-only cluster).
    pub backend: Option<Backend>,
    /// How peers are reached over IPv6 (dual-stack, IPv6-only).
    pub backend6: Option<Backend>,
    /// Our lease.
    pub own: Lease,
    /// How the underlay interface was chosen, to choose it again when it
    /// changes.
    pub selection: Selection,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
    /// `--vxlan-tx-checksum-off`: the VTEPs' transmit checksum offload to
    /// keep (`None`: left alone).
    pub vxlan_tx_checksum: Option<bool>,
}

impl Node {
    /// What the blackhole route for our (IPv4) subnet should be.
    pub fn blackhole(&self) -> Option<plan::Blackhole> {
        self.own.subnet4().map(|subnet| plan::Blackhole { subnet, wanted: self.blackhole_route })
    }

    /// The families the overlay carries: IPv4, IPv6, or both.
    pub fn families(&self) -> Vec<Family> {
        let v4 = self.backend.as_ref().map(|_| Family::V4);
        let v6 = self.backend6.as_ref().map(|_| Family::V6);
        v4.into_iter().chain(v6).collect()
    }

    /// The backends, IPv4's first.
    pub fn backends(&self) -> Vec<&Backend> {
        self.backend.iter().chain(self.backend6.iter()).collect()
    }

    /// The backend of `family` (one of [`Node::families`]).
    pub fn backend_of(&self, family: Family) -> &Backend {
        let b = match family {
            Family::V4 => self.backend.as_ref(),
            Family::V6 => self.backend6.as_ref(),
        };
        b.expect("a family is reconciled only with its backend")
    }

    /// The underlay's subnet of `family` (the segment direct routes and
    /// host-gw need peers on); the IPv4 one of an IPv6-only underlay is
    /// never asked for (no IPv4 backend).
    pub fn segment(&self, family: Family) -> IpNet {
        match (family, self.ext.v6, self.ext.addr) {
            (Family::V6, Some(v6), _) => IpNet::V6(v6.addr.trunc()),
            (_, _, Some(v4)) => IpNet::V4(v4.trunc()),
            (_, Some(v6), None) => IpNet::V6(v6.addr.trunc()),
            (_, None, None) => unreachable!("an underlay has an address of a family the cluster runs"),
        }
    }

    /// What our lease advertises with these backends and this interface.
    pub fn lease_attrs(
        backend: Option<&Backend>,
        backend6: Option<&Backend>,
        ext: &ExtIface,
    ) -> crate::lease::LeaseAttrs {
        crate::backend::lease_attrs(backend.zip(ext.public_ip), backend6.zip(ext.v6.map(|v6| v6.public_ip)))
    }

    /// The pods' MTU: the smallest the backends allow.
    pub fn pod_mtu(&self) -> u32 {
        self.backends().iter().map(|b| b.pod_mtu()).min().expect("a cluster runs at least one family")
    }
}

/// An underlay in words, for the log.
fn describe(e: &ExtIface) -> String {
    let v4 = e.addr.map(|a| format!(" {a}")).unwrap_or_default();
    let ip = e.public_ip.map(|ip| format!(" public IP {ip},")).unwrap_or_default();
    let v6 = e.v6.map(|v6| format!(" {} (public {}),", v6.addr, v6.public_ip)).unwrap_or_default();
    format!("{} #{}{v4}{ip}{v6} MTU {}", e.name, e.index, e.mtu)
}

/// How often the driver re-asserts things besides the kernel entries.
#[derive(Debug, Clone)]
pub struct Timers {
    /// `--iptables-resync`: the firewall.
    pub resync: Duration,
    /// `--subnet-lease-renew-margin`: renew this long before the lease expires.
    pub renew_margin: Duration,
}

/// The reconcile loop of one node.
pub struct Driver<S: LeaseStore> {
    nl: Netlink,
    store: S,
    node: Node,
    leases: LeaseSet,
    metrics: Arc<Metrics>,
    fw: FirewallSpec,
    timers: Timers,
    last_rejected: Vec<String>,
    /// Our devices' indexes (IPv4, IPv6) as last observed, to tell which
    /// notifications concern us.
    device_index: [Option<u32>; 2],
    /// Each family's user-space data path (IPv4, IPv6: wireguard's
    /// `flannel-wg` and `flannel-wg-v6`), and the peer table last given to it.
    /// With one device for both families (wireguard's Mode auto, ipv4,
    /// ipv6), the first family's data path carries both.
    data_path: [Option<Box<dyn DataPath>>; 2],
    data_path_peers: [Vec<(IpNet, TunnelPeer)>; 2],
    /// The underlay must be chosen again before the next reconcile (it
    /// changed, or the periodic check is due).
    underlay_due: bool,
    /// The underlay was gone at the last check (then any new link may be it).
    underlay_missing: bool,
    /// What we programmed, per family (IPv4, IPv6), for incremental runs
    /// and to tell echoes of our own changes; `None` until a full reconcile
    /// without errors, and after any error.
    models: [Option<Model>; 2],
}

impl<S: LeaseStore> Driver<S> {
    /// A driver for `node`, taking its leases from `store`.
    pub fn new(nl: Netlink, store: S, node: Node, metrics: Arc<Metrics>, fw: FirewallSpec, timers: Timers) -> Self {
        Driver {
            nl,
            store,
            node,
            leases: LeaseSet::new(),
            metrics,
            fw,
            timers,
            last_rejected: Vec::new(),
            device_index: [None, None],
            data_path: [None, None],
            data_path_peers: [Vec::new(), Vec::new()],
            underlay_due: false,
            underlay_missing: false,
            models: [None, None],
        }
    }

    /// The store (for what start-up does after the first reconcile).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Starts the backends' data paths, where they have one. At start a
    /// data path that cannot run (its port is taken, no TUN) is fatal; later
    /// the reconcile restarts it when it stops or its device goes.
    pub fn start_data_path(&mut self) -> anyhow::Result<()> {
        for family in self.node.families() {
            if self.data_path_owner(family) == family {
                self.start_data_path_of(family)?;
            }
        }
        Ok(())
    }

    /// The family whose data path carries `family`'s peers: its own, or,
    /// when both families' backends use one device, the first family's.
    fn data_path_owner(&self, family: Family) -> Family {
        match (&self.node.backend, &self.node.backend6) {
            (Some(b4), Some(b6))
                if family == Family::V6 && b4.has_data_path() && b4.device_name() == b6.device_name() =>
            {
                Family::V4
            }
            _ => family,
        }
    }

    /// Starts the data path of `family`, if its backend has one.
    fn start_data_path_of(&mut self, family: Family) -> anyhow::Result<()> {
        let backend = self.node.backend_of(family);
        let (Some(own), Some((network, _))) =
            (self.node.own.family(family), crate::backend::family_network(&self.node.cfg, family))
        else {
            return Ok(());
        };
        let subnet = own.subnet;
        let started = tokio::task::block_in_place(|| backend.start_data_path(subnet, network, &self.metrics))?;
        self.data_path[family as usize] = started;
        self.data_path_peers[family as usize].clear();
        Ok(())
    }

    /// Reconciles with the lease set `leases` (the watcher's first snapshot).
    pub async fn reconcile_with(&mut self, leases: LeaseSet, why: &str) {
        self.leases = leases;
        self.reconcile(why).await;
    }

    /// One full reconcile: desired state from the leases, observed state from
    /// the kernel, the plan between them, applied, for each family. Errors
    /// are logged and counted; the next reconcile retries.
    pub async fn reconcile(&mut self, why: &str) {
        let start = Instant::now();
        if std::mem::take(&mut self.underlay_due) {
            self.check_underlay(why).await;
        }
        let mut rejected_text = Vec::new();
        let mut tunnels: [Tunnel; 2] = Default::default();
        for family in self.node.families() {
            let (r, n, tunnel) = self.reconcile_family(family, why).await;
            tunnels[family as usize] = tunnel;
            rejected_text.extend(r);
            let gauge = match family {
                Family::V4 => &self.metrics.peers,
                Family::V6 => &self.metrics.peers_ipv6,
            };
            gauge.store(n as u64, Ordering::Relaxed);
        }
        self.sync_data_paths(&tunnels, why);
        if rejected_text != self.last_rejected {
            for r in &rejected_text {
                warn!("lease not programmed: {r}");
            }
            self.metrics.rejected_leases.store(rejected_text.len() as u64, Ordering::Relaxed);
            self.last_rejected = rejected_text;
        }
        let m = &self.metrics;
        m.reconcile_full_runs.fetch_add(1, Ordering::Relaxed);
        m.reconcile_micros.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        if self.leases.len() >= TRIM_AT_PEERS {
            return_free_memory();
        }
    }

    /// The reconcile of one family: the rejected leases (in words), how many
    /// peers it programs, and its data path's peers (the leases' alone: for
    /// the data path even when the kernel could not be read).
    async fn reconcile_family(&mut self, family: Family, why: &str) -> (Vec<String>, usize, Tunnel) {
        self.models[family as usize] = None;
        let t0 = Instant::now();
        let node = &self.node;
        let backend = node.backend_of(family);
        let mut full =
            desired::desired(&node.cfg, family, &node.own, backend, node.segment(family), self.leases.iter());
        if family == Family::V4 {
            full.desired.blackhole = node.blackhole();
        }
        let want = &full.desired;
        let rejected_text: Vec<String> = full.rejected.iter().map(|r| format!("{}: {}", r.source, r.reason)).collect();
        let t_desired = t0.elapsed();
        let Some((observed, ops)) = self.observe_and_plan(family, want, why).await else {
            return (rejected_text, 0, full.desired.tunnel);
        };
        let t_planned = t0.elapsed();
        log_ops(&ops, why);
        let errors = kernel::apply(&self.nl, want, &observed, &ops).await;
        let t_applied = t0.elapsed();
        for e in &errors {
            error!("reconcile ({why}): {e}");
        }
        let m = &self.metrics;
        m.netlink_errors.fetch_add(errors.len() as u64, Ordering::Relaxed);
        m.reconcile_ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        if ops.iter().any(|op| matches!(op, plan::Op::CreateDevice | plan::Op::RecreateDevice(_))) {
            let name = self.node.backend_of(family).device_name().to_string();
            self.device_index[family as usize] = self.nl.link_by_name(&name).await.ok().flatten().map(|l| l.index);
        }
        let programmed = want.peers.len() + want.tunnel.len();
        let tunnel = std::mem::take(&mut full.desired.tunnel);
        if errors.is_empty() && !self.node.backend_of(family).has_data_path() {
            self.models[family as usize] = Model::after_full(full, observed, &ops);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        log::debug!(
            "reconcile ({why}, {family:?}): {} ops in {:.1} ms: desired state {:.1}, observe and plan {:.1}, apply {:.1}, model {:.1}",
            ops.len(),
            ms(t0.elapsed()),
            ms(t_desired),
            ms(t_planned - t_desired),
            ms(t_applied - t_planned),
            ms(t0.elapsed() - t_applied)
        );
        (rejected_text, programmed, tunnel)
    }

    /// Takes the lease snapshot `leases`: incrementally when it can (see
    /// [`Model`]), else with a full reconcile.
    async fn lease_change(&mut self, leases: LeaseSet) {
        let done = self.incremental(&leases).await;
        self.leases = leases;
        if !done {
            self.reconcile("lease change").await;
        }
    }

    /// The incremental run for the new lease snapshot `leases` (the caller
    /// then takes it as the current one); false (nothing done)
    /// when it needs the full reconcile: no model (the last run had an
    /// error, or none ran yet), the underlay to be chosen again, rejected
    /// leases about, a data path, our own lease among the changes, too many
    /// changes, or a change that involves other leases. When an op fails,
    /// the model is dropped (the next trigger runs in full).
    async fn incremental(&mut self, leases: &LeaseSet) -> bool {
        let start = Instant::now();
        let families = self.node.families();
        if self.underlay_due
            || !self.last_rejected.is_empty()
            || self.data_path.iter().any(Option::is_some)
            || families.iter().any(|f| self.models[*f as usize].is_none())
        {
            return false;
        }
        let Some(changes) = leases.changes_since(&self.leases, INCREMENTAL_MAX) else {
            return false;
        };
        if changes.iter().any(|(source, _, _)| *source == self.node.own.source) {
            return false;
        }
        let node = &self.node;
        let mut plans = Vec::new();
        for &family in &families {
            let (Some(model), Some(own)) = (&self.models[family as usize], node.own.family(family)) else {
                return false;
            };
            let backend = node.backend_of(family);
            match model.plan(&node.cfg, &own, backend, node.segment(family), &changes) {
                Some(inc) => plans.push((family, inc)),
                None => return false,
            }
        }
        let why = "lease change";
        let mut n_ops = 0;
        for (family, inc) in plans {
            let backend = self.node.backend_of(family);
            let model = self.models[family as usize].as_mut().expect("checked above");
            let (want, observed) = model.device_only(backend);
            log_ops(&inc.ops, why);
            let errors = kernel::apply(&self.nl, &want, &observed, &inc.ops).await;
            for e in &errors {
                error!("reconcile ({why}): {e}");
            }
            n_ops += inc.ops.len();
            self.metrics.netlink_errors.fetch_add(errors.len() as u64, Ordering::Relaxed);
            let gauge = match family {
                Family::V4 => &self.metrics.peers,
                Family::V6 => &self.metrics.peers_ipv6,
            };
            if errors.is_empty() {
                model.commit(inc);
                gauge.store(model.peers() as u64, Ordering::Relaxed);
            } else {
                // What the kernel has now is unknown: the next trigger runs in full.
                self.models[family as usize] = None;
            }
        }
        let m = &self.metrics;
        m.reconcile_incremental_runs.fetch_add(1, Ordering::Relaxed);
        m.reconcile_ops.fetch_add(n_ops as u64, Ordering::Relaxed);
        let micros = start.elapsed().as_micros() as u64;
        m.reconcile_micros.fetch_add(micros, Ordering::Relaxed);
        m.reconcile_incremental_micros.fetch_add(micros, Ordering::Relaxed);
        true
    }

    /// Whether a kernel notification about what we own agrees with what we
    /// programmed (see [`Model::agrees`]), in the family it is about.
    fn echo(&self, change: &Change) -> bool {
        let family = match change {
            Change::Route { route: Some(r), .. } => Some(match r.dst {
                IpNet::V4(_) => Family::V4,
                IpNet::V6(_) => Family::V6,
            }),
            Change::Neigh { index, .. } => {
                self.node.families().into_iter().find(|f| self.device_index[*f as usize] == Some(*index))
            }
            _ => None,
        };
        let model = family.and_then(|f| self.models[f as usize].as_ref());
        let echo = model.is_some_and(|m| m.agrees(change));
        let counter = if echo { &self.metrics.kernel_echoes } else { &self.metrics.kernel_disagreements };
        counter.fetch_add(1, Ordering::Relaxed);
        echo
    }

    /// Chooses the underlay interface again. When it is gone, everything
    /// stays as it is (the kernel deletes a VTEP with its underlay; it is
    /// made again once the interface is back). When it changed (another
    /// index after being deleted and added, another address or MTU), the
    /// backend is rebuilt on it, which the plan turns into a new device and
    /// every peer's entries, and a changed public address is published in
    /// our lease.
    async fn check_underlay(&mut self, why: &str) {
        let ext = match self.node.selection.select(&self.nl).await {
            Ok(ext) => ext,
            Err(e) => {
                if !self.underlay_missing {
                    warn!(
                        "reconcile ({why}): the underlay ({}) cannot be chosen now: {e}; keeping what is \
                         programmed and choosing again at each change and every {}s",
                        self.node.ext.name,
                        PERIODIC.as_secs()
                    );
                }
                self.underlay_missing = true;
                return;
            }
        };
        if self.underlay_missing {
            info!("reconcile ({why}): underlay interface {} (#{}) is back", ext.name, ext.index);
            self.underlay_missing = false;
        }
        if ext == self.node.ext {
            return;
        }
        info!("reconcile ({why}): underlay changed: {} -> {}", describe(&self.node.ext), describe(&ext));
        let mac = self.node.backend.as_ref().and_then(|b| b.vtep()).map(|v| v.mac);
        let mac = mac.unwrap_or_else(crate::backend::random_mac);
        let mac6 = self.node.backend6.as_ref().and_then(|b| b.vtep()).map(|v| v.mac);
        let tx = self.node.vxlan_tx_checksum;
        let backends = Backend::for_config(&self.node.cfg, &ext, mac, tx).and_then(|b| {
            let mac6 = mac6.unwrap_or_else(crate::backend::random_mac);
            let b6 = Backend::for_config_v6(&self.node.cfg, &ext, mac6, tx)?;
            Ok((b, b6))
        });
        let (backend, backend6) = match backends {
            Ok(b) => b,
            Err(e) => {
                error!("reconcile ({why}): the changed underlay cannot carry the backend: {e:#}; keeping the old one");
                return;
            }
        };
        let mtu = backend.iter().chain(backend6.iter()).map(|b| b.pod_mtu()).min();
        if mtu.is_some_and(|m| m != self.node.pod_mtu()) {
            warn!(
                "reconcile ({why}): the pod MTU is now {} (was {}); pods keep theirs until they are restarted",
                mtu.unwrap_or_default(),
                self.node.pod_mtu()
            );
        }
        let attrs = Node::lease_attrs(backend.as_ref(), backend6.as_ref(), &ext);
        let advertised = Node::lease_attrs(self.node.backend.as_ref(), self.node.backend6.as_ref(), &self.node.ext);
        if attrs != advertised {
            match self.store.publish(&self.node.cfg, &attrs).await {
                Ok(lease) => self.node.own = lease,
                Err(e) => {
                    // Keep the old state; the next check tries again.
                    error!(
                        "reconcile ({why}): advertise the new public IP {:?} ({:?}): {e}",
                        ext.public_ip, attrs.public_ipv6
                    );
                    self.underlay_due = true;
                    return;
                }
            }
        }
        for (family, changed) in
            [(Family::V4, backend != self.node.backend), (Family::V6, backend6 != self.node.backend6)]
        {
            if changed && self.data_path[family as usize].is_some() {
                // Its sockets are bound to the old address.
                let old = self.data_path[family as usize].take();
                tokio::task::block_in_place(|| drop(old));
            }
        }
        self.node.backend = backend;
        self.node.backend6 = backend6;
        self.node.ext = ext;
    }

    /// Observes and plans; with a data path, (re)starts it first when it
    /// stopped or its device is gone (the data path makes its device), then
    /// observes again.
    async fn observe_and_plan(
        &mut self,
        family: Family,
        want: &plan::Desired,
        why: &str,
    ) -> Option<(plan::Observed, Vec<plan::Op>)> {
        let device = want.device.as_ref().map(|d| d.name().to_string());
        let (network, _) = crate::backend::family_network(&self.node.cfg, family)?;
        let (sweep, has_data_path) = {
            let b = self.node.backend_of(family);
            (b.sweep(), b.has_data_path())
        };
        for attempt in 0..2 {
            let observed =
                match kernel::observe(&self.nl, device.as_deref(), sweep, network, want.blackhole.map(|b| b.subnet))
                    .await
                {
                    Ok(o) => o,
                    Err(e) => {
                        error!("reconcile ({why}): {e}");
                        self.metrics.netlink_errors.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                };
            self.device_index[family as usize] = observed.device.as_ref().map(|v| v.index);
            let ops = plan::plan(want, &observed);
            if !has_data_path || attempt > 0 {
                return Some((observed, ops));
            }
            let gone = ops.iter().any(|op| matches!(op, plan::Op::CreateDevice | plan::Op::RecreateDevice(_)));
            let owner = self.data_path_owner(family);
            let slot = owner as usize;
            let stopped = self.data_path[slot].as_ref().is_some_and(|dp| !dp.running());
            if !(gone || stopped || self.data_path[slot].is_none()) {
                return Some((observed, ops));
            }
            if self.data_path[slot].is_some() {
                let what = if stopped { "a data path thread stopped" } else { "its device is gone" };
                warn!("reconcile ({why}): {what}; restarting the data path");
                let old = self.data_path[slot].take();
                tokio::task::block_in_place(|| drop(old));
                self.metrics.udp.restarts.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.start_data_path_of(owner) {
                // Retried by the next reconcile (at the latest the periodic one).
                error!("reconcile ({why}): start the data path: {e:#}");
                return None;
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    /// `--ip-blackhole-route`, re-asserted with the firewall every
    /// `--iptables-resync` seconds as flannel does (the reconcile also keeps
    /// it, and removes it when the flag is off).
    async fn reassert_blackhole(&mut self) {
        let Some(b) = self.node.blackhole().filter(|b| b.wanted) else {
            return;
        };
        let there = match self.nl.routes_v4_and_blackholes().await {
            Ok((_, blackholes)) => blackholes.contains(&ipnet::IpNet::V4(b.subnet)),
            Err(e) => {
                error!("re-assert the blackhole route for {}: {e}", b.subnet);
                return;
            }
        };
        if !there {
            info!("resync: ip route add blackhole {}", b.subnet);
            if let Err(e) = self.nl.add_blackhole_route(ipnet::IpNet::V4(b.subnet)).await {
                self.metrics.netlink_errors.fetch_add(1, Ordering::Relaxed);
                error!("resync: {e}");
            }
        }
    }

    /// Hands each data path the peer table of the families it carries
    /// (`tunnels`: this run's, per family), when it changed. Once per run,
    /// after every family's: a data path carrying both families gets both
    /// tables of the same run.
    fn sync_data_paths(&mut self, tunnels: &[Tunnel; 2], why: &str) {
        for owner in self.node.families() {
            let slot = owner as usize;
            let Some(dp) = &self.data_path[slot] else { continue };
            let peers: Vec<_> = self
                .node
                .families()
                .into_iter()
                .filter(|f| self.data_path_owner(*f) == owner)
                .flat_map(|f| tunnels[f as usize].iter().map(|(s, p)| (*s, *p)))
                .collect();
            // A new data path starts with an empty table.
            if peers != self.data_path_peers[slot] {
                let device = self.node.backend_of(owner).device_name();
                info!("reconcile ({why}): {device}'s data path peer table: {} peer(s)", peers.len());
                // Off the async workers: the wireguard kernel path sends netlink
                // requests and waits for their answers, the user-space one
                // makes a tunnel (an X25519 agreement) per new peer.
                tokio::task::block_in_place(|| dp.set_peers(&peers));
                self.data_path_peers[slot] = peers;
            }
        }
    }

    /// Runs until SIGTERM/SIGINT (then `Ok`, kernel state left in place so
    /// pods keep talking across a restart) or a fatal error (our lease
    /// revoked, the watcher gone).
    pub async fn run(mut self, mut events: mpsc::Receiver<LeaseEvent>) -> anyhow::Result<()> {
        let ipv6 = self.node.backend6.is_some();
        let mut changes = flannel_net::netlink::monitor(ipv6)?;
        let mut periodic = tokio::time::interval(PERIODIC);
        periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(self.timers.resync.max(Duration::from_secs(1)));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

        // When a kernel notification about our device asks for a reconcile.
        let mut kernel_due: Option<tokio::time::Instant> = None;
        loop {
            let renew_at = self.store.renew_at(self.timers.renew_margin);
            let renew_in = renew_at.map(|t| t.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(LeaseEvent::Snapshot(leases)) => self.lease_change(leases).await,
                    Some(LeaseEvent::Revoked(key)) => {
                        bail!("our lease {key} was deleted from the store (revoked); exiting so that a restart acquires a new one");
                    }
                    None => bail!("the lease watcher stopped"),
                },
                change = changes.recv() => match change {
                    // Coalesce the burst a hand edit (or our own changes) cause,
                    // without holding up lease events meanwhile.
                    Some(c) => {
                        let underlay = concerns_underlay(self.node.ext.index, self.underlay_missing, &c);
                        self.underlay_due |= underlay;
                        let ours = self.node.families().into_iter().any(|f| {
                            let network = crate::backend::family_network(&self.node.cfg, f).map(|(n, _)| n);
                            concerns_us(self.device_index[f as usize], self.node.backend_of(f).underlay(), network, &c)
                        });
                        // The echo of our own change asks for nothing.
                        let disagrees = ours && !self.echo(&c);
                        if kernel_due.is_none() && (underlay || disagrees) {
                            kernel_due = Some(tokio::time::Instant::now() + DEBOUNCE);
                        }
                    }
                    None => {
                        warn!("netlink notifications stopped; subscribing again");
                        changes = flannel_net::netlink::monitor(ipv6)?;
                        kernel_due = Some(tokio::time::Instant::now());
                    }
                },
                _ = tokio::time::sleep_until(kernel_due.unwrap_or_else(tokio::time::Instant::now)), if kernel_due.is_some() => {
                    kernel_due = None;
                    self.reconcile("kernel change").await;
                }
                _ = periodic.tick() => {
                    // Also the safety net for a missed notification about the underlay.
                    self.underlay_due = true;
                    self.reconcile("periodic").await
                }
                _ = resync.tick() => {
                    match ensure_firewall(self.fw).await {
                        Ok(fixed) if fixed.is_empty() => {}
                        Ok(fixed) => {
                            for p in fixed {
                                warn!("firewall: {}; rewritten", p.what);
                            }
                        }
                        Err(e) => error!("re-assert the {}: {e}", self.fw.describe()),
                    }
                    self.reassert_blackhole().await;
                }
                _ = tokio::time::sleep(renew_in.unwrap_or(NEVER)), if renew_in.is_some() => {
                    match self.store.renew().await {
                        Ok(()) => {
                            self.metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => error!("renew our lease ({}): {e}; retrying in a minute", self.store.describe()),
                    }
                }
                _ = term.recv() => {
                    info!("SIGTERM: exiting; kernel state stays so that pods keep talking");
                    return Ok(());
                }
                _ = int.recv() => {
                    info!("SIGINT: exiting; kernel state stays");
                    return Ok(());
                }
            }
        }
    }
}

/// Returns the heap's free memory to the kernel. A full reconcile's dumps
/// (every route, neighbour and FDB entry) are freed when it ends, but the C
/// allocator keeps the pages (in its one arena: see `limit_malloc_arenas` in
/// main.rs), so the resident size stayed at the dumps' peak. Trimming costs a walk
/// of the free lists, well under a millisecond at this heap's size.
fn return_free_memory() {
    // SAFETY: malloc_trim only releases free memory; it never touches live
    // allocations.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

fn log_ops(ops: &[plan::Op], why: &str) {
    if ops.len() <= 20 {
        for op in ops {
            info!("reconcile ({why}): {op:?}");
        }
    } else {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for op in ops {
            *kinds.entry(op.kind()).or_default() += 1;
        }
        info!("reconcile ({why}): {} changes: {kinds:?}", ops.len());
    }
}

/// [`firewall::ensure`] runs `iptables-save`, `iptables-restore` and `nft`:
/// on the blocking pool, not on a runtime worker.
async fn ensure_firewall(fw: FirewallSpec) -> Result<Vec<firewall::Problem>, String> {
    tokio::task::spawn_blocking(move || firewall::ensure(&fw))
        .await
        .unwrap_or_else(|e| Err(format!("firewall task: {e}")))
}

/// Whether a kernel notification is about our device, or about a route
/// through the underlay into the family's `network` (direct routes, the
/// only ones there the reconcile keeps or sweeps: another route on the
/// underlay, a default route a DHCP client renews, is not ours). Without a
/// device every link event matters: it may be the device coming back or
/// going.
fn concerns_us(device_index: Option<u32>, underlay: u32, network: Option<IpNet>, change: &Change) -> bool {
    match (device_index, change) {
        (_, Change::Overrun) => true,
        (_, Change::Route { oif, route, .. }) if *oif == Some(underlay) => {
            match (route, network) {
                (Some(r), Some(n)) => n.contains(&r.dst),
                // Not a main-table unicast route, or no network to tell by.
                _ => true,
            }
        }
        (None, Change::Link(_)) => true,
        (None, _) => false,
        (Some(idx), Change::Link(i) | Change::Neigh { index: i, .. } | Change::Addr(i)) => *i == idx,
        (Some(idx), Change::Route { oif, .. }) => *oif == Some(idx),
    }
}

/// Whether a kernel notification may mean the underlay changed: a link or
/// address event on it, an overrun, or, while it is gone, any new link.
fn concerns_underlay(underlay: u32, missing: bool, change: &Change) -> bool {
    match change {
        Change::Overrun => true,
        Change::Link(i) => *i == underlay || missing,
        Change::Addr(i) => *i == underlay || missing,
        // A default route coming back may be what the choice waits for.
        Change::Route { .. } => missing,
        Change::Neigh { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{concerns_underlay, concerns_us};
    use flannel_net::netlink::{Change, Route, Scope};
    use ipnet::IpNet;

    #[test]
    fn notifications_about_our_device_and_the_underlays_routes_concern_us() {
        let net: Option<IpNet> = Some("10.244.0.0/16".parse().unwrap());
        let concerns_us = |idx, underlay, c: &Change| concerns_us(idx, underlay, net, c);
        let route = |oif| Change::Route { oif, route: None, deleted: false };
        assert!(concerns_us(Some(7), 2, &Change::Link(7)));
        assert!(!concerns_us(Some(7), 2, &Change::Link(8)));
        assert!(concerns_us(Some(7), 2, &route(Some(2))));
        assert!(concerns_us(Some(7), 2, &route(Some(7))));
        assert!(!concerns_us(Some(7), 2, &route(Some(9))));
        assert!(concerns_us(None, 2, &Change::Link(9)), "without a device any link may be it coming back");
        assert!(!concerns_us(None, 2, &Change::Neigh { index: 9, entry: None, deleted: false }));
        assert!(concerns_us(Some(7), 2, &Change::Overrun));
        // Of the underlay's main-table routes, those into the network only.
        let to = |dst: &str, oif| Change::Route {
            oif,
            route: Some(Route {
                dst: dst.parse().unwrap(),
                gateway: Some("192.0.2.1".parse().unwrap()),
                oif,
                onlink: false,
                scope: Scope::Global,
            }),
            deleted: false,
        };
        assert!(concerns_us(Some(7), 2, &to("10.244.3.0/24", Some(2))), "a direct route");
        assert!(!concerns_us(Some(7), 2, &to("0.0.0.0/0", Some(2))), "the default route");
        assert!(!concerns_us(None, 2, &to("198.51.100.0/24", Some(2))));
        assert!(concerns_us(Some(7), 2, &to("198.51.100.0/24", Some(7))), "any route through our device");
    }

    #[test]
    fn link_and_address_events_on_the_underlay_ask_for_a_new_choice() {
        assert!(concerns_underlay(2, false, &Change::Link(2)));
        assert!(concerns_underlay(2, false, &Change::Addr(2)));
        assert!(!concerns_underlay(2, false, &Change::Link(9)));
        assert!(concerns_underlay(2, true, &Change::Link(9)), "while it is gone, a new link may be it");
        assert!(!concerns_underlay(2, false, &Change::Route { oif: Some(2), route: None, deleted: false }));
    }
}
