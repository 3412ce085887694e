//! `/healthz`, `/readyz` and Prometheus `/metrics` on one small listener.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The wireguard data path's per-peer gauge of failing handshakes, which
/// `diagnose` reads.
pub const FAILING_HANDSHAKES: &str = "flannel_wireguard_failing_handshakes";

/// Counters and gauges, updated by the daemon, read by `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ready: rules in place and subnet.env written.
    pub ready: AtomicBool,
    /// Peers currently programmed (IPv4).
    pub peers: AtomicU64,
    /// Peers whose IPv6 half is programmed (dual-stack).
    pub peers_ipv6: AtomicU64,
    /// Leases rejected (bad data) in the last snapshot.
    pub rejected_leases: AtomicU64,
    /// Full reconcile runs (every entry dumped and planned).
    pub reconcile_full_runs: AtomicU64,
    /// Incremental reconcile runs (only the changed leases' entries, planned
    /// against what the last full run saw and the runs since applied).
    pub reconcile_incremental_runs: AtomicU64,
    /// Sum of the incremental runs' durations, microseconds (also in
    /// `reconcile_micros`).
    pub reconcile_incremental_micros: AtomicU64,
    /// Kernel notifications that agreed with what we programmed (the echo
    /// of our own changes), which ask for no reconcile.
    pub kernel_echoes: AtomicU64,
    /// Kernel notifications about what we own that did not agree with what
    /// we programmed (hand edits, deletions, our model unknown), each of
    /// which asks for a full reconcile.
    pub kernel_disagreements: AtomicU64,
    /// Kernel changes made.
    pub reconcile_ops: AtomicU64,
    /// Sum of reconcile durations, microseconds.
    pub reconcile_micros: AtomicU64,
    /// Netlink requests that failed.
    pub netlink_errors: AtomicU64,
    /// Lease renewals done.
    pub lease_renewals: AtomicU64,
    /// The NetworkPolicy agent's counters (zero when it is off).
    pub policy: Arc<crate::netpol::PolicyMetrics>,
    /// The udp data path's counters (absent with other backends).
    pub udp: UdpMetrics,
    /// The wireguard data path's counters (zero with other backends).
    pub wireguard: Arc<crate::backend::wireguard::datapath::Counters>,
}

type StatsReader = Box<dyn Fn() -> crate::udp::Stats + Send + Sync>;

/// The udp data path's counters, kept monotonic across data path restarts.
#[derive(Default)]
pub struct UdpMetrics {
    /// What earlier data paths counted, and a reader of the current one's.
    inner: std::sync::Mutex<(crate::udp::Stats, Option<StatsReader>)>,
    /// Data path restarts (its device had gone).
    pub restarts: AtomicU64,
}

impl std::fmt::Debug for UdpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpMetrics").field("stats", &self.read()).finish()
    }
}

