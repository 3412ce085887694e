//! In-place migration: a node running upstream flannel's own flanneld
//! (v0.20.2) is stopped and flanneld-rs started on it with the same flags
//! and files, then back, while a sequence-numbered UDP stream runs each way
//! between a pod on that node and a pod on a node that keeps running
//! upstream. The node keeps its subnet and VTEP MAC, the other node's kernel
//! state for it does not change, the pods keep their addresses; lost
//! datagrams are counted: none for vxlan and host-gw; udp's count is printed
//! (its TUN device goes with the daemon that opened it). Dual-stack vxlan
//! (etcd and Kubernetes mode) too: both subnets, both VTEP MACs and node 1's state for both
//! halves kept, IPv6 TCP connections kept open across each step.
//!
//! Pods are plugged in by our plugin (reading the subnet.env upstream
//! wrote). Upstream's iptables rules are taken over in place
//! ([`assert_upstream_rules_taken_over`]); the takeover of pods upstream's CNI
//! plugin added is tested with the plugins themselves (cni-plugin/tests).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use e2e_tests::kube::{require_kube, ApiServer, KubeOverlay, PREFIX};
use e2e_tests::mixed::{
    dev_mac, dual_conf, etcd_peers, etcd_peers6, kube_dual_stack_overlay, kube_peers, kube_peers6, lease_key_of,
    node_ipv6, peer_entries, pod_addr, pod_addr6, require_upstream, start, start_nodes, subnet6, vtep_mac, Kind, Peer,
};
use e2e_tests::overlay::{leases, Overlay};
use e2e_tests::stream::UdpStream;
use netns_fixtures::{require_root, Netns};

fn conf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#)
}

/// What must not change on node 0 across a migration: its subnet, its VTEP
/// MAC, its lease as the store has it, its pod's address, and what node 1
/// programs for it; dual-stack, the same for the IPv6 half (flannel-v6.1).
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    subnet: String,
    mac: Option<String>,
    lease: String,
    pod: Option<String>,
    peer_state: BTreeSet<String>,
    subnet6: Option<String>,
    mac6: Option<String>,
    pod6: Option<Ipv6Addr>,
    peer_state6: BTreeSet<String>,
}

/// The store's view of node 0's lease: etcd's key and value, or Node0's
/// podCIDR and flannel annotations.
enum Store<'a> {
    Etcd,
    Kube(&'a ApiServer),
}

impl Store<'_> {
    fn lease(&self, o: &Overlay) -> String {
        match self {
            Store::Etcd => {
                let key = lease_key_of(o, 0);
                format!("{key} = {}", leases(o.outside())[&key])
            }
            Store::Kube(api) => {
                let n = api.get_json(&["node", "node0"]);
                let a = n["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
                let mut v: Vec<String> = a
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(PREFIX))
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                    .collect();
                v.sort();
                format!("{} {} {}", n["spec"]["podCIDR"], n["spec"]["podCIDRs"], v.join(" "))
            }
        }
    }

    fn peers(&self, o: &Overlay) -> Vec<Peer> {
        match self {
            Store::Etcd => etcd_peers(o),
            Store::Kube(api) => kube_peers(api),
        }
    }

    /// The IPv6 halves of the leases (dual-stack).
    fn peers6(&self, o: &Overlay) -> Vec<Peer> {
        match self {
            Store::Etcd => etcd_peers6(o),
            Store::Kube(api) => kube_peers6(api),
        }
    }
}

fn identity(o: &Overlay, store: &Store, pod: &Netns) -> Identity {
    let own = o.cluster.node(0).underlay_ip.to_string();
    let me = store.peers(o).into_iter().find(|p| p.public_ip == own).expect("node0's lease");
    let own6 = node_ipv6(0).to_string();
    let me6 = store.peers6(o).into_iter().find(|p| p.public_ip == own6);
    Identity {
        subnet: o.subnet(0).to_string(),
        mac: vtep_mac(o, 0),
        lease: store.lease(o),
        pod: pod_addr(pod),
        peer_state: peer_entries(&o.cluster.node(1).ns, &me),
        subnet6: subnet6(o, 0).map(|s| s.to_string()),
        mac6: dev_mac(o, 0, "flannel-v6.1"),
        pod6: pod_addr6(pod),
        peer_state6: me6.map(|p| peer_entries(&o.cluster.node(1).ns, &p)).unwrap_or_default(),
    }
}

/// A TCP connection from `from` to `to` (at `target`) that stays open
/// across a migration: [`Conn::round_trip`] sends a line and reads it back.
struct Conn {
    stream: BufReader<TcpStream>,
    server: std::thread::JoinHandle<()>,
}

