//! The etcd subnet manager: flannel's lease store in etcd (v3 API).
//!
//! Layout, as flannel writes it:
//!
//! - `<prefix>/config`: the network configuration (JSON, see [`crate::config`]).
//! - `<prefix>/subnets/10.5.52.0-24` (dual stack: `10.5.52.0-24&fc00::-64`):
//!   one node's lease, value
//!   `{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`,
//!   bound to an etcd lease with a 24 h TTL. A key without an etcd lease is a
//!   permanent reservation: no node takes it except the one whose `PublicIP`
//!   it names.
//!
//! Creating a lease is a transaction that succeeds only if the key does not
//! exist yet (`create_revision == 0`), so two nodes never get the same subnet.
//! The watcher hands the reconcile loop full snapshots of the valid leases; it
//! resumes its watch from the last revision it saw after a connection error,
//! and relists when etcd has compacted that revision away, so no change (in
//! particular no delete) is ever lost.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, LeaseTimeToLiveOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Backoff, StoreError};
use crate::config::{ConfigError, Ipv4Config, Ipv6Config, NetworkConfig};
use crate::lease::{
    decode_value, encode_value, shown, unusable_public_ip, unusable_public_ipv6, Lease, LeaseAttrs, LeaseEvent,
    LeaseSet,
};

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// TTL of the etcd lease a subnet key is bound to (flannel's 24 h).
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long one etcd request may take before it counts as failed.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// After a failed renewal, when to try again.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// How many times acquisition picks again when other nodes keep winning the race.
const ACQUIRE_ATTEMPTS: usize = 64;

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Clone)]
pub struct EtcdOptions {
    /// `http://127.0.0.1:2379`, ...
    pub endpoints: Vec<String>,
    /// Key prefix, default [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Client key for TLS.
    pub keyfile: Option<PathBuf>,
    /// Client certificate for TLS.
    pub certfile: Option<PathBuf>,
    /// CA that signed etcd's certificate.
    pub cafile: Option<PathBuf>,
    /// User for etcd authentication.
    pub username: Option<String>,
    /// Password of `username`.
    pub password: Option<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: DEFAULT_PREFIX.to_string(),
            keyfile: None,
            certfile: None,
            cafile: None,
            username: None,
            password: None,
        }
    }
}

impl fmt::Debug for EtcdOptions {
    // By hand, so that the password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquiredLease {
    /// The lease as the store holds it (source = the key).
    pub lease: Lease,
    /// `<prefix>/subnets/10.5.52.0-24`.
    pub key: String,
    /// The etcd lease the key is bound to; `None` for a reservation.
    pub etcd_lease_id: Option<i64>,
    /// When the lease expires unless renewed. For a reservation, which never
    /// expires, one [`LEASE_TTL`] from the last check, so that the caller
    /// renews (re-checks) it like any other lease.
    pub expires: SystemTime,
}

/// `<prefix>/subnets/10.5.52.0-24`.
pub fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    lease_key(prefix, subnet, None)
}

/// The key of a lease, as flannel names it: `<prefix>/subnets/10.5.52.0-24`,
/// dual-stack `<prefix>/subnets/10.5.52.0-24&2001:db8:10:1::-64` (both
/// networks' addresses as Go prints them; Rust prints IPv6 the same way,
/// RFC 5952).
pub fn lease_key(prefix: &str, subnet: Ipv4Net, subnet6: Option<Ipv6Net>) -> String {
    let mut key = format!("{}/subnets/{}-{}", prefix.trim_end_matches('/'), subnet.network(), subnet.prefix_len());
    if let Some(s6) = subnet6 {
        key += &format!("&{}-{}", s6.network(), s6.prefix_len());
    }
    key
}

/// The subnet a key names, from the part after `<prefix>/subnets/`:
/// `10.5.52.0-24`, or for dual stack `10.5.52.0-24&fc00::-64` (the IPv4 part).
/// `None` unless it is a canonical IPv4 CIDR (no host bits, length 0..=32).
pub fn parse_subnet_key(key_tail: &str) -> Option<Ipv4Net> {
    parse_lease_key(key_tail).map(|(v4, _)| v4)
}

/// Both subnets a key names: `10.5.52.0-24` (no IPv6 half) or
/// `10.5.52.0-24&2001:db8:10:1::-64`. `None` unless each part is a canonical
/// CIDR (no host bits) in flannel's spelling (lower-case hex, as flannel's
/// key pattern wants), the IPv4 one first.
pub fn parse_lease_key(key_tail: &str) -> Option<(Ipv4Net, Option<Ipv6Net>)> {
    let (v4, v6) = match key_tail.split_once('&') {
        Some((a, b)) => (a, Some(b)),
        None => (key_tail, None),
    };
    let digits = |len: &str, max: usize| !len.is_empty() && len.len() <= max && len.bytes().all(|b| b.is_ascii_digit());
    let (ip, len) = v4.split_once('-')?;
    if !digits(len, 2) {
        return None;
    }
    let ip: Ipv4Addr = ip.parse().ok()?;
    let net = Ipv4Net::new(ip, len.parse().ok()?).ok()?;
    if net.trunc() != net {
        return None;
    }
    let net6 = match v6 {
        None => None,
        Some(v6) => {
            let (ip, len) = v6.rsplit_once('-')?;
            if !digits(len, 3) || !ip.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':') {
                return None;
            }
            let ip: Ipv6Addr = ip.parse().ok()?;
            let n = Ipv6Net::new(ip, len.parse().ok()?).ok()?;
            if n.trunc() != n {
                return None;
            }
            Some(n)
        }
    };
    Some((net, net6))
}

/// Decodes one entry of `<prefix>/subnets/`: the key must name a subnet inside
/// the configuration's Network (and, dual-stack, an IPv6 subnet inside
/// IPv6Network) and the value must decode. The error names the key and the
/// value. Without `EnableIPv6` the IPv6 half of a dual-stack key is not
/// used (as flannel's backends ignore it then).
pub fn decode_entry(prefix: &str, cfg: &NetworkConfig, key: &str, value: &[u8]) -> Result<Lease, String> {
    let dir = format!("{}/subnets/", prefix.trim_end_matches('/'));
    let (subnet, subnet6) = key.strip_prefix(&dir).and_then(parse_lease_key).ok_or_else(|| {
        format!(
            "lease {key} = {}: the key does not name a subnet (want {dir}<a.b.c.d>-<len> or \
             {dir}<a.b.c.d>-<len>&<ipv6>-<len>)",
            shown(value)
        )
    })?;
    let c4 = ipv4_of(cfg)?;
    if !c4.network.contains(&subnet) {
        return Err(format!("lease {key} = {}: subnet {subnet} is outside Network {}", shown(value), c4.network));
    }
    let subnet6 = match (&cfg.ipv6, subnet6) {
        (Some(c6), Some(s6)) if !c6.network.contains(&s6) => {
            return Err(format!(
                "lease {key} = {}: IPv6 subnet {s6} is outside IPv6Network {}",
                shown(value),
                c6.network
            ));
        }
        (Some(_), s6) => s6,
        (None, _) => None,
    };
    decode_value(key, subnet, subnet6, value)
}

/// A raw entry of `<prefix>/subnets/`.
struct Entry {
    key: String,
    /// The subnet the key names, if it names one.
    subnet: Option<Ipv4Net>,
    /// The IPv6 subnet a dual-stack key names.
    subnet6: Option<Ipv6Net>,
    value: Vec<u8>,
    /// The etcd lease, 0 for none (a reservation).
    lease_id: i64,
    mod_revision: i64,
    create_revision: i64,
}

