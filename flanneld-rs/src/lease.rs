//! Subnet leases: the vocabulary the lease stores (etcd, Kubernetes) and the
//! backends share, and the one wire format both stores use.
//!
//! A lease says "this node owns this subnet, is reachable at this public IP,
//! and runs this backend with this data". The etcd store keeps it as one JSON
//! value (`{"PublicIP":...,"BackendType":...,"BackendData":...}`), the
//! Kubernetes store as annotations on the Node (`backend-type`,
//! `backend-data`, `public-ip`); the backend type and backend data are the
//! same strings in both, and are encoded and decoded here only, with
//! upstream flannel's rules:
//!
//! - the backend type is compared exactly (flannel's backends compare with
//!   `!=`): `vxlan`, `host-gw`, `udp`; a missing or empty type is `udp`
//!   (flannel's udp backend writes its lease without one);
//! - VXLAN backend data is `{"VNI":<n>,"VtepMAC":"<mac>"}`; field names match
//!   without regard to case (Go's decoder), a missing VNI is 0 (Go's zero
//!   value), and the MAC takes any of Go's `net.ParseMAC` spellings of a
//!   48-bit address.

use std::fmt;
use std::net::Ipv4Addr;

use flannel_net::MacAddr;
use ipnet::Ipv4Net;
use serde_json::Value;

/// How much of a value error messages show.
const MAX_SHOWN_VALUE: usize = 300;

/// A lease's `BackendType`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendType {
    /// `vxlan`.
    Vxlan,
    /// `host-gw`.
    HostGw,
    /// `udp`, also written as an empty or missing type (flannel's udp backend).
    Udp,
    /// Any other type (another flannel backend: `wireguard`, `ipip`, ...).
    Other(String),
}

impl BackendType {
    /// Reads a type as a lease or annotation carries it; `None` (missing) and
    /// `""` are udp, as in flannel.
    pub fn parse(s: Option<&str>) -> BackendType {
        match s.unwrap_or("") {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            "udp" | "" => BackendType::Udp,
            other => BackendType::Other(other.to_string()),
        }
    }

    /// The name as written in leases and annotations, as flannel writes
    /// it: its udp backend sets no type, so a udp lease has none (etcd: the
    /// field is left out; Kubernetes: `backend-type: ""`).
    pub fn wire_name(&self) -> &str {
        match self {
            BackendType::Udp => "",
            other => other.as_str(),
        }
    }

    /// The backend's name (in logs and messages).
    pub fn as_str(&self) -> &str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Udp => "udp",
            BackendType::Other(s) => s,
        }
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's lease on a subnet of the cluster network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node's subnet (`10.244.1.0/24`).
    pub subnet: Ipv4Net,
    /// The node's underlay address, the VXLAN/UDP tunnel endpoint.
    pub public_ip: Ipv4Addr,
    /// The node's backend.
    pub backend: BackendType,
    /// VXLAN backend data, when the lease has it.
    pub vxlan: Option<VxlanData>,
    /// Where the lease came from, for messages (`/coreos.com/network/subnets/10.244.1.0-24`, `node worker-1`).
    pub source: String,
}

/// `BackendData` of a VXLAN lease: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// VXLAN network identifier.
    pub vni: u32,
    /// The node's VTEP MAC.
    pub vtep_mac: MacAddr,
}

/// What a node advertises about itself when it acquires or renews a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// The node's underlay address.
    pub public_ip: Ipv4Addr,
    /// Backend type.
    pub backend: BackendType,
    /// VXLAN data (the VTEP MAC this node uses).
    pub vxlan: Option<VxlanData>,
}

impl LeaseAttrs {
    /// The lease these attributes make for `subnet`, found at `source`.
    pub fn lease(&self, subnet: Ipv4Net, source: impl Into<String>) -> Lease {
        Lease {
            subnet,
            public_ip: self.public_ip,
            backend: self.backend.clone(),
            vxlan: self.vxlan,
            source: source.into(),
        }
    }
}

/// The lease set as a store's watcher hands it over: a persistent map (keyed
/// by where each lease came from: etcd key, node name) that the watcher
/// updates in place and hands over by cloning, which shares its nodes
/// instead of copying them. Handing over a snapshot per event therefore
/// costs O(log n), not O(n), at any number of nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSet(imbl::OrdMap<String, Lease>);

