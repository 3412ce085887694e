//! flannel's etcd habits (issue 13), with a real etcd, real daemons and
//! certificates made by openssl: TLS options beside an `http://` endpoint,
//! an X.509 version-1 client certificate against an etcd that requires
//! client certificates, and a daemon started before its network
//! configuration or before etcd itself, which waits (without spinning) and
//! carries on.
//!
//! Knob (environment): `FLANNEL_RS_LATE_START_SECS`, how long after the
//! daemon the configuration key or etcd comes (default 20).

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use e2e_tests::faults::{knob, max_tries};
use e2e_tests::overlay::{etcdctl_ok, leases, Etcd, Overlay, NET_CONF};
use netns_fixtures::{require_root, wait_until, Cluster, Netns};

/// etcd's TLS listener, beside the harness's plain [`e2e_tests::overlay::ETCD`].
const ETCD_TLS: &str = "https://192.0.2.200:2381";

/// The daemon's log filter in these tests: each try of a wait is logged
/// (debug, target `flanneld_rs::subnet`), so that the tries can be counted.
const LOG_TRIES: &str = "warn,flanneld_rs=info,flanneld_rs::subnet=debug";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates as a flannel user makes them with openssl: a CA, etcd's
/// server certificate (for 192.0.2.200), a client certificate signed with
/// the common `openssl x509 -req` recipe without extensions (X.509 version
/// 1), and a key that belongs to neither.
struct Pki(tempfile::TempDir);

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let new_key = ["-newkey", "rsa:2048", "-nodes", "-keyout"];
        openssl(
            d,
            &[&["req", "-x509"][..], &new_key, &["ca.key", "-out", "ca.pem", "-subj", "/CN=flt-ca", "-days", "2"]]
                .concat(),
        );
        std::fs::write(d.join("server.ext"), "subjectAltName=IP:192.0.2.200\nextendedKeyUsage=serverAuth\n").unwrap();
        for (name, cn) in [("server", "/CN=etcd"), ("client", "/CN=flanneld")] {
            let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            openssl(d, &[&["req", "-new"][..], &new_key, &[&key, "-out", &csr, "-subj", cn]].concat());
            let mut sign = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
            sign.extend(["-out", &pem, "-days", "2"]);
            if name == "server" {
                sign.extend(["-extfile", "server.ext"]);
            }
            openssl(d, &sign);
        }
        openssl(d, &["genrsa", "-out", "other.key", "2048"]);
        let text =
            Command::new("openssl").current_dir(d).args(["x509", "-in", "client.pem", "-noout", "-text"]).output();
        let text = String::from_utf8_lossy(&text.unwrap().stdout).to_string();
        assert!(text.contains("Version: 1 (0x0)"), "the client certificate is not X.509 version 1:\n{text}");
        Pki(dir)
    }

    fn arg(&self, name: &str) -> String {
        self.0.path().join(name).display().to_string()
    }

    /// The daemon's TLS flags with client key `key`.
    fn flags(&self, key: &str) -> Vec<String> {
        vec![
            "--etcd-cafile".into(),
            self.arg("ca.pem"),
            "--etcd-certfile".into(),
            self.arg("client.pem"),
            "--etcd-keyfile".into(),
            self.arg(key),
        ]
    }
}

/// `etcdctl get /x` on etcd's TLS listener with `extra` TLS flags; whether it worked.
fn etcdctl_tls(ns: &Netns, extra: &[String]) -> bool {
    ns.command("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", ETCD_TLS, "--dial-timeout", "2s", "--command-timeout", "3s"])
        .args(extra)
        .args(["get", "/x"])
        .output()
        .expect("run etcdctl")
        .status
        .success()
}