impl Entry {
    fn from_kv(kv: &KeyValue) -> Option<Entry> {
        let Ok(key) = kv.key_str() else {
            log::warn!("skipping lease key {:?}: not UTF-8", String::from_utf8_lossy(kv.key()));
            return None;
        };
        let parsed = key.rsplit_once("/subnets/").and_then(|(_, tail)| parse_lease_key(tail));
        Some(Entry {
            key: key.to_string(),
            subnet: parsed.map(|p| p.0),
            subnet6: parsed.and_then(|p| p.1),
            value: kv.value().to_vec(),
            lease_id: kv.lease(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }
}

/// A random number, different on every call (std's randomly keyed hasher).
fn random_u64(seed: impl Hash) -> u64 {
    let mut h = RandomState::new().build_hasher();
    seed.hash(&mut h);
    SystemTime::now().hash(&mut h);
    h.finish()
}

/// The IPv4 network. flannel's etcd store leases every node an IPv4
/// subnet (upstream's too: its etcd leases always have one), so an
/// IPv6-only configuration is for Kubernetes mode; the daemon refuses it in
/// etcd mode before it gets here.
pub fn ipv4_of(cfg: &NetworkConfig) -> Result<&Ipv4Config, String> {
    cfg.ipv4.as_ref().ok_or_else(|| {
        "EnableIPv4 false (an IPv6-only cluster) needs --kube-subnet-mgr: flannel's etcd store leases every node \
         an IPv4 subnet (upstream's too)"
            .to_string()
    })
}

/// Whether `s` is a subnet the configuration lets a node lease.
fn in_range(cfg: &Ipv4Config, s: Ipv4Net) -> bool {
    let v = u32::from(s.network());
    s.prefix_len() == cfg.subnet_len
        && s.trunc() == s
        && cfg.network.contains(&s)
        && v >= u32::from(cfg.subnet_min)
        && v <= u32::from(cfg.subnet_max)
}

/// How many subnets [SubnetMin, SubnetMax] holds.
fn range_count(cfg: &Ipv4Config) -> u64 {
    let size = 1u64 << (32 - cfg.subnet_len);
    (u64::from(u32::from(cfg.subnet_max)) - u64::from(u32::from(cfg.subnet_min))) / size + 1
}

/// A free subnet of the range: the first one from a random starting point on
/// (wrapping around), so that nodes starting together rarely pick the same.
fn pick_free(cfg: &Ipv4Config, taken: &HashSet<Ipv4Net>, random: u64) -> Option<Ipv4Net> {
    let n = range_count(cfg);
    let size = 1u64 << (32 - cfg.subnet_len);
    let min = u64::from(u32::from(cfg.subnet_min));
    let start = random % n;
    (0..n)
        .map(|i| {
            let addr = Ipv4Addr::from((min + ((start + i) % n) * size) as u32);
            Ipv4Net::new(addr, cfg.subnet_len).expect("valid prefix length")
        })
        .find(|s| !taken.contains(s))
}

/// A key created before our dual-stack key `ours` (created at `created`,
/// unless `entries` has it) that holds our IPv4 subnet `s4` or our IPv6
/// subnet `s6` (the same, a wider or a narrower one, as [`occupied`] and
/// [`occupied6`] count them), and which subnet that is. A dual-stack key
/// names both subnets, so its create-if-absent guards only the pair:
/// another node may have created a key with either one beside another
/// meanwhile. The older key keeps it: the younger is given up right after
/// its create, or, when that check did not run, when it is found again as
/// ours. (A single-stack key names its only subnet, so its create guards
/// it; it needs no such check.)
fn older_holder(entries: &[Entry], ours: &str, s4: Ipv4Net, s6: Ipv6Net, created: i64) -> Option<(String, String)> {
    let created = entries.iter().find(|e| e.key == ours).map_or(created, |e| e.create_revision);
    entries.iter().filter(|e| e.key != ours && e.create_revision < created).find_map(|e| {
        let which = if e.subnet.is_some_and(|o| o.contains(&s4) || s4.contains(&o)) {
            format!("IPv4 subnet {s4}")
        } else if e.subnet6.is_some_and(|o| o.contains(&s6) || s6.contains(&o)) {
            format!("IPv6 subnet {s6}")
        } else {
            return None;
        };
        Some((e.key.clone(), which))
    })
}

/// The `subnet_len`-sized subnets the existing keys occupy (also the ones with
/// malformed values: the key exists, so creating it would fail).
fn occupied(cfg: &Ipv4Config, entries: &[Entry]) -> HashSet<Ipv4Net> {
    let mut out = HashSet::new();
    for s in entries.iter().filter_map(|e| e.subnet) {
        if s.prefix_len() >= cfg.subnet_len {
            if let Ok(n) = Ipv4Net::new(s.network(), cfg.subnet_len) {
                out.insert(n.trunc());
            }
        } else if cfg.subnet_len - s.prefix_len() <= 16 {
            if let Ok(subs) = s.subnets(cfg.subnet_len) {
                out.extend(subs);
            }
        }
    }
    out
}

/// The IPv6 subnets the existing keys occupy: the `IPv6SubnetLen`-sized
/// ones, and (rare: a key written under another length) the wider ones.
fn occupied6(c6: &Ipv6Config, entries: &[Entry]) -> (HashSet<Ipv6Net>, Vec<Ipv6Net>) {
    let (mut exact, mut wide) = (HashSet::new(), Vec::new());
    for s in entries.iter().filter_map(|e| e.subnet6) {
        if s.prefix_len() >= c6.subnet_len {
            exact.insert(Ipv6Net::new(s.network(), c6.subnet_len).expect("valid prefix").trunc());
        } else {
            wide.push(s);
        }
    }
    (exact, wide)
}

/// A free IPv6 subnet of [IPv6SubnetMin, IPv6SubnetMax]: as for IPv4, the
/// first free one from a random starting point on (wrapping around). Wider
/// keys are stepped over whole, so the scan is as long as the keys are many,
/// whatever the size of the range.
fn pick_free6(c6: &Ipv6Config, taken: &(HashSet<Ipv6Net>, Vec<Ipv6Net>), random: u128) -> Option<Ipv6Net> {
    let n = c6.count();
    let size = 1u128.checked_shl(u32::from(128 - c6.subnet_len)).unwrap_or(u128::MAX);
    let min = u128::from(c6.subnet_min);
    let start = random % n;
    // Scans indices [from, to); None when all taken.
    let scan = |from: u128, to: u128| {
        let mut i = from;
        while i < to {
            let cand = c6.nth(i)?;
            if taken.0.contains(&cand) {
                i += 1;
            } else if let Some(w) = taken.1.iter().find(|w| w.contains(&cand)) {
                // Past the wide key's last address.
                let last = u128::from(w.broadcast());
                i = ((last - min) / size).saturating_add(1);
            } else {
                return Some(cand);
            }
        }
        None
    };
    scan(start, n).or_else(|| scan(0, start))
}

/// A random IPv6 subnet index seed.
fn random_u128(seed: impl Hash + Copy) -> u128 {
    (u128::from(random_u64((seed, 1u8))) << 64) | u128::from(random_u64((seed, 2u8)))
}

/// Whether a lease of ours with `subnet6` (its key's IPv6 half) fits the
/// configuration's families, flannel's test for reusing it: with
/// `EnableIPv6` it must have an IPv6 subnet flannel would lease, without it
/// none.
fn fits_families(cfg: &NetworkConfig, subnet6: Option<Ipv6Net>) -> bool {
    match (&cfg.ipv6, subnet6) {
        (None, None) => true,
        (Some(c6), Some(s6)) => c6.allows(s6),
        _ => false,
    }
}

/// The pieces needed to (re)build a client.
#[derive(Clone)]
struct Connector {
    endpoints: Vec<String>,
    /// Comma separated, for messages.
    shown: String,
    options: ConnectOptions,
}

impl Connector {
    async fn connect(&self) -> Result<Client, StoreError> {
        let op = "connect".to_string();
        match tokio::time::timeout(RPC_TIMEOUT, Client::connect(&self.endpoints, Some(self.options.clone()))).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(source)) => Err(StoreError::Etcd { endpoints: self.shown.clone(), op, source }),
            Err(_) => Err(StoreError::Timeout { endpoints: self.shown.clone(), op, after: RPC_TIMEOUT }),
        }
    }

    /// Runs one request with a deadline, naming `op` in errors.
    async fn call<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(RPC_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(StoreError::Etcd { endpoints: self.shown.clone(), op: op(), source }),
            Err(_) => Err(StoreError::Timeout { endpoints: self.shown.clone(), op: op(), after: RPC_TIMEOUT }),
        }
    }
}