impl LeaseSet {
    /// An empty set.
    pub fn new() -> LeaseSet {
        LeaseSet::default()
    }

    /// Adds or replaces the lease from `source`; whether the set changed.
    pub fn upsert(&mut self, source: &str, lease: Lease) -> bool {
        if self.0.get(source) == Some(&lease) {
            return false;
        }
        self.0.insert(source.to_string(), lease);
        true
    }

    /// Removes the lease from `source`; whether there was one.
    pub fn remove(&mut self, source: &str) -> bool {
        self.0.remove(source).is_some()
    }

    /// Every lease, in the order of their sources.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> + '_ {
        self.0.values()
    }

    /// How many leases.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A copy of every lease, sorted by subnet (for tests, `diagnose` and
    /// messages, never per event).
    pub fn to_vec(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.0.values().cloned().collect();
        v.sort_by_key(|l| (l.subnet, l.public_ip));
        v
    }
}

impl FromIterator<Lease> for LeaseSet {
    fn from_iter<T: IntoIterator<Item = Lease>>(iter: T) -> Self {
        LeaseSet(iter.into_iter().map(|l| (l.source.clone(), l)).collect())
    }
}

/// What the lease watcher hands the reconcile loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The complete, current set of valid leases (ours included). Entries that
    /// failed to parse are not in it (they were logged with key and value).
    Snapshot(LeaseSet),
    /// Our own lease disappeared from the store: it was revoked.
    Revoked(String),
}

/// A value for messages: lossy UTF-8, cut when long.
pub fn shown(value: &[u8]) -> String {
    let s = String::from_utf8_lossy(value);
    if s.chars().count() > MAX_SHOWN_VALUE {
        format!("{}...", s.chars().take(MAX_SHOWN_VALUE).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// The `BackendData` (etcd) or `backend-data` annotation (Kubernetes) for
/// `attrs`, byte for byte as flannel writes it: `{"VNI":1,"VtepMAC":"..."}`
/// for VXLAN, `null` otherwise.
pub fn encode_backend_data(attrs: &LeaseAttrs) -> String {
    match &attrs.vxlan {
        Some(v) => format!("{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", v.vni, v.vtep_mac),
        None => "null".to_string(),
    }
}

/// flannel's JSON for an etcd lease value, byte for byte:
/// `{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`.
/// flannel's `BackendType` and `BackendData` are `omitempty`: host-gw's
/// lease has no `BackendData`, udp's neither field
/// (`{"PublicIP":"192.0.2.3","PublicIPv6":null}`).
pub fn encode_value(attrs: &LeaseAttrs) -> String {
    let mut s = format!("{{\"PublicIP\":\"{}\",\"PublicIPv6\":null", attrs.public_ip);
    let backend = attrs.backend.wire_name();
    if !backend.is_empty() {
        s += &format!(",\"BackendType\":{}", Value::String(backend.to_string()));
    }
    if attrs.vxlan.is_some() {
        s += &format!(",\"BackendData\":{}", encode_backend_data(attrs));
    }
    s + "}"
}

/// A field of a JSON object, matched without regard to case (as Go's
/// decoder matches struct fields); `null` counts as missing.
fn field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).filter(|v| !v.is_null())
}

/// A MAC in any of the spellings Go's `net.ParseMAC` takes for a 48-bit
/// address: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`, `aabb.ccdd.eeff`.
pub fn parse_mac(s: &str) -> Option<MacAddr> {
    let hex_pair = |p: &str| (p.len() == 2).then(|| u8::from_str_radix(p, 16).ok()).flatten();
    let mut b = [0u8; 6];
    if s.len() == 17 && (s.as_bytes()[2] == b':' || s.as_bytes()[2] == b'-') {
        let sep = s.as_bytes()[2] as char;
        let parts: Vec<&str> = s.split(sep).collect();
        if parts.len() != 6 {
            return None;
        }
        for (i, p) in parts.iter().enumerate() {
            b[i] = hex_pair(p)?;
        }
        return Some(MacAddr(b));
    }
    if s.len() == 14 && s.as_bytes()[4] == b'.' {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.len() != 4) {
            return None;
        }
        for (i, p) in parts.iter().enumerate() {
            b[2 * i] = hex_pair(&p[..2])?;
            b[2 * i + 1] = hex_pair(&p[2..])?;
        }
        return Some(MacAddr(b));
    }
    None
}

