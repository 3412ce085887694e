//! The daemon, wired together: flags -> lease store -> interface -> backend
//! -> lease -> the reconcile driver. Start-up is one sequence for every store
//! and backend; [`start`] is shared with `diagnose`, which stops before
//! taking a lease.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flannel_net::netlink::Netlink;
use flannel_net::SubnetEnv;
use ipnet::Ipv4Net;
use log::info;

use crate::backend::{self, Backend};
use crate::config::NetworkConfig;
use crate::firewall::{self, FirewallSpec};
use crate::flags::Opts;
use crate::health::{self, Metrics};
use crate::iface::{self, ExtIface};
use crate::lease::{Family, Lease};
use crate::reconcile::driver::{Driver, Node, Timers};
use crate::subnet::etcd::{EtcdOptions, EtcdStore};
use crate::subnet::kube::{KubeOptions, KubeStore};
use crate::subnet::LeaseStore;
use crate::waiting;

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

/// The Kubernetes options from the flags.
pub fn kube_options(opts: &Opts) -> KubeOptions {
    KubeOptions {
        api_url: opts.kube_api_url.clone(),
        kubeconfig: opts.kubeconfig_file.clone(),
        prefix: opts.kube_annotation_prefix.clone(),
    }
}

/// subnet.env for our lease: as flannel writes it, the first address of each
/// subnet with the subnet's length (`FLANNEL_SUBNET=10.244.1.1/24`,
/// `FLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64`).
/// An IPv6-only cluster's has no IPv4 lines, as flannel's.
pub fn subnet_env(cfg: &NetworkConfig, own: &Lease, mtu: u32, ipmasq: bool) -> SubnetEnv {
    let v4 = cfg.ipv4.zip(own.subnet4());
    let v6 = cfg.ipv6.zip(own.subnet6());
    SubnetEnv {
        networks: v4.map(|(c, _)| vec![c.network]).unwrap_or_default(),
        subnet: v4.map(|(_, s)| {
            let first = std::net::Ipv4Addr::from(u32::from(s.network()) + 1);
            Ipv4Net::new(first, s.prefix_len()).expect("valid prefix")
        }),
        ipv6_networks: v6.map(|(c, _)| vec![c.network]).unwrap_or_default(),
        ipv6_subnet: v6.map(|(_, s)| {
            let first = std::net::Ipv6Addr::from(u128::from(s.network()) + 1);
            ipnet::Ipv6Net::new(first, s.prefix_len()).expect("valid prefix")
        }),
        mtu,
        ipmasq,
    }
}

/// The VTEPs' transmit checksum offload the flags ask to keep:
/// `--vxlan-tx-checksum-off` keeps it off; without it the kernel's (or the
/// administrator's) setting is left alone, as flannel does.
pub fn vxlan_tx_checksum(opts: &Opts) -> Option<bool> {
    opts.vxlan_tx_checksum_off.then_some(false)
}

/// What start-up establishes before a lease is taken.
pub struct Prepared {
    /// The network configuration.
    pub cfg: NetworkConfig,
    /// The underlay interface (with the address we advertise).
    pub ext: ExtIface,
    /// The IPv4 backend (`None` in an IPv6-only cluster).
    pub backend: Option<Backend>,
    /// The IPv6 backend (dual-stack, IPv6-only).
    pub backend6: Option<Backend>,
    /// How the interface was chosen (the reconcile loop chooses again when it changes).
    pub selection: iface::Selection,
}

