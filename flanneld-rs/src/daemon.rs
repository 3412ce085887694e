//! The daemon: take a lease, set up the node, then keep the kernel in line
//! with the lease set for as long as it runs.
//!
//! Every trigger (a lease snapshot, a netlink notification about our device,
//! a timer) runs the same full reconcile: observe, plan, apply. Deletes are
//! never assumed to have been seen; a missed event is repaired by the next run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use flannel_net::netlink::{Change, Netlink, VxlanSpec, DEFAULT_VXLAN_PORT};
use flannel_net::{MacAddr, SubnetEnv};
use ipnet::Ipv4Net;
use log::{error, info, warn};

use crate::config::NetworkConfig;
use crate::firewall::{self, FirewallSpec};
use crate::flags::Opts;
use crate::health::{self, Metrics};
use crate::iface::{self, ExtIface};
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, VxlanData};
use crate::reconcile::{desired, kernel, plan, Backend, UdpSpec};
use crate::subnet::etcd::{AcquiredLease, EtcdOptions, EtcdSubnetManager};
use crate::subnet::kube::{KubeOptions, KubeSubnetManager};
use crate::udp::{self, UdpConfig, UdpDataPath};

/// How often to reconcile when nothing else asks for it: a safety net for
/// missed notifications (netlink overruns) and hand edits.
const PERIODIC: Duration = Duration::from_secs(10);

/// Notifications arriving this close together are handled by one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// The etcd options from the flags.
pub fn etcd_options(opts: &Opts) -> EtcdOptions {
    EtcdOptions {
        endpoints: opts.etcd_endpoints.clone(),
        prefix: opts.etcd_prefix.clone(),
        keyfile: opts.etcd_keyfile.clone(),
        certfile: opts.etcd_certfile.clone(),
        cafile: opts.etcd_cafile.clone(),
        username: opts.etcd_username.clone(),
        password: opts.etcd_password.clone(),
    }
}

/// What the node was set up with.
pub struct Node {
    /// The network configuration.
    pub cfg: NetworkConfig,
    /// The underlay interface.
    pub ext: ExtIface,
    /// How peers are reached.
    pub backend: Backend,
}

/// The VTEP we want: attributes from the configuration and the interface,
/// and a MAC that survives restarts (the existing device's, else the one in
/// our own lease, else a new random one).
pub fn vtep_spec(cfg: &NetworkConfig, ext: &ExtIface, mac: MacAddr) -> anyhow::Result<VxlanSpec> {
    let Some(vx) = cfg.vxlan() else {
        bail!("Backend.Type {:?}: only vxlan is implemented so far", cfg.backend.type_name());
    };
    let underlay_mtu = vx.mtu.unwrap_or(ext.mtu);
    if underlay_mtu < 68 + 50 {
        let what = if vx.mtu.is_some() { "Backend.MTU" } else { "the interface MTU" };
        bail!("{what} {underlay_mtu} leaves no room for VXLAN's 50 bytes (need at least 118)");
    }
    Ok(VxlanSpec {
        name: format!("flannel.{}", vx.vni),
        vni: vx.vni,
        local: ext.addr.addr(),
        dev: ext.index,
        port: if vx.port == 0 { DEFAULT_VXLAN_PORT } else { vx.port },
        learning: vx.learning,
        gbp: vx.gbp,
        // VXLAN adds 50 bytes: outer IPv4 (20), UDP (8), VXLAN (8), inner Ethernet (14).
        mtu: underlay_mtu - 50,
        mac,
    })
}

