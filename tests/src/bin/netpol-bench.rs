//! `netpol-bench`: NetworkPolicy enforcement's costs, on the policy lab
//! (pods a, b, c in namespaces x, y, z over two nodes, real API server).
//!
//! - Update latency: a policy that allows a denied flow is applied; time
//!   from the API server's answer to the first connection that gets through
//!   (and the same for the deny direction, until connections stop getting
//!   through), p50/p99; over IPv4, then over IPv6 (the lab's pods are
//!   dual-stack: see `e2e_tests::netpol`).
//! - Throughput cost: iperf3 between two pods on different nodes, with no
//!   policy, and with 100 policies selecting the receiver (99 that do not
//!   match the flow and one that allows it): the ratio.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::netpol::Lab;
use e2e_tests::perf::{iperf, summary};
use serde_json::json;

#[derive(Parser)]
#[command(about = "NetworkPolicy: update latency and throughput cost")]
struct Args {
    /// Policy updates to time (each direction).
    #[arg(long, default_value_t = 30)]
    updates: usize,
    /// Policies for the throughput part.
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// iperf3 seconds per run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> String {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    .to_string()
}

/// Polls a TCP connect (50 ms timeout) until it succeeds (`want`) or fails.
fn until_reachable(lab: &Lab, from: &str, to: SocketAddr, want: bool, start: Instant) -> f64 {
    let ns = &lab.pods.iter().find(|p| p.id == from).unwrap().netns;
    loop {
        let ok = ns.in_thread(|| TcpStream::connect_timeout(&to, Duration::from_millis(50)).is_ok());
        if ok == want {
            return start.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "policy never took effect");
    }
}

fn main() {
    let args = Args::parse();
    assert!(netns_fixtures::require_root() && e2e_tests::kube::require_kube());
    let lab = Lab::new();
    let pod = |id: &str| lab.pods.iter().find(|p| p.id == id).unwrap();
    let (xa, xb) = (pod("x/a"), pod("x/b"));
    assert_ne!(xa.node, xb.node, "x/a and x/b must be on different nodes");
    let target = SocketAddr::new(xb.ip.into(), 80);
    let target6 = SocketAddr::new(xb.ip6.into(), 80);

    // Update latency: x/b isolated; an allow policy comes and goes.
    lab.apply(&policy(
        "x",
        "isolate-b",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}),
    ));
    until_reachable(&lab, "x/a", target, false, Instant::now());
    until_reachable(&lab, "x/a", target6, false, Instant::now());
    let allow = policy(
        "x",
        "allow-a",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
    );
    for (family, target) in [("IPv4", target), ("IPv6", target6)] {
        let (mut opened, mut closed) = (Vec::new(), Vec::new());
        for _ in 0..args.updates {
            lab.apply(&allow);
            opened.push(until_reachable(&lab, "x/a", target, true, Instant::now()));
            lab.ko.api.kubectl_ok(&["delete", "networkpolicy", "allow-a", "-n", "x"]);
            closed.push(until_reachable(&lab, "x/a", target, false, Instant::now()));
        }
        let (o50, o99, omax) = summary(opened);
        let (c50, c99, cmax) = summary(closed);
        println!(
            "policy update to enforcement over {family}, {} updates (from the API server's answer): allow p50 {o50:.0} ms p99 {o99:.0} ms max {omax:.0} ms; deny p50 {c50:.0} ms p99 {c99:.0} ms max {cmax:.0} ms",
            args.updates
        );
    }
    lab.ko.api.kubectl_ok(&["delete", "networkpolicy", "--all", "-n", "x"]);
    until_reachable(&lab, "x/a", target, true, Instant::now());

    // Throughput without policy, then with N policies selecting the receiver.
    let run = |label: &str| {
        let mut v: Vec<f64> = (0..3).map(|_| iperf(&xa.netns, &xb.netns, xb.ip, 1, args.seconds)).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("iperf3 x/a -> x/b across nodes, {label}: median {:.2} Gbit/s {v:.2?}", v[1]);
        v[1]
    };
    let none = run("no policy");
    let mut items: Vec<serde_json::Value> = (0..args.policies - 1)
        .map(|k| {
            serde_json::from_str(&policy(
                "x",
                &format!("p{k}"),
                json!({"podSelector": {"matchLabels": {"pod": "b"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("other-{k}")}}}],
                                    "ports": [{"protocol": "TCP", "port": 1000 + k}]}]}),
            ))
            .unwrap()
        })
        .collect();
    items.push(
        serde_json::from_str(&policy(
            "x",
            "allow-iperf",
            json!({"podSelector": {"matchLabels": {"pod": "b"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"protocol": "TCP", "port": 5201}]}]}),
        ))
        .unwrap(),
    );
    let text = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    lab.apply(&text);
    // Enforced: x/a can no longer reach port 80 of x/b, only 5201.
    until_reachable(&lab, "x/a", target, false, Instant::now());
    let with = run(&format!("{} policies selecting x/b", args.policies));
    println!("throughput with {} policies / without: {:.1}%", args.policies, with / none * 100.0);
}
