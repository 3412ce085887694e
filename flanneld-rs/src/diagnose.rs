//! `flanneld-rs diagnose`: plan against the current kernel and lease state
//! without applying anything, and say every difference in words a person can
//! act on. Exit status 0 only when the node is converged.

use std::collections::BTreeMap;

use flannel_net::netlink::Netlink;
use flannel_net::SubnetEnv;
use serde_json::json;

use crate::backend::{self, Backend};
use crate::daemon::{etcd_options, kube_options, start, subnet_env, Prepared};
use crate::firewall::{self, FirewallSpec};
use crate::flags::Opts;
use crate::lease::Family;
use crate::reconcile::driver::Node;
use crate::reconcile::plan::{Device, Observed, Op};
use crate::reconcile::{desired, kernel, plan};
use crate::subnet::etcd::EtcdStore;
use crate::subnet::kube::KubeStore;
use crate::subnet::LeaseStore;

/// One finding.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// `missing`, `wrong`, `stale`, `note`.
    pub kind: &'static str,
    /// What differs.
    pub what: String,
    /// What the daemon would do (or what the person should do).
    pub fix: String,
}

fn describe(op: &Op, observed: &Observed, sources: &BTreeMap<String, String>, dev: &str) -> Finding {
    let peer = |dst: String| sources.get(&dst).map(|s| format!(" (lease {s})")).unwrap_or_default();
    let fix = op.as_ip(dev);
    let f = |kind, what: String| Finding { kind, what, fix: fix.clone() };
    match op {
        Op::CreateDevice => f("missing", format!("device {dev} does not exist")),
        Op::RecreateDevice(why) => f("wrong", format!("device {dev}: {}", why.join("; "))),
        Op::SetMtu(m) => {
            f("wrong", format!("{dev} has MTU {}, want {m}", observed.device.as_ref().map(|v| v.mtu).unwrap_or(0)))
        }
        Op::SetUp => f("wrong", format!("{dev} is down")),
        Op::SetTxChecksum(on) => f(
            "wrong",
            format!(
                "{dev} has transmit checksum offload {}, want it {}",
                if *on { "off" } else { "on" },
                if *on { "on" } else { "off" }
            ),
        ),
        Op::AddAddr(a) => f("missing", format!("{dev} lacks address {a}")),
        Op::DelAddr(a) => f("stale", format!("{dev} carries address {a}, which is not our lease's")),
        Op::SetNeigh(n) => {
            let src = peer(format!("{}/", n.ip));
            match observed.neighs.iter().find(|x| x.ip == n.ip) {
                Some(h) => {
                    f("wrong", format!("neighbour {} on {dev} has MAC {}, the lease says {}{src}", n.ip, h.mac, n.mac))
                }
                None => f("missing", format!("neighbour {} lladdr {} on {dev} is missing{src}", n.ip, n.mac)),
            }
        }
        Op::DelNeigh(n) => f("stale", format!("neighbour {} lladdr {} on {dev} belongs to no lease", n.ip, n.mac)),
        Op::SetFdb(x) => f("missing", format!("FDB entry {} dst {} on {dev} is missing", x.mac, x.dst)),
        Op::DelFdb(x) => f("stale", format!("FDB entry {} dst {} on {dev} belongs to no lease", x.mac, x.dst)),
        Op::SetRoute(r) if r.gateway.is_none() => f("missing", format!("route {} dev {dev} is missing", r.dst)),
        Op::SetRoute(r) if !r.onlink => {
            let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            f(
                "missing",
                format!("direct route {} via {via} on the underlay is missing{}", r.dst, peer(r.dst.to_string())),
            )
        }
        Op::SetRoute(r) => {
            let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            let src = peer(r.dst.to_string());
            match observed.routes.iter().find(|x| x.dst == r.dst) {
                Some(h) => f(
                    "wrong",
                    format!(
                        "route {} goes via {}, want via {via} dev {dev} onlink{src}",
                        r.dst,
                        h.gateway.map(|g| g.to_string()).unwrap_or("-".into())
                    ),
                ),
                None => f("missing", format!("route {} via {via} dev {dev} onlink is missing{src}", r.dst)),
            }
        }
        Op::DelRoute(r) => f("stale", format!("route {} on {dev} belongs to no lease", r.dst)),
        Op::AddBlackhole(n) => {
            f("missing", format!("blackhole route for our subnet {n} is missing (--ip-blackhole-route)"))
        }
        Op::DelBlackhole(n) => {
            f("stale", format!("blackhole route for our subnet {n} is there without --ip-blackhole-route"))
        }
    }
}