impl Conn {
    fn open(from: &Netns, to: &Netns, target: SocketAddr) -> Conn {
        let listener = to.in_thread(|| TcpListener::bind(target)).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                    break;
                }
            }
        });
        let s = from.in_thread(|| TcpStream::connect_timeout(&target, Duration::from_secs(5))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Conn { stream: BufReader::new(s), server };
        c.round_trip("open");
        c
    }

    /// Sends `what` and reads it back on the same connection.
    fn round_trip(&mut self, what: &str) {
        self.stream.get_mut().write_all(format!("{what}\n").as_bytes()).unwrap_or_else(|e| panic!("{what}: send: {e}"));
        let mut back = String::new();
        self.stream.read_line(&mut back).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert_eq!(back, format!("{what}\n"), "{what}: echo on the connection kept open");
    }

    fn close(self) {
        drop(self.stream);
        self.server.join().unwrap();
    }
}

/// Upstream's iptables rules on a migrated node are taken over in place, not
/// doubled: the FORWARD jump to FLANNEL-FWD is there once and its rules
/// exactly once (dual-stack: in ip6tables too), and no second rule set of
/// ours beside them.
fn assert_upstream_rules_taken_over(ns: &Netns, dual: bool) {
    for tool in if dual { &["iptables", "ip6tables"][..] } else { &["iptables"] } {
        let fwd = ns.run_ok(tool, &["-t", "filter", "-S", "FORWARD"]);
        assert_eq!(fwd.matches("-j FLANNEL-FWD").count(), 1, "{tool}: {fwd}");
        let chain = ns.run_ok(tool, &["-t", "filter", "-S", "FLANNEL-FWD"]);
        assert_eq!(chain.lines().filter(|l| l.starts_with("-A FLANNEL-FWD")).count(), 2, "{tool}: {chain}");
    }
    let nft = ns.run_ok("nft", &["list", "tables"]);
    assert!(!nft.contains("flannel-rs"), "a second rule set beside upstream's: {nft}");
}

/// Migrates node 0 upstream → flanneld-rs → upstream under two streams (pod
/// on node 0 ↔ pod on node 1); returns the datagrams lost in each step
/// (sent, lost) for both directions.
fn migrate_both_ways(o: &mut Overlay, store: &Store, lossless: bool, port: u16) -> Vec<(String, u32, usize)> {
    let (p0, a0) = o.add_pod(0, "mig0");
    let (p1, a1) = o.add_pod(1, "mig1");
    let before = identity(o, store, &p0);
    assert!(!before.peer_state.is_empty() || before.mac.is_none(), "node1 programs nothing for node0: {before:?}");
    // Dual-stack: the pods' IPv6 addresses, and node1's state for node0's
    // IPv6 half.
    let dual = before.subnet6.is_some();
    let v6 = dual.then(|| {
        assert!(!before.peer_state6.is_empty() && before.mac6.is_some(), "node0's IPv6 half: {before:?}");
        let b6 = pod_addr6(&p1).expect("pod on node1 has an IPv6 address");
        (before.pod6.expect("pod on node0 has an IPv6 address"), b6)
    });
    let mut figures = Vec::new();
    for (k, (step, to)) in
        [("upstream -> flanneld-rs", Kind::Ours), ("flanneld-rs -> upstream", Kind::Upstream)].into_iter().enumerate()
    {
        // Dual-stack: one TCP connection each way over IPv6, open across
        // the step (the IPv4 streams count datagrams; the connections show
        // that IPv6 flows are neither reset nor stalled by the takeover).
        let conns6 = v6.map(|(a6, b6)| {
            let port = port + 10 + 2 * k as u16;
            (
                Conn::open(&p0, &p1, SocketAddr::new(b6.into(), port)),
                Conn::open(&p1, &p0, SocketAddr::new(a6.into(), port + 1)),
            )
        });
        let fwd = UdpStream::start(&p0, &p1, SocketAddr::new(a1.into(), port));
        let back = UdpStream::start(&p1, &p0, SocketAddr::new(a0.into(), port + 1));
        o.stop(0);
        if to == Kind::Upstream && o.cluster.node(0).ns.ip_json(&["link", "show"]).to_string().contains("\"flannel0\"")
        {
            // Rolling a udp node back: flanneld-rs keeps its TUN flannel0
            // (persistent, so that its own restarts lose less), and upstream
            // opens "flannel%d": it would get flannel1 beside it while the
            // route to the Network still points into flannel0, read by no
            // one. The rollback step (README) is to delete flannel0 first.
            o.cluster.node(0).ns.run_ok("ip", &["link", "del", "flannel0"]);
        }
        start(o, 0, to);
        fwd.wait_flowing(&format!("pod0 -> pod1 to flow after {step}"));
        back.wait_flowing(&format!("pod1 -> pod0 to flow after {step}"));
        let after = identity(o, store, &p0);
        assert_eq!(after, before, "node0's identity across {step}");
        if let Some((mut c0, mut c1)) = conns6 {
            c0.round_trip(&format!("pod0 -> pod1 over IPv6 after {step}"));
            c1.round_trip(&format!("pod1 -> pod0 over IPv6 after {step}"));
            c0.close();
            c1.close();
        }
        for (dir, s) in [("pod0 -> pod1", fwd), ("pod1 -> pod0", back)] {
            let (sent, lost) = s.stop_and_count();
            println!("{step}: {dir}: {} of {sent} datagrams lost {:?}", lost.len(), &lost[..lost.len().min(10)]);
            if lossless {
                assert!(lost.is_empty(), "{step}: {dir}: {} of {sent} datagrams lost: {lost:?}", lost.len());
            } else {
                // udp: what is lost is one run of consecutive datagrams, the
                // gap between one daemon's TUN going and the other's coming.
                let run = lost.first().map(|f| (*f..*f + lost.len() as u32).collect::<Vec<_>>());
                assert!(
                    lost.is_empty() || run.as_ref() == Some(&lost),
                    "{step}: {dir}: lost more than one gap: {lost:?}"
                );
            }
            figures.push((format!("{step}: {dir}"), sent, lost.len()));
        }
        if to == Kind::Ours {
            assert_upstream_rules_taken_over(&o.cluster.node(0).ns, dual);
        }
    }
    figures
}

