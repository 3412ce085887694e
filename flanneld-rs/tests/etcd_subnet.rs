//! The etcd subnet manager against a real etcd.
//!
//! Each test starts its own `etcd` inside its own network namespace and runs
//! its async body on a thread that has entered that namespace, so that every
//! socket (etcd's and the client's) lives in a namespace the test created and
//! deletes. Needs root (skipped otherwise, fails under CI=true).

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Client, CompactionOptions, ConnectOptions, GetOptions, LeaseTimeToLiveOptions, PutOptions};
use flanneld_rs::config::NetworkConfig;
use flanneld_rs::lease::{encode_value, BackendType, Lease, LeaseAttrs, LeaseEvent, VxlanData};
use flanneld_rs::subnet::etcd::{subnet_key, AcquiredLease, EtcdOptions, EtcdSubnetManager};
use flanneld_rs::subnet::StoreError;
use ipnet::Ipv4Net;
use netns_fixtures::Netns;
use nix::sched::{setns, CloneFlags};
use tokio::sync::mpsc;

const PREFIX: &str = "/coreos.com/network";
const CLIENT: &str = "127.0.0.1:2379";
const PEER: &str = "127.0.0.1:2380";
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Prints the library's log lines (visible with --nocapture).
fn init_log() {
    struct StderrLog;
    impl log::Log for StderrLog {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Debug && m.target().starts_with("flanneld_rs")
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
            }
        }
        fn flush(&self) {}
    }
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
}

/// An etcd process, killed (and reaped) on drop.
struct Etcd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.dir.path().join("etcd.log")) {
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- etcd log (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// A namespace with an etcd inside (fields drop in order: etcd first).
struct Env {
    etcd: Etcd,
    ns: Netns,
}

fn start_etcd() -> Env {
    let ns = Netns::new("etcd").expect("create namespace");
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new().prefix("flt-etcd").tempdir_in("/dev/shm")
    } else {
        tempfile::Builder::new().prefix("flt-etcd").tempdir()
    }
    .expect("tempdir");
    let child = start_etcd_in(&ns, dir.path());
    Env { etcd: Etcd { child, dir }, ns }
}

/// Runs `body` on a thread inside `ns` (so that every socket it makes is in
/// the namespace), on a current-thread runtime; re-raises its panic.
fn in_netns<F, Fut>(ns: &Netns, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let path = ns.path();
    let res = std::thread::spawn(move || {
        let f = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        setns(&f, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
        drop(f);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(body());
    })
    .join();
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// Starts etcd in a fresh namespace and runs `body` in there once etcd answers.
fn with_etcd<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    init_log();
    let env = start_etcd();
    in_netns(&env.ns, || async move {
        wait_ready().await;
        body().await;
    });
    drop(env);
}

async fn wait_ready() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(1), async {
            let mut c = Client::connect([CLIENT], None).await.ok()?;
            c.get("ready-probe", None).await.ok()
        })
        .await;
        if let Ok(Some(_)) = ok {
            return;
        }
        assert!(Instant::now() < deadline, "etcd did not answer on {CLIENT} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn raw_client() -> Client {
    Client::connect([CLIENT], None).await.expect("connect etcd")
}

fn opts(endpoint: &str) -> EtcdOptions {
    EtcdOptions { endpoints: vec![format!("http://{endpoint}")], ..Default::default() }
}

async fn manager() -> EtcdSubnetManager {
    EtcdSubnetManager::connect(&opts(CLIENT)).await.expect("connect manager")
}

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

async fn put_config(c: &mut Client, text: &str) -> NetworkConfig {
    c.put(format!("{PREFIX}/config"), text, None).await.expect("put config");
    NetworkConfig::parse(text, "test").expect("test config parses")
}

fn attrs(host: u8) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: Some(Ipv4Addr::new(192, 0, 2, host)),
        backend: BackendType::Vxlan,
        vxlan: Some(VxlanData { vni: 1, vtep_mac: format!("02:00:00:00:00:{host:02x}").parse().unwrap() }),
        public_ipv6: None,
        vxlan6: None,
        wireguard: None,
        wireguard6: None,
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

async fn get_value(c: &mut Client, key: &str) -> Option<(String, i64)> {
    let r = c.get(key, None).await.expect("get");
    r.kvs().first().map(|kv| (kv.value_str().unwrap().to_string(), kv.lease()))
}

async fn put_lease(c: &mut Client, subnet: &str, host: u8) -> String {
    let key = subnet_key(PREFIX, net(subnet));
    c.put(key.clone(), encode_value(&attrs(host)), None).await.expect("put lease");
    key
}

async fn next_event(rx: &mut mpsc::Receiver<LeaseEvent>) -> LeaseEvent {
    tokio::time::timeout(EVENT_TIMEOUT, rx.recv()).await.expect("no lease event in time").expect("watcher ended")
}

/// Waits for a snapshot that satisfies `ok`, skipping others (and failing on Revoked).
async fn snapshot_where(rx: &mut mpsc::Receiver<LeaseEvent>, what: &str, ok: impl Fn(&[Lease]) -> bool) -> Vec<Lease> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no snapshot where {what} in time"))
            .expect("watcher ended");
        match ev {
            LeaseEvent::Snapshot(s) if ok(&s.to_vec()) => return s.to_vec(),
            LeaseEvent::Snapshot(_) => {}
            LeaseEvent::Revoked(k) => panic!("unexpected Revoked({k}) while waiting for {what}"),
        }
    }
}