/// Runs the diagnosis; prints it; returns whether the node is converged.
pub async fn run(opts: &Opts, json_out: bool) -> anyhow::Result<bool> {
    if opts.kube_subnet_mgr {
        let store = KubeStore::connect(&kube_options(opts), opts.net_config_path.clone()).await?.without_waiting();
        run_with(opts, json_out, store).await
    } else {
        run_with(opts, json_out, EtcdStore::connect(&etcd_options(opts)).await?).await
    }
}

async fn run_with(opts: &Opts, json_out: bool, mut store: impl LeaseStore) -> anyhow::Result<bool> {
    let nl = Netlink::connect()?;
    let mut findings = Vec::new();
    // The start-up below would create a missing WireGuard key file (and
    // with it a public key no peer knows): diagnose only looks.
    if let crate::config::BackendConfig::Wireguard(_) = store.network_config().await?.backend {
        let path = crate::backend::wireguard::keys::key_file();
        if !path.exists() {
            findings.push(Finding {
                kind: "missing",
                what: format!("the WireGuard key file {} does not exist (diagnose does not create it)", path.display()),
                fix: "start flanneld-rs: it creates the key file (mode 0400) and advertises its public key".into(),
            });
            return report(&findings, json_out);
        }
    }
    // The daemon's own start-up, up to the lease.
    let Prepared { cfg, ext, backend, backend6, .. } = start(&nl, opts, &mut store, false).await?;
    let listing = store.list(&cfg).await?;
    for e in listing.unusable {
        findings.push(Finding { kind: "note", what: format!("lease not usable: {e}"), fix: "fix or delete it".into() });
    }
    let leases = listing.leases;
    let Some(own) = store.own(&leases, ext.public_ip).cloned() else {
        let (what, fix) = store.own_missing(ext.public_ip);
        findings.push(Finding { kind: "missing", what, fix });
        return report(&findings, json_out);
    };
    let macs = [
        (own.ipv4.and_then(|v4| v4.vxlan), backend.as_ref().and_then(|b| b.vtep())),
        (own.ipv6.and_then(|v6| v6.vxlan), backend6.as_ref().and_then(|b| b.vtep())),
    ];
    for (d, v) in macs {
        if let (Some(d), Some(v)) = (d, v) {
            if v.mac != d.vtep_mac {
                findings.push(Finding {
                    kind: "wrong",
                    what: format!("{} has MAC {}, our lease ({}) says {}", v.name, v.mac, own.source, d.vtep_mac),
                    fix: "restart flanneld-rs so that it re-advertises the device's MAC".into(),
                });
            }
        }
    }
    if cfg.ipv6.is_some() && own.ipv6.is_none() {
        findings.push(Finding {
            kind: "missing",
            what: format!("our lease {} has no IPv6 subnet, but the network configuration has EnableIPv6", own.source),
            fix: "restart flanneld-rs (it takes a dual-stack lease)".into(),
        });
    }
    let mut sources = BTreeMap::new();
    for l in &leases {
        for f in [Family::V4, Family::V6] {
            if let Some(p) = l.family(f) {
                sources.insert(p.subnet.to_string(), l.source.clone());
                sources.insert(format!("{}/", p.subnet.network()), l.source.clone());
            }
        }
    }
    let node = Node {
        cfg: cfg.clone(),
        ext: ext.clone(),
        backend: backend.clone(),
        backend6: backend6.clone(),
        own: own.clone(),
        selection: Default::default(),
        blackhole_route: opts.ip_blackhole_route,
        vxlan_tx_checksum: crate::daemon::vxlan_tx_checksum(opts),
    };
    let mut rejected = Vec::new();
    for family in node.families() {
        let Some((network, _)) = backend::family_network(&cfg, family) else { continue };
        let b = node.backend_of(family);
        let full = desired::desired(&cfg, family, &own, b, node.segment(family), &leases);
        let mut want = full.desired;
        rejected.extend(full.rejected);
        if family == Family::V4 {
            want.blackhole = node.blackhole();
        }
        let device = want.device.as_ref().map(|d| d.name().to_string());
        let observed =
            kernel::observe(&nl, device.as_deref(), b.sweep(), network, want.blackhole.map(|b| b.subnet)).await?;
        let ops = plan::plan(&want, &observed);
        if let (Some(Device::Tun(_)), Some(Op::CreateDevice)) = (&want.device, ops.first()) {
            findings.push(Finding {
                kind: "missing",
                what: format!("device {} does not exist", b.device_name()),
                fix: "start flanneld-rs (its data path creates the device)".into(),
            });
        } else {
            for op in &ops {
                findings.push(describe(op, &observed, &sources, b.device_name()));
            }
        }
    }
    let names: Vec<&str> = node.backends().into_iter().filter_map(|b| b.device().map(|_| b.device_name())).collect();
    let (network, network6) = (cfg.ipv4.map(|v4| v4.network), cfg.ipv6.map(|v6| v6.network));
    for (_, name) in backend::leftover_devices(&nl, &names, network, network6).await? {
        findings.push(Finding {
            kind: "stale",
            what: format!(
                "device {name} is an earlier backend's (it carries an address in this cluster's network) or a \
                 family's the cluster no longer runs"
            ),
            fix: format!("ip link del {name} (flanneld-rs does at start)"),
        });
    }
    if let Some(Backend::Udp(spec)) = &backend {
        if !udp_listening(spec.bind, spec.port) {
            findings.push(Finding {
                kind: "missing",
                what: format!("nothing listens on UDP {}:{}: the udp data path is not running", spec.bind, spec.port),
                fix: "start flanneld-rs (or look in its log for why the data path stopped)".into(),
            });
        }
    }
    let mut wireguard: Vec<&crate::backend::WireguardSpec> = [&backend, &backend6]
        .into_iter()
        .filter_map(|b| match b {
            Some(Backend::Wireguard(w)) => Some(w),
            _ => None,
        })
        .collect();
    // One device for both families (Mode auto, ipv4, ipv6) is looked at once.
    wireguard.dedup_by(|a, b| a.name == b.name);
    for spec in &wireguard {
        let kind = nl.link_by_name(&spec.name).await?.and_then(|l| l.kind);
        // One device for both families listens on a dual-stack IPv6 socket.
        let listening = match (spec.family, spec.one_device) {
            (Family::V4, None) => udp_listening(std::net::Ipv4Addr::UNSPECIFIED, spec.port),
            _ => udp6_listening(spec.port),
        };
        if listening {
            let what = if kind.as_deref() == Some("wireguard") {
                format!(
                    "wireguard: the kernel path runs ({} is a kernel WireGuard device, UDP port {} is bound)",
                    spec.name, spec.port
                )
            } else {
                format!(
                    "wireguard: the user-space data path runs ({} is a TUN device, UDP port {} is bound; this kernel \
                     has no WireGuard)",
                    spec.name, spec.port
                )
            };
            findings.push(Finding { kind: "note", what, fix: "nothing to fix".into() });
        } else {
            findings.push(Finding {
                kind: "missing",
                what: format!(
                    "nothing listens on UDP port {}: the wireguard user-space data path is not running",
                    spec.port
                ),
                fix: "start flanneld-rs (or look in its log for why the data path stopped)".into(),
            });
        }
    }
    if !wireguard.is_empty() {
        // The running daemon's count of failing handshakes per peer (of
        // either family), from its /metrics (when it serves them).
        if opts.healthz_port != 0 {
            match failing_handshakes(&opts.healthz_ip, opts.healthz_port).await {
                Ok(failing) => {
                    for (peer, n) in failing {
                        let Some(source) = sources.get(&peer) else { continue };
                        findings.push(Finding {
                            kind: "wrong",
                            what: format!(
                                "wireguard: {n} handshake responses from peer {peer} ({source}) failed authentication \
                                 since its last good datagram: its PSK differs from ours, or its key is not the one \
                                 its lease advertises"
                            ),
                            fix: "give every node the same Backend.PSK (net-conf.json), or restart that node so that \
                                  its lease advertises its key"
                                .into(),
                        });
                    }
                }
                Err(e) => findings.push(Finding {
                    kind: "note",
                    what: format!("wireguard: could not read the daemon's handshake counts from /metrics: {e}"),
                    fix: "start flanneld-rs with the same --healthz-ip/--healthz-port".into(),
                }),
            }
        }
    }
    for r in rejected {
        findings.push(Finding {
            kind: "note",
            what: format!("lease {} is not programmed: {}", r.source, r.reason),
            fix: "fix or delete that lease".into(),
        });
    }

    let want_env = subnet_env(&cfg, &own, node.pod_mtu(), opts.ip_masq);
    match SubnetEnv::load(&opts.subnet_file) {
        Ok(have) => {
            if have.subnet != want_env.subnet
                || have.networks != want_env.networks
                || have.mtu != want_env.mtu
                || have.ipv6_subnet != want_env.ipv6_subnet
                || have.ipv6_networks != want_env.ipv6_networks
            {
                findings.push(Finding {
                    kind: "wrong",
                    what: format!(
                        "{} says subnet {} IPv6 subnet {} mtu {}, the lease is {} IPv6 {} mtu {}",
                        opts.subnet_file.display(),
                        have.subnet.map(|s| s.to_string()).unwrap_or("-".into()),
                        have.ipv6_subnet.map(|s| s.to_string()).unwrap_or("-".into()),
                        have.mtu,
                        want_env.subnet.map(|s| s.to_string()).unwrap_or_default(),
                        want_env.ipv6_subnet.map(|s| s.to_string()).unwrap_or("-".into()),
                        want_env.mtu
                    ),
                    fix: "restart flanneld-rs to rewrite it".into(),
                });
            }
        }
        Err(e) => findings.push(Finding { kind: "missing", what: e.to_string(), fix: "start flanneld-rs".into() }),
    }
    let fw = FirewallSpec::from_opts(opts, &cfg, &own);
    match firewall::check(&fw) {
        Ok(problems) => findings.extend(problems.into_iter().map(|p| Finding {
            kind: p.kind,
            what: p.what,
            fix: "flanneld-rs rewrites its rules every --iptables-resync seconds; is it running?".into(),
        })),
        Err(e) => findings.push(Finding {
            kind: "missing",
            what: format!("cannot read the {}: {e}", fw.describe()),
            fix: "install the tool named (Debian's iptables or nftables package)".into(),
        }),
    }
    match firewall::leftovers(&fw) {
        Ok(problems) => findings.extend(problems.into_iter().map(|p| Finding {
            kind: p.kind,
            what: p.what,
            fix: "flanneld-rs removes it at start".into(),
        })),
        Err(e) => findings.push(Finding {
            kind: "note",
            what: format!("cannot look for leftover rules: {e}"),
            fix: "install the tool named".into(),
        }),
    }
    if cfg.ipv4.is_some()
        && std::fs::read_to_string(flannel_net::host::IPV4_FORWARD).map(|v| v.trim() != "1").unwrap_or(true)
    {
        findings.push(Finding {
            kind: "wrong",
            what: "net.ipv4.ip_forward is not 1".into(),
            fix: "sysctl -w net.ipv4.ip_forward=1".into(),
        });
    }
    if cfg.ipv6.is_some()
        && std::fs::read_to_string(flannel_net::host::IPV6_FORWARD).map(|v| v.trim() != "1").unwrap_or(true)
    {
        findings.push(Finding {
            kind: "wrong",
            what: "net.ipv6.conf.all.forwarding is not 1 (EnableIPv6)".into(),
            fix: "sysctl -w net.ipv6.conf.all.forwarding=1".into(),
        });
    }
    report(&findings, json_out)
}