/// TLS settings from `--etcd-cafile/--etcd-certfile/--etcd-keyfile`; `None`
/// when every endpoint is `http://`: as flannel does, the files are then not
/// used (and said so), and the client connects without TLS.
fn tls_options(opts: &EtcdOptions) -> Result<Option<etcd_client::TlsOptions>, StoreError> {
    let given = opts.cafile.is_some() || opts.certfile.is_some() || opts.keyfile.is_some();
    let plain = opts.endpoints.iter().filter(|e| e.starts_with("http://")).count();
    if plain == opts.endpoints.len() {
        if given {
            log::info!(
                "--etcd-cafile/--etcd-certfile/--etcd-keyfile are not used: every etcd endpoint is http:// ({})",
                opts.endpoints.join(",")
            );
        }
        return Ok(None);
    }
    if plain > 0 {
        // etcd-client uses one TLS setting for all endpoints.
        return Err(StoreError::Invalid(format!(
            "--etcd-endpoints {}: mixes http:// and https:// endpoints; use one scheme for all",
            opts.endpoints.join(",")
        )));
    }
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StoreError::Invalid(format!("--{flag} {}: {e}", p.display())))
    };
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = &opts.cafile {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("etcd-cafile", ca)?));
    }
    match (&opts.certfile, &opts.keyfile) {
        (Some(cert), Some(key)) => {
            let (cert_pem, key_pem) = (read("etcd-certfile", cert)?, read("etcd-keyfile", key)?);
            super::etcd_tls::check_identity(
                &cert_pem,
                &cert.display().to_string(),
                &key_pem,
                &key.display().to_string(),
            )
            .map_err(StoreError::Invalid)?;
            // X.509 version 1 client certificates work (see etcd_tls).
            super::etcd_tls::use_any_version_client_certs();
            tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        (Some(_), None) => return Err(StoreError::Invalid("--etcd-certfile needs --etcd-keyfile".into())),
        (None, Some(_)) => return Err(StoreError::Invalid("--etcd-keyfile needs --etcd-certfile".into())),
    }
    Ok(Some(tls))
}

/// The etcd lease store.
pub struct EtcdSubnetManager {
    conn: Connector,
    client: Client,
    /// The prefix without a trailing `/`.
    prefix: String,
}

impl fmt::Debug for EtcdSubnetManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSubnetManager").field("endpoints", &self.conn.shown).field("prefix", &self.prefix).finish()
    }
}