/// Decodes backend data for `backend` (the JSON text of `BackendData` or of
/// the `backend-data` annotation). Only VXLAN's is read; other backends'
/// data is not looked at, as in flannel. `what` names the field in errors.
pub fn decode_backend_data(
    backend: &BackendType,
    data: Option<&Value>,
    what: &str,
) -> Result<Option<VxlanData>, String> {
    if *backend != BackendType::Vxlan {
        return Ok(None);
    }
    let obj = match data {
        Some(Value::Object(o)) => o,
        None => return Err(format!("a vxlan lease needs {what} with VtepMAC")),
        Some(other) => return Err(format!("{what} {other} is not an object")),
    };
    let vni = match field(obj, "VNI") {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(n) if n <= 0xff_ffff => n as u32,
            _ => return Err(format!("{what}.VNI {v} is not an integer in 0..=16777215")),
        },
    };
    let vtep_mac = match field(obj, "VtepMAC") {
        None => return Err(format!("{what}.VtepMAC is missing")),
        Some(Value::String(s)) => {
            let mac = parse_mac(s).ok_or_else(|| format!("{what}.VtepMAC {s:?} is not a MAC address"))?;
            if mac.0 == [0; 6] || mac.0[0] & 1 == 1 {
                return Err(format!("{what}.VtepMAC {s} is not a unicast MAC address"));
            }
            mac
        }
        Some(other) => return Err(format!("{what}.VtepMAC {other} is not a string")),
    };
    Ok(Some(VxlanData { vni, vtep_mac }))
}