/// The backend for the configuration: VXLAN with [`vtep_spec`], or host-gw
/// on the chosen interface (which must hold the public IP: peers route to us
/// through it).
pub fn backend_for(cfg: &NetworkConfig, ext: &ExtIface, mac: MacAddr) -> anyhow::Result<Backend> {
    match cfg.backend.type_name() {
        "vxlan" => Ok(Backend::Vxlan(vtep_spec(cfg, ext, mac)?)),
        "host-gw" => {
            if ext.public_ip != ext.addr.addr() {
                bail!(
                    "Backend.Type host-gw: the public IP {} is not the address of interface {} ({}); peers route \
                     to our pods through that address, so it must be on the interface (check --public-ip, \
                     --iface, public-ip-overwrite)",
                    ext.public_ip,
                    ext.name,
                    ext.addr
                );
            }
            Ok(Backend::HostGw { dev: ext.index, name: ext.name.clone(), mtu: ext.mtu })
        }
        "udp" => {
            let crate::config::BackendConfig::Udp { port } = cfg.backend else { unreachable!("type_name is udp") };
            if ext.mtu < 68 + udp::OVERHEAD {
                bail!(
                    "Backend.Type udp: interface {} has MTU {}, which leaves no room for the 28 bytes of UDP \
                     encapsulation (need at least {})",
                    ext.name,
                    ext.mtu,
                    68 + udp::OVERHEAD
                );
            }
            if port == 0 {
                bail!("Backend.Port 0: the udp backend needs a UDP port (default 8285)");
            }
            Ok(Backend::Udp(UdpSpec {
                name: udp::DEFAULT_TUN_NAME.into(),
                dev: ext.index,
                bind: ext.addr.addr(),
                port,
                mtu: ext.mtu - udp::OVERHEAD,
            }))
        }
        other => bail!("Backend.Type {other:?} is not one of vxlan, host-gw, udp"),
    }
}

/// The udp data path's configuration for our lease.
pub fn udp_config(spec: &UdpSpec, subnet: Ipv4Net, network: Ipv4Net) -> UdpConfig {
    UdpConfig {
        tun_name: spec.name.clone(),
        subnet,
        network,
        mtu: spec.mtu,
        port: spec.port,
        bind: spec.bind,
        queues: 0,
    }
}

/// What the udp data path's device must look like for our lease.
pub fn udp_device(spec: &UdpSpec, subnet: Ipv4Net, network: Ipv4Net) -> udp::kernel::DeviceSpec {
    udp::kernel::DeviceSpec { name: spec.name.clone(), subnet, network, mtu: spec.mtu }
}

/// Devices that an earlier run of this Network with another backend left
/// behind: `flannel0` (a TUN, udp) or `flannel.<VNI>` (VXLAN) that is not
/// the device of the backend in use and carries an address inside Network
/// (which makes it this Network's, not another flannel's). Their routes
/// would shadow ours. Index and name of each.
pub async fn leftover_devices(
    nl: &Netlink,
    backend: &Backend,
    network: Ipv4Net,
) -> flannel_net::netlink::NlResult<Vec<(u32, String)>> {
    let ours = match backend {
        Backend::Vxlan(v) => Some(v.name.as_str()),
        Backend::Udp(u) => Some(u.name.as_str()),
        Backend::HostGw { .. } => None,
    };
    let mut found = Vec::new();
    for link in nl.links().await? {
        let kind = link.kind.as_deref();
        let flannels = (link.name == "flannel0" && kind == Some("tun"))
            || (link.name.starts_with("flannel.") && kind == Some("vxlan"));
        if !flannels || Some(link.name.as_str()) == ours {
            continue;
        }
        let addrs = nl.addrs(link.index).await?;
        if addrs.iter().any(|a| matches!(a, ipnet::IpNet::V4(v) if network.contains(&v.addr()))) {
            found.push((link.index, link.name));
        }
    }
    Ok(found)
}