impl EtcdSubnetManager {
    /// Builds a client for `opts.endpoints`. The connection itself is made by
    /// the first request (and made again after it breaks), so this fails only
    /// on bad options or bad credentials.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        if let Some(tls) = tls_options(opts)? {
            options = options.with_tls(tls);
        }
        match (&opts.username, &opts.password) {
            (Some(user), password) => {
                // etcd's simple tokens expire (--auth-token-ttl, 5 min idle):
                // a daemon that renews once a day needs fresh ones.
                options =
                    options.with_user(user.clone(), password.clone().unwrap_or_default()).with_auto_token_refresh(true);
            }
            (None, Some(_)) => return Err(StoreError::Invalid("etcd password given without a username".into())),
            (None, None) => {}
        }
        let conn = Connector { endpoints: opts.endpoints.clone(), shown: opts.endpoints.join(","), options };
        let client = conn.connect().await?;
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        Ok(EtcdSubnetManager { conn, client, prefix })
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_dir(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// Reads and validates `<prefix>/config`.
    pub async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        let key = self.config_key();
        let mut c = self.client.clone();
        let resp = self.conn.call(|| format!("get {key}"), c.get(key.clone(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(StoreError::ConfigMissing { endpoints: self.conn.shown.clone(), key });
        };
        let text = std::str::from_utf8(kv.value()).map_err(|_| ConfigError {
            source_name: key.clone(),
            msg: format!("value {:?} is not UTF-8", shown(kv.value())),
        })?;
        let cfg = NetworkConfig::parse(text, &key)?;
        ipv4_of(&cfg).map_err(|msg| ConfigError { source_name: key.clone(), msg })?;
        Ok(cfg)
    }

    /// Every entry of `<prefix>/subnets/` and the store revision.
    async fn list_raw(&self) -> Result<(Vec<Entry>, i64), StoreError> {
        list_raw(&self.conn, &self.client, &self.subnets_dir()).await
    }

    /// All valid leases (sorted by subnet) and the store revision. Entries that
    /// fail to parse are logged (key and value) and skipped.
    pub async fn list_leases(&self, cfg: &NetworkConfig) -> Result<(Vec<Lease>, i64), StoreError> {
        let (entries, rev) = self.list_raw().await?;
        let mut leases: Vec<Lease> = entries
            .iter()
            .filter_map(|e| match decode_entry(&self.prefix, cfg, &e.key, &e.value) {
                Ok(l) => Some(l),
                Err(msg) => {
                    log::warn!("skipping {msg}");
                    None
                }
            })
            .collect();
        leases.sort_by_key(|l| l.subnet4().map(|s| (u32::from(s.network()), s.prefix_len())));
        Ok((leases, rev))
    }

    async fn grant(&self) -> Result<(i64, SystemTime), StoreError> {
        let now = SystemTime::now();
        let mut c = self.client.clone();
        let resp =
            self.conn.call(|| "grant a lease".to_string(), c.lease_grant(LEASE_TTL.as_secs() as i64, None)).await?;
        Ok((resp.id(), now + Duration::from_secs(resp.ttl().max(0) as u64)))
    }

    /// Revokes an etcd lease we granted and did not use (best effort).
    async fn revoke_unused(&self, id: i64) {
        let mut c = self.client.clone();
        if let Err(e) = self.conn.call(|| format!("revoke lease {id:x}"), c.lease_revoke(id)).await {
            log::debug!("{e}");
        }
    }

    /// Revokes an etcd lease if no key is attached to it any more (best effort).
    async fn revoke_if_orphan(&self, id: i64) {
        let mut c = self.client.clone();
        let ttl = self
            .conn
            .call(
                || format!("time-to-live of lease {id:x}"),
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())),
            )
            .await;
        match ttl {
            Ok(r) if r.ttl() > 0 && r.keys().is_empty() => self.revoke_unused(id).await,
            Ok(_) => {}
            Err(e) => log::debug!("{e}"),
        }
    }

    /// Acquires a subnet lease, flannel's way: the lease whose PublicIP is
    /// ours, else `previous` (from our old subnet.env) if it is in range and
    /// free, else a free subnet in [SubnetMin, SubnetMax] picked at random.
    ///
    /// Dual-stack (`EnableIPv6`): the lease has an IPv6 subnet too, under
    /// flannel's key `10.5.52.0-24&2001:db8:10:1::-64`. Our lease is reused
    /// with both halves; `previous` is reused with `previous6` (subnet.env's
    /// FLANNEL_IPV6_SUBNET) when both fit and are free, else both are picked
    /// afresh. A lease of ours that does not fit the families (IPv4-only
    /// while the configuration now asks for IPv6, or the reverse) is
    /// deleted and a new one taken, as flannel does (so the node gets a new
    /// IPv4 subnet too).
    pub async fn acquire_lease(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<AcquiredLease, StoreError> {
        let c4 = ipv4_of(cfg).map_err(StoreError::Invalid)?;
        let public_ip = attrs
            .public_ip
            .ok_or_else(|| StoreError::Invalid("no public IPv4 address to lease an IPv4 subnet with".into()))?;
        if let Some(why) = unusable_public_ip(public_ip) {
            return Err(StoreError::Invalid(format!(
                "public IP {public_ip} is {why}: other nodes could not reach this one"
            )));
        }
        if let Some(why) = attrs.public_ipv6.and_then(unusable_public_ipv6) {
            return Err(StoreError::Invalid(format!(
                "public IPv6 {} is {why}: other nodes could not reach this one",
                attrs.public_ipv6.expect("checked")
            )));
        }
        let value = encode_value(attrs);
        let cfg4 = NetworkConfig { ipv6: None, ..cfg.clone() };
        // A lease granted in an earlier attempt and not used yet.
        let mut granted: Option<(i64, SystemTime)> = None;
        let mut last_key = String::new();
        let result = 'attempts: {
            for attempt in 0..ACQUIRE_ATTEMPTS {
                let (entries, _) = match self.list_raw().await {
                    Ok(v) => v,
                    Err(e) => break 'attempts Err(e),
                };
                // (1) A lease whose PublicIP is ours; reservations first.
                // Found whatever its IPv6 half (as flannel finds it), which
                // is checked below.
                let mut mine: Vec<(&Entry, Ipv4Net)> = entries
                    .iter()
                    .filter_map(|e| match decode_entry(&self.prefix, &cfg4, &e.key, &e.value) {
                        Ok(l) => l.ipv4.filter(|v4| v4.public_ip == public_ip).map(|v4| (e, v4.subnet)),
                        Err(msg) => {
                            log::debug!("not considering {msg}");
                            None
                        }
                    })
                    .collect();
                mine.sort_by_key(|(e, _)| e.lease_id != 0);
                if let Some((entry, subnet)) = mine.into_iter().next() {
                    // A dual-stack key that lost the race of its create
                    // (whose check below did not run: etcd failed, or the
                    // daemon was stopped, right after the create) is not
                    // ours to keep; a reservation always is.
                    let lost = match (entry.lease_id, entry.subnet6) {
                        (0, _) | (_, None) => None,
                        (_, Some(s6)) => older_holder(&entries, &entry.key, subnet, s6, entry.create_revision),
                    };
                    if lost.is_none() && fits_families(cfg, entry.subnet6) {
                        let subnet6 = cfg.ipv6.and(entry.subnet6);
                        match self.take_over(entry, subnet, subnet6, attrs, &value, &mut granted).await {
                            Ok(Some(acquired)) => break 'attempts Ok(acquired),
                            Ok(None) => {
                                log::info!("lease {} changed while we updated it; looking again", entry.key);
                                last_key = entry.key.clone();
                                continue;
                            }
                            Err(e) => break 'attempts Err(e),
                        }
                    }
                    // flannel deletes it and takes a new lease; the deleted
                    // subnets stay taken for this pick (as in flannel, which
                    // picks from the list it read before deleting).
                    let why = match (lost, entry.subnet6) {
                        (Some((winner, which)), _) => format!("lost {which} to the older {winner} when it was created"),
                        _ if cfg.ipv6.is_none() => {
                            "has an IPv6 subnet, and the configuration has no EnableIPv6 (as flannel does)".to_string()
                        }
                        (None, None) => {
                            "has no IPv6 subnet, and the configuration has EnableIPv6 (as flannel does)".to_string()
                        }
                        (None, Some(s6)) => format!(
                            "has IPv6 subnet {s6}, which the configuration's IPv6 range does not allow (as flannel does)"
                        ),
                    };
                    log::warn!(
                        "this node's lease {} = {} {why}: deleting it and taking a new lease",
                        entry.key,
                        shown(&entry.value)
                    );
                    let txn = Txn::new()
                        .when([Compare::mod_revision(entry.key.clone(), CompareOp::Equal, entry.mod_revision)])
                        .and_then([TxnOp::delete(entry.key.clone(), None)]);
                    let mut c = self.client.clone();
                    match self.conn.call(|| format!("delete {}", entry.key), c.txn(txn)).await {
                        Ok(r) if r.succeeded() => {}
                        Ok(_) => {
                            last_key = entry.key.clone();
                            continue;
                        }
                        Err(e) => break 'attempts Err(e),
                    }
                }
                // (2) The previous subnet(s), (3) free ones.
                let taken = occupied(c4, &entries);
                let taken6 = cfg.ipv6.as_ref().map(|c6| (c6, occupied6(c6, &entries)));
                let prev6_ok = |p6: Option<Ipv6Net>| match &taken6 {
                    None => true,
                    Some((c6, t6)) => {
                        p6.is_some_and(|p| c6.allows(p) && !t6.0.contains(&p) && !t6.1.iter().any(|w| w.contains(&p)))
                    }
                };
                let prev = previous.map(|p| p.trunc()).filter(|p| in_range(c4, *p) && !taken.contains(p));
                let (subnet, subnet6) = match prev {
                    Some(p) if prev6_ok(previous6.map(|p| p.trunc())) => {
                        log::info!(
                            "reusing the previous subnet {p}{}",
                            match (&taken6, previous6) {
                                (Some(_), Some(p6)) => format!(" and IPv6 subnet {}", p6.trunc()),
                                _ => String::new(),
                            }
                        );
                        (p, taken6.as_ref().and(previous6.map(|p| p.trunc())))
                    }
                    _ => {
                        if let Some(p) = prev {
                            log::info!(
                                "not reusing the previous subnet {p}: the previous IPv6 subnet ({}) is missing, out of \
                                 range or taken",
                                previous6.map_or("none".to_string(), |p| p.to_string())
                            );
                        }
                        let Some(subnet) = pick_free(c4, &taken, random_u64((public_ip, attempt))) else {
                            break 'attempts Err(StoreError::OutOfSubnets {
                                count: range_count(c4) as usize,
                                network: c4.network,
                                min: c4.subnet_min,
                                max: c4.subnet_max,
                            });
                        };
                        let subnet6 = match &taken6 {
                            None => None,
                            Some((c6, t6)) => match pick_free6(c6, t6, random_u128((public_ip, attempt))) {
                                Some(s6) => Some(s6),
                                None => {
                                    break 'attempts Err(StoreError::OutOfSubnets6 {
                                        count: c6.count(),
                                        network: c6.network,
                                        min: c6.subnet_min,
                                        max: c6.subnet_max,
                                    })
                                }
                            },
                        };
                        (subnet, subnet6)
                    }
                };
                let (lease_id, expires) = match granted {
                    Some(g) => g,
                    None => match self.grant().await {
                        Ok(g) => {
                            granted = Some(g);
                            g
                        }
                        Err(e) => break 'attempts Err(e),
                    },
                };
                let key = lease_key(&self.prefix, subnet, subnet6);
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease_id)))]);
                let mut c = self.client.clone();
                let resp = match self.conn.call(|| format!("create {key} = {value}"), c.txn(txn)).await {
                    Ok(r) => r,
                    Err(e) => break 'attempts Err(e),
                };
                if !resp.succeeded() {
                    log::info!("{key} was created by another node meanwhile; picking again");
                    last_key = key;
                    continue;
                }
                granted = None;
                // A dual-stack key's create guards only the pair of subnets
                // (see `older_holder`; a full run saw two nodes hold
                // 10.5.124.0/24 beside different IPv6 subnets).
                if let Some(s6) = subnet6 {
                    match self.lost_dual_stack_race(&key, subnet, s6, resp.header().map_or(0, |h| h.revision())).await {
                        Ok(None) => {}
                        Ok(Some((winner, which))) => {
                            log::info!("{winner} took {which} before our {key}; deleting ours and picking again");
                            let mut c = self.client.clone();
                            if let Err(e) =
                                self.conn.call(|| format!("delete {key}"), c.delete(key.clone(), None)).await
                            {
                                break 'attempts Err(e);
                            }
                            self.revoke_if_orphan(lease_id).await;
                            last_key = key;
                            continue;
                        }
                        Err(e) => break 'attempts Err(e),
                    }
                }
                log::info!("acquired lease {key} = {value} (etcd lease {lease_id:x})");
                let lease = attrs.lease(Some(subnet), subnet6, key.clone());
                break 'attempts Ok(AcquiredLease { lease, key, etcd_lease_id: Some(lease_id), expires });
            }
            Err(StoreError::Contention { attempts: ACQUIRE_ATTEMPTS, last_key })
        };
        if let Some((id, _)) = granted {
            self.revoke_unused(id).await;
        }
        result
    }

    /// The key that won the race for our dual-stack key `ours` (created at
    /// `created`), if one did, and the subnet it holds: see [`older_holder`].
    async fn lost_dual_stack_race(
        &self,
        ours: &str,
        s4: Ipv4Net,
        s6: Ipv6Net,
        created: i64,
    ) -> Result<Option<(String, String)>, StoreError> {
        let (entries, _) = self.list_raw().await?;
        Ok(older_holder(&entries, ours, s4, s6, created))
    }

    /// Makes an existing lease with our PublicIP ours again: writes our
    /// attributes (e.g. a new VTEP MAC) and, unless it is a reservation, binds
    /// it to a fresh 24 h etcd lease. `Ok(None)`: it changed meanwhile.
    async fn take_over(
        &self,
        entry: &Entry,
        subnet: Ipv4Net,
        subnet6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        value: &str,
        granted: &mut Option<(i64, SystemTime)>,
    ) -> Result<Option<AcquiredLease>, StoreError> {
        let key = entry.key.clone();
        let lease = attrs.lease(Some(subnet), subnet6, key.clone());
        let unchanged = Compare::mod_revision(key.clone(), CompareOp::Equal, entry.mod_revision);
        let mut c = self.client.clone();
        if entry.lease_id == 0 {
            // A reservation: ours to use, never bound to a TTL.
            if entry.value != value.as_bytes() {
                let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(key.clone(), value, None)]);
                let resp = self.conn.call(|| format!("update reservation {key} = {value}"), c.txn(txn)).await?;
                if !resp.succeeded() {
                    return Ok(None);
                }
            }
            log::info!("using reservation {key} = {value}");
            return Ok(Some(AcquiredLease { lease, key, etcd_lease_id: None, expires: SystemTime::now() + LEASE_TTL }));
        }
        let (lease_id, expires) = match *granted {
            Some(g) => g,
            None => {
                let g = self.grant().await?;
                *granted = Some(g);
                g
            }
        };
        let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease_id)),
        )]);
        let resp = self.conn.call(|| format!("renew {key} = {value}"), c.txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        *granted = None;
        if entry.lease_id != lease_id {
            self.revoke_if_orphan(entry.lease_id).await;
        }
        log::info!("reusing lease {key} = {value} (etcd lease {lease_id:x})");
        Ok(Some(AcquiredLease { lease, key, etcd_lease_id: Some(lease_id), expires }))
    }

    /// Extends the lease's TTL (one etcd keep-alive) after checking that the
    /// key still exists and is still bound to our etcd lease; returns the
    /// lease with its new expiry. A reservation is only checked.
    pub async fn renew_lease(&self, lease: &AcquiredLease) -> Result<AcquiredLease, StoreError> {
        let key = &lease.key;
        let mut c = self.client.clone();
        let resp = self.conn.call(|| format!("get {key}"), c.get(key.clone(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(StoreError::Revoked { key: key.clone(), why: "the key is gone from etcd".into() });
        };
        let Some(id) = lease.etcd_lease_id else {
            // A reservation: still ours as long as it names our PublicIP.
            let holder = serde_json::from_slice::<Value>(kv.value()).ok().and_then(|v| {
                let obj = v.as_object()?.clone();
                obj.into_iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("PublicIP"))
                    .and_then(|(_, v)| v.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()))
            });
            if holder.is_none() || holder != lease.lease.public_ip4() {
                return Err(StoreError::Revoked {
                    key: key.clone(),
                    why: format!(
                        "the reservation now holds {}, not PublicIP {}",
                        shown(kv.value()),
                        lease.lease.public_ip4().map_or("(none)".to_string(), |ip| ip.to_string())
                    ),
                });
            }
            return Ok(AcquiredLease { expires: SystemTime::now() + LEASE_TTL, ..lease.clone() });
        };
        if kv.lease() != id {
            return Err(StoreError::Revoked {
                key: key.clone(),
                why: format!(
                    "the key is now bound to etcd lease {:x}, not ours ({id:x}); value {}",
                    kv.lease(),
                    shown(kv.value())
                ),
            });
        }
        let now = SystemTime::now();
        // One keep-alive: lease_keep_alive sends a request and reads its
        // answer, failing when the lease is gone; the stream ends when dropped.
        let kept = self
            .conn
            .call(|| format!("keep etcd lease {id:x} of {key} alive"), async { c.lease_keep_alive(id).await.map(drop) })
            .await;
        match kept {
            Ok(()) => {}
            Err(StoreError::Etcd { source: etcd_client::Error::LeaseKeepAliveError(msg), .. }) => {
                return Err(StoreError::Revoked { key: key.clone(), why: format!("etcd lease {id:x}: {msg}") });
            }
            Err(e) => return Err(e),
        }
        let mut c = self.client.clone();
        let left = self
            .conn
            .call(|| format!("time-to-live of etcd lease {id:x} of {key}"), c.lease_time_to_live(id, None))
            .await?;
        if left.ttl() <= 0 {
            return Err(StoreError::Revoked { key: key.clone(), why: format!("etcd lease {id:x} has expired") });
        }
        Ok(AcquiredLease { expires: now + Duration::from_secs(left.ttl() as u64), ..lease.clone() })
    }

    /// Rewrites our lease's value with `attrs` (same key, same etcd lease),
    /// if the key still exists.
    pub async fn update_lease(&self, lease: &AcquiredLease, attrs: &LeaseAttrs) -> Result<AcquiredLease, StoreError> {
        let key = &lease.key;
        let value = encode_value(attrs);
        let put = match lease.etcd_lease_id {
            Some(id) => PutOptions::new().with_lease(id),
            None => PutOptions::new(),
        };
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Greater, 0)]).and_then([TxnOp::put(
            key.clone(),
            value.clone(),
            Some(put),
        )]);
        let mut c = self.client.clone();
        let resp = self.conn.call(|| format!("update {key} = {value}"), c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Revoked { key: key.clone(), why: "the key is gone from etcd".into() });
        }
        log::info!("updated lease {key} = {value}");
        Ok(AcquiredLease {
            lease: attrs.lease(lease.lease.subnet4(), lease.lease.subnet6(), key.clone()),
            ..lease.clone()
        })
    }

    /// Starts the lease watcher (see the module documentation): a snapshot at
    /// start and after every change of the valid lease set, `Revoked(own_key)`
    /// when our own key disappears. The task ends when `tx` is closed.
    pub fn spawn_watcher(
        &self,
        cfg: NetworkConfig,
        own_key: String,
        tx: mpsc::Sender<LeaseEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let w = Watcher {
            conn: self.conn.clone(),
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            dir: self.subnets_dir(),
            cfg,
            own_key,
            tx,
            state: LeaseSet::new(),
            own_present: false,
            dirty: true,
        };
        tokio::spawn(w.run())
    }
}