/// Start-up up to the lease, for any store: the configuration, the
/// interface (with what the store says about this node), the backend (with
/// the VTEP MAC kept across restarts). With `wait` (the daemon), a store
/// that is not reachable yet, or an etcd without the network configuration
/// yet, is waited for (see [`crate::subnet::Waiter`]); without (`diagnose`),
/// the first failure is the answer.
pub async fn start(nl: &Netlink, opts: &Opts, store: &mut impl LeaseStore, wait: bool) -> anyhow::Result<Prepared> {
    let describe = store.describe();
    let cfg = if wait {
        waiting!(format!("the network configuration from {describe}"), store.network_config().await)?
    } else {
        store.network_config().await?
    };
    let networks: Vec<String> = (cfg.ipv4.map(|c| format!("{} (subnets /{})", c.network, c.subnet_len)).into_iter())
        .chain(cfg.ipv6.map(|c| format!("{} (subnets /{})", c.network, c.subnet_len)))
        .collect();
    info!("network {}, backend {}", networks.join(" and "), cfg.backend.type_name());
    let hints = if wait {
        waiting!(format!("this node's settings from {describe}"), store.hints(&cfg).await)?
    } else {
        store.hints(&cfg).await?
    };
    let mut selection = iface::Selection::from_opts(opts)?;
    selection.ipv6 = cfg.ipv6.is_some();
    selection.ipv4 = cfg.ipv4.is_some();
    if let (Some(v6), false) = (opts.public_ipv6, selection.ipv6) {
        log::warn!("--public-ipv6 {v6} has no effect: the network is IPv4 only (net-conf EnableIPv6 is not set)");
    }
    if selection.ipv4 {
        if hints.public_ip.is_some() {
            selection.public_ip = hints.public_ip;
        }
        selection.advertise = hints.advertise;
    }
    if selection.ipv6 {
        if hints.public_ipv6.is_some() {
            selection.public_ipv6 = hints.public_ipv6;
        }
        selection.advertise_ipv6 = hints.advertise_ipv6;
    }
    let ext = selection.select(nl).await?;
    if let (Some(addr), Some(ip)) = (ext.addr, ext.public_ip) {
        info!("using interface {} ({addr}), public IP {ip}", ext.name);
    }
    if let Some(v6) = &ext.v6 {
        info!("using IPv6 address {} of {}, public IPv6 {}", v6.addr, ext.name, v6.public_ip);
    }
    let advertised = if wait {
        waiting!(format!("this node's lease from {describe}"), store.advertised_macs(&cfg, ext.public_ip).await)?
    } else {
        store.advertised_macs(&cfg, ext.public_ip).await?
    };
    let tx = vxlan_tx_checksum(opts);
    let backend = match cfg.ipv4 {
        Some(_) => Backend::for_config(&cfg, &ext, backend::vtep_mac(nl, &cfg, Family::V4, advertised.v4).await?, tx)?,
        None => None,
    };
    let backend6 = match cfg.ipv6 {
        Some(_) => {
            Backend::for_config_v6(&cfg, &ext, backend::vtep_mac(nl, &cfg, Family::V6, advertised.v6).await?, tx)?
        }
        None => None,
    };
    Ok(Prepared { cfg, ext, backend, backend6, selection })
}

/// Where `--healthz-ip`/`--healthz-port` listen, as Go's `net.JoinHostPort`
/// and `Listen` take them: an IPv4 or IPv6 literal (`::` is every address of
/// both families) or a host name; empty is every IPv4 address.
pub fn healthz_addr(ip: &str, port: u16) -> (String, u16) {
    let host = if ip.is_empty() { "0.0.0.0" } else { ip.trim_start_matches('[').trim_end_matches(']') };
    (host.to_string(), port)
}

/// Runs the daemon until SIGTERM/SIGINT (exit 0, kernel state left in place
/// so pods keep talking across a restart) or a fatal error.
pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    if opts.healthz_port != 0 {
        let addr = healthz_addr(&opts.healthz_ip, opts.healthz_port);
        let listener = tokio::net::TcpListener::bind((addr.0.as_str(), addr.1))
            .await
            .with_context(|| format!("listen on {} (--healthz-ip/--healthz-port)", addr.0))?;
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr.0);
        tokio::spawn(health::serve(listener, metrics.clone()));
        info!("serving /healthz, /readyz and /metrics on {addr}");
    }
    if opts.network_policy && !opts.kube_subnet_mgr {
        bail!("--network-policy needs --kube-subnet-mgr (policies come from the Kubernetes API)");
    }
    if opts.kube_subnet_mgr {
        let kube = kube_options(&opts);
        let store = waiting!(
            format!("the Kubernetes API server ({})", kube.api_url.as_deref().unwrap_or("from the kubeconfig")),
            KubeStore::connect(&kube, opts.net_config_path.clone()).await
        )?;
        run_with(opts, store, metrics).await
    } else {
        let etcd = etcd_options(&opts);
        let store = waiting!(format!("etcd at {}", etcd.endpoints.join(",")), EtcdStore::connect(&etcd).await)?;
        run_with(opts, store, metrics).await
    }
}