impl UdpMetrics {
    /// Reads a (new) data path from now on; the previous one's final counts
    /// are kept.
    pub fn attach(&self, reader: impl Fn() -> crate::udp::Stats + Send + Sync + 'static) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.1.take() {
            g.0 += old();
        }
        g.1 = Some(Box::new(reader));
    }

    /// The counts so far, if a data path ever ran.
    pub fn read(&self) -> Option<crate::udp::Stats> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let reader = g.1.as_ref()?;
        let mut s = g.0;
        s += reader();
        Some(s)
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: String| {
            let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        metric(
            "flannel_peers",
            "gauge",
            "Peers programmed (in the kernel, or in the udp data path's table).",
            g(&self.peers),
        );
        metric(
            "flannel_peers_ipv6",
            "gauge",
            "Peers whose IPv6 subnet is programmed (dual-stack; 0 without EnableIPv6).",
            g(&self.peers_ipv6),
        );
        metric(
            "flannel_rejected_leases",
            "gauge",
            "Leases not programmed because their data is invalid.",
            g(&self.rejected_leases),
        );
        let runs =
            self.reconcile_full_runs.load(Ordering::Relaxed) + self.reconcile_incremental_runs.load(Ordering::Relaxed);
        metric("flannel_reconcile_runs_total", "counter", "Reconcile runs (full and incremental).", runs.to_string());
        metric(
            "flannel_reconcile_full_runs_total",
            "counter",
            "Full reconcile runs (every entry dumped and planned).",
            g(&self.reconcile_full_runs),
        );
        metric(
            "flannel_reconcile_incremental_runs_total",
            "counter",
            "Incremental reconcile runs (only the changed leases' entries).",
            g(&self.reconcile_incremental_runs),
        );
        metric(
            "flannel_reconcile_incremental_duration_seconds_total",
            "counter",
            "Time spent in incremental reconcile runs.",
            format!("{:.6}", self.reconcile_incremental_micros.load(Ordering::Relaxed) as f64 / 1e6),
        );
        metric(
            "flannel_kernel_echoes_total",
            "counter",
            "Kernel notifications that agreed with what was programmed (no reconcile).",
            g(&self.kernel_echoes),
        );
        metric(
            "flannel_kernel_disagreements_total",
            "counter",
            "Kernel notifications about our entries that disagreed with what was programmed (a full reconcile).",
            g(&self.kernel_disagreements),
        );
        metric(
            "flannel_reconcile_ops_total",
            "counter",
            "Kernel changes made by reconcile runs.",
            g(&self.reconcile_ops),
        );
        metric(
            "flannel_reconcile_duration_seconds_total",
            "counter",
            "Time spent in reconcile runs.",
            format!("{:.6}", self.reconcile_micros.load(Ordering::Relaxed) as f64 / 1e6),
        );
        metric("flannel_netlink_errors_total", "counter", "Netlink requests that failed.", g(&self.netlink_errors));
        metric("flannel_lease_renewals_total", "counter", "Subnet lease renewals.", g(&self.lease_renewals));
        let p = &self.policy;
        metric("flannel_policy_rulesets_applied_total", "counter", "NetworkPolicy rulesets applied.", g(&p.applied));
        metric(
            "flannel_policy_unchanged_total",
            "counter",
            "NetworkPolicy compiles that changed nothing (not applied).",
            g(&p.unchanged),
        );
        metric("flannel_policy_errors_total", "counter", "NetworkPolicy rulesets nft rejected.", g(&p.errors));
        metric(
            "flannel_policy_duration_seconds_total",
            "counter",
            "Time spent compiling and applying NetworkPolicy rulesets.",
            format!("{:.6}", p.micros.load(Ordering::Relaxed) as f64 / 1e6),
        );
        if let Some(u) = self.udp.read() {
            let counters: [(&str, &str, u64); 14] = [
                ("tx_packets", "Inner packets sent to peers.", u.tx_packets),
                ("tx_bytes", "Bytes of inner packets sent to peers.", u.tx_bytes),
                ("rx_packets", "Inner packets received from peers.", u.rx_packets),
                ("rx_bytes", "Bytes of inner packets received from peers.", u.rx_bytes),
                ("dropped_no_peer", "Packets to a destination no peer owns.", u.dropped_no_peer),
                ("dropped_not_peer", "Datagrams from an address that is not a peer's.", u.dropped_not_peer),
                ("dropped_bad", "Malformed packets.", u.dropped_bad),
                ("dropped_ttl", "Packets whose TTL ran out here.", u.dropped_ttl),
                ("icmp_unreachable", "ICMP net unreachable messages sent.", u.icmp_unreachable_sent),
                ("ignored_ipv6", "IPv6 packets from the TUN, ignored.", u.ignored_ipv6),
                ("send_errors", "Inner packets the kernel refused to send.", u.send_errors),
                ("tun_write_errors", "Writes to the TUN that failed.", u.tun_write_errors),
                ("flow_moves", "Buckets of flows moved from a busy worker to a less busy one.", u.flow_moves),
                ("restarts", "Data path restarts (its device had gone).", self.udp.restarts.load(Ordering::Relaxed)),
            ];
            for (name, help, v) in counters {
                metric(&format!("flannel_udp_{name}_total"), "counter", help, v.to_string());
            }
        }
        if self.wireguard.started.load(Ordering::Relaxed) {
            for (name, help, v) in self.wireguard.list() {
                metric(&format!("flannel_wireguard_{name}_total"), "counter", help, v.to_string());
            }
        }
        metric(
            "flannel_ready",
            "gauge",
            "1 once rules are in place and subnet.env is written.",
            u8::from(self.ready.load(Ordering::Relaxed)).to_string(),
        );
        if self.wireguard.started.load(Ordering::Relaxed) {
            let failing = self.wireguard.failing_handshakes.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let name = FAILING_HANDSHAKES;
            let _ = write!(
                s,
                "# HELP {name} Handshake responses from a peer that failed authentication since its last \
                 authenticated datagram (another PSK, or a key not its lease's).\n# TYPE {name} gauge\n"
            );
            for (peer, n) in failing {
                let _ = writeln!(s, "{name}{{peer=\"{peer}\"}} {n}");
            }
        }
        s
    }
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (up to the blank line); a request may
            // arrive in several segments.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut chunk)).await;
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body, ctype) = match path {
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_string(), "text/plain"),
                "/metrics" => ("200 OK", metrics.render(), "text/plain; version=0.0.4"),
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
