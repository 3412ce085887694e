//! `flanneld-rs diagnose`: plan against the current kernel and lease state
//! without applying anything, and say every difference in words a person can
//! act on. Exit status 0 only when the node is converged.

use std::collections::BTreeMap;

use flannel_net::netlink::Netlink;
use flannel_net::SubnetEnv;
use serde_json::json;

use crate::daemon::{backend_for, etcd_options, kube_ext_iface, kube_options, read_net_conf, subnet_env};
use crate::firewall::{self, FirewallSpec};
use crate::flags::Opts;
use crate::iface;
use crate::lease::VxlanData;
use crate::reconcile::plan::{Observed, Op};
use crate::reconcile::{desired, kernel, plan};
use crate::subnet::etcd::EtcdSubnetManager;
use crate::subnet::kube::KubeSubnetManager;
use flannel_net::MacAddr;

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
    let f = |kind, what: String, fix: String| Finding { kind, what, fix };
    match op {
        Op::CreateVtep => f("missing", format!("device {dev} does not exist"), format!("create {dev}")),
        Op::RecreateVtep(why) => f("wrong", format!("device {dev}: {}", why.join("; ")), format!("recreate {dev}")),
        Op::SetMtu(m) => f(
            "wrong",
            format!("{dev} has MTU {}, want {m}", observed.vtep.as_ref().map(|v| v.mtu).unwrap_or(0)),
            format!("ip link set {dev} mtu {m}"),
        ),
        Op::SetUp => f("wrong", format!("{dev} is down"), format!("ip link set {dev} up")),
        Op::AddAddr(a) => f("missing", format!("{dev} lacks address {a}"), format!("ip addr add {a} dev {dev}")),
        Op::DelAddr(a) => f(
            "stale",
            format!("{dev} carries address {a}, which is not our lease's"),
            format!("ip addr del {a} dev {dev}"),
        ),
        Op::SetNeigh(n) => {
            let have = observed.neighs.iter().find(|x| x.ip == n.ip);
            let src = peer(format!("{}/", n.ip));
            match have {
                Some(h) => f(
                    "wrong",
                    format!("neighbour {} on {dev} has MAC {}, the lease says {}{src}", n.ip, h.mac, n.mac),
                    format!("ip neigh replace {} lladdr {} dev {dev} nud permanent", n.ip, n.mac),
                ),
                None => f(
                    "missing",
                    format!("neighbour {} lladdr {} on {dev} is missing{src}", n.ip, n.mac),
                    format!("ip neigh replace {} lladdr {} dev {dev} nud permanent", n.ip, n.mac),
                ),
            }
        }
        Op::DelNeigh(n) => f(
            "stale",
            format!("neighbour {} lladdr {} on {dev} belongs to no lease", n.ip, n.mac),
            format!("ip neigh del {} dev {dev}", n.ip),
        ),
        Op::SetFdb(x) => f(
            "missing",
            format!("FDB entry {} dst {} on {dev} is missing", x.mac, x.dst),
            format!("bridge fdb replace {} dev {dev} dst {} self permanent", x.mac, x.dst),
        ),
        Op::DelFdb(x) => f(
            "stale",
            format!("FDB entry {} dst {} on {dev} belongs to no lease", x.mac, x.dst),
            format!("bridge fdb del {} dev {dev} dst {}", x.mac, x.dst),
        ),
        Op::SetRoute(r) if !r.onlink => {
            let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            f(
                "missing",
                format!("direct route {} via {via} on the underlay is missing{}", r.dst, peer(r.dst.to_string())),
                format!("ip route replace {} via {via}", r.dst),
            )
        }
        Op::SetRoute(r) => {
            let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            let have = observed.routes.iter().find(|x| x.dst == r.dst);
            let src = peer(r.dst.to_string());
            match have {
                Some(h) => f(
                    "wrong",
                    format!(
                        "route {} goes via {}, want via {via} dev {dev} onlink{src}",
                        r.dst,
                        h.gateway.map(|g| g.to_string()).unwrap_or("-".into())
                    ),
                    format!("ip route replace {} via {via} dev {dev} onlink", r.dst),
                ),
                None => f(
                    "missing",
                    format!("route {} via {via} dev {dev} onlink is missing{src}", r.dst),
                    format!("ip route replace {} via {via} dev {dev} onlink", r.dst),
                ),
            }
        }
        Op::DelRoute(r) => f(
            "stale",
            format!("route {} on {dev} belongs to no lease", r.dst),
            format!("ip route del {} dev {dev}", r.dst),
        ),
    }
}

