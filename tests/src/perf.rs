//! Measuring helpers the benchmark harnesses share: percentiles, iperf3 and
//! ping between two namespaces.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use netns_fixtures::{wait_until, Netns};

/// The `p` quantile (0..=1) of an ascending slice.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sorts and returns (p50, p99, max).
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&v, 0.5), pct(&v, 0.99), v[v.len() - 1])
}

/// iperf3 from `client` to a one-shot server in `server` listening on
/// `addr`:5201, `streams` parallel streams: Gbit/s received.
pub fn iperf(client: &Netns, server: &Netns, addr: Ipv4Addr, streams: u32, seconds: u32) -> f64 {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(5), "iperf3 server", || {
        server.run_ok("ss", &["-Hltn", "sport = :5201"]).contains("5201")
    });
    let out = client.run_ok(
        "iperf3",
        &["-c", &addr.to_string(), "-p", "5201", "-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"],
    );
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9
}

/// Round-trip times of 200 pings, p50 and p99 in ms.
pub fn ping(client: &Netns, addr: Ipv4Addr) -> (f64, f64) {
    let out = client.run_ok("ping", &["-c", "200", "-i", "0.005", &addr.to_string()]);
    let mut rtt: Vec<f64> =
        out.lines().filter_map(|l| l.split("time=").nth(1)).filter_map(|t| t.split(' ').next()?.parse().ok()).collect();
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&rtt, 0.5), pct(&rtt, 0.99))
}