fn subnets(s: &[Lease]) -> Vec<String> {
    s.iter().map(|l| l.subnet4().unwrap().to_string()).collect()
}

fn has(s: &[Lease], subnet: &str) -> bool {
    s.iter().any(|l| l.subnet4().unwrap().to_string() == subnet)
}

#[test]
fn config_is_read_and_validation_errors_name_key_and_field() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let m = manager().await;
        let e = m.network_config().await.unwrap_err();
        assert!(matches!(e, StoreError::ConfigMissing { .. }), "{e:?}");
        assert!(e.to_string().contains("/coreos.com/network/config"), "{e}");

        let mut c = raw_client().await;
        c.put(format!("{PREFIX}/config"), r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#, None).await.unwrap();
        let e = m.network_config().await.unwrap_err();
        assert!(matches!(e, StoreError::Config(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("/coreos.com/network/config") && msg.contains("SubnetLen 31"), "{msg}");

        let want = put_config(&mut c, CONFIG).await;
        assert_eq!(m.network_config().await.unwrap(), want);

        // Another prefix, given with a trailing slash.
        c.put("/other/net/config", r#"{"Network":"10.9.0.0/16","Backend":{"Type":"host-gw"}}"#, None).await.unwrap();
        let o = EtcdOptions { prefix: "/other/net/".into(), ..opts(CLIENT) };
        let m2 = EtcdSubnetManager::connect(&o).await.unwrap();
        assert_eq!(m2.network_config().await.unwrap().ipv4.unwrap().network, net("10.9.0.0/16"));

        // Unreachable etcd: the error names the endpoint.
        let down = EtcdSubnetManager::connect(&opts("127.0.0.1:1")).await.unwrap();
        let msg = down.network_config().await.unwrap_err().to_string();
        assert!(msg.contains("http://127.0.0.1:1") && msg.contains("/coreos.com/network/config"), "{msg}");

        // A CA file that does not exist, for an https:// endpoint: the error
        // names the flag and the path. (With http:// endpoints only, the TLS
        // options are not used, as in flannel: the connection above works.)
        let tls = EtcdOptions {
            endpoints: vec![format!("https://{CLIENT}")],
            cafile: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let msg = EtcdSubnetManager::connect(&tls).await.unwrap_err().to_string();
        assert!(msg.contains("--etcd-cafile") && msg.contains("/etc/ca.pem"), "{msg}");
        let plain = EtcdOptions { cafile: Some("/etc/ca.pem".into()), ..opts(CLIENT) };
        assert!(EtcdSubnetManager::connect(&plain).await.is_ok());
    });
}

#[test]
fn acquire_writes_flannels_json_with_a_24h_lease_and_is_idempotent() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG).await;
        let m = manager().await;
        let a = m.acquire_lease(&cfg, &attrs(10), None, None).await.unwrap();
        assert!(cfg.ipv4.as_ref().unwrap().subnets().any(|s| s == a.lease.subnet4().unwrap()), "{a:?} out of range");
        assert_eq!(a.key, subnet_key(PREFIX, a.lease.subnet4().unwrap()));
        assert_eq!(a.lease.source, a.key);
        assert_eq!(a.lease.public_ip4(), attrs(10).public_ip);
        let (value, lease_id) = get_value(&mut c, &a.key).await.expect("key written");
        assert_eq!(
            value,
            r#"{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:0a"}}"#
        );
        assert_eq!(Some(lease_id), a.etcd_lease_id);
        let ttl = c.lease_time_to_live(lease_id, None).await.unwrap();
        assert_eq!(ttl.granted_ttl(), 86400);
        assert!(ttl.ttl() > 86300, "ttl {}", ttl.ttl());
        let left = a.expires.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(86300) && left <= Duration::from_secs(86400), "{left:?}");

        // Again from a "restarted" node, with a new VTEP MAC: same subnet, value updated.
        let mut again_attrs = attrs(10);
        again_attrs.vxlan.as_mut().unwrap().vtep_mac = "02:aa:00:00:00:0a".parse().unwrap();
        let m2 = manager().await;
        let b = m2.acquire_lease(&cfg, &again_attrs, Some(net("10.5.200.0/24")), None).await.unwrap();
        assert_eq!((b.lease.subnet4().unwrap(), &b.key), (a.lease.subnet4().unwrap(), &a.key));
        assert_eq!(b.lease.ipv4.unwrap().vxlan.unwrap().vtep_mac.to_string(), "02:aa:00:00:00:0a");
        let (value, lease_id) = get_value(&mut c, &b.key).await.unwrap();
        assert_eq!(value, encode_value(&again_attrs));
        assert_eq!(Some(lease_id), b.etcd_lease_id);
        assert_eq!(c.lease_time_to_live(lease_id, None).await.unwrap().granted_ttl(), 86400);
        // The old etcd lease, now without keys, was revoked: one lease left.
        assert_eq!(c.leases().await.unwrap().leases().len(), 1);
        let all = c.get(format!("{PREFIX}/subnets/"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(all.kvs().len(), 1);

        let (leases, rev) = m.list_leases(&cfg).await.unwrap();
        assert!(rev > 0);
        assert_eq!(leases, vec![b.lease.clone()]);
    });
}