/// Runs the diagnosis; prints it; returns whether the node is converged.
pub async fn run(opts: &Opts, json_out: bool) -> anyhow::Result<bool> {
    let nl = Netlink::connect()?;
    let mut findings = Vec::new();
    let (cfg, ext, leases, own) = if opts.kube_subnet_mgr {
        let cfg = read_net_conf(opts)?;
        let mgr = KubeSubnetManager::connect(&kube_options(opts)).await?;
        let node = mgr.own_node().await?;
        let ext = kube_ext_iface(&nl, opts, &mgr, &node).await?;
        let (leases, errors) = mgr.list_leases(&cfg).await?;
        for e in errors {
            findings.push(Finding {
                kind: "note",
                what: format!("lease not usable: {e}"),
                fix: "fix that Node's annotations".into(),
            });
        }
        let own = leases.iter().find(|l| l.source == format!("node {}", mgr.node_name)).cloned();
        if own.is_none() {
            findings.push(Finding {
                kind: "missing",
                what: format!(
                    "node {} has no podCIDR or no flannel annotations ({}/)",
                    mgr.node_name, opts.kube_annotation_prefix
                ),
                fix: "start flanneld-rs on this node (it writes them once the node has a podCIDR)".into(),
            });
        }
        (cfg, ext, leases, own)
    } else {
        let ext = iface::select(&nl, opts).await?;
        let mgr = EtcdSubnetManager::connect(&etcd_options(opts)).await?;
        let cfg = mgr.network_config().await?;
        let (leases, _) = mgr.list_leases(&cfg).await?;
        let own = leases.iter().find(|l| l.public_ip == ext.public_ip).cloned();
        if own.is_none() {
            findings.push(Finding {
                kind: "missing",
                what: format!("no lease in etcd ({}/subnets/) has PublicIP {}", opts.etcd_prefix, ext.public_ip),
                fix: "start flanneld-rs on this node (or check --iface/--public-ip)".into(),
            });
        }
        (cfg, ext, leases, own)
    };
    let Some(own) = own else {
        return report(&findings, json_out);
    };
    let vni = cfg.vxlan().map(|v| v.vni).unwrap_or(1);
    let existing = nl.vxlan_by_name(&format!("flannel.{vni}")).await?.and_then(|v| v.mac);
    let mac = match (existing, own.vxlan, cfg.vxlan()) {
        (Some(m), _, _) | (None, Some(VxlanData { vtep_mac: m, .. }), _) => m,
        (None, None, Some(_)) => anyhow::bail!("our lease has no VtepMAC and there is no VTEP"),
        // Not VXLAN: no MAC is used.
        (None, None, None) => MacAddr([0; 6]),
    };
    let backend = backend_for(&cfg, &ext, mac)?;
    if let (Some(d), Some(v)) = (own.vxlan, backend.vtep()) {
        if existing.is_some_and(|m| m != d.vtep_mac) {
            findings.push(Finding {
                kind: "wrong",
                what: format!("{} has MAC {}, our lease ({}) says {}", v.name, mac, own.source, d.vtep_mac),
                fix: "restart flanneld-rs so that it re-advertises the device's MAC".into(),
            });
        }
    }
    let (want, rejected) = desired::desired(&cfg, &own, &backend, ext.addr.trunc(), &leases);
    let observed = kernel::observe(&nl, &backend, cfg.network).await?;
    let mut sources = BTreeMap::new();
    for l in &leases {
        sources.insert(l.subnet.to_string(), l.source.clone());
        sources.insert(format!("{}/", l.subnet.network()), l.source.clone());
    }
    for op in plan::plan(&want, &observed) {
        findings.push(describe(&op, &observed, &sources, backend.device_name()));
    }
    for (_, name) in crate::daemon::leftover_devices(&nl, &backend, cfg.network).await? {
        findings.push(Finding {
            kind: "stale",
            what: format!("device {name} is an earlier backend's (it carries an address in {})", cfg.network),
            fix: format!("ip link del {name} (flanneld-rs does at start)"),
        });
    }
    if let crate::reconcile::Backend::Udp(spec) = &backend {
        udp_findings(&nl, spec, own.subnet, cfg.network, &mut findings).await?;
    }
    for r in rejected {
        findings.push(Finding {
            kind: "note",
            what: format!("lease {} is not programmed: {}", r.source, r.reason),
            fix: "fix or delete that lease".into(),
        });
    }

    let want_env = subnet_env(&cfg, own.subnet, backend.pod_mtu(), opts.ip_masq);
    match SubnetEnv::load(&opts.subnet_file) {
        Ok(have) => {
            if have.subnet != want_env.subnet || have.networks != want_env.networks || have.mtu != want_env.mtu {
                findings.push(Finding {
                    kind: "wrong",
                    what: format!(
                        "{} says subnet {} mtu {}, the lease is {} mtu {}",
                        opts.subnet_file.display(),
                        have.subnet.map(|s| s.to_string()).unwrap_or("-".into()),
                        have.mtu,
                        want_env.subnet.map(|s| s.to_string()).unwrap_or_default(),
                        want_env.mtu
                    ),
                    fix: "restart flanneld-rs to rewrite it".into(),
                });
            }
        }
        Err(e) => findings.push(Finding { kind: "missing", what: e.to_string(), fix: "start flanneld-rs".into() }),
    }
    let fw = FirewallSpec::from_opts(opts, cfg.network, own.subnet);
    if (fw.masquerade || fw.forward) && !firewall::present(&fw).unwrap_or(false) {
        findings.push(Finding {
            kind: "missing",
            what: format!(
                "nftables table ip {} is missing or lacks its rules, or iptables' FORWARD chain lacks our accept \
                 rules (comment {:?})",
                firewall::TABLE,
                firewall::FORWARD_COMMENT
            ),
            fix: "flanneld-rs re-asserts it every --iptables-resync seconds; is it running?".into(),
        });
    }
    if std::fs::read_to_string(flannel_net::host::IPV4_FORWARD).map(|v| v.trim() != "1").unwrap_or(true) {
        findings.push(Finding {
            kind: "wrong",
            what: "net.ipv4.ip_forward is not 1".into(),
            fix: "sysctl -w net.ipv4.ip_forward=1".into(),
        });
    }
    report(&findings, json_out)
}