/// The peers (subnets) with failing handshakes and their counts, from the
/// daemon's `/metrics` on `ip:port` (its --healthz-ip/--healthz-port; an
/// unspecified address read on loopback).
async fn failing_handshakes(ip: &str, port: u16) -> anyhow::Result<Vec<(String, u64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip: std::net::IpAddr = ip.parse().map_err(|e| anyhow::anyhow!("--healthz-ip {ip:?}: {e}"))?;
    let ip = match ip {
        std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        other => other,
    };
    let addr = std::net::SocketAddr::new(ip, port);
    let body = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: flanneld\r\n\r\n").await?;
        let mut text = String::new();
        c.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    })
    .await
    .map_err(|_| anyhow::anyhow!("{addr}: no answer within 3 s"))?
    .map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    Ok(parse_failing(&body))
}

/// The `flannel_wireguard_failing_handshakes{peer="..."} N` lines of a
/// metrics text, N > 0.
fn parse_failing(text: &str) -> Vec<(String, u64)> {
    let prefix = format!("{}{{peer=\"", crate::health::FAILING_HANDSHAKES);
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (peer, n) = rest.split_once("\"} ")?;
            let n: u64 = n.trim().parse().ok()?;
            (n > 0).then(|| (peer.to_string(), n))
        })
        .collect()
}