#[test]
fn previous_subnet_is_honoured_when_in_range_and_free() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG).await;
        let m = manager().await;
        let a = m.acquire_lease(&cfg, &attrs(10), Some(net("10.5.77.0/24")), None).await.unwrap();
        assert_eq!(a.lease.subnet4().unwrap(), net("10.5.77.0/24"));
        // Taken by someone else: another subnet.
        let b = m.acquire_lease(&cfg, &attrs(11), Some(net("10.5.77.0/24")), None).await.unwrap();
        assert_ne!(b.lease.subnet4().unwrap(), a.lease.subnet4().unwrap());
        // Below SubnetMin (10.5.1.0): not honoured.
        let d = m.acquire_lease(&cfg, &attrs(12), Some(net("10.5.0.0/24")), None).await.unwrap();
        assert_ne!(d.lease.subnet4().unwrap(), net("10.5.0.0/24"));
        assert!(cfg.ipv4.as_ref().unwrap().subnets().any(|s| s == d.lease.subnet4().unwrap()));
        // Wrong size or outside Network: not honoured either.
        let e = m.acquire_lease(&cfg, &attrs(13), Some(net("10.6.3.0/24")), None).await.unwrap();
        assert!(cfg.ipv4.unwrap().network.contains(&e.lease.subnet4().unwrap()));
        let f = m.acquire_lease(&cfg, &attrs(14), Some(net("10.5.90.0/25")), None).await.unwrap();
        assert_eq!(f.lease.subnet4().unwrap().prefix_len(), 24);
    });
}

#[test]
fn reservations_are_kept_for_their_owner() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(
            &mut c,
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.10.0","Backend":{"Type":"vxlan"}}"#,
        )
        .await;
        // A reservation (no etcd lease) for 192.0.2.50.
        let reserved = put_lease(&mut c, "10.5.9.0/24", 50).await;
        let m = manager().await;
        let a = m.acquire_lease(&cfg, &attrs(10), Some(net("10.5.9.0/24")), None).await.unwrap();
        assert_eq!(a.lease.subnet4().unwrap(), net("10.5.10.0/24"), "the reservation must not be taken");
        let e = m.acquire_lease(&cfg, &attrs(11), None, None).await.unwrap_err();
        assert!(matches!(e, StoreError::OutOfSubnets { .. }), "{e:?}");

        // Its owner uses it (with a new MAC), and it stays a reservation.
        let mut owner = attrs(50);
        owner.vxlan.as_mut().unwrap().vtep_mac = "02:bb:00:00:00:32".parse().unwrap();
        let r = m.acquire_lease(&cfg, &owner, None, None).await.unwrap();
        assert_eq!((r.lease.subnet4().unwrap(), &r.key, r.etcd_lease_id), (net("10.5.9.0/24"), &reserved, None));
        let (value, lease_id) = get_value(&mut c, &reserved).await.unwrap();
        assert_eq!((value, lease_id), (encode_value(&owner), 0));
        // Renewing a reservation checks it is still there.
        let r2 = m.renew_lease(&r).await.unwrap();
        assert_eq!(r2.etcd_lease_id, None);
        assert_eq!(get_value(&mut c, &reserved).await.unwrap().1, 0);
        // Re-reserved for another node: revoked.
        put_lease(&mut c, "10.5.9.0/24", 51).await;
        let e = m.renew_lease(&r2).await.unwrap_err();
        assert!(matches!(e, StoreError::Revoked { .. }), "{e:?}");
        assert!(e.to_string().contains("192.0.2.51"), "{e}");
    });
}

#[test]
fn twenty_concurrent_nodes_get_distinct_subnets() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        // 24 subnets for 20 nodes: plenty of collisions to resolve.
        let cfg = put_config(
            &mut c,
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.24.0","Backend":{"Type":"vxlan"}}"#,
        )
        .await;
        let mut managers = Vec::new();
        for _ in 0..20 {
            managers.push(manager().await);
        }
        let tasks: Vec<_> = managers
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let cfg = cfg.clone();
                tokio::spawn(async move { m.acquire_lease(&cfg, &attrs(10 + i as u8), None, None).await })
            })
            .collect();
        let mut got = std::collections::BTreeSet::new();
        for t in tasks {
            let a = t.await.unwrap().expect("acquire");
            assert!(cfg.ipv4.as_ref().unwrap().subnets().any(|s| s == a.lease.subnet4().unwrap()));
            assert!(got.insert(a.lease.subnet4().unwrap()), "{} given twice", a.lease.subnet4().unwrap());
        }
        assert_eq!(got.len(), 20);
        let all = c.get(format!("{PREFIX}/subnets/"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(all.kvs().len(), 20);
        // No etcd lease leaked by lost races.
        assert_eq!(c.leases().await.unwrap().leases().len(), 20);
    });
}

#[test]
fn out_of_subnets_is_a_clear_error() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(
            &mut c,
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.3.0","SubnetMax":"10.5.4.0","Backend":{"Type":"vxlan"}}"#,
        )
        .await;
        let m = manager().await;
        m.acquire_lease(&cfg, &attrs(10), None, None).await.unwrap();
        m.acquire_lease(&cfg, &attrs(11), None, None).await.unwrap();
        let e = m.acquire_lease(&cfg, &attrs(12), None, None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "out of subnets: all 2 subnets of Network 10.5.0.0/16 between SubnetMin 10.5.3.0 and SubnetMax 10.5.4.0 are leased"
        );
        // The failed attempt left no etcd lease behind.
        assert_eq!(c.leases().await.unwrap().leases().len(), 2);
        // A malformed value still occupies its subnet.
        let mut c2 = raw_client().await;
        c2.delete(subnet_key(PREFIX, net("10.5.3.0/24")), None).await.unwrap();
        c2.put(subnet_key(PREFIX, net("10.5.3.0/24")), "garbage", None).await.unwrap();
        let e = m.acquire_lease(&cfg, &attrs(12), None, None).await.unwrap_err();
        assert!(matches!(e, StoreError::OutOfSubnets { .. }), "{e:?}");
    });
}