/// udp: the TUN device as the data path keeps it, and a socket on the port.
/// (The peer table lives in the daemon's memory; `/metrics` counts it.)
async fn udp_findings(
    nl: &Netlink,
    spec: &crate::reconcile::UdpSpec,
    subnet: ipnet::Ipv4Net,
    network: ipnet::Ipv4Net,
    findings: &mut Vec<Finding>,
) -> anyhow::Result<()> {
    let dev = crate::daemon::udp_device(spec, subnet, network);
    match crate::udp::kernel::inspect(nl, &dev).await? {
        None => findings.push(Finding {
            kind: "missing",
            what: format!("device {} does not exist", spec.name),
            fix: "start flanneld-rs (its udp data path creates the device)".into(),
        }),
        Some((_, faults)) => {
            for fault in faults {
                let kind = match fault {
                    crate::udp::kernel::Fault::StaleAddr(_) => "stale",
                    crate::udp::kernel::Fault::MissingAddr | crate::udp::kernel::Fault::MissingRoute => "missing",
                    _ => "wrong",
                };
                let (what, fix) = fault.describe(&dev);
                findings.push(Finding { kind, what, fix });
            }
        }
    }
    if !udp_listening(spec.bind, spec.port) {
        findings.push(Finding {
            kind: "missing",
            what: format!("nothing listens on UDP {}:{}: the udp data path is not running", spec.bind, spec.port),
            fix: "start flanneld-rs (or look in its log for why the data path stopped)".into(),
        });
    }
    Ok(())
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