/// The daemon on one store.
async fn run_with(opts: Opts, mut store: impl LeaseStore, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let started = Instant::now();
    let nl = Netlink::connect()?;
    let Prepared { cfg, ext, backend, backend6, selection } = start(&nl, &opts, &mut store, true).await?;
    let t_prepared = started.elapsed();

    let previous_env = SubnetEnv::load(&opts.subnet_file).ok();
    let previous = previous_env.as_ref().and_then(|e| e.subnet).map(|s| s.trunc());
    let previous6 = previous_env.as_ref().and_then(|e| e.ipv6_subnet).map(|s| s.trunc());
    let attrs = Node::lease_attrs(backend.as_ref(), backend6.as_ref(), &ext);
    let own =
        waiting!(format!("a lease from {}", store.describe()), store.acquire(&cfg, &attrs, previous, previous6).await)?;
    if cfg.ipv6.is_some() && own.ipv6.is_none() {
        bail!(
            "{} gave our lease {} no IPv6 subnet, but the network configuration has EnableIPv6",
            store.describe(),
            own.source
        );
    }
    if cfg.ipv4.is_some() && own.ipv4.is_none() {
        bail!(
            "{} gave our lease {} no IPv4 subnet, but the network configuration has Network",
            store.describe(),
            own.source
        );
    }
    let described: Vec<String> = backend.iter().chain(backend6.iter()).map(|b| b.describe()).collect();
    info!("lease {} ({}), {}", own.subnets(), own.source, described.join("; IPv6: "));
    let mut events = store.watch(&cfg);
    // The watcher's first complete list is the starting lease set.
    let leases = match events.recv().await {
        Some(crate::lease::LeaseEvent::Snapshot(l)) => l,
        Some(crate::lease::LeaseEvent::Revoked(key)) => bail!("our lease {key} was deleted while starting"),
        None => bail!("the lease watcher stopped before its first list"),
    };
    let t_lease = started.elapsed();

    let ours: Vec<&Backend> = backend.iter().chain(backend6.as_ref()).collect();
    backend::remove_leftover_devices(&nl, &ours, cfg.ipv4.map(|v4| v4.network), cfg.ipv6.map(|v6| v6.network)).await;
    let fw = FirewallSpec::from_opts(&opts, &cfg, &own);
    let timers = Timers {
        resync: Duration::from_secs(opts.iptables_resync.max(1)),
        renew_margin: Duration::from_secs(u64::from(opts.subnet_lease_renew_margin) * 60),
    };
    let (subnet, subnet6) = (own.subnet4(), own.subnet6());
    let node = Node {
        cfg: cfg.clone(),
        ext,
        backend,
        backend6,
        own,
        selection,
        blackhole_route: opts.ip_blackhole_route,
        vxlan_tx_checksum: vxlan_tx_checksum(&opts),
    };
    // One MTU for both families of a pod's interface: the smaller.
    let env = subnet_env(&cfg, &node.own, node.pod_mtu(), opts.ip_masq);
    let mut driver = Driver::new(nl.clone(), store, node, metrics.clone(), fw, timers);
    driver.start_data_path().context("start the data path")?;
    // The firewall's set-up (iptables-save/-restore or nft, on the blocking
    // pool) does not depend on the kernel entries: it runs while the first
    // reconcile programs them, as flannel sets its rules up beside its
    // backend's loop. Its result is taken after subnet.env is written, where
    // it always was, and it has ended before any error is returned.
    let rules = tokio::task::spawn_blocking(move || firewall::setup(&fw));
    driver.reconcile_with(leases, "start").await;
    let t_kernel = started.elapsed();

    // Sysctls and an fsync'ed file: off the async workers.
    let files = tokio::task::block_in_place(|| {
        if cfg.ipv4.is_some() {
            flannel_net::host::ensure_sysctl_on(flannel_net::host::IPV4_FORWARD)
                .map_err(|e| anyhow::anyhow!("enable IPv4 forwarding: {e}"))?;
        }
        if cfg.ipv6.is_some() {
            flannel_net::host::ensure_sysctl_on(flannel_net::host::IPV6_FORWARD)
                .map_err(|e| anyhow::anyhow!("enable IPv6 forwarding: {e}"))?;
        }
        env.write_atomic(&opts.subnet_file).with_context(|| format!("write {}", opts.subnet_file.display()))
    });
    let set_up = rules.await.unwrap_or_else(|e| Err(format!("firewall task: {e}")));
    files?;
    for done in set_up.map_err(|e| anyhow::anyhow!("{}: {e}", fw.describe()))? {
        info!("firewall: {done}");
    }
    let describe = driver.store_mut().describe();
    waiting!(
        format!("{describe} to take the node's readiness"),
        driver.store_mut().node_ready(opts.set_node_network_unavailable).await
    )?;
    if opts.network_policy {
        let (client, node_name) =
            driver.store_mut().kube_client().context("--network-policy needs the Kubernetes API")?;
        let node_ips = policy_node_ips(&nl, subnet, subnet6).await?;
        tokio::spawn(crate::netpol::run(client, node_name, node_ips, metrics.policy.clone()));
    } else {
        // `nft list table`: a process, off the async workers.
        tokio::task::block_in_place(crate::netpol::remove_leftover_table);
    }
    metrics.ready.store(true, Ordering::Relaxed);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    info!(
        "ready: {} written, rules in place ({:.0} ms: interface and backend {:.0}, lease and leases {:.0}, kernel {:.0} (the firewall meanwhile), files and the rest of the rules {:.0})",
        opts.subnet_file.display(),
        ms(started.elapsed()),
        ms(t_prepared),
        ms(t_lease - t_prepared),
        ms(t_kernel - t_lease),
        ms(started.elapsed() - t_kernel)
    );
    driver.run(events).await
}