fn etcd_migration(backend: &str, lossless: bool, port: u16) {
    if !(require_root() && require_upstream()) {
        return;
    }
    let mut o = Overlay::with_conf(2, &conf(backend));
    start_nodes(&mut o, &[Kind::Upstream, Kind::Upstream]);
    migrate_both_ways(&mut o, &Store::Etcd, lossless, port);
}

#[test]
fn etcd_vxlan_node_migrates_without_loss() {
    etcd_migration(r#"{"Type":"vxlan"}"#, true, 9100);
}

#[test]
fn etcd_host_gw_node_migrates_without_loss() {
    etcd_migration(r#"{"Type":"host-gw"}"#, true, 9200);
}

#[test]
fn etcd_udp_node_migrates_losing_only_the_restart_gap() {
    etcd_migration(r#"{"Type":"udp"}"#, false, 9300);
}

#[test]
fn kube_vxlan_node_migrates_without_loss() {
    if !(require_root() && require_kube() && require_upstream()) {
        return;
    }
    let mut ko = KubeOverlay::with_conf(2, &conf(r#"{"Type":"vxlan"}"#));
    ko.create_node(0);
    ko.create_node(1);
    start_nodes(&mut ko.o, &[Kind::Upstream, Kind::Upstream]);
    migrate_both_ways(&mut ko.o, &Store::Kube(&ko.api), true, 9400);
}

/// Dual-stack vxlan in etcd mode: node 0 keeps both halves of its lease
/// (the one key `10.244.x.0-24&2001:db8:10:y::-64` and its value, so the
/// same `PublicIPv6` and flannel-v6.1 MAC), both subnets in subnet.env, and
/// node 1's state for both; no IPv4 datagram lost, IPv6 connections kept.
#[test]
fn etcd_vxlan_dual_stack_node_migrates_without_loss() {
    if !(require_root() && require_upstream()) {
        return;
    }
    let mut o = Overlay::dual_stack(2, &dual_conf(r#"{"Type":"vxlan"}"#));
    start_nodes(&mut o, &[Kind::Upstream, Kind::Upstream]);
    migrate_both_ways(&mut o, &Store::Etcd, true, 9500);
}

/// Dual-stack vxlan in Kubernetes mode (the API server with
/// `IPv6DualStack`, the Nodes with podCIDRs of both families): as
/// [`etcd_vxlan_dual_stack_node_migrates_without_loss`], node 0 keeping its
/// podCIDRs and its annotations (`backend-v6-data` and `public-ipv6`
/// among them) unchanged.
#[test]
fn kube_vxlan_dual_stack_node_migrates_without_loss() {
    if !(require_root() && require_kube() && require_upstream()) {
        return;
    }
    let mut ko = kube_dual_stack_overlay(2, &dual_conf(r#"{"Type":"vxlan"}"#));
    start_nodes(&mut ko.o, &[Kind::Upstream, Kind::Upstream]);
    migrate_both_ways(&mut ko.o, &Store::Kube(&ko.api), true, 9600);
}