/// Whether a socket in this network namespace is bound to `ip:port` (or
/// the wildcard address), from `/proc/net/udp`.
fn udp_listening(ip: std::net::Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else { return false };
    // "sl local_address ...": the address is the in-memory u32 in hex,
    // the port big-endian hex.
    let want = [format!("{:08X}:{port:04X}", u32::from_ne_bytes(ip.octets())), format!("00000000:{port:04X}")];
    table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).any(|local| want.iter().any(|w| w == local))
}

/// Whether an IPv6 socket in this network namespace is bound to the
/// wildcard address and `port`, from `/proc/net/udp6`.
fn udp6_listening(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp6") else { return false };
    let want = format!("{}:{port:04X}", "0".repeat(32));
    table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).any(|local| local == want)
}

fn report(findings: &[Finding], json_out: bool) -> anyhow::Result<bool> {
    let converged = findings.iter().all(|f| f.kind == "note");
    if json_out {
        println!("{}", serde_json::to_string_pretty(&json!({ "converged": converged, "findings": findings }))?);
    } else if findings.is_empty() {
        println!("converged: the kernel matches every lease");
    } else {
        for f in findings {
            println!("{:<8} {}\n         fix: {}", f.kind, f.what, f.fix);
        }
        println!("{}", if converged { "converged (with notes)" } else { "NOT converged" });
    }
    Ok(converged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_handshakes_are_read_from_the_metrics_text() {
        let text = "# HELP flannel_wireguard_failing_handshakes x\n# TYPE flannel_wireguard_failing_handshakes gauge\n\
                    flannel_wireguard_failing_handshakes{peer=\"10.244.1.0/24\"} 3\n\
                    flannel_wireguard_failing_handshakes{peer=\"10.244.2.0/24\"} 0\n\
                    flannel_wireguard_dropped_invalid_total 7\n";
        assert_eq!(parse_failing(text), [("10.244.1.0/24".to_string(), 3)]);
    }
}