/// Deletes [`leftover_devices`] (with their addresses and routes).
async fn remove_leftover_devices(nl: &Netlink, backend: &Backend, network: Ipv4Net) {
    let found = match leftover_devices(nl, backend, network).await {
        Ok(f) => f,
        Err(e) => return warn!("look for devices of an earlier backend: {e}"),
    };
    for (index, name) in found {
        info!("deleting {name}: an earlier backend's device for Network {network} (now {})", describe(backend));
        if let Err(e) = nl.del_link(index, &name).await {
            warn!("delete {name}: {e}");
        }
    }
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> MacAddr {
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    MacAddr(b)
}

/// subnet.env for our lease.
pub fn subnet_env(cfg: &NetworkConfig, subnet: Ipv4Net, mtu: u32, ipmasq: bool) -> SubnetEnv {
    let first_host = std::net::Ipv4Addr::from(u32::from(subnet.network()) + 1);
    SubnetEnv {
        networks: vec![cfg.network],
        subnet: Some(Ipv4Net::new(first_host, subnet.prefix_len()).expect("valid prefix")),
        ipv6_networks: Vec::new(),
        ipv6_subnet: None,
        mtu,
        ipmasq,
    }
}

struct Loop {
    nl: Netlink,
    node: Node,
    own: Lease,
    leases: Vec<Lease>,
    last_rejected: Vec<String>,
    metrics: Arc<Metrics>,
    /// Our VTEP's (or TUN's) index as last observed, to tell which
    /// notifications concern us.
    vtep_index: Option<u32>,
    /// The udp backend's data path, and the peer table last given to it.
    udp: Option<UdpDataPath>,
    udp_peers: Vec<(Ipv4Net, std::net::Ipv4Addr)>,
}

impl Loop {
    async fn reconcile(&mut self, why: &str) {
        let start = Instant::now();
        let (want, rejected) =
            desired::desired(&self.node.cfg, &self.own, &self.node.backend, self.node.ext.addr.trunc(), &self.leases);
        let rejected_text: Vec<String> = rejected.iter().map(|r| format!("{}: {}", r.source, r.reason)).collect();
        if rejected_text != self.last_rejected {
            for r in &rejected_text {
                warn!("lease not programmed: {r}");
            }
            self.last_rejected = rejected_text;
        }
        self.metrics.rejected_leases.store(rejected.len() as u64, Ordering::Relaxed);
        let observed = match kernel::observe(&self.nl, &self.node.backend, self.node.cfg.network).await {
            Ok(o) => o,
            Err(e) => {
                error!("reconcile ({why}): {e}");
                self.metrics.netlink_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.vtep_index = observed.vtep.as_ref().map(|v| v.index);
        let ops = plan::plan(&want, &observed);
        if ops.len() <= 20 {
            for op in &ops {
                info!("reconcile ({why}): {op:?}");
            }
        } else {
            let mut kinds: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
            for op in &ops {
                *kinds.entry(op.kind()).or_default() += 1;
            }
            info!("reconcile ({why}): {} changes: {kinds:?}", ops.len());
        }
        let errors = kernel::apply(&self.nl, &want, &observed, &ops).await;
        for e in &errors {
            error!("reconcile ({why}): {e}");
        }
        let m = &self.metrics;
        m.netlink_errors.fetch_add(errors.len() as u64, Ordering::Relaxed);
        m.reconcile_runs.fetch_add(1, Ordering::Relaxed);
        m.reconcile_ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        m.reconcile_micros.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.peers.store((want.peers.len() + want.tunnel.len()) as u64, Ordering::Relaxed);
        if ops.iter().any(|op| matches!(op, plan::Op::CreateVtep | plan::Op::RecreateVtep(_))) {
            let name = self.node.backend.device_name();
            self.vtep_index = self.nl.link_by_name(name).await.ok().flatten().map(|l| l.index);
        }
        if let Backend::Udp(spec) = &self.node.backend {
            let spec = spec.clone();
            self.sync_udp(&spec, &want, why).await;
        }
    }

    /// Stops the udp data path (joining its threads) for a restart.
    fn stop_udp(&mut self) {
        let old = self.udp.take();
        tokio::task::block_in_place(|| drop(old));
        self.metrics.udp.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// udp: the device repaired (or, when it is gone, the data path started
    /// anew, which recreates it), and the peer table brought up to date.
    async fn sync_udp(&mut self, spec: &UdpSpec, want: &plan::Desired, why: &str) {
        let (subnet, network) = (self.own.subnet, self.node.cfg.network);
        let dev = udp_device(spec, subnet, network);
        if self.udp.as_ref().is_some_and(|dp| !dp.running()) {
            warn!("reconcile ({why}): a udp worker thread stopped; restarting the udp data path");
            self.stop_udp();
        }
        if self.udp.is_some() {
            match udp::kernel::repair(&self.nl, &dev).await {
                Ok(Some((index, fixed))) => {
                    self.vtep_index = Some(index);
                    self.metrics.reconcile_ops.fetch_add(fixed.len() as u64, Ordering::Relaxed);
                    for f in fixed {
                        info!("reconcile ({why}): {f}");
                    }
                }
                Ok(None) => {
                    warn!("reconcile ({why}): {} is gone; restarting the udp data path", spec.name);
                    self.stop_udp();
                }
                Err(e) => {
                    error!("reconcile ({why}): {}: {e:#}", spec.name);
                    self.metrics.netlink_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.udp.is_none() {
            let cfg = udp_config(spec, subnet, network);
            match tokio::task::block_in_place(|| UdpDataPath::start(cfg)) {
                Ok(dp) => {
                    self.metrics.udp.attach(dp.stats_reader());
                    self.vtep_index = self.nl.link_by_name(&spec.name).await.ok().flatten().map(|l| l.index);
                    self.udp = Some(dp);
                    self.udp_peers.clear();
                }
                Err(e) => {
                    // Retried by the next reconcile (at the latest the periodic one).
                    error!("reconcile ({why}): start the udp data path: {e:#}");
                    return;
                }
            }
        }
        let peers: Vec<_> = want.tunnel.iter().map(|(s, ip)| (*s, *ip)).collect();
        if let Some(dp) = &self.udp {
            // A new data path starts with an empty table.
            if peers != self.udp_peers {
                info!("reconcile ({why}): udp peer table: {} peer(s)", peers.len());
                dp.set_peers(&peers);
                self.udp_peers = peers;
            }
        }
    }
}

/// Where the leases come from, and what that source needs over time.
enum Store {
    /// etcd: our lease has a TTL and is renewed.
    Etcd { mgr: Box<EtcdSubnetManager>, acquired: AcquiredLease },
    /// The Kubernetes API: the lease is the Node's podCIDR and never expires.
    Kube { mgr: Box<KubeSubnetManager> },
}

/// What start-up established.
struct Started {
    cfg: NetworkConfig,
    ext: ExtIface,
    backend: Backend,
    own: Lease,
    leases: Vec<Lease>,
    store: Store,
    /// Lease snapshots from the store's watcher.
    events: tokio::sync::mpsc::Receiver<LeaseEvent>,
    /// The watcher task (it stops when the receiver is dropped).
    watcher: tokio::task::JoinHandle<()>,
    /// Interface chosen, configuration and leases read, lease taken.
    marks: [Duration; 3],
}

/// The kube options from the flags.
pub fn kube_options(opts: &Opts) -> KubeOptions {
    KubeOptions {
        api_url: opts.kube_api_url.clone(),
        kubeconfig: opts.kubeconfig_file.clone(),
        prefix: opts.kube_annotation_prefix.clone(),
    }
}

/// The VTEP MAC survives restarts, so that peers' FDB entries stay valid:
/// the existing device's, else the one our lease advertises, else a new one.
async fn vtep_mac(nl: &Netlink, cfg: &NetworkConfig, advertised: Option<MacAddr>) -> anyhow::Result<MacAddr> {
    let vni = cfg.vxlan().map(|v| v.vni).unwrap_or(1);
    let existing = nl.vxlan_by_name(&format!("flannel.{vni}")).await?.and_then(|v| v.mac);
    Ok(existing.or(advertised).unwrap_or_else(random_mac))
}

fn lease_attrs(cfg: &NetworkConfig, ext: &ExtIface, backend: &Backend) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ext.public_ip,
        backend_type: cfg.backend.type_name().to_string(),
        vxlan: backend.vtep().map(|v| VxlanData { vni: v.vni, vtep_mac: v.mac }),
    }
}

fn describe(backend: &Backend) -> String {
    match backend {
        Backend::Vxlan(v) => format!("VTEP {} {}", v.name, v.mac),
        Backend::HostGw { name, .. } => format!("host-gw routes on {name}"),
        Backend::Udp(u) => format!("udp data path on {} (UDP port {}, MTU {})", u.name, u.port, u.mtu),
    }
}

async fn start_etcd(nl: &Netlink, opts: &Opts, started: Instant) -> anyhow::Result<Started> {
    let ext = iface::select(nl, opts).await?;
    let t_iface = started.elapsed();
    info!("using interface {} ({}), public IP {}", ext.name, ext.addr, ext.public_ip);
    let mgr = EtcdSubnetManager::connect(&etcd_options(opts)).await?;
    let cfg = mgr.network_config().await?;
    info!("network {} (subnets /{}), backend {}", cfg.network, cfg.subnet_len, cfg.backend.type_name());
    let (leases, _) = mgr.list_leases(&cfg).await?;
    let from_lease = leases.iter().find(|l| l.public_ip == ext.public_ip).and_then(|l| l.vxlan).map(|d| d.vtep_mac);
    let backend = backend_for(&cfg, &ext, vtep_mac(nl, &cfg, from_lease).await?)?;
    let previous = SubnetEnv::load(&opts.subnet_file).ok().and_then(|e| e.subnet).map(|s| s.trunc());
    let t_list = started.elapsed();
    let acquired = mgr.acquire_lease(&cfg, &lease_attrs(&cfg, &ext, &backend), previous).await?;
    let own = acquired.lease.clone();
    info!("lease {} ({}), {}", own.subnet, acquired.key, describe(&backend));
    let (tx, events) = tokio::sync::mpsc::channel(16);
    let watcher = mgr.spawn_watcher(cfg.clone(), acquired.key.clone(), tx);
    Ok(Started {
        cfg,
        ext,
        backend,
        own,
        leases,
        store: Store::Etcd { mgr: Box::new(mgr), acquired },
        events,
        watcher,
        marks: [t_iface, t_list, started.elapsed()],
    })
}

/// Kubernetes mode's network configuration: `--net-config-path`.
pub fn read_net_conf(opts: &Opts) -> anyhow::Result<NetworkConfig> {
    let path = &opts.net_config_path;
    let text = std::fs::read_to_string(path).with_context(|| format!("read --net-config-path {}", path.display()))?;
    Ok(NetworkConfig::parse(&text, &path.display().to_string())?)
}

/// The underlay interface in Kubernetes mode: the Node may name the address
/// to use (`node-public-ip`, instead of `--public-ip`) and the one to
/// advertise (`public-ip-overwrite`).
pub async fn kube_ext_iface(
    nl: &Netlink,
    opts: &Opts,
    mgr: &KubeSubnetManager,
    node: &k8s_openapi::api::core::v1::Node,
) -> anyhow::Result<ExtIface> {
    let (node_ip, overwrite) = mgr.user_ips(node)?;
    let mut sel = opts.clone();
    if let Some(ip) = node_ip {
        info!("node {}: using node-public-ip {ip}", mgr.node_name);
        sel.public_ip = Some(ip);
    }
    let mut ext = iface::select(nl, &sel).await?;
    if let Some(ip) = overwrite {
        info!("node {}: advertising public-ip-overwrite {ip} instead of {}", mgr.node_name, ext.public_ip);
        ext.public_ip = ip;
    }
    Ok(ext)
}

async fn start_kube(nl: &Netlink, opts: &Opts, started: Instant) -> anyhow::Result<Started> {
    let cfg = read_net_conf(opts)?;
    info!("network {} (subnets /{}), backend {}", cfg.network, cfg.subnet_len, cfg.backend.type_name());
    let mgr = KubeSubnetManager::connect(&kube_options(opts)).await?;
    let (node, cidr) = mgr.wait_for_pod_cidr().await?;
    let subnet = crate::subnet::kube::own_subnet(&mgr.node_name, &cidr, &cfg)?;
    let ext = kube_ext_iface(nl, opts, &mgr, &node).await?;
    let t_iface = started.elapsed();
    info!("using interface {} ({}), public IP {}", ext.name, ext.addr, ext.public_ip);

    let prefix = &opts.kube_annotation_prefix;
    let advertised = crate::subnet::kube_annotations::lease_from_node(
        &mgr.node_name,
        Some(&cidr),
        &crate::subnet::kube::annotations(&node),
        prefix,
        &cfg,
    )
    .ok()
    .flatten()
    .and_then(|l| l.vxlan)
    .map(|d| d.vtep_mac);
    let backend = backend_for(&cfg, &ext, vtep_mac(nl, &cfg, advertised).await?)?;
    let attrs = lease_attrs(&cfg, &ext, &backend);
    let t_list = started.elapsed();
    if mgr.publish(&node, &attrs).await? {
        info!("node {}: annotations written (nodes/status)", mgr.node_name);
    }
    // The watcher's first complete list is the starting lease set (one list
    // of all Nodes, not two).
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let watcher = mgr.spawn_watcher(cfg.clone(), tx);
    let leases = match events.recv().await {
        Some(LeaseEvent::Snapshot(l)) => l,
        _ => bail!("the node watcher stopped before its first list"),
    };
    let own = Lease {
        subnet,
        public_ip: ext.public_ip,
        backend_type: attrs.backend_type,
        vxlan: attrs.vxlan,
        source: format!("node {}", mgr.node_name),
    };
    info!("lease {} (node {}), {}", own.subnet, mgr.node_name, describe(&backend));
    Ok(Started {
        cfg,
        ext,
        backend,
        own,
        leases,
        store: Store::Kube { mgr: Box::new(mgr) },
        events,
        watcher,
        marks: [t_iface, t_list, started.elapsed()],
    })
}

/// Runs the daemon until SIGTERM/SIGINT (exit 0, kernel state left in place
/// so pods keep talking across a restart) or a fatal error.
pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    if opts.healthz_port != 0 {
        let addr = std::net::SocketAddr::from((opts.healthz_ip, opts.healthz_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} (--healthz-ip/--healthz-port)"))?;
        tokio::spawn(health::serve(listener, metrics.clone()));
        info!("serving /healthz, /readyz and /metrics on {addr}");
    }

    let started = Instant::now();
    let nl = Netlink::connect()?;
    let st = if opts.kube_subnet_mgr {
        start_kube(&nl, &opts, started).await?
    } else {
        start_etcd(&nl, &opts, started).await?
    };
    let [t_iface, t_list, t_lease] = st.marks;
    let (cfg, own, mut store, mut events, _watcher) = (st.cfg, st.own, st.store, st.events, st.watcher);
    let node = Node { cfg: cfg.clone(), ext: st.ext, backend: st.backend };
    let mut lp = Loop {
        nl: nl.clone(),
        node,
        own: own.clone(),
        leases: st.leases,
        last_rejected: Vec::new(),
        metrics: metrics.clone(),
        vtep_index: None,
        udp: None,
        udp_peers: Vec::new(),
    };
    remove_leftover_devices(&nl, &lp.node.backend, cfg.network).await;
    if let Backend::Udp(spec) = &lp.node.backend {
        // At start a data path that cannot run (the port is taken, no TUN)
        // is fatal; later the reconcile restarts it when its device goes.
        let dp = tokio::task::block_in_place(|| UdpDataPath::start(udp_config(spec, own.subnet, cfg.network)))
            .context("start the udp data path")?;
        metrics.udp.attach(dp.stats_reader());
        lp.udp = Some(dp);
    }
    lp.reconcile("start").await;
    let t_kernel = started.elapsed();

    flannel_net::host::ensure_sysctl_on(flannel_net::host::IPV4_FORWARD)
        .map_err(|e| anyhow::anyhow!("enable IPv4 forwarding: {e}"))?;
    let env = subnet_env(&cfg, own.subnet, lp.node.backend.pod_mtu(), opts.ip_masq);
    env.write_atomic(&opts.subnet_file).with_context(|| format!("write {}", opts.subnet_file.display()))?;
    let fw = FirewallSpec::from_opts(&opts, cfg.network, own.subnet);
    apply_firewall(fw).await.map_err(|e| anyhow::anyhow!("nftables table {}: {e}", firewall::TABLE))?;
    if let Store::Kube { mgr } = &store {
        if opts.set_node_network_unavailable {
            mgr.set_network_available().await?;
        }
        if opts.network_policy {
            // The node's own addresses: traffic between a pod and its node
            // (kubelet's probes) stays allowed.
            let mut node_ips: Vec<std::net::Ipv4Addr> = nl
                .all_addrs()
                .await
                .map_err(|e| anyhow::anyhow!("list the node's addresses: {e}"))?
                .into_iter()
                .filter_map(|(_, a)| match a.addr() {
                    std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
                    _ => None,
                })
                .collect();
            // The bridge's address may not exist yet (the plugin makes it with
            // the first pod): it is the first address of our subnet.
            node_ips.push(std::net::Ipv4Addr::from(u32::from(own.subnet.network()) + 1));
            node_ips.sort();
            node_ips.dedup();
            tokio::spawn(crate::netpol::run(mgr.client(), mgr.node_name.clone(), node_ips, metrics.policy.clone()));
        }
    } else if opts.network_policy {
        bail!("--network-policy needs --kube-subnet-mgr (policies come from the Kubernetes API)");
    }
    if !opts.network_policy {
        crate::netpol::remove_leftover_table();
    }
    metrics.ready.store(true, Ordering::Relaxed);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    info!(
        "ready: {} written, rules in place ({:.0} ms: interface {:.0}, configuration and leases {:.0}, lease {:.0}, kernel {:.0}, files and rules {:.0})",
        opts.subnet_file.display(),
        ms(started.elapsed()),
        ms(t_iface),
        ms(t_list - t_iface),
        ms(t_lease - t_list),
        ms(t_kernel - t_lease),
        ms(started.elapsed() - t_kernel)
    );

    let mut changes = flannel_net::netlink::monitor()?;
    let mut periodic = tokio::time::interval(PERIODIC);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval(Duration::from_secs(opts.iptables_resync.max(1)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let margin = Duration::from_secs(u64::from(opts.subnet_lease_renew_margin) * 60);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    // When a kernel notification about our device asks for a reconcile.
    let mut kernel_due: Option<tokio::time::Instant> = None;
    loop {
        let renew_in = match &store {
            Store::Etcd { acquired, .. } => renew_delay(acquired, margin),
            Store::Kube { .. } => Duration::from_secs(86400 * 365),
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Some(LeaseEvent::Snapshot(leases)) => {
                    lp.leases = leases;
                    lp.reconcile("lease change").await;
                }
                Some(LeaseEvent::Revoked(key)) => {
                    bail!("our lease {key} was deleted from etcd (revoked); exiting so that a restart acquires a new one");
                }
                None => bail!("the lease watcher stopped"),
            },
            change = changes.recv() => match change {
                // Coalesce the burst a hand edit (or our own changes) cause,
                // without holding up lease events meanwhile.
                Some(c) => {
                    if concerns_us(lp.vtep_index, lp.node.backend.underlay(), c) && kernel_due.is_none() {
                        kernel_due = Some(tokio::time::Instant::now() + DEBOUNCE);
                    }
                }
                None => {
                    warn!("netlink notifications stopped; subscribing again");
                    changes = flannel_net::netlink::monitor()?;
                    kernel_due = Some(tokio::time::Instant::now());
                }
            },
            _ = tokio::time::sleep_until(kernel_due.unwrap_or_else(tokio::time::Instant::now)), if kernel_due.is_some() => {
                kernel_due = None;
                lp.reconcile("kernel change").await;
            }
            _ = periodic.tick() => lp.reconcile("periodic").await,
            _ = resync.tick() => {
                if let Err(e) = apply_firewall(fw).await {
                    error!("re-assert nftables table {}: {e}", firewall::TABLE);
                }
            }
            _ = tokio::time::sleep(renew_in), if matches!(store, Store::Etcd { .. }) => {
                if let Store::Etcd { mgr, acquired } = &mut store {
                    match mgr.renew_lease(acquired).await {
                        Ok(renewed) => {
                            *acquired = renewed;
                            metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
                            info!("renewed lease {}", acquired.key);
                        }
                        Err(e) => {
                            error!("renew lease {}: {e}; retrying in a minute", acquired.key);
                            acquired.expires = SystemTime::now() + margin + Duration::from_secs(60);
                        }
                    }
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

/// [`firewall::apply`] runs `nft` (twice, with iptables' FORWARD chain):
/// on the blocking pool, not on a runtime worker.
async fn apply_firewall(fw: FirewallSpec) -> Result<(), String> {
    tokio::task::spawn_blocking(move || firewall::apply(&fw)).await.unwrap_or_else(|e| Err(format!("nft task: {e}")))
}

fn renew_delay(acquired: &AcquiredLease, margin: Duration) -> Duration {
    if acquired.etcd_lease_id.is_none() {
        // A reservation never expires.
        return Duration::from_secs(86400 * 365);
    }
    acquired
        .expires
        .checked_sub(margin)
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::ZERO)
}

/// Whether a kernel notification is about our VTEP, or about a route through
/// the underlay (direct routes). Without a VTEP every link event matters: it
/// may be the device coming back or going.
fn concerns_us(vtep_index: Option<u32>, underlay: u32, change: Change) -> bool {
    match (vtep_index, change) {
        (_, Change::Overrun) => true,
        (_, Change::Route(oif)) if oif == Some(underlay) => true,
        (None, Change::Link(_)) => true,
        (None, _) => false,
        (Some(idx), Change::Link(i) | Change::Neigh(i) | Change::Addr(i)) => i == idx,
        (Some(idx), Change::Route(oif)) => oif == Some(idx),
    }
}