#[test]
fn renew_extends_the_ttl_and_notices_revocation() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG).await;
        let m = manager().await;
        let a = m.acquire_lease(&cfg, &attrs(10), None, None).await.unwrap();
        let id = a.etcd_lease_id.unwrap();
        // Let the TTL run down a little (polled, not a fixed sleep).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if c.lease_time_to_live(id, None).await.unwrap().ttl() <= 86397 {
                break;
            }
            assert!(Instant::now() < deadline, "TTL does not go down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = m.renew_lease(&a).await.unwrap();
        assert_eq!((r.etcd_lease_id, &r.key, &r.lease), (a.etcd_lease_id, &a.key, &a.lease));
        let ttl = c.lease_time_to_live(id, None).await.unwrap().ttl();
        assert!(ttl >= 86398, "ttl after renew {ttl}");
        assert!(r.expires > a.expires, "{:?} !> {:?}", r.expires, a.expires);

        // Re-bound to another etcd lease (someone else took it over): revoked.
        let other = c.lease_grant(600, None).await.unwrap().id();
        c.put(a.key.clone(), "x", Some(PutOptions::new().with_lease(other))).await.unwrap();
        let e = m.renew_lease(&r).await.unwrap_err();
        assert!(matches!(e, StoreError::Revoked { .. }), "{e:?}");
        // Deleted: revoked.
        c.delete(a.key.clone(), None).await.unwrap();
        let e = m.renew_lease(&r).await.unwrap_err();
        assert!(matches!(&e, StoreError::Revoked { key, .. } if key == &a.key), "{e:?}");
        assert!(e.to_string().contains(&a.key), "{e}");
        // Its etcd lease revoked (the key goes with it): revoked.
        let b = m.acquire_lease(&cfg, &attrs(11), None, None).await.unwrap();
        c.lease_revoke(b.etcd_lease_id.unwrap()).await.unwrap();
        let e = m.renew_lease(&b).await.unwrap_err();
        assert!(matches!(e, StoreError::Revoked { .. }), "{e:?}");
        let ttl = c.lease_time_to_live(b.etcd_lease_id.unwrap(), Some(LeaseTimeToLiveOptions::new())).await;
        assert!(ttl.map(|t| t.ttl() <= 0).unwrap_or(true));
    });
}

#[test]
fn watcher_sends_snapshots_skips_malformed_and_reports_revocation() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG).await;
        let m = manager().await;
        let own: AcquiredLease = m.acquire_lease(&cfg, &attrs(10), Some(net("10.5.1.0/24")), None).await.unwrap();
        // Malformed from the start: skipped by the initial list.
        let bad1 = subnet_key(PREFIX, net("10.5.66.0/24"));
        c.put(bad1.clone(), r#"{"PublicIP":"127.0.0.1","BackendType":"vxlan"}"#, None).await.unwrap();
        c.put(format!("{PREFIX}/subnets/not-a-subnet"), encode_value(&attrs(66)), None).await.unwrap();

        let (tx, mut rx) = mpsc::channel(16);
        let task = m.spawn_watcher(cfg.clone(), own.key.clone(), tx);
        match next_event(&mut rx).await {
            LeaseEvent::Snapshot(s) => assert_eq!(s.to_vec(), vec![own.lease.clone()]),
            other => panic!("first event {other:?}"),
        }

        let other = put_lease(&mut c, "10.5.2.0/24", 11).await;
        let s = snapshot_where(&mut rx, "10.5.2.0/24 is in", |s| has(s, "10.5.2.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.2.0/24"]);
        let l = s.iter().find(|l| l.subnet4() == Some(net("10.5.2.0/24"))).unwrap();
        assert_eq!((l.public_ip4(), &l.source, l.ipv4.unwrap().vxlan), (attrs(11).public_ip, &other, attrs(11).vxlan));

        // Malformed values (bad JSON, bad MAC, outside Network) never show up;
        // a valid lease that turns malformed drops out.
        c.put(subnet_key(PREFIX, net("10.5.3.0/24")), "{oops", None).await.unwrap();
        c.put(
            subnet_key(PREFIX, net("10.5.4.0/24")),
            r#"{"PublicIP":"192.0.2.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"nope"}}"#,
            None,
        )
        .await
        .unwrap();
        c.put(subnet_key(PREFIX, net("10.6.4.0/24")), encode_value(&attrs(12)), None).await.unwrap();
        put_lease(&mut c, "10.5.5.0/24", 13).await;
        let s = snapshot_where(&mut rx, "10.5.5.0/24 is in", |s| has(s, "10.5.5.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.2.0/24", "10.5.5.0/24"]);
        c.put(other.clone(), "not json any more", None).await.unwrap();
        let s = snapshot_where(&mut rx, "10.5.2.0/24 is out", |s| !has(s, "10.5.2.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.5.0/24"]);

        // A delete.
        put_lease(&mut c, "10.5.2.0/24", 11).await;
        snapshot_where(&mut rx, "10.5.2.0/24 is back", |s| has(s, "10.5.2.0/24")).await;
        c.delete(subnet_key(PREFIX, net("10.5.5.0/24")), None).await.unwrap();
        let s = snapshot_where(&mut rx, "10.5.5.0/24 is gone", |s| !has(s, "10.5.5.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.2.0/24"]);

        // Our own key deleted: a snapshot without it, then Revoked, once.
        c.delete(own.key.clone(), None).await.unwrap();
        let mut revoked = 0;
        let mut saw_without_own = false;
        while revoked == 0 {
            match next_event(&mut rx).await {
                LeaseEvent::Revoked(k) => {
                    assert_eq!(k, own.key);
                    revoked += 1;
                }
                LeaseEvent::Snapshot(s) => saw_without_own |= !has(&s.to_vec(), "10.5.1.0/24"),
            }
        }
        assert!(saw_without_own);
        put_lease(&mut c, "10.5.7.0/24", 14).await;
        let s = snapshot_where(&mut rx, "10.5.7.0/24 is in", |s| has(s, "10.5.7.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.2.0/24", "10.5.7.0/24"]);
        assert!(rx.try_recv().is_err(), "no second Revoked");

        // The watcher stops when the receiver goes away.
        drop(rx);
        put_lease(&mut c, "10.5.8.0/24", 15).await;
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("watcher did not stop").unwrap();
    });
}