/// Why an address cannot be a node's public (underlay) address.
pub fn unusable_public_ip(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// A `PublicIP` as a lease or annotation carries it.
pub fn parse_public_ip(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s.parse().map_err(|_| format!("{what} {s:?} is not an IPv4 address"))?;
    if let Some(why) = unusable_public_ip(ip) {
        return Err(format!("{what} {ip} is {why}, not a node's address"));
    }
    Ok(ip)
}

/// Decodes an etcd lease value (flannel's JSON). `key` and `subnet` say where
/// it came from; the error names the key and the value.
pub fn decode_value(key: &str, subnet: Ipv4Net, value: &[u8]) -> Result<Lease, String> {
    let err = |msg: String| format!("lease {key} = {}: {msg}", shown(value));
    let root: Value = serde_json::from_slice(value).map_err(|e| err(format!("not JSON: {e}")))?;
    let Value::Object(obj) = root else {
        return Err(err("not a JSON object".into()));
    };
    let public_ip = match field(&obj, "PublicIP") {
        None => return Err(err("PublicIP is missing".into())),
        Some(Value::String(s)) => parse_public_ip(s, "PublicIP").map_err(err)?,
        Some(other) => return Err(err(format!("PublicIP {other} is not a string"))),
    };
    let backend = match field(&obj, "BackendType") {
        None => BackendType::parse(None),
        Some(Value::String(s)) => BackendType::parse(Some(s)),
        Some(other) => return Err(err(format!("BackendType {other} is not a string"))),
    };
    let vxlan = decode_backend_data(&backend, field(&obj, "BackendData"), "BackendData").map_err(err)?;
    Ok(Lease { subnet, public_ip, backend, vxlan, source: key.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(backend: BackendType, mac: Option<&str>) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: "192.0.2.7".parse().unwrap(),
            backend,
            vxlan: mac.map(|m| VxlanData { vni: 1, vtep_mac: m.parse().unwrap() }),
        }
    }

    #[test]
    fn backend_types_follow_flannel() {
        assert_eq!(BackendType::parse(Some("vxlan")), BackendType::Vxlan);
        assert_eq!(BackendType::parse(Some("host-gw")), BackendType::HostGw);
        assert_eq!(BackendType::parse(Some("udp")), BackendType::Udp);
        // flannel's udp backend writes no type.
        assert_eq!(BackendType::parse(Some("")), BackendType::Udp);
        assert_eq!(BackendType::parse(None), BackendType::Udp);
        // flannel compares exactly.
        assert_eq!(BackendType::parse(Some("VXLAN")), BackendType::Other("VXLAN".into()));
        assert_eq!(BackendType::parse(Some("wireguard")).as_str(), "wireguard");
    }

    #[test]
    fn backend_data_is_flannels_exact_json_and_reads_back() {
        let a = attrs(BackendType::Vxlan, Some("02:00:00:00:00:10"));
        assert_eq!(encode_backend_data(&a), r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:10"}"#);
        assert_eq!(encode_backend_data(&attrs(BackendType::HostGw, None)), "null");
        let v: Value = serde_json::from_str(&encode_backend_data(&a)).unwrap();
        assert_eq!(decode_backend_data(&BackendType::Vxlan, Some(&v), "d").unwrap(), a.vxlan);
        let udp = encode_value(&attrs(BackendType::Udp, None));
        // As flannel's udp backend writes it: no type, no data.
        assert_eq!(udp, r#"{"PublicIP":"192.0.2.7","PublicIPv6":null}"#);
        assert_eq!(
            encode_value(&attrs(BackendType::HostGw, None)),
            r#"{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn one_set_of_rules_for_vni_and_mac() {
        let d = |s: &str| decode_backend_data(&BackendType::Vxlan, Some(&serde_json::from_str(s).unwrap()), "d");
        // A missing VNI is Go's zero value, in both stores.
        assert_eq!(d(r#"{"VtepMAC":"02:00:00:00:00:10"}"#).unwrap().unwrap().vni, 0);
        // Case-insensitive field names; Go's three MAC spellings.
        for mac in ["02:00:00:00:00:1a", "02-00-00-00-00-1A", "0200.0000.001a"] {
            let got = d(&format!(r#"{{"vni":7,"vtepmac":"{mac}"}}"#)).unwrap().unwrap();
            assert_eq!((got.vni, got.vtep_mac.to_string()), (7, "02:00:00:00:00:1a".to_string()), "{mac}");
        }
        for (bad, want) in [
            (r#"{"VNI":1}"#, "d.VtepMAC is missing"),
            (r#"{"VNI":1,"VtepMAC":"02:00:00:00:00"}"#, "is not a MAC address"),
            (r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}"#, "not a unicast MAC"),
            (r#"{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}"#, "not a unicast MAC"),
            (r#"{"VNI":-1,"VtepMAC":"02:00:00:00:00:10"}"#, "d.VNI -1 is not an integer"),
            (r#"{"VNI":16777216,"VtepMAC":"02:00:00:00:00:10"}"#, "is not an integer"),
            (r#"{"VNI":1,"VtepMAC":5}"#, "is not a string"),
            (r#"[1]"#, "is not an object"),
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e:?} lacks {want:?}");
        }
        assert!(decode_backend_data(&BackendType::Vxlan, None, "d").unwrap_err().contains("needs d with VtepMAC"));
        // Other backends' data is not looked at.
        assert_eq!(decode_backend_data(&BackendType::HostGw, Some(&Value::Bool(true)), "d"), Ok(None));
    }

    #[test]
    fn an_upstream_udp_lease_without_backend_type_is_udp() {
        let s: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        let l = decode_value("k", s, br#"{"PublicIP":"192.0.2.1","PublicIPv6":null}"#).unwrap();
        assert_eq!((l.backend, l.vxlan), (BackendType::Udp, None));
    }

    #[test]
    fn macs_in_gos_spellings_only() {
        for bad in ["", "02:00:00:00:00:1", "02:00:00:00:00:1g", "0200.0000.001", "02:00-00:00:00:10", "020000000010"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn lease_sets_share_on_clone_and_report_changes() {
        let l = attrs(BackendType::Udp, None).lease("10.5.1.0/24".parse().unwrap(), "a");
        let mut set = LeaseSet::new();
        assert!(set.upsert("a", l.clone()));
        assert!(!set.upsert("a", l.clone()), "the same lease again is no change");
        let snap = set.clone();
        assert!(set.remove("a"));
        assert!(!set.remove("a"));
        assert_eq!((snap.len(), set.len()), (1, 0));
        assert_eq!(snap.to_vec(), vec![l]);
    }
}