async fn list_raw(conn: &Connector, client: &Client, dir: &str) -> Result<(Vec<Entry>, i64), StoreError> {
    let mut c = client.clone();
    let resp = conn.call(|| format!("list {dir}"), c.get(dir, Some(GetOptions::new().with_prefix()))).await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok((resp.kvs().iter().filter_map(Entry::from_kv).collect(), rev))
}

/// How a watch ended.
enum WatchEnd {
    /// Start over from a fresh list (compacted, or canceled by etcd).
    Relist,
    /// Connection trouble: wait, then watch again from this revision.
    Resume(i64),
    /// The receiver is gone.
    Closed,
}

struct Watcher {
    conn: Connector,
    client: Client,
    prefix: String,
    dir: String,
    cfg: NetworkConfig,
    own_key: String,
    tx: mpsc::Sender<LeaseEvent>,
    /// The valid leases by key.
    state: LeaseSet,
    /// Whether our own key existed when last seen.
    own_present: bool,
    /// Whether `state` changed since it was last handed over (true until the
    /// first snapshot is sent).
    dirty: bool,
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut resume: Option<i64> = None;
        loop {
            let start = match resume.take() {
                Some(rev) => rev,
                None => match self.relist().await {
                    Ok(Some(rev)) => rev + 1,
                    Ok(None) => return,
                    Err(e) => {
                        log::warn!("lease watcher: {e}; retrying");
                        if !self.pause(&mut backoff).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            match self.watch_from(start, &mut backoff).await {
                WatchEnd::Closed => return,
                WatchEnd::Relist => {}
                WatchEnd::Resume(rev) => resume = Some(rev),
            }
            if !self.pause(&mut backoff).await {
                return;
            }
        }
    }

    /// Waits the next backoff; false if the receiver went away meanwhile.
    async fn pause(&mut self, backoff: &mut Backoff) -> bool {
        let d = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.tx.closed() => return false,
        }
        // A fresh client, so that a broken connection is not reused.
        match self.conn.connect().await {
            Ok(c) => self.client = c,
            Err(e) => log::debug!("lease watcher: {e}"),
        }
        true
    }

    /// Replaces the state with a fresh list; returns its revision, or None if
    /// the receiver is gone.
    async fn relist(&mut self) -> Result<Option<i64>, StoreError> {
        let (entries, rev) = list_raw(&self.conn, &self.client, &self.dir).await?;
        let mut state = LeaseSet::new();
        let mut own_present = false;
        for e in &entries {
            own_present |= e.key == self.own_key;
            match decode_entry(&self.prefix, &self.cfg, &e.key, &e.value) {
                Ok(l) => {
                    state.upsert(&e.key, l);
                }
                Err(msg) => log::warn!("skipping {msg}"),
            }
        }
        if state != self.state {
            self.dirty = true;
            self.state = state;
        }
        let revoked = std::mem::replace(&mut self.own_present, own_present) && !own_present;
        log::debug!("lease watcher: listed {} leases at revision {rev}", self.state.len());
        if !self.publish(revoked).await {
            return Ok(None);
        }
        Ok(Some(rev))
    }

    /// Sends a snapshot if the set changed (always the first time), then
    /// `Revoked` if asked; false if the receiver is gone.
    async fn publish(&mut self, revoked: bool) -> bool {
        if std::mem::take(&mut self.dirty) && !super::send_snapshot(&self.tx, &self.state).await {
            return false;
        }
        if revoked {
            log::warn!("our lease {} was deleted from etcd: revoked", self.own_key);
            if self.tx.send(LeaseEvent::Revoked(self.own_key.clone())).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn watch_from(&mut self, start: i64, backoff: &mut Backoff) -> WatchEnd {
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut c = self.client.clone();
        let dir = self.dir.clone();
        let mut stream = match self
            .conn
            .call(|| format!("watch {dir} from revision {start}"), c.watch(dir.clone(), Some(opts)))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                log::warn!("lease watcher: {e}; retrying");
                return WatchEnd::Resume(start);
            }
        };
        let mut next = start;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = self.tx.closed() => return WatchEnd::Closed,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => {
                    log::warn!("lease watcher: etcd at {} ended the watch of {dir}; resuming", self.conn.shown);
                    return WatchEnd::Resume(next);
                }
                Err(e) => {
                    log::warn!("lease watcher: etcd at {}: watch {dir}: {e}; resuming", self.conn.shown);
                    return WatchEnd::Resume(next);
                }
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    log::info!(
                        "lease watcher: revision {next} of {dir} was compacted (oldest left: {}); relisting",
                        resp.compact_revision()
                    );
                } else {
                    log::warn!("lease watcher: etcd canceled the watch of {dir} ({}); relisting", resp.cancel_reason());
                }
                return WatchEnd::Relist;
            }
            if resp.created() {
                backoff.reset();
            }
            let mut revoked = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                let Ok(key) = kv.key_str() else {
                    log::warn!("skipping lease key {:?}: not UTF-8", String::from_utf8_lossy(kv.key()));
                    continue;
                };
                match ev.event_type() {
                    EventType::Put => {
                        if key == self.own_key {
                            self.own_present = true;
                        }
                        self.dirty |= match decode_entry(&self.prefix, &self.cfg, key, kv.value()) {
                            Ok(l) => self.state.upsert(key, l),
                            Err(msg) => {
                                log::warn!("skipping {msg}");
                                self.state.remove(key)
                            }
                        };
                    }
                    EventType::Delete => {
                        self.dirty |= self.state.remove(key);
                        if key == self.own_key && self.own_present {
                            self.own_present = false;
                            revoked = true;
                        }
                    }
                }
            }
            if !self.publish(revoked).await {
                return WatchEnd::Closed;
            }
        }
    }
}