/// The node's own addresses of both families, for NetworkPolicy: traffic
/// between a pod and its node (kubelet's probes) stays allowed. Loopback
/// addresses never reach the forward hook and are left out; so are IPv6
/// link-local ones (fe80::/10): every interface of every pod has one, so
/// they name no node, and what the node sends from them to its pods on the
/// link (neighbour and router discovery) is let through by type instead.
/// `subnet` and `subnet6` are the node's pod subnets, when it has them.
async fn policy_node_ips(
    nl: &Netlink,
    subnet: Option<Ipv4Net>,
    subnet6: Option<ipnet::Ipv6Net>,
) -> anyhow::Result<Vec<std::net::IpAddr>> {
    use std::net::IpAddr;
    let mut node_ips: Vec<IpAddr> = nl
        .all_addrs()
        .await
        .map_err(|e| anyhow::anyhow!("list the node's addresses: {e}"))?
        .into_iter()
        .map(|(_, a)| a.addr())
        .filter(|a| match a {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    // The bridge's addresses may not exist yet (the plugin makes them with
    // the first pod): the first address of each of our subnets.
    if let Some(s) = subnet {
        node_ips.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from(s.network()) + 1)));
    }
    if let Some(s6) = subnet6 {
        node_ips.push(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(s6.network()).wrapping_add(1))));
    }
    node_ips.sort();
    node_ips.dedup();
    Ok(node_ips)
}