/// A TCP relay in front of etcd that the test can cut (close every connection
/// and refuse new ones) and restore: an etcd outage without stopping etcd.
struct Relay {
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(listen: &str, target: &'static str) -> Relay {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind relay");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(h);
            }
        });
        Relay { cut, conns, accept }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[test]
fn watcher_recovers_from_an_outage_with_compaction_without_losing_deletes() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG).await;
        let relay = Relay::start("127.0.0.1:23790", CLIENT).await;
        let m = EtcdSubnetManager::connect(&opts("127.0.0.1:23790")).await.unwrap();
        let own = m.acquire_lease(&cfg, &attrs(10), Some(net("10.5.1.0/24")), None).await.unwrap();
        let doomed = put_lease(&mut c, "10.5.2.0/24", 11).await;

        let (tx, mut rx) = mpsc::channel(16);
        let _task = m.spawn_watcher(cfg.clone(), own.key.clone(), tx);
        let s = snapshot_where(&mut rx, "the initial two", |s| s.len() == 2).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.2.0/24"]);
        // A change seen through the relay: the watch stream is up (so the
        // cut breaks a running watch, not its creation).
        put_lease(&mut c, "10.5.5.0/24", 15).await;
        snapshot_where(&mut rx, "10.5.5.0/24 is in", |s| has(s, "10.5.5.0/24")).await;

        // Outage: meanwhile a delete, some churn, a new lease, and a compaction
        // that removes the history the watcher would resume from.
        relay.cut();
        c.delete(doomed, None).await.unwrap();
        for i in 0..5 {
            let k = put_lease(&mut c, "10.5.9.0/24", 20 + i).await;
            c.delete(k, None).await.unwrap();
        }
        put_lease(&mut c, "10.5.3.0/24", 12).await;
        let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
        c.compact(rev, Some(CompactionOptions::new().with_physical())).await.unwrap();
        relay.restore();

        let s = snapshot_where(&mut rx, "the state after the outage", |s| has(s, "10.5.3.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.3.0/24", "10.5.5.0/24"], "the delete was lost");

        // And it keeps watching.
        c.delete(subnet_key(PREFIX, net("10.5.3.0/24")), None).await.unwrap();
        let s = snapshot_where(&mut rx, "10.5.3.0/24 deleted", |s| !has(s, "10.5.3.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.5.0/24"]);
        put_lease(&mut c, "10.5.4.0/24", 13).await;
        let s = snapshot_where(&mut rx, "10.5.4.0/24 added", |s| has(s, "10.5.4.0/24")).await;
        assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.4.0/24", "10.5.5.0/24"]);

        // The manager's own requests work again too.
        let r = m.renew_lease(&own).await.unwrap();
        assert_eq!(r.key, own.key);
    });
}

#[test]
fn watcher_recovers_when_etcd_restarts() {
    if !netns_fixtures::require_root() {
        return;
    }
    init_log();
    let mut env = start_etcd();
    let (tx_stop, rx_stop) = std::sync::mpsc::channel::<()>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    // The test body runs in the namespace while this thread restarts etcd.
    let path = env.ns.path();
    let body = std::thread::spawn(move || {
        let f = File::open(&path).unwrap();
        setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            wait_ready().await;
            let mut c = raw_client().await;
            let cfg = put_config(&mut c, CONFIG).await;
            let m = manager().await;
            let own = m.acquire_lease(&cfg, &attrs(10), Some(net("10.5.1.0/24")), None).await.unwrap();
            let (tx, mut rx) = mpsc::channel(16);
            let _task = m.spawn_watcher(cfg.clone(), own.key.clone(), tx);
            snapshot_where(&mut rx, "the initial one", |s| s.len() == 1).await;
            tx_stop.send(()).unwrap();
            tokio::task::spawn_blocking(move || rx_go.recv().unwrap()).await.unwrap();
            wait_ready().await;
            let mut c = raw_client().await;
            put_lease(&mut c, "10.5.2.0/24", 11).await;
            let s = snapshot_where(&mut rx, "10.5.2.0/24 after the restart", |s| has(s, "10.5.2.0/24")).await;
            assert_eq!(subnets(&s), ["10.5.1.0/24", "10.5.2.0/24"]);
            m.renew_lease(&own).await.expect("renew after the restart");
        });
    });
    // Restart etcd on the same data dir once the watcher runs.
    if rx_stop.recv().is_ok() {
        let _ = env.etcd.child.kill();
        let _ = env.etcd.child.wait();
        let data_dir = env.etcd.dir.path().to_path_buf();
        let new = start_etcd_in(&env.ns, &data_dir);
        env.etcd.child = new;
        let _ = tx_go.send(());
    }
    let res = body.join();
    drop(env);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// Starts etcd in `ns` with its data and log in `dir` (again, after a restart).