/// Waits for node `i`'s daemon to exit by itself and returns its status.
fn wait_exit(o: &mut Overlay, i: usize, what: &str) -> ExitStatus {
    let mut status = None;
    let child = o.daemons[i].proc.0.as_mut().expect("the daemon was started");
    wait_until(Duration::from_secs(20), what, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    o.daemons[i].proc.0 = None;
    status.unwrap()
}

/// The lease in etcd whose PublicIP is node `i`'s underlay address.
fn has_lease(o: &Overlay, i: usize) -> bool {
    let ip = o.cluster.node(i).underlay_ip.to_string();
    leases(o.outside()).values().any(|v| v["PublicIP"] == ip.as_str())
}

/// "`--etcd-cafile/--etcd-certfile/--etcd-keyfile` with an `http://`
/// endpoint are not used (and said so); the daemon connects", as flannel.
#[test]
fn tls_options_with_an_http_endpoint_are_not_used_and_the_daemon_connects() {
    if !require_root() {
        return;
    }
    let pki = Pki::new();
    let mut o = Overlay::new(1);
    let flags = pki.flags("client.key");
    o.set_flags(0, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    o.start(0);
    o.wait_converged(0);
    assert!(has_lease(&o, 0), "no lease for node0 in etcd: {:?}", leases(o.outside()));
    let log = o.log(0);
    assert!(log.contains("are not used: every etcd endpoint is http://"), "the log does not say so:\n{log}");
}

/// "A client certificate of X.509 version 1 (`openssl x509 -req` without
/// extensions) works", against an etcd that requires client certificates
/// (which refuses a client without one, and accepts this one from Go's
/// etcdctl); a key that is not the certificate's is refused by name.
#[test]
fn a_version_1_client_certificate_is_accepted_by_an_etcd_requiring_client_certificates() {
    if !require_root() {
        return;
    }
    let pki = Pki::new();
    let cluster = Cluster::with_outside(2).unwrap();
    let mut etcd = Etcd::stopped();
    let p = |n: &str| pki.0.path().join(n);
    etcd.serve_tls(ETCD_TLS, &p("server.pem"), &p("server.key"), &p("ca.pem"));
    etcd.restart(cluster.outside().unwrap());
    let mut o = Overlay::with_etcd(cluster, etcd, Some(NET_CONF));
    let ca_only = ["--cacert".to_string(), pki.arg("ca.pem")];
    assert!(!etcdctl_tls(o.outside(), &ca_only), "etcd's TLS listener answered a client without a certificate");
    let with_cert =
        [&ca_only[..], &["--cert".into(), pki.arg("client.pem"), "--key".into(), pki.arg("client.key")]].concat();
    assert!(etcdctl_tls(o.outside(), &with_cert), "etcd refused etcdctl with the version-1 client certificate");

    o.set_etcd_endpoint(ETCD_TLS);
    for i in 0..2 {
        let flags = pki.flags("client.key");
        o.set_flags(i, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        o.start(i);
    }
    o.wait_converged(0);
    o.wait_converged(1);
    assert!(has_lease(&o, 0) && has_lease(&o, 1), "leases: {:?}", leases(o.outside()));

    // A key that is not the certificate's: refused at start, by name.
    o.stop(1);
    let flags = pki.flags("other.key");
    o.set_flags(1, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    o.spawn(1);
    let status = wait_exit(&mut o, 1, "the daemon with a mismatched key to exit");
    assert!(!status.success(), "exit status {status}");
    let log = o.log(1);
    let want = format!("--etcd-keyfile {} is not the private key of --etcd-certfile", pki.arg("other.key"));
    assert!(log.contains(&want), "the log does not say {want:?}:\n{log}");
}

/// Lines of `log` that contain each of `needles`.
fn count(log: &str, needles: &[&str]) -> usize {
    log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
}

/// How many Range requests (gets) etcd has served, from its /metrics.
fn etcd_ranges(ns: &Netns) -> u64 {
    let text = ns.run_ok("curl", &["-sS", "--max-time", "5", "http://192.0.2.200:2379/metrics"]);
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains("grpc_method=\"Range\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Asserts what the daemon (started at `started`) said while it waited:
/// what it waits for, once and then every 30 s, and a try count the Backoff
/// bounds. The log is read before the time is taken, so that no try can
/// fall between the two.
fn assert_waited_without_spinning(o: &Overlay, what: &str, started: Instant) -> usize {
    let log = o.log(0);
    let elapsed = started.elapsed();
    let said = count(&log, &[&format!("waiting for {what}")]);
    let said_bound = 1 + (elapsed.as_secs() / 30) as usize;
    assert!(
        said >= 1 && said <= said_bound,
        "said {said} times that it waits (at most {said_bound} in {elapsed:?}):\n{log}"
    );
    let tries = count(&log, &["DEBUG", " try ", &format!(" for {what}"), " failed: "]);
    let bound = max_tries(elapsed);
    assert!(tries >= 2 && tries <= bound, "{tries} tries logged in {elapsed:?} (the Backoff allows {bound}):\n{log}");
    let first = log.lines().find(|l| l.contains(&format!("waiting for {what}"))).unwrap_or_default();
    eprintln!("waited {elapsed:?}: {tries} tries (bound {bound}), said {said} times; first: {first}");
    tries
}

/// "When `<prefix>/config` does not exist yet, the daemon waits for it and
/// carries on when it is written", as flannel (which retries every second);
/// the waiting daemon's gets, counted by etcd, stay within the Backoff's bound.
#[test]
fn a_daemon_started_before_the_network_configuration_waits_for_it_and_carries_on() {
    if !require_root() {
        return;
    }
    let delay = Duration::from_secs(knob("FLANNEL_RS_LATE_START_SECS", 20));
    let cluster = Cluster::with_outside(2).unwrap();
    let etcd = Etcd::start(cluster.outside().unwrap());
    let mut o = Overlay::with_etcd(cluster, etcd, None);
    o.set_env(0, &[("FLANNELD_LOG", LOG_TRIES)]);
    let ranges_before = etcd_ranges(o.outside());
    let started = Instant::now();
    o.spawn(0);
    let what = "the network configuration from etcd at";
    wait_until(delay.max(Duration::from_secs(10)), "the daemon to say what it waits for", || {
        o.log(0).contains(&format!("waiting for {what}"))
    });
    assert!(
        o.log(0).contains("/coreos.com/network/config does not exist"),
        "the wait does not name the key:\n{}",
        o.log(0)
    );
    // The late writer: the test's premise, not a wait for a condition.
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    let ranges = etcd_ranges(o.outside()) - ranges_before;
    let elapsed = started.elapsed();
    let tries = assert_waited_without_spinning(&o, what, started);
    let bound = max_tries(elapsed) as u64;
    assert!(ranges <= bound, "etcd served {ranges} gets in {elapsed:?} (the Backoff allows {bound})");
    assert!(ranges as usize >= tries, "etcd served {ranges} gets, fewer than the {tries} tries logged");

    etcdctl_ok(o.outside(), &["put", "/coreos.com/network/config", NET_CONF]);
    o.wait_ready(0);
    o.start(1);
    o.wait_converged(0);
    o.wait_converged(1);
    assert!(o.log(0).contains(&format!("got {what}")), "{}", o.log(0));
}

/// "When etcd is not reachable at start, the daemon waits for it with a
/// bounded backoff and carries on when it comes", as flannel.
#[test]
fn a_daemon_started_before_etcd_waits_for_it_and_carries_on() {
    if !require_root() {
        return;
    }
    let delay = Duration::from_secs(knob("FLANNEL_RS_LATE_START_SECS", 20));
    let cluster = Cluster::with_outside(2).unwrap();
    let mut o = Overlay::with_etcd(cluster, Etcd::stopped(), None);
    o.set_env(0, &[("FLANNELD_LOG", LOG_TRIES)]);
    let started = Instant::now();
    o.spawn(0);
    let what = "the network configuration from etcd at";
    wait_until(delay.max(Duration::from_secs(10)), "the daemon to say what it waits for", || {
        o.log(0).contains(&format!("waiting for {what}"))
    });
    // The late etcd: the test's premise, not a wait for a condition.
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    assert_waited_without_spinning(&o, what, started);

    let outside = o.cluster.outside().unwrap();
    o.etcd.restart(outside);
    etcdctl_ok(outside, &["put", "/coreos.com/network/config", NET_CONF]);
    o.wait_ready(0);
    o.start(1);
    o.wait_converged(0);
    o.wait_converged(1);
    assert!(has_lease(&o, 0), "no lease for node0: {:?}", leases(o.outside()));
}

/// "`diagnose` does not wait": against an etcd that is not there, and
/// against one without the network configuration, it reports the error and
/// exits non-zero (by itself: the 20-s guard below only catches a hang).
#[test]
fn diagnose_reports_an_absent_etcd_or_configuration_instead_of_waiting() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::with_outside(1).unwrap();
    let mut o = Overlay::with_etcd(cluster, Etcd::stopped(), None);
    let run = |o: &Overlay| {
        let mut cmd = o.daemon_command(0);
        let child = cmd.args(["diagnose", "--json"]).stdout(std::process::Stdio::piped());
        let mut child = child.stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut status = None;
        wait_until(Duration::from_secs(20), "diagnose to exit by itself", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let out = child.wait_with_output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (status, err) = run(&o);
    assert!(!status.success(), "diagnose without etcd: {status}\n{err}");
    assert!(err.contains("etcd at http://192.0.2.200:2379") && !err.contains("waiting for"), "{err}");

    let outside = o.cluster.outside().unwrap();
    o.etcd.restart(outside);
    let (status, err) = run(&o);
    assert!(!status.success(), "diagnose without the configuration: {status}\n{err}");
    assert!(err.contains("/coreos.com/network/config does not exist") && !err.contains("waiting for"), "{err}");
}
