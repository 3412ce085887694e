//! Mixed clusters: upstream flannel's own `flanneld` (v0.20.2, built by
//! `/work/shared/upstream-flannel/build.sh` into
//! `/var/cache/flannel-rs/upstream/`) on some nodes of an [`Overlay`] and
//! flanneld-rs on the others, started with the same flags, files and
//! environment; and the kernel state each kind programs, reduced to a form
//! that can be compared between peers and between the two kinds.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netns_fixtures::Netns;
use serde_json::Value;

use crate::kube::{ApiServer, KubeOverlay, HOST6, PREFIX};
use crate::overlay::{leases, Overlay, ETCD};

/// Where upstream's flanneld is: `$FLANNEL_RS_UPSTREAM_FLANNELD`, else the
/// cache of `build.sh`.
pub fn upstream_flanneld_path() -> PathBuf {
    std::env::var_os("FLANNEL_RS_UPSTREAM_FLANNELD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/flannel-rs/upstream/flanneld-v0.20.2"))
}

/// Whether upstream's flanneld and iptables (which it runs for its FORWARD
/// rules) are here; skips, or fails under `CI=true`, when not.
pub fn require_upstream() -> bool {
    let bin = upstream_flanneld_path();
    if !bin.is_file() {
        return netns_fixtures::skip_or_fail(&format!(
            "this test needs upstream flannel's flanneld at {} (run /work/shared/upstream-flannel/build.sh, \
             or set FLANNEL_RS_UPSTREAM_FLANNELD)",
            bin.display()
        ));
    }
    let iptables = std::process::Command::new("iptables").arg("-V").output().is_ok_and(|o| o.status.success());
    if !iptables {
        return netns_fixtures::skip_or_fail("upstream flanneld needs iptables (Debian package iptables)");
    }
    true
}

/// Which daemon a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Upstream flannel's flanneld v0.20.2.
    Upstream,
    /// flanneld-rs.
    Ours,
}

/// How many times `needle` occurs in node `i`'s log.
fn count(o: &Overlay, i: usize, needle: &str) -> usize {
    o.log(i).matches(needle).count()
}

/// The line upstream logs once its subnet file is written and its backend
/// runs.
const UPSTREAM_READY: &str = "Running backend.";