fn start_etcd_in(ns: &Netns, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("etcd.log")).expect("etcd.log");
    let client_url = format!("http://{CLIENT}");
    let peer_url = format!("http://{PEER}");
    ns.command("etcd")
        .arg("--name=t")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=t={peer_url}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn etcd (is /usr/bin/etcd installed?)")
}

#[test]
fn username_and_password_are_used() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        put_config(&mut c, CONFIG).await;
        c.user_add("root", "s3cret", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();

        let creds = EtcdOptions { username: Some("root".into()), password: Some("s3cret".into()), ..opts(CLIENT) };
        let m = EtcdSubnetManager::connect(&creds).await.expect("connect with credentials");
        let cfg = m.network_config().await.expect("config with credentials");
        let a = m.acquire_lease(&cfg, &attrs(10), None, None).await.expect("acquire with credentials");
        m.renew_lease(&a).await.expect("renew with credentials");
        let (tx, mut rx) = mpsc::channel(16);
        let _task = m.spawn_watcher(cfg.clone(), a.key.clone(), tx);
        snapshot_where(&mut rx, "our lease", |s| s == [a.lease.clone()]).await;
        let mut authed =
            Client::connect([CLIENT], Some(ConnectOptions::new().with_user("root", "s3cret"))).await.unwrap();
        put_lease(&mut authed, "10.5.200.0/24", 11).await;
        snapshot_where(&mut rx, "10.5.200.0/24 is in", |s| has(s, "10.5.200.0/24")).await;

        let anon = EtcdSubnetManager::connect(&opts(CLIENT)).await.unwrap();
        let msg = anon.network_config().await.unwrap_err().to_string();
        assert!(msg.contains("http://127.0.0.1:2379") && msg.contains("/coreos.com/network/config"), "{msg}");

        let wrong = EtcdOptions { password: Some("nope".into()), ..creds.clone() };
        let msg = EtcdSubnetManager::connect(&wrong).await.unwrap_err().to_string();
        assert!(msg.contains("http://127.0.0.1:2379") && msg.contains("connect"), "{msg}");
        let printed = format!("{creds:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
    });
}