/// The etcd store as the daemon uses it: the manager and the lease it holds.
pub struct EtcdStore {
    mgr: EtcdSubnetManager,
    acquired: Option<AcquiredLease>,
    /// After a failed renewal: when to try again.
    retry_at: Option<SystemTime>,
}

impl EtcdStore {
    /// Builds the client (see [`EtcdSubnetManager::connect`]).
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        Ok(EtcdStore { mgr: EtcdSubnetManager::connect(opts).await?, acquired: None, retry_at: None })
    }

    fn not_acquired() -> StoreError {
        StoreError::Invalid("no lease acquired yet".into())
    }
}

impl super::LeaseStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd at {} (prefix {})", self.mgr.conn.shown, self.mgr.prefix)
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, StoreError> {
        self.mgr.network_config().await
    }

    async fn hints(&mut self, _cfg: &NetworkConfig) -> Result<super::NodeHints, StoreError> {
        Ok(super::NodeHints::default())
    }

    async fn advertised_macs(
        &mut self,
        cfg: &NetworkConfig,
        public_ip: Option<Ipv4Addr>,
    ) -> Result<super::VtepMacs, StoreError> {
        let (leases, _) = self.mgr.list_leases(cfg).await?;
        Ok(self.own(&leases, public_ip).map(super::VtepMacs::of).unwrap_or_default())
    }

    async fn acquire(
        &mut self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<Lease, StoreError> {
        let acquired = self.mgr.acquire_lease(cfg, attrs, previous, previous6).await?;
        let lease = acquired.lease.clone();
        self.acquired = Some(acquired);
        Ok(lease)
    }

    async fn publish(&mut self, _cfg: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Lease, StoreError> {
        let acquired = self.acquired.as_mut().ok_or_else(Self::not_acquired)?;
        *acquired = self.mgr.update_lease(acquired, attrs).await?;
        Ok(acquired.lease.clone())
    }

    fn watch(&mut self, cfg: &NetworkConfig) -> mpsc::Receiver<LeaseEvent> {
        let (tx, rx) = super::channel();
        let own_key = self.acquired.as_ref().map(|a| a.key.clone()).unwrap_or_default();
        // The task ends when the receiver is dropped.
        drop(self.mgr.spawn_watcher(cfg.clone(), own_key, tx));
        rx
    }

    fn renew_at(&self, margin: Duration) -> Option<SystemTime> {
        // A reservation never expires.
        let acquired = self.acquired.as_ref().filter(|a| a.etcd_lease_id.is_some())?;
        if let Some(t) = self.retry_at {
            return Some(t);
        }
        Some(acquired.expires.checked_sub(margin).unwrap_or(SystemTime::UNIX_EPOCH))
    }

    async fn renew(&mut self) -> Result<(), StoreError> {
        let acquired = self.acquired.as_mut().ok_or_else(Self::not_acquired)?;
        match self.mgr.renew_lease(acquired).await {
            Ok(renewed) => {
                log::info!("renewed lease {}", renewed.key);
                *acquired = renewed;
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(SystemTime::now() + RENEW_RETRY);
                Err(e)
            }
        }
    }

    async fn node_ready(&mut self, _set_unavailable: bool) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list(&mut self, cfg: &NetworkConfig) -> Result<super::Listing, StoreError> {
        let (entries, _) = self.mgr.list_raw().await?;
        let mut listing = super::Listing::default();
        for e in &entries {
            match decode_entry(&self.mgr.prefix, cfg, &e.key, &e.value) {
                Ok(l) => listing.leases.push(l),
                Err(msg) => listing.unusable.push(msg),
            }
        }
        listing.leases.sort_by_key(|l| (l.subnet4(), l.public_ip4()));
        Ok(listing)
    }

    fn own<'a>(&self, leases: &'a [Lease], public_ip: Option<Ipv4Addr>) -> Option<&'a Lease> {
        leases.iter().find(|l| public_ip.is_some() && l.public_ip4() == public_ip)
    }

    fn own_missing(&self, public_ip: Option<Ipv4Addr>) -> (String, String) {
        let ip = public_ip.map_or("(none: no IPv4 underlay address)".to_string(), |ip| ip.to_string());
        (
            format!("no lease in etcd ({}/subnets/) has PublicIP {ip}", self.mgr.prefix),
            "start flanneld-rs on this node (or check --iface/--public-ip)".into(),
        )
    }

    fn kube_client(&self) -> Option<(::kube::Client, String)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{BackendType, VxlanData};

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#, "test").unwrap()
    }

    fn vxlan_attrs() -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some("192.0.2.3".parse().unwrap()),
            backend: BackendType::Vxlan,
            vxlan: Some(VxlanData { vni: 1, vtep_mac: "aa:bb:cc:dd:ee:ff".parse().unwrap() }),
            public_ipv6: None,
            vxlan6: None,
            wireguard: None,
            wireguard6: None,
        }
    }

    const P: &str = "/coreos.com/network";

    /// The entry of key `k` (`10.5.1.0-24`, as under `/subnets/`), created
    /// and last changed at revision `created`, with the subnets its key
    /// names (as [`Entry::from_kv`] reads them) and no value or etcd lease.
    fn entry(k: &str, created: i64) -> Entry {
        let parsed = parse_lease_key(k);
        Entry {
            key: k.into(),
            subnet: parsed.map(|p| p.0),
            subnet6: parsed.and_then(|p| p.1),
            value: vec![],
            lease_id: 0,
            mod_revision: created,
            create_revision: created,
        }
    }

    #[test]
    fn key_naming_and_parsing() {
        let s: Ipv4Net = "10.5.52.0/24".parse().unwrap();
        assert_eq!(subnet_key(P, s), "/coreos.com/network/subnets/10.5.52.0-24");
        assert_eq!(subnet_key("/x/", s), "/x/subnets/10.5.52.0-24");
        assert_eq!(parse_subnet_key("10.5.52.0-24"), Some(s));
        assert_eq!(parse_subnet_key("10.5.52.0-24&fc00::-64"), Some(s));
        assert_eq!(parse_subnet_key("10.5.52.64-26"), Some("10.5.52.64/26".parse().unwrap()));
        for bad in
            ["10.5.52.0", "10.5.52.0-", "10.5.52.0-33", "10.5.52.1-24", "10.5.52-24", "x-24", "10.5.52.0-+4", "", "&"]
        {
            assert_eq!(parse_subnet_key(bad), None, "{bad}");
        }
        for s in ["10.5.52.0/24", "10.244.255.128/25", "0.0.0.0/0"] {
            let net: Ipv4Net = s.parse().unwrap();
            let key = subnet_key(P, net);
            assert_eq!(parse_subnet_key(key.rsplit_once("/subnets/").unwrap().1), Some(net));
        }
    }

    #[test]
    fn encode_is_flannels_exact_json() {
        assert_eq!(
            encode_value(&vxlan_attrs()),
            r#"{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#
        );
        let hostgw = LeaseAttrs { backend: BackendType::HostGw, vxlan: None, ..vxlan_attrs() };
        assert_eq!(encode_value(&hostgw), r#"{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"host-gw"}"#);
    }

    #[test]
    fn decode_roundtrips_and_tolerates_case_and_extra_fields() {
        let key = "/coreos.com/network/subnets/10.5.52.0-24";
        let s: Ipv4Net = "10.5.52.0/24".parse().unwrap();
        let l = decode_value(key, s, None, encode_value(&vxlan_attrs()).as_bytes()).unwrap();
        assert_eq!(l, vxlan_attrs().lease(Some(s), None, key));
        let v = br#"{"publicip":"192.0.2.9","PublicIPv6":"fc00::9","backendtype":"vxlan","BackendData":{"vni":4096,"vtepmac":"0A:1B:2C:3D:4E:5F"},"BackendV6Data":null}"#;
        let l = decode_value(key, s, None, v).unwrap();
        assert_eq!(l.public_ip4().unwrap().to_string(), "192.0.2.9");
        assert_eq!(l.ipv4.unwrap().vxlan.unwrap().vni, 4096);
        assert_eq!(l.ipv4.unwrap().vxlan.unwrap().vtep_mac.to_string(), "0a:1b:2c:3d:4e:5f");
        let l = decode_value(key, s, None, br#"{"PublicIP":"192.0.2.9","BackendType":"host-gw","BackendData":null}"#)
            .unwrap();
        assert_eq!((l.backend.as_str(), l.ipv4.unwrap().vxlan), ("host-gw", None));
        let l = decode_entry(P, &cfg(), key, encode_value(&vxlan_attrs()).as_bytes()).unwrap();
        assert_eq!(l.source, key);
    }

    #[test]
    fn decode_errors_name_key_and_value() {
        let key = "/coreos.com/network/subnets/10.5.52.0-24";
        let s: Ipv4Net = "10.5.52.0/24".parse().unwrap();
        let cases: &[(&str, &str)] = &[
            ("{not json", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (r#"{"BackendType":"vxlan"}"#, "PublicIP is missing"),
            (r#"{"PublicIP":"300.1.1.1","BackendType":"udp"}"#, "PublicIP \"300.1.1.1\" is not an IPv4"),
            (r#"{"PublicIP":"127.0.0.1","BackendType":"udp"}"#, "PublicIP 127.0.0.1 is loopback"),
            (r#"{"PublicIP":"224.0.0.5","BackendType":"udp"}"#, "PublicIP 224.0.0.5 is multicast"),
            (r#"{"PublicIP":"0.0.0.0","BackendType":"udp"}"#, "PublicIP 0.0.0.0 is unspecified"),
            (r#"{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":null}"#, "needs BackendData"),
            (
                r#"{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:bb:cc:dd:ee:ff"}}"#,
                "VtepMAC \"zz:bb:cc:dd:ee:ff\" is not a MAC",
            ),
            (
                r#"{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
                "not a unicast MAC",
            ),
            (r#"{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":{"VNI":1}}"#, "VtepMAC is missing"),
            (
                r#"{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
                "VNI -1",
            ),
        ];
        // No BackendType is not an error: flannel's udp backend writes none.
        let udp = decode_value(key, s, None, br#"{"PublicIP":"192.0.2.3"}"#).unwrap();
        assert_eq!(udp.backend, BackendType::Udp);
        for (value, want) in cases {
            let e = decode_value(key, s, None, value.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(e.contains(key), "{e:?} lacks the key");
            assert!(e.contains(value), "{e:?} lacks the value");
        }
    }

    #[test]
    fn decode_entry_checks_key_and_network() {
        let v = encode_value(&vxlan_attrs());
        let outside = "/coreos.com/network/subnets/10.6.1.0-24";
        let e = decode_entry(P, &cfg(), outside, v.as_bytes()).unwrap_err();
        assert!(e.contains("outside Network 10.5.0.0/16") && e.contains(outside) && e.contains(&v), "{e}");
        let badkey = "/coreos.com/network/subnets/10.5.1.0";
        let e = decode_entry(P, &cfg(), badkey, v.as_bytes()).unwrap_err();
        assert!(e.contains("does not name a subnet") && e.contains(badkey) && e.contains(&v), "{e}");
        let dual = "/coreos.com/network/subnets/10.5.1.0-24&fc00::-64";
        assert_eq!(decode_entry(P, &cfg(), dual, v.as_bytes()).unwrap().subnet4().unwrap().to_string(), "10.5.1.0/24");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let v = format!("{{\"x\":\"{}\"", "a".repeat(10_000));
        let e = decode_value("k", "10.5.1.0/24".parse().unwrap(), None, v.as_bytes()).unwrap_err();
        assert!(e.len() < 1000, "{}", e.len());
    }

    #[test]
    fn range_and_occupancy() {
        let c = cfg().ipv4.unwrap();
        assert!(in_range(&c, "10.5.1.0/24".parse().unwrap()));
        assert!(!in_range(&c, "10.5.0.0/24".parse().unwrap())); // below SubnetMin
        assert!(!in_range(&c, "10.5.1.0/25".parse().unwrap()));
        assert!(!in_range(&c, "10.6.1.0/24".parse().unwrap()));
        let e = |k: &str| entry(k, 1);
        let taken = occupied(&c, &[e("10.5.3.0-24"), e("10.5.4.128-25"), e("10.5.8.0-23"), e("junk")]);
        let mut t: Vec<String> = taken.iter().map(|s| s.to_string()).collect();
        t.sort();
        assert_eq!(t, ["10.5.3.0/24", "10.5.4.0/24", "10.5.8.0/24", "10.5.9.0/24"]);
    }

    #[test]
    fn free_subnets_are_picked_from_the_range_only() {
        let c =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.3.0","SubnetMax":"10.5.6.0"}"#, "test")
                .unwrap()
                .ipv4
                .unwrap();
        assert_eq!(range_count(&c), 4);
        assert_eq!(range_count(&cfg().ipv4.unwrap()), 255);
        let mut taken: HashSet<Ipv4Net> = ["10.5.3.0/24", "10.5.5.0/24"].iter().map(|s| s.parse().unwrap()).collect();
        for r in 0..16 {
            let s = pick_free(&c, &taken, r).unwrap().to_string();
            assert!(s == "10.5.4.0/24" || s == "10.5.6.0/24", "{s}");
        }
        assert_eq!(pick_free(&c, &taken, 1).unwrap().to_string(), "10.5.4.0/24");
        assert_eq!(pick_free(&c, &taken, 2).unwrap().to_string(), "10.5.6.0/24");
        assert_eq!(pick_free(&c, &taken, 3).unwrap().to_string(), "10.5.6.0/24");
        taken.extend(["10.5.4.0/24", "10.5.6.0/24"].iter().map(|s| s.parse::<Ipv4Net>().unwrap()));
        assert_eq!(pick_free(&c, &taken, 7), None);
    }

    fn cfg6() -> NetworkConfig {
        NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn dual_stack_keys_are_flannels() {
        let s: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let s6: Ipv6Net = "2001:db8:10:1::/64".parse().unwrap();
        // flannel's MakeSubnetKey, byte for byte.
        assert_eq!(lease_key(P, s, Some(s6)), "/coreos.com/network/subnets/10.244.1.0-24&2001:db8:10:1::-64");
        assert_eq!(lease_key(P, s, None), subnet_key(P, s));
        assert_eq!(parse_lease_key("10.244.1.0-24&2001:db8:10:1::-64"), Some((s, Some(s6))));
        assert_eq!(parse_lease_key("10.244.1.0-24"), Some((s, None)));
        assert_eq!(
            lease_key(P, s, Some("2001:db8::/64".parse().unwrap())),
            "/coreos.com/network/subnets/10.244.1.0-24&2001:db8::-64"
        );
        for bad in [
            "10.244.1.0-24&",
            "10.244.1.0-24&2001:db8:10:1::",
            "10.244.1.0-24&2001:db8:10:1::-",
            "10.244.1.0-24&2001:db8:10:1::1-64",
            "10.244.1.0-24&2001:DB8:10:1::-64",
            "10.244.1.0-24&2001:db8:10:1::-129",
            "10.244.1.0-24&10.1.0.0-16",
            "10.244.1.0-24&2001:db8:10:1::-64&2001:db8:10:2::-64",
        ] {
            assert_eq!(parse_lease_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn dual_stack_entries_carry_both_halves_and_are_checked() {
        let mut a = vxlan_attrs();
        a.public_ipv6 = Some("2001:db8::3".parse().unwrap());
        a.vxlan6 = Some(VxlanData { vni: 1, vtep_mac: "aa:bb:cc:dd:ee:01".parse().unwrap() });
        let v = encode_value(&a);
        let key = "/coreos.com/network/subnets/10.5.1.0-24&2001:db8:10:1::-64";
        let l = decode_entry(P, &cfg6(), key, v.as_bytes()).unwrap();
        assert_eq!(l, a.lease(Some("10.5.1.0/24".parse().unwrap()), Some("2001:db8:10:1::/64".parse().unwrap()), key));
        // Without EnableIPv6 the IPv6 half is not used.
        assert_eq!(decode_entry(P, &cfg(), key, v.as_bytes()).unwrap().ipv6, None);
        // An IPv4-only lease in a dual-stack network: no IPv6 half.
        let v4key = "/coreos.com/network/subnets/10.5.2.0-24";
        assert_eq!(decode_entry(P, &cfg6(), v4key, encode_value(&vxlan_attrs()).as_bytes()).unwrap().ipv6, None);
        let outside = "/coreos.com/network/subnets/10.5.1.0-24&2001:db8:99::-64";
        let e = decode_entry(P, &cfg6(), outside, v.as_bytes()).unwrap_err();
        assert!(
            e.contains(outside)
                && e.contains(&v)
                && e.contains("IPv6 subnet 2001:db8:99::/64 is outside IPv6Network 2001:db8:10::/56"),
            "{e}"
        );
    }

    #[test]
    fn a_dual_stack_key_loses_to_an_older_key_holding_either_of_its_subnets() {
        let e = entry;
        let ours = "10.5.1.0-24&2001:db8:10:1::-64";
        let (s4, s6) = parse_lease_key(ours).unwrap();
        let s6 = s6.unwrap();
        let check = |mut entries: Vec<Entry>| {
            entries.push(e(ours, 10));
            older_holder(&entries, ours, s4, s6, 0).map(|(k, which)| format!("{k}: {which}"))
        };
        assert_eq!(check(vec![]), None);
        assert_eq!(
            check(vec![e("10.5.1.0-24&2001:db8:10:9::-64", 5)]).as_deref(),
            Some("10.5.1.0-24&2001:db8:10:9::-64: IPv4 subnet 10.5.1.0/24")
        );
        assert_eq!(
            check(vec![e("10.5.9.0-24&2001:db8:10:1::-64", 5)]).as_deref(),
            Some("10.5.9.0-24&2001:db8:10:1::-64: IPv6 subnet 2001:db8:10:1::/64")
        );
        // A wider key (another SubnetLen) holds it too; a single-stack one holds its IPv4 subnet.
        assert!(check(vec![e("10.5.0.0-23&2001:db8:10:9::-64", 5)]).is_some());
        assert!(check(vec![e("10.5.1.0-24", 5)]).is_some());
        // A younger key, or one holding neither, loses or does not race.
        assert_eq!(check(vec![e("10.5.1.0-24&2001:db8:10:9::-64", 11)]), None);
        assert_eq!(check(vec![e("10.5.9.0-24&2001:db8:10:9::-64", 5)]), None);
        // Our key not listed (yet): the create's revision counts.
        let older = e("10.5.1.0-24&2001:db8:10:9::-64", 5);
        assert!(older_holder(std::slice::from_ref(&older), ours, s4, s6, 10).is_some());
        assert_eq!(older_holder(std::slice::from_ref(&older), ours, s4, s6, 3), None);
    }

    #[test]
    fn free_ipv6_subnets_are_picked_from_the_range_only() {
        let c = cfg6();
        let c6 = c.ipv6.unwrap();
        // Default IPv6SubnetMin: the second /64.
        assert_eq!(c6.count(), 255);
        let e = |k: &str| entry(k, 1);
        let entries: Vec<Entry> = (1..=254u32)
            .map(|i| e(&format!("10.5.{i}.0-24&2001:db8:10:{i:x}::-64")))
            .chain([e("10.5.255.0-24")])
            .collect();
        let taken = occupied6(&c6, &entries);
        for r in [0u128, 1, 77, u128::MAX] {
            assert_eq!(pick_free6(&c6, &taken, r).unwrap().to_string(), "2001:db8:10:ff::/64", "{r}");
        }
        let mut all = entries;
        all.push(e("10.5.9.0-24&2001:db8:10:ff::-64"));
        assert_eq!(pick_free6(&c6, &occupied6(&c6, &all), 5), None);
        // A wider key covers every /64 in it, and is stepped over whole.
        let wide = occupied6(&c6, &[e("10.5.1.0-24&2001:db8:10::-57")]);
        for r in 0..300u128 {
            let s = pick_free6(&c6, &wide, r).unwrap();
            assert!(u128::from(s.network()) >= u128::from("2001:db8:10:80::".parse::<Ipv6Addr>().unwrap()), "{s}");
        }
        // Reuse of our lease needs the families to match the configuration.
        assert!(fits_families(&c, Some("2001:db8:10:5::/64".parse().unwrap())));
        assert!(!fits_families(&c, None));
        assert!(!fits_families(&c, Some("2001:db8:10::/64".parse().unwrap())), "below IPv6SubnetMin");
        assert!(!fits_families(&cfg(), Some("2001:db8:10:5::/64".parse().unwrap())));
        assert!(fits_families(&cfg(), None));
    }

    #[test]
    fn options_debug_hides_the_password() {
        let o = EtcdOptions { password: Some("hunter2".into()), username: Some("root".into()), ..Default::default() };
        let d = format!("{o:?}");
        assert!(!d.contains("hunter2") && d.contains("root"), "{d}");
    }
}