/// Starts node `i`'s daemon of `kind` with the node's flags and environment
/// (the same for both kinds: `--etcd-endpoints`, `--subnet-file`, then
/// [`Overlay::set_flags`]'s), and waits until it says it is ready.
pub fn start(o: &mut Overlay, i: usize, kind: Kind) {
    match kind {
        Kind::Ours => o.start(i),
        Kind::Upstream => {
            let before = count(o, i, UPSTREAM_READY);
            let renew_before = count(o, i, UPSTREAM_WATCHING);
            let etcd_mode = !o.flags(i).iter().any(|f| f == "--kube-subnet-mgr");
            let watchers_before = if etcd_mode { etcd_watchers(o).0 } else { 0.0 };
            let mut cmd = o.cluster.node(i).ns.command(upstream_flanneld_path());
            cmd.args(["--etcd-endpoints", ETCD, "--subnet-file"]).arg(&o.daemons[i].subnet_file);
            cmd.args(o.flags(i)).envs(o.env(i));
            // Verbosity 2: upstream logs each peer it programs ("adding
            // subnet: ..."), which the tests wait for.
            cmd.arg("--v=2");
            o.spawn_command(i, cmd);
            let deadline = Instant::now() + Duration::from_secs(30);
            while count(o, i, UPSTREAM_READY) <= before {
                let exited = o.daemons[i].proc.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() >= deadline {
                    panic!("upstream flanneld on node{i} is not ready ({exited:?}); its log ends:\n{}", tail(o, i));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if etcd_mode {
                // Upstream v0.20.2's etcd watch takes one event per watch
                // and then watches again from "now" (subnet/etcd/registry.go
                // watchSubnets, local_manager.go WatchLeases): a lease
                // written between its snapshot and the end of its first
                // watch is never seen (observed: started back to back, the
                // first upstream node programmed none of the nodes started
                // after it). Its own-lease watch ends that first round and
                // logs "Waiting for ... to renew lease" a second time; once
                // both of its watches watch "from now", etcd counts two
                // watchers more than before and none "slow" (catching up
                // with past revisions): only then may the next node write
                // its lease.
                crate::wait_until_or(
                    Duration::from_secs(10),
                    &|| {
                        let (all, slow) = etcd_watchers(o);
                        count(o, i, UPSTREAM_WATCHING) >= renew_before + 2
                            && all >= watchers_before + 2.0
                            && slow == 0.0
                    },
                    &|| {
                        format!(
                            "upstream flanneld on node{i} to end its first watch round (etcd's watchers (all, slow): \
                             {:?}, {watchers_before} before); its log ends:\n{}",
                            etcd_watchers(o),
                            tail(o, i)
                        )
                    },
                );
            }
        }
    }
}

/// etcd's count of watchers, and of those still catching up with past
/// revisions, from its /metrics. Asked in HTTP/1.0, so that the answer is
/// not chunked (HTTP/1.1's chunk-size lines can cut a metric's line in
/// two). A failed or incomplete read (seen under load, with several
/// clusters' tests side by side: a 5-s read timeout) is tried again, up to
/// 5 times.
fn etcd_watchers(o: &Overlay) -> (f64, f64) {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = ETCD.trim_start_matches("http://").parse().unwrap();
    let fetch = || -> std::io::Result<(f64, f64)> {
        let mut s = flannel_net::netns::NetNs::open(o.outside().path())?
            .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let get = |name: &str| {
            crate::metric(&text, name)
                .ok_or_else(|| std::io::Error::other(format!("no {name} in the {} bytes read", text.len())))
        };
        Ok((get("etcd_debugging_mvcc_watcher_total")?, get("etcd_debugging_mvcc_slow_watcher_total")?))
    };
    let mut tries = 0;
    loop {
        tries += 1;
        match fetch() {
            Ok(counts) => return counts,
            Err(e) if tries < 5 => eprintln!("etcd's /metrics, try {tries} of 5: {e}; again"),
            Err(e) => panic!("etcd's /metrics: {e} (5 tries)"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What upstream logs each time its own-lease watch sees its lease.
const UPSTREAM_WATCHING: &str = "to renew lease";

/// Waits until upstream's daemon on node `i` logs that it programmed `subnet`
/// (vxlan: "adding subnet: S" or, DirectRouting, "Adding direct route to
/// subnet: S"; host-gw and udp: "Subnet added: S").
pub fn wait_upstream_added(o: &Overlay, i: usize, subnet: &str) {
    let said = [
        format!("adding subnet: {subnet} "),
        format!("Adding direct route to subnet: {subnet} "),
        format!("Subnet added: {subnet}"),
    ];
    crate::wait_until_or(Duration::from_secs(10), &|| said.iter().any(|s| o.log(i).contains(s)), &|| {
        format!("upstream flanneld on node{i} to add {subnet}; its log ends:\n{}", tail(o, i))
    });
}

/// The last 40 lines of node `i`'s log.
pub fn tail(o: &Overlay, i: usize) -> String {
    let log = o.log(i);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One peer as a lease describes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// `10.244.3.0/24`.
    pub subnet: String,
    /// Its VTEP MAC (vxlan only).
    pub mac: Option<String>,
    /// Its public IP.
    pub public_ip: String,
}

/// The subnets a lease's etcd key names: `.../10.244.1.0-24` is
/// (`10.244.1.0/24`, `None`), a dual-stack lease's
/// `.../10.244.1.0-24&2001:db8:10:1::-64` is (`10.244.1.0/24`,
/// `Some("2001:db8:10:1::/64")`).
pub fn key_subnets(key: &str) -> (String, Option<String>) {
    let cidr = |part: &str| {
        let (net, len) = part.rsplit_once('-').unwrap_or_else(|| panic!("lease key {key}"));
        format!("{net}/{len}")
    };
    let tail = key.rsplit('/').next().unwrap();
    match tail.split_once('&') {
        Some((v4, v6)) => (cidr(v4), Some(cidr(v6))),
        None => (cidr(tail), None),
    }
}

/// The peers etcd knows (their IPv4 half).
pub fn etcd_peers(o: &Overlay) -> Vec<Peer> {
    leases(o.outside())
        .into_iter()
        .map(|(key, v)| Peer {
            subnet: key_subnets(&key).0,
            mac: v["BackendData"]["VtepMAC"].as_str().map(str::to_string),
            public_ip: v["PublicIP"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// The IPv6 halves of the dual-stack leases etcd knows: the IPv6 subnet of
/// the key, `BackendV6Data`'s VTEP MAC and `PublicIPv6`.
pub fn etcd_peers6(o: &Overlay) -> Vec<Peer> {
    leases(o.outside())
        .into_iter()
        .filter_map(|(key, v)| {
            Some(Peer {
                subnet: key_subnets(&key).1?,
                mac: v["BackendV6Data"]["VtepMAC"].as_str().map(str::to_string),
                public_ip: v["PublicIPv6"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// The etcd key of node `i`'s lease, whichever families it has: the one
/// key whose IPv4 subnet is the node's.
pub fn lease_key_of(o: &Overlay, i: usize) -> String {
    let own = o.subnet(i).to_string();
    let keys: Vec<String> = leases(o.outside()).into_keys().filter(|k| key_subnets(k).0 == own).collect();
    assert_eq!(keys.len(), 1, "node{i}'s lease ({own}) in etcd: {keys:?}");
    keys.into_iter().next().unwrap()
}

/// The peers the API server knows: Nodes with `kube-subnet-manager: "true"`
/// and a podCIDR.
pub fn kube_peers(api: &ApiServer) -> Vec<Peer> {
    let nodes = api.get_json(&["nodes"]);
    let mut out = Vec::new();
    for n in nodes["items"].as_array().unwrap() {
        let a = &n["metadata"]["annotations"];
        let get = |k: &str| a[format!("{PREFIX}/{k}")].as_str().map(str::to_string);
        if get("kube-subnet-manager").as_deref() != Some("true") {
            continue;
        }
        let (Some(cidr), Some(ip)) = (n["spec"]["podCIDR"].as_str(), get("public-ip")) else { continue };
        let mac = get("backend-data")
            .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            .and_then(|d| d["VtepMAC"].as_str().map(str::to_string));
        out.push(Peer { subnet: cidr.to_string(), mac, public_ip: ip });
    }
    out
}

/// The IPv6 halves of the leases the API server knows: Nodes with
/// `kube-subnet-manager: "true"`, an IPv6 entry in `spec.podCIDRs`, and
/// `public-ipv6` (the VTEP MAC from `backend-v6-data`).
pub fn kube_peers6(api: &ApiServer) -> Vec<Peer> {
    let nodes = api.get_json(&["nodes"]);
    let mut out = Vec::new();
    for n in nodes["items"].as_array().unwrap() {
        let a = &n["metadata"]["annotations"];
        let get = |k: &str| a[format!("{PREFIX}/{k}")].as_str().map(str::to_string);
        if get("kube-subnet-manager").as_deref() != Some("true") {
            continue;
        }
        let cidrs = n["spec"]["podCIDRs"].as_array().cloned().unwrap_or_default();
        let cidr6 = cidrs.iter().filter_map(Value::as_str).find(|c| c.contains(':'));
        let (Some(cidr), Some(ip)) = (cidr6, get("public-ipv6")) else { continue };
        let mac = get("backend-v6-data")
            .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            .and_then(|d| d["VtepMAC"].as_str().map(str::to_string));
        out.push(Peer { subnet: cidr.to_string(), mac, public_ip: ip });
    }
    out
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

fn bridge_json(ns: &Netns, args: &[&str]) -> Value {
    let out = ns.run_ok("bridge", &[&["-j"], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bridge -j {args:?}: {e}: {out}"))
}

/// Everything of a node's kernel state that names `peer` (routes to its
/// subnet in any table of the main routing table, neighbours for its subnet's
/// address or its VTEP MAC, FDB entries for its MAC or public IP), each
/// entry as `ip -j -d`/`bridge -j` prints it, with the peer's own values
/// replaced by `<subnet>`, `<net>`, `<mac>`, `<ip>`: two peers handled the
/// same way give the same set.
pub fn peer_entries(ns: &Netns, peer: &Peer) -> BTreeSet<String> {
    let net = peer.subnet.split('/').next().unwrap().to_string();
    let q = |s: &str| format!("\"{s}\"");
    let normalise = |v: &Value| {
        let mut s = v.to_string();
        s = s.replace(&q(&peer.subnet), "\"<subnet>\"").replace(&q(&net), "\"<net>\"");
        s = s.replace(&q(&peer.public_ip), "\"<ip>\"");
        if let Some(mac) = &peer.mac {
            s = s.replace(&q(mac), "\"<mac>\"");
        }
        s
    };
    let family = if peer.subnet.contains(':') { "-6" } else { "-4" };
    let mut out = BTreeSet::new();
    for r in array(ns.ip_json(&[family, "-d", "route", "show", "table", "main"])) {
        if r["dst"] == peer.subnet.as_str() {
            out.insert(format!("route {}", normalise(&r)));
        }
    }
    for n in array(ns.ip_json(&["neigh", "show"])) {
        if n["dst"] == net.as_str() || peer.mac.as_deref().is_some_and(|m| n["lladdr"] == m) {
            out.insert(format!("neigh {}", normalise(&n)));
        }
    }
    for f in array(bridge_json(ns, &["fdb", "show"])) {
        if f["dst"] == peer.public_ip.as_str() || peer.mac.as_deref().is_some_and(|m| f["mac"] == m) {
            out.insert(format!("fdb {}", normalise(&f)));
        }
    }
    out
}

/// The shape of what node `i` programs for each of its peers: the distinct
/// [`peer_entries`] sets over every peer but itself, each with the peers
/// that have it (one set when every peer is handled alike).
pub fn peer_shapes(o: &Overlay, i: usize, peers: &[Peer]) -> Vec<(BTreeSet<String>, Vec<String>)> {
    let node = o.cluster.node(i);
    let own = [node.underlay_ip.to_string(), node_ipv6(i).to_string()];
    let mut shapes: Vec<(BTreeSet<String>, Vec<String>)> = Vec::new();
    for p in peers.iter().filter(|p| !own.contains(&p.public_ip)) {
        let e = peer_entries(&node.ns, p);
        match shapes.iter_mut().find(|(s, _)| *s == e) {
            Some((_, who)) => who.push(p.public_ip.clone()),
            None => shapes.push((e, vec![p.public_ip.clone()])),
        }
    }
    shapes
}

/// Node `i`'s own overlay device (`flannel.1`, `flannel-v6.1` or
/// `flannel0`), as `ip -j -d link` and `ip -j addr` show it, without what
/// differs between any two nodes (ifindex, MAC, counters), its own subnet's
/// address (IPv4 or IPv6, as `own_subnet`) as `<own>` and its underlay
/// addresses as `<node ip>`; its global addresses (not the link-local one,
/// made from the random MAC) and routes through it to the whole network
/// (a /16 or, IPv6, a /56) too. `None` when the node has no such device.
pub fn own_device(o: &Overlay, i: usize, dev: &str, own_subnet: &str) -> Option<Vec<String>> {
    let ns = &o.cluster.node(i).ns;
    let links = array(ns.ip_json(&["-d", "link", "show"]));
    let mut link = links.into_iter().find(|l| l["ifname"] == dev)?;
    let obj = link.as_object_mut().unwrap();
    for k in
        ["ifindex", "address", "broadcast", "operstate", "linkmode", "group", "link_index", "stats64", "promiscuity"]
    {
        obj.remove(k);
    }
    if let Some(info) = obj.get_mut("linkinfo").and_then(|l| l.get_mut("info_data")).and_then(Value::as_object_mut) {
        // The underlay link's ifindex differs between namespaces.
        info.remove("link");
        // flanneld-rs's TUN differs from upstream's on purpose (README,
        // "udp"): multi-queue with vnet headers (one queue per data-path
        // thread, GSO super-packets) and persistent, so that a restart
        // keeps the device and its route. Only its own end sees these.
        for k in ["multi_queue", "numqueues", "numdisabled", "persist", "vnet_hdr"] {
            info.remove(k);
        }
    }
    if dev == "flannel0" {
        for k in ["num_rx_queues", "num_tx_queues", "qdisc"] {
            obj.remove(k);
        }
    }
    let own_net = own_subnet.split('/').next().unwrap();
    let own_ip = o.cluster.node(i).underlay_ip.to_string();
    let own_ip6 = node_ipv6(i).to_string();
    let norm = |v: &Value| {
        let s = v.to_string().replace(&format!("\"{own_net}\""), "\"<own>\"");
        s.replace(&format!("\"{own_ip}\""), "\"<node ip>\"").replace(&format!("\"{own_ip6}\""), "\"<node ip>\"")
    };
    let mut out = vec![format!("link {}", norm(&link))];
    for a in array(ns.ip_json(&["addr", "show", "dev", dev])) {
        for ai in array(a["addr_info"].clone()) {
            // IPv6 link-local addresses are made from the random MAC.
            if ai["family"] == "inet" || ai["family"] == "inet6" && ai["scope"] == "global" {
                out.push(format!("addr {}/{}", norm(&ai["local"]), ai["prefixlen"]));
            }
        }
    }
    for family in ["-4", "-6"] {
        for r in array(ns.ip_json(&[family, "-d", "route", "show", "table", "main", "dev", dev])) {
            if r["dst"].as_str().is_some_and(|d| d.ends_with("/16") || d.ends_with("/56")) {
                out.push(format!("route {}", norm(&r)));
            }
        }
    }
    out.sort();
    Some(out)
}

/// Node `i`'s VTEP MAC (flannel.1's address), if it has one.
pub fn vtep_mac(o: &Overlay, i: usize) -> Option<String> {
    dev_mac(o, i, "flannel.1")
}

/// The MAC of node `i`'s device `dev`, if it has one.
pub fn dev_mac(o: &Overlay, i: usize, dev: &str) -> Option<String> {
    let links = array(o.cluster.node(i).ns.ip_json(&["link", "show"]));
    links.into_iter().find(|l| l["ifname"] == dev).and_then(|l| l["address"].as_str().map(str::to_string))
}

/// Pod `pod`'s IPv4 address on eth0.
pub fn pod_addr(pod: &Netns) -> Option<String> {
    let a = pod.ip_json(&["-4", "addr", "show", "dev", "eth0"]);
    a[0]["addr_info"][0]["local"].as_str().map(str::to_string)
}

/// Pod `pod`'s global IPv6 address on eth0.
pub fn pod_addr6(pod: &Netns) -> Option<Ipv6Addr> {
    let a = pod.ip_json(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    a[0]["addr_info"][0]["local"].as_str().and_then(|s| s.parse().ok())
}

/// The IPv6 network of the dual-stack mixed and migration tests.
pub const NETWORK6: &str = "2001:db8:10::/56";

/// A dual-stack network configuration (10.244.0.0/16 and [`NETWORK6`])
/// with `backend`, as upstream v0.20.2 reads it.
pub fn dual_conf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{backend}}}"#)
}

/// Node `i`'s IPv6 underlay address in the dual-stack tests:
/// `2001:db8::<10 + i>` ([`netns_fixtures::ipv6_of_node`]; node 0:
/// `192.0.2.10` and `2001:db8::10`).
pub fn node_ipv6(i: usize) -> Ipv6Addr {
    netns_fixtures::ipv6_of_node(i)
}

/// Makes every node's underlay dual-stack, for an overlay built on an
/// IPv4-only [`netns_fixtures::Cluster`] (a [`crate::kube::KubeOverlay`];
/// etcd mode uses [`Overlay::dual_stack`]), inside the node namespaces only:
/// IPv6 on and duplicate address detection off there (for what exists and
/// what is made later: addresses are usable at once), `eth0` gets
/// [`node_ipv6`]`/64` (`nodad`) and an IPv6 default route through it (both
/// daemons pick the interface of the default routes; upstream v0.20.2
/// dual-stack wants the IPv4 and the IPv6 one on the same interface, and
/// takes that interface's first global IPv6 address), and the node forwards
/// IPv6. The IPv6 segment is 2001:db8::/64 on the switch; nothing answers
/// beyond it (a device default route: no gateway, unlike
/// [`netns_fixtures::Cluster::dual_stack`]'s, whose `br0` holds one).
pub fn dual_stack_underlay(o: &Overlay) {
    for node in o.cluster.nodes() {
        let ns = &node.ns;
        for conf in ["all", "default", "eth0"] {
            ns.sysctl(&format!("net.ipv6.conf.{conf}.disable_ipv6"), "0").unwrap();
            ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0").unwrap();
        }
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let addr = format!("{}/64", node_ipv6(node.index));
        ns.ip(&["addr", "add", &addr, "dev", "eth0", "nodad"]).unwrap();
        ns.ip(&["-6", "route", "add", "default", "dev", "eth0"]).unwrap();
    }
    // Every node reaches every other over IPv6 before a daemon starts.
    nodes_reach_each_other6(o);
}

/// Node `i`'s IPv6 subnet (`FLANNEL_IPV6_SUBNET` of its subnet.env), if
/// it has one.
pub fn subnet6(o: &Overlay, i: usize) -> Option<ipnet::Ipv6Net> {
    let text = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))?;
    Some(line.parse::<ipnet::Ipv6Net>().unwrap_or_else(|e| panic!("FLANNEL_IPV6_SUBNET={line}: {e}")).trunc())
}

/// Waits until upstream's daemon on node `i` logs that it programmed the
/// IPv6 subnet `subnet` (vxlan: "adding v6 subnet: S").
pub fn wait_upstream_added6(o: &Overlay, i: usize, subnet: &str) {
    let said = format!("adding v6 subnet: {subnet} ");
    crate::wait_until_or(Duration::from_secs(10), &|| o.log(i).contains(&said), &|| {
        format!("upstream flanneld on node{i} to add {subnet}; its log ends:\n{}", tail(o, i))
    });
}

/// Starts the daemons of `kinds` (node `i` runs `kinds[i]`) one after the
/// other; after each, waits until every upstream daemon started before it
/// has programmed its subnet (both of them, dual-stack; the IPv6 one alone,
/// IPv6-only).
pub fn start_nodes(o: &mut Overlay, kinds: &[Kind]) {
    for (i, k) in kinds.iter().enumerate() {
        start(o, i, *k);
        let v4 = o.subnet_env(i, "FLANNEL_SUBNET").map(|_| o.subnet(i).to_string());
        let v6 = subnet6(o, i).map(|s| s.to_string());
        for j in (0..i).filter(|&j| kinds[j] == Kind::Upstream) {
            if let Some(subnet) = &v4 {
                wait_upstream_added(o, j, subnet);
            }
            if let Some(v6) = &v6 {
                wait_upstream_added6(o, j, v6);
            }
        }
    }
}

/// Node `i`'s IPv6 podCIDR in the Kubernetes-mode dual-stack and IPv6-only
/// tests: `2001:db8:10:<i+1>::/64`, inside [`NETWORK6`].
pub fn node_cidr6(i: usize) -> String {
    format!("2001:db8:10:{}::/64", i + 1)
}

/// A Kubernetes-mode overlay of `nodes` nodes, dual-stack: the API server
/// with `IPv6DualStack`, each Node with podCIDRs of both families
/// (`10.244.<i+1>.0/24`, [`node_cidr6`]) as kube-controller-manager
/// sets them, the underlay with IPv6 ([`dual_stack_underlay`]), and the
/// network configuration `conf`; daemons not started.
pub fn kube_dual_stack_overlay(nodes: usize, conf: &str) -> KubeOverlay {
    let mut ko = KubeOverlay::with_conf(nodes, conf);
    ko.api.enable_dual_stack(ko.o.outside());
    for i in 0..nodes {
        ko.create_node_with_cidrs(i, &[format!("10.244.{}.0/24", i + 1), node_cidr6(i)]);
    }
    dual_stack_underlay(&ko.o);
    ko
}

/// A Kubernetes-mode overlay of `nodes` IPv6-only nodes with the network
/// configuration `conf` (`"EnableIPv4":false`); daemons not started. The
/// underlay is [`netns_fixtures::Cluster::dual_stack`]'s (node `i` at
/// [`node_ipv6`]`(i)`, IPv6 default route via the switch) whose nodes then
/// lose every IPv4 address and route ([`ipv6_only_underlay`]): a node's
/// `underlay_ip` names an address it no longer has. etcd and the API server
/// run on the outside host, which keeps both families; the API server
/// listens on its IPv6 address only ([`HOST6`]), which the daemons'
/// kubeconfig names. Each Node has the one podCIDR [`node_cidr6`]`(i)`
/// (`spec.podCIDR` and `spec.podCIDRs`; one family needs no feature gate).
pub fn kube_ipv6_only_overlay(nodes: usize, conf: &str) -> KubeOverlay {
    let ko = KubeOverlay::on(Overlay::dual_stack(nodes, conf), Some(conf), HOST6);
    for i in 0..nodes {
        ko.create_node_with_cidrs(i, &[node_cidr6(i)]);
    }
    ipv6_only_underlay(&ko.o);
    ko
}

/// Takes every IPv4 address off the nodes' `eth0` (the kernel drops the
/// IPv4 routes through it with the last one), inside the node namespaces
/// only, and checks that no node has an IPv4 address or route left but
/// loopback's, and that every node still reaches every other over IPv6.
pub fn ipv6_only_underlay(o: &Overlay) {
    for node in o.cluster.nodes() {
        let ns = &node.ns;
        ns.run_ok("ip", &["-4", "addr", "flush", "dev", &node.underlay_if]);
        let addrs = ns.ip_json(&["-4", "addr", "show", "scope", "global"]);
        let left: Vec<&Value> = array_ref(&addrs).iter().filter(|l| !array_ref(&l["addr_info"]).is_empty()).collect();
        assert!(left.is_empty(), "node{}: IPv4 addresses left: {left:?}", node.index);
        let routes = ns.ip_json(&["-4", "route", "show", "table", "main"]);
        assert!(array_ref(&routes).is_empty(), "node{}: IPv4 routes left: {routes}", node.index);
    }
    nodes_reach_each_other6(o);
}

/// Waits until every node reaches every other at [`node_ipv6`].
fn nodes_reach_each_other6(o: &Overlay) {
    for a in o.cluster.nodes() {
        for b in o.cluster.nodes().iter().filter(|b| b.index != a.index) {
            let to = node_ipv6(b.index).to_string();
            crate::wait_until_or(
                Duration::from_secs(10),
                &|| a.ns.run("ping", &["-6", "-n", "-c1", "-W1", &to]).is_ok_and(|o| o.status.success()),
                &|| format!("node{} to reach node{} at {to}", a.index, b.index),
            );
        }
    }
}

fn array_ref(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}