/// Runs openssl in `dir`, panicking with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=flt-test-ca",
            "-days",
            "2",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, pem, ext) =
            (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN=flt-{who}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn tls_with_a_client_certificate() {
    if !netns_fixtures::require_root() {
        return;
    }
    let ns = Netns::new("etcdtls").expect("create namespace");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    make_pki(&d);
    let url = format!("https://{CLIENT}");
    let peer_url = format!("http://{PEER}");
    let log = File::create(d.join("etcd.log")).unwrap();
    let child = ns
        .command("etcd")
        .arg("--name=t")
        .arg(format!("--data-dir={}", d.join("data").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=t={peer_url}"))
        .arg(format!("--cert-file={}", d.join("server.pem").display()))
        .arg(format!("--key-file={}", d.join("server.key").display()))
        .arg(format!("--trusted-ca-file={}", d.join("ca.pem").display()))
        .arg("--client-cert-auth")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn etcd");
    let _etcd = Etcd { child, dir };
    in_netns(&ns, move || async move {
        let tls = EtcdOptions {
            endpoints: vec![url.clone()],
            cafile: Some(d.join("ca.pem")),
            certfile: Some(d.join("client.pem")),
            keyfile: Some(d.join("client.key")),
            ..Default::default()
        };
        // Put the configuration over TLS with etcd's own client options.
        let raw_tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(d.join("ca.pem")).unwrap()))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(d.join("client.pem")).unwrap(),
                std::fs::read(d.join("client.key")).unwrap(),
            ));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut c = loop {
            let attempt = Client::connect([url.as_str()], Some(ConnectOptions::new().with_tls(raw_tls.clone()))).await;
            if let Ok(mut c) = attempt {
                if c.put(format!("{PREFIX}/config"), CONFIG, None).await.is_ok() {
                    break c;
                }
            }
            assert!(Instant::now() < deadline, "etcd with TLS did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = &mut c;
        let m = EtcdSubnetManager::connect(&tls).await.unwrap();
        let cfg = m.network_config().await.unwrap();
        assert_eq!(cfg.ipv4.unwrap().network, net("10.5.0.0/16"));
        // Without the client certificate, etcd refuses us and the error says where.
        let no_cert = EtcdOptions { certfile: None, keyfile: None, ..tls.clone() };
        match EtcdSubnetManager::connect(&no_cert).await {
            Ok(m) => {
                let e = m.network_config().await.unwrap_err().to_string();
                assert!(e.contains(&url), "{e}");
            }
            Err(e) => assert!(e.to_string().contains(&url), "{e}"),
        }
        let half = EtcdOptions { keyfile: None, ..tls };
        let e = EtcdSubnetManager::connect(&half).await.unwrap_err().to_string();
        assert!(e.contains("--etcd-certfile needs --etcd-keyfile"), "{e}");
    });
}

const CONFIG6: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan","VNI":1}}"#;

fn attrs6(host: u8) -> LeaseAttrs {
    LeaseAttrs {
        public_ipv6: Some(format!("2001:db8::{host:x}").parse().unwrap()),
        vxlan6: Some(VxlanData { vni: 1, vtep_mac: format!("02:00:00:00:06:{host:02x}").parse().unwrap() }),
        wireguard: None,
        wireguard6: None,
        ..attrs(host)
    }
}

fn net6(s: &str) -> ipnet::Ipv6Net {
    s.parse().unwrap()
}

#[test]
fn dual_stack_leases_have_both_halves_in_flannels_key_and_value() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg = put_config(&mut c, CONFIG6).await;
        let c6 = cfg.ipv6.unwrap();
        let m = manager().await;
        let a = m.acquire_lease(&cfg, &attrs6(10), None, None).await.unwrap();
        let s6 = a.lease.subnet6().expect("an IPv6 half");
        assert!(c6.allows(s6), "{s6} out of range");
        // flannel's key: <v4>-<len>&<v6>-<len>.
        assert_eq!(
            a.key,
            format!("{PREFIX}/subnets/{}-24&{}-64", a.lease.subnet4().unwrap().network(), s6.network()),
            "{a:?}"
        );
        let (value, _) = get_value(&mut c, &a.key).await.expect("key written");
        assert_eq!(
            value,
            r#"{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::a","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:0a"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:0a"}}"#
        );
        let l6 = a.lease.ipv6.unwrap();
        assert_eq!(l6.public_ip, Some("2001:db8::a".parse().unwrap()));
        assert_eq!(l6.vxlan.unwrap().vtep_mac.to_string(), "02:00:00:00:06:0a");

        // Renewal and an update keep both halves and the key.
        let r = m.renew_lease(&a).await.unwrap();
        assert_eq!((&r.key, r.lease.subnet6()), (&a.key, Some(s6)));
        let mut moved = attrs6(10);
        moved.public_ipv6 = Some("2001:db8::aa".parse().unwrap());
        let u = m.update_lease(&r, &moved).await.unwrap();
        assert_eq!((&u.key, u.lease.subnet6(), u.lease.ipv6.unwrap().public_ip), (&a.key, Some(s6), moved.public_ipv6));
        assert_eq!(get_value(&mut c, &a.key).await.unwrap().0, encode_value(&moved));

        // A restart finds its lease by PublicIP: both halves again.
        let b = manager().await.acquire_lease(&cfg, &attrs6(10), None, None).await.unwrap();
        assert_eq!(
            (&b.key, b.lease.subnet4().unwrap(), b.lease.subnet6()),
            (&a.key, a.lease.subnet4().unwrap(), Some(s6))
        );

        // The watcher, the listing and the advertised MACs carry the IPv6 half.
        let (leases, _) = m.list_leases(&cfg).await.unwrap();
        assert_eq!(leases, vec![b.lease.clone()]);
        let (tx, mut rx) = mpsc::channel(16);
        let _w = m.spawn_watcher(cfg.clone(), b.key.clone(), tx);
        snapshot_where(&mut rx, "our dual-stack lease", |s| s == [b.lease.clone()]).await;
        let mut store = etcd_store().await;
        let macs =
            flanneld_rs::subnet::LeaseStore::advertised_macs(&mut store, &cfg, attrs(10).public_ip).await.unwrap();
        assert_eq!(
            (macs.v4.unwrap().to_string(), macs.v6.unwrap().to_string()),
            ("02:00:00:00:00:0a".into(), "02:00:00:00:06:0a".into())
        );

        // subnet.env's previous subnets are reused together when free.
        let p = m
            .acquire_lease(&cfg, &attrs6(11), Some(net("10.5.77.0/24")), Some(net6("2001:db8:10:77::/64")))
            .await
            .unwrap();
        assert_eq!(p.key, format!("{PREFIX}/subnets/10.5.77.0-24&2001:db8:10:77::-64"));
        // The previous IPv6 subnet taken (or missing): both picked afresh, as flannel.
        let q = m.acquire_lease(&cfg, &attrs6(12), Some(net("10.5.78.0/24")), Some(s6)).await.unwrap();
        assert_ne!(q.lease.subnet6(), Some(s6));
        assert!(c6.allows(q.lease.subnet6().unwrap()));
        let r2 = m.acquire_lease(&cfg, &attrs6(13), Some(net("10.5.79.0/24")), None).await.unwrap();
        assert!(r2.lease.subnet6().is_some());

        // A lease written by upstream flanneld (dual-stack vxlan), exact
        // bytes, on an IPv6 subnet none of the leases above was given (they
        // were picked at random: a fixed one would collide 1 time in 255).
        let (before, _) = m.list_leases(&cfg).await.unwrap();
        let free6 = (0xc8u16..=0xff)
            .map(|n| format!("2001:db8:10:{n:x}::/64"))
            .find(|s| before.iter().all(|l| l.subnet6().map(|x| x.to_string()).as_deref() != Some(s.as_str())))
            .expect("a free IPv6 subnet");
        let upstream_key = format!("{PREFIX}/subnets/10.5.200.0-24&{}", free6.replace('/', "-"));
        let upstream_value = r#"{"PublicIP":"192.0.2.200","PublicIPv6":"2001:db8::c8","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:11:22:33:44:55"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:11:22:33:44:66"}}"#;
        c.put(upstream_key.clone(), upstream_value, None).await.unwrap();
        let (leases, _) = m.list_leases(&cfg).await.unwrap();
        let up = leases.iter().find(|l| l.source == upstream_key).expect("upstream's lease is read");
        let up6 = up.ipv6.unwrap();
        assert_eq!(
            (up.subnet4().unwrap().to_string(), up6.subnet.to_string(), up6.public_ip.unwrap().to_string()),
            ("10.5.200.0/24".into(), free6.clone(), "2001:db8::c8".into())
        );
        assert_eq!(up6.vxlan.unwrap().vtep_mac.to_string(), "aa:11:22:33:44:66");
        // ...and its IPv6 subnet is not handed to anyone else.
        let mut seen = std::collections::HashSet::new();
        for l in &leases {
            assert!(seen.insert(l.subnet6()), "{:?} twice", l.subnet6());
        }
        // An IPv6 subnet outside IPv6Network is named with key and value.
        let bad_key = format!("{PREFIX}/subnets/10.5.201.0-24&2001:db8:99::-64");
        c.put(bad_key.clone(), encode_value(&attrs6(30)), None).await.unwrap();
        let listing = flanneld_rs::subnet::LeaseStore::list(&mut etcd_store().await, &cfg).await.unwrap();
        assert!(
            listing.unusable.iter().any(|u| u.contains(&bad_key) && u.contains("outside IPv6Network 2001:db8:10::/56")),
            "{:?}",
            listing.unusable
        );
    });
}

async fn etcd_store() -> flanneld_rs::subnet::etcd::EtcdStore {
    flanneld_rs::subnet::etcd::EtcdStore::connect(&opts(CLIENT)).await.unwrap()
}

#[test]
fn dual_stack_upgrade_replaces_an_ipv4_only_lease_as_flannel_does() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        let cfg4 = put_config(&mut c, CONFIG).await;
        let m = manager().await;
        let old = m.acquire_lease(&cfg4, &attrs(10), None, None).await.unwrap();
        assert_eq!(old.lease.ipv6, None);
        // The cluster turns dual-stack: the IPv4-only lease is deleted and a
        // dual-stack one taken (a new IPv4 subnet too, as in flannel).
        let cfg6 = put_config(&mut c, CONFIG6).await;
        let new = m.acquire_lease(&cfg6, &attrs6(10), old.lease.subnet4(), None).await.unwrap();
        assert!(new.lease.subnet6().is_some() && new.key.contains('&'), "{new:?}");
        assert_ne!(new.lease.subnet4().unwrap(), old.lease.subnet4().unwrap());
        assert_eq!(get_value(&mut c, &old.key).await, None, "the IPv4-only key is gone");
        let all = c.get(format!("{PREFIX}/subnets/"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(all.kvs().len(), 1);
        // An IPv4-only lease of another node stays and is read without an IPv6 half.
        let other = put_lease(&mut c, "10.5.9.0/24", 20).await;
        let (leases, _) = m.list_leases(&cfg6).await.unwrap();
        assert_eq!(leases.iter().find(|l| l.source == other).unwrap().ipv6, None);
        // IPv6Network moved: our lease's IPv6 half is outside it, and it is
        // replaced (not left beside a second lease of ours).
        let moved = put_config(&mut c, &CONFIG6.replace("2001:db8:10::/56", "2001:db8:20::/56")).await;
        let renumbered = m.acquire_lease(&moved, &attrs6(10), None, None).await.unwrap();
        assert!(renumbered.key.contains("&2001:db8:20:"), "{renumbered:?}");
        assert_eq!(get_value(&mut c, &new.key).await, None);
        let new = renumbered;
        // And back to IPv4 only: the dual-stack lease is replaced likewise.
        let back = m.acquire_lease(&cfg4, &attrs(10), None, None).await.unwrap();
        assert!(!back.key.contains('&') && back.lease.ipv6.is_none(), "{back:?}");
        assert_eq!(get_value(&mut c, &new.key).await, None);
    });
}

#[test]
fn concurrent_dual_stack_nodes_get_distinct_ipv6_subnets_until_none_is_left() {
    if !netns_fixtures::require_root() {
        return;
    }
    with_etcd(|| async {
        let mut c = raw_client().await;
        // Eight IPv6 subnets for many more IPv4 ones: the IPv6 half is the
        // one that collides.
        let cfg = put_config(
            &mut c,
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","IPv6SubnetMin":"2001:db8:10:10::","IPv6SubnetMax":"2001:db8:10:17::","Backend":{"Type":"vxlan"}}"#,
        )
        .await;
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let cfg = cfg.clone();
            let m = manager().await;
            tasks.push(tokio::spawn(async move { m.acquire_lease(&cfg, &attrs6(10 + i), None, None).await }));
        }
        let mut v6 = std::collections::BTreeSet::new();
        let mut v4 = std::collections::BTreeSet::new();
        for t in tasks {
            let a = t.await.unwrap().unwrap();
            v4.insert(a.lease.subnet4().unwrap());
            v6.insert(a.lease.subnet6().unwrap());
        }
        assert_eq!((v4.len(), v6.len()), (8, 8), "{v6:?}");
        let e = manager().await.acquire_lease(&cfg, &attrs6(40), None, None).await.unwrap_err();
        assert!(matches!(e, StoreError::OutOfSubnets6 { count: 8, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("IPv6Network 2001:db8:10::/56") && msg.contains("2001:db8:10:17::"), "{msg}");
    });
}
