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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_net::MacAddr;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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

/// A node's lease on a subnet of the cluster network, one half per family
/// the cluster runs (IPv4, IPv6, or both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 half; `None` in an IPv6-only cluster (Kubernetes mode).
    pub ipv4: Option<Lease4>,
    /// The node's backend.
    pub backend: BackendType,
    /// Where the lease came from, for messages (`/coreos.com/network/subnets/10.244.1.0-24`, `node worker-1`).
    pub source: String,
    /// The IPv6 half of a dual-stack or IPv6-only lease.
    pub ipv6: Option<Lease6>,
}

/// The IPv4 half of a lease: flannel's subnet, `PublicIP` and
/// `BackendData` (etcd), or the node's IPv4 podCIDR and the `public-ip`
/// and `backend-data` annotations (Kubernetes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease4 {
    /// The node's subnet (`10.244.1.0/24`).
    pub subnet: Ipv4Net,
    /// The node's underlay address, the VXLAN/UDP tunnel endpoint.
    pub public_ip: Ipv4Addr,
    /// VXLAN backend data, when the lease has it.
    pub vxlan: Option<VxlanData>,
    /// WireGuard backend data, when the lease has it.
    pub wireguard: Option<WireguardData>,
}

/// The IPv6 half of a lease: flannel's `IPv6Subnet`, `PublicIPv6` and
/// `BackendV6Data` (etcd), or the node's IPv6 podCIDR and the
/// `public-ipv6` and `backend-v6-data` annotations (Kubernetes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease6 {
    /// The node's IPv6 subnet (`2001:db8:10:1::/64`).
    pub subnet: Ipv6Net,
    /// The node's IPv6 underlay address (VXLAN's IPv6 tunnel endpoint,
    /// host-gw's IPv6 next hop); flannel leaves it out when the node has none.
    pub public_ip: Option<Ipv6Addr>,
    /// The IPv6 VTEP's data (`flannel-v6.<VNI>`'s MAC), VXLAN only.
    pub vxlan: Option<VxlanData>,
    /// The IPv6 WireGuard device's data (`BackendV6Data`), wireguard only.
    pub wireguard: Option<WireguardData>,
}

/// An address family of the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// One family's part of a lease, the same shape for both, which is what
/// the backends and the reconcile loop program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyLease<'a> {
    /// The family.
    pub family: Family,
    /// The node's subnet of that family.
    pub subnet: IpNet,
    /// The node's underlay address of that family, if it has one.
    pub public_ip: Option<IpAddr>,
    /// The VTEP's data for that family (VXLAN).
    pub vxlan: Option<VxlanData>,
    /// The WireGuard device's data for that family.
    pub wireguard: Option<WireguardData>,
    /// The node's backend.
    pub backend: &'a BackendType,
    /// Where the lease came from.
    pub source: &'a str,
}

impl Lease {
    /// This lease's part for `family`; `None` when it has none (an IPv4-only
    /// lease in a dual-stack cluster, e.g. from a node not yet upgraded; no
    /// IPv4 part in an IPv6-only cluster).
    pub fn family(&self, family: Family) -> Option<FamilyLease<'_>> {
        match family {
            Family::V4 => self.ipv4.map(|v4| FamilyLease {
                family,
                subnet: IpNet::V4(v4.subnet),
                public_ip: Some(IpAddr::V4(v4.public_ip)),
                vxlan: v4.vxlan,
                wireguard: v4.wireguard,
                backend: &self.backend,
                source: &self.source,
            }),
            Family::V6 => self.ipv6.map(|v6| FamilyLease {
                family,
                subnet: IpNet::V6(v6.subnet),
                public_ip: v6.public_ip.map(IpAddr::V6),
                vxlan: v6.vxlan,
                wireguard: v6.wireguard,
                backend: &self.backend,
                source: &self.source,
            }),
        }
    }

    /// The IPv4 subnet, if the lease has one.
    pub fn subnet4(&self) -> Option<Ipv4Net> {
        self.ipv4.map(|v4| v4.subnet)
    }

    /// The IPv4 public address, if the lease has one.
    pub fn public_ip4(&self) -> Option<Ipv4Addr> {
        self.ipv4.map(|v4| v4.public_ip)
    }

    /// The IPv6 subnet, if the lease has one.
    pub fn subnet6(&self) -> Option<Ipv6Net> {
        self.ipv6.map(|v6| v6.subnet)
    }

    /// The lease's subnets, IPv4 first (`10.244.1.0/24`, `2001:db8:10:1::/64`), for messages.
    pub fn subnets(&self) -> String {
        let v4 = self.subnet4().map(|s| s.to_string());
        let v6 = self.subnet6().map(|s| s.to_string());
        v4.into_iter().chain(v6).collect::<Vec<_>>().join(" and ")
    }
}

/// `BackendData` of a VXLAN lease: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// VXLAN network identifier.
    pub vni: u32,
    /// The node's VTEP MAC.
    pub vtep_mac: MacAddr,
}

/// `BackendData` of a WireGuard lease, as current flannel writes it:
/// `{"PublicKey":"<base64>","Port":51820}`. flannel v0.20.2 writes no
/// `Port`; a lease without one (or with 0) means the reader's own listen
/// port, as flannel reads it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireguardData {
    /// The node's WireGuard public key (Curve25519, 32 bytes).
    pub public_key: [u8; 32],
    /// The node's listen port, when the lease says.
    pub port: Option<u16>,
}

impl fmt::Debug for WireguardData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WireguardData {{ public_key: {}, port: {:?} }}",
            crate::config::encode_key(&self.public_key),
            self.port
        )
    }
}

/// What a node advertises about itself when it acquires or renews a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// The node's IPv4 underlay address; `None` in an IPv6-only cluster.
    pub public_ip: Option<Ipv4Addr>,
    /// Backend type.
    pub backend: BackendType,
    /// VXLAN data (the VTEP MAC this node uses).
    pub vxlan: Option<VxlanData>,
    /// The node's IPv6 underlay address (dual-stack).
    pub public_ipv6: Option<Ipv6Addr>,
    /// The IPv6 VTEP's data (dual-stack VXLAN).
    pub vxlan6: Option<VxlanData>,
    /// WireGuard data (public key and port), IPv4.
    pub wireguard: Option<WireguardData>,
    /// WireGuard data, IPv6.
    pub wireguard6: Option<WireguardData>,
}

impl LeaseAttrs {
    /// The lease these attributes make for `subnet` and `subnet6` (the
    /// families the cluster runs), found at `source`.
    pub fn lease(&self, subnet: Option<Ipv4Net>, subnet6: Option<Ipv6Net>, source: impl Into<String>) -> Lease {
        Lease {
            // An IPv4 subnet comes with the IPv4 underlay address: the
            // daemon selects one whenever the cluster runs IPv4.
            ipv4: subnet.map(|subnet| Lease4 {
                subnet,
                public_ip: self.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                vxlan: self.vxlan,
                wireguard: self.wireguard,
            }),
            backend: self.backend.clone(),
            source: source.into(),
            ipv6: subnet6.map(|subnet| Lease6 {
                subnet,
                public_ip: self.public_ipv6,
                vxlan: self.vxlan6,
                wireguard: self.wireguard6,
            }),
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

    /// The leases that differ from `old` to `self` (source, before, after),
    /// or `None` when more than `limit` do. Subtrees the two sets share
    /// (a snapshot shares all but the path to what changed) are skipped,
    /// so this costs O(changes · log n).
    pub fn changes_since<'a>(&'a self, old: &'a LeaseSet, limit: usize) -> Option<Vec<LeaseChange<'a>>> {
        use imbl::ordmap::DiffItem;
        let mut out = Vec::new();
        for d in old.0.diff(&self.0) {
            if out.len() == limit {
                return None;
            }
            out.push(match d {
                DiffItem::Add(k, v) => (k.as_str(), None, Some(v)),
                DiffItem::Update { old: (k, o), new: (_, v) } => (k.as_str(), Some(o), Some(v)),
                DiffItem::Remove(k, o) => (k.as_str(), Some(o), None),
            });
        }
        Some(out)
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
        v.sort_by_key(|l| (l.subnet4(), l.subnet6(), l.public_ip4()));
        v
    }
}

impl FromIterator<Lease> for LeaseSet {
    fn from_iter<T: IntoIterator<Item = Lease>>(iter: T) -> Self {
        LeaseSet(iter.into_iter().map(|l| (l.source.clone(), l)).collect())
    }
}

/// A lease that differs between two snapshots: its source, and the lease
/// before and after (`None`: absent).
pub type LeaseChange<'a> = (&'a str, Option<&'a Lease>, Option<&'a Lease>);

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
/// for VXLAN, `{"PublicKey":"...","Port":51820}` for WireGuard (current
/// flannel's), `null` otherwise.
pub fn encode_backend_data(attrs: &LeaseAttrs) -> String {
    match &attrs.wireguard {
        Some(w) => encode_wireguard_data(w),
        None => encode_vxlan_data(attrs.vxlan.as_ref()),
    }
}

/// The `BackendV6Data` (etcd) or `backend-v6-data` annotation: the same
/// JSON for the IPv6 VTEP or WireGuard device.
pub fn encode_backend_v6_data(attrs: &LeaseAttrs) -> String {
    match &attrs.wireguard6 {
        Some(w) => encode_wireguard_data(w),
        None => encode_vxlan_data(attrs.vxlan6.as_ref()),
    }
}

fn encode_wireguard_data(w: &WireguardData) -> String {
    // Go's encoder writes a missing port as 0.
    format!("{{\"PublicKey\":\"{}\",\"Port\":{}}}", crate::config::encode_key(&w.public_key), w.port.unwrap_or(0))
}

/// Decodes WireGuard backend data (`{"PublicKey":...,"Port":...}`, field
/// names without regard to case) when `backend` is wireguard; `None` for
/// other backends and for a missing field (a lease of a node that runs no
/// WireGuard device of that family). `what` names the field in errors.
pub fn decode_wireguard_data(
    backend: &BackendType,
    data: Option<&Value>,
    what: &str,
) -> Result<Option<WireguardData>, String> {
    if backend.as_str() != "wireguard" {
        return Ok(None);
    }
    let obj = match data {
        None => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(format!("{what} {other} is not an object")),
    };
    let public_key = match field(obj, "PublicKey") {
        None => return Err(format!("{what}.PublicKey is missing")),
        Some(Value::String(s)) => crate::config::decode_key(s)
            .map_err(|why| format!("{what}.PublicKey {:?} is {why}", shown(s.as_bytes())))?,
        Some(other) => return Err(format!("{what}.PublicKey {other} is not a string")),
    };
    let port = match field(obj, "Port") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(n) if n <= 65535 => Some(n as u16),
            _ => return Err(format!("{what}.Port {v} is not an integer in 0..=65535")),
        },
    };
    Ok(Some(WireguardData { public_key, port }))
}

fn encode_vxlan_data(v: Option<&VxlanData>) -> String {
    match v {
        Some(v) => format!("{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", v.vni, v.vtep_mac),
        None => "null".to_string(),
    }
}

/// flannel's JSON for an etcd lease value, byte for byte:
/// `{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`.
/// flannel's `BackendType`, `BackendData` and `BackendV6Data` are
/// `omitempty`: host-gw's lease has no `BackendData`, udp's neither field
/// (`{"PublicIP":"192.0.2.3","PublicIPv6":null}`). A dual-stack node sets
/// `PublicIPv6` (`"2001:db8::3"`), and with VXLAN `BackendV6Data` for its
/// IPv6 VTEP.
pub fn encode_value(attrs: &LeaseAttrs) -> String {
    let v6 = match attrs.public_ipv6 {
        Some(ip) => format!("\"{ip}\""),
        None => "null".into(),
    };
    // etcd leases always have an IPv4 half (flannel's etcd store too).
    let v4 = attrs.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut s = format!("{{\"PublicIP\":\"{v4}\",\"PublicIPv6\":{v6}");
    let backend = attrs.backend.wire_name();
    if !backend.is_empty() {
        s += &format!(",\"BackendType\":{}", Value::String(backend.to_string()));
    }
    if attrs.vxlan.is_some() || attrs.wireguard.is_some() {
        s += &format!(",\"BackendData\":{}", encode_backend_data(attrs));
    }
    if attrs.vxlan6.is_some() || attrs.wireguard6.is_some() {
        s += &format!(",\"BackendV6Data\":{}", encode_backend_v6_data(attrs));
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

/// Why an address cannot be a node's public (underlay) address, of either
/// family (flannel's peers could not reach an IPv6 link-local one without a
/// zone).
pub fn unusable_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address"),
        _ => None,
    }
}

/// [`unusable_address`] for a `PublicIP`.
pub fn unusable_public_ip(ip: Ipv4Addr) -> Option<&'static str> {
    unusable_address(IpAddr::V4(ip))
}

/// [`unusable_address`] for a `PublicIPv6`.
pub fn unusable_public_ipv6(ip: Ipv6Addr) -> Option<&'static str> {
    unusable_address(IpAddr::V6(ip))
}

/// A `PublicIPv6` as a lease or annotation carries it.
pub fn parse_public_ipv6(s: &str, what: &str) -> Result<Ipv6Addr, String> {
    let ip: Ipv6Addr = s.parse().map_err(|_| format!("{what} {s:?} is not an IPv6 address"))?;
    if let Some(why) = unusable_public_ipv6(ip) {
        return Err(format!("{what} {ip} is {why}, not a node's address"));
    }
    Ok(ip)
}

/// A `PublicIP` as a lease or annotation carries it.
pub fn parse_public_ip(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s.parse().map_err(|_| format!("{what} {s:?} is not an IPv4 address"))?;
    if let Some(why) = unusable_public_ip(ip) {
        return Err(format!("{what} {ip} is {why}, not a node's address"));
    }
    Ok(ip)
}

/// Decodes an etcd lease value (flannel's JSON). `key` and `subnet` (with
/// `subnet6`, from a dual-stack key) say where it came from; the error names
/// the key and the value.
pub fn decode_value(key: &str, subnet: Ipv4Net, subnet6: Option<Ipv6Net>, value: &[u8]) -> Result<Lease, String> {
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
    let wireguard = decode_wireguard_data(&backend, field(&obj, "BackendData"), "BackendData").map_err(err)?;
    let ipv6 = match subnet6 {
        None => None,
        Some(subnet) => {
            let public_ip = match field(&obj, "PublicIPv6") {
                None => None,
                Some(Value::String(s)) => Some(parse_public_ipv6(s, "PublicIPv6").map_err(err)?),
                Some(other) => return Err(err(format!("PublicIPv6 {other} is not a string"))),
            };
            // flannel writes BackendV6Data only for a node with an IPv6
            // VTEP; without it the lease's IPv6 half has no tunnel data (and
            // the VXLAN backend says so when it would program it).
            let vxlan = match field(&obj, "BackendV6Data") {
                None => None,
                data => decode_backend_data(&backend, data, "BackendV6Data").map_err(err)?,
            };
            let wireguard =
                decode_wireguard_data(&backend, field(&obj, "BackendV6Data"), "BackendV6Data").map_err(err)?;
            Some(Lease6 { subnet, public_ip, vxlan, wireguard })
        }
    };
    Ok(Lease { ipv4: Some(Lease4 { subnet, public_ip, vxlan, wireguard }), backend, source: key.to_string(), ipv6 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(backend: BackendType, mac: Option<&str>) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some("192.0.2.7".parse().unwrap()),
            backend,
            vxlan: mac.map(|m| VxlanData { vni: 1, vtep_mac: m.parse().unwrap() }),
            public_ipv6: None,
            vxlan6: None,
            wireguard: None,
            wireguard6: None,
        }
    }

    #[test]
    fn dual_stack_values_are_flannels_and_read_back() {
        let mut a = attrs(BackendType::Vxlan, Some("02:00:00:00:00:10"));
        a.public_ipv6 = Some("2001:db8::7".parse().unwrap());
        a.vxlan6 = Some(VxlanData { vni: 1, vtep_mac: "02:00:00:00:00:16".parse().unwrap() });
        let v = encode_value(&a);
        assert_eq!(
            v,
            r#"{"PublicIP":"192.0.2.7","PublicIPv6":"2001:db8::7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:10"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:16"}}"#
        );
        let s6: Ipv6Net = "2001:db8:10:1::/64".parse().unwrap();
        let l = decode_value("k", "10.5.1.0/24".parse().unwrap(), Some(s6), v.as_bytes()).unwrap();
        assert_eq!(l, a.lease(Some("10.5.1.0/24".parse().unwrap()), Some(s6), "k"));
        let f = l.family(Family::V6).unwrap();
        assert_eq!(
            (f.subnet.to_string(), f.public_ip.unwrap().to_string()),
            ("2001:db8:10:1::/64".into(), "2001:db8::7".into())
        );
        // An IPv4-only key has no IPv6 half, whatever the value says.
        assert_eq!(decode_value("k", "10.5.1.0/24".parse().unwrap(), None, v.as_bytes()).unwrap().ipv6, None);
        for (bad, want) in [
            (r#"{"PublicIP":"192.0.2.7","PublicIPv6":"fe80::1"}"#, "PublicIPv6 fe80::1 is link-local"),
            (r#"{"PublicIP":"192.0.2.7","PublicIPv6":"192.0.2.8"}"#, "PublicIPv6 \"192.0.2.8\" is not an IPv6 address"),
            (r#"{"PublicIP":"192.0.2.7","PublicIPv6":7}"#, "PublicIPv6 7 is not a string"),
            (
                r#"{"PublicIP":"192.0.2.7","PublicIPv6":"2001:db8::7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:10"},"BackendV6Data":{"VNI":1}}"#,
                "BackendV6Data.VtepMAC is missing",
            ),
        ] {
            let e = decode_value("k", "10.5.1.0/24".parse().unwrap(), Some(s6), bad.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
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
    fn wireguard_data_is_current_flannels_and_a_v0_20_lease_has_no_port() {
        let key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        let wg = WireguardData { public_key: crate::config::decode_key(key).unwrap(), port: Some(51820) };
        let a = LeaseAttrs {
            backend: BackendType::parse(Some("wireguard")),
            vxlan: None,
            wireguard: Some(wg),
            ..attrs(BackendType::HostGw, None)
        };
        let value = encode_value(&a);
        assert_eq!(
            value,
            format!(
                r#"{{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{key}","Port":51820}}}}"#
            )
        );
        let l = decode_value("k", "10.244.1.0/24".parse().unwrap(), None, value.as_bytes()).unwrap();
        assert_eq!(l.ipv4.unwrap().wireguard, Some(wg));
        // flannel v0.20.2's lease: no Port (the reader's own port).
        let old =
            format!(r#"{{"PublicIP":"192.0.2.8","BackendType":"wireguard","BackendData":{{"publickey":"{key}"}}}}"#);
        let l = decode_value("k", "10.244.2.0/24".parse().unwrap(), None, old.as_bytes()).unwrap();
        assert_eq!(l.ipv4.unwrap().wireguard.unwrap().port, None);
        // A bad PublicKey or Port names the lease and the field.
        for (data, want) in [
            (r#"{"PublicKey":"c2VjcmV0"}"#, "BackendData.PublicKey \"c2VjcmV0\" is 6 bytes of base64, not 32"),
            (r#"{"PublicKey":"***"}"#, "BackendData.PublicKey \"***\" is not base64"),
            (r#"{"Port":51820}"#, "BackendData.PublicKey is missing"),
            (r#"{"PublicKey":7}"#, "BackendData.PublicKey 7 is not a string"),
            (&format!(r#"{{"PublicKey":"{key}","Port":65536}}"#), "BackendData.Port 65536 is not an integer"),
        ] {
            let v = format!(r#"{{"PublicIP":"192.0.2.8","BackendType":"wireguard","BackendData":{data}}}"#);
            let e = decode_value(
                "/coreos.com/network/subnets/10.244.2.0-24",
                "10.244.2.0/24".parse().unwrap(),
                None,
                v.as_bytes(),
            )
            .unwrap_err();
            assert!(e.contains(want) && e.contains("lease /coreos.com/network/subnets/10.244.2.0-24"), "{e}");
        }
    }

    #[test]
    fn an_upstream_udp_lease_without_backend_type_is_udp() {
        let s: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        let l = decode_value("k", s, None, br#"{"PublicIP":"192.0.2.1","PublicIPv6":null}"#).unwrap();
        assert_eq!((l.backend, l.ipv4.unwrap().vxlan), (BackendType::Udp, None));
    }

    #[test]
    fn macs_in_gos_spellings_only() {
        for bad in ["", "02:00:00:00:00:1", "02:00:00:00:00:1g", "0200.0000.001", "02:00-00:00:00:10", "020000000010"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn lease_sets_share_on_clone_and_report_changes() {
        let l = attrs(BackendType::Udp, None).lease(Some("10.5.1.0/24".parse().unwrap()), None, "a");
        let mut set = LeaseSet::new();
        assert!(set.upsert("a", l.clone()));
        assert!(!set.upsert("a", l.clone()), "the same lease again is no change");
        let snap = set.clone();
        assert!(set.remove("a"));
        assert!(!set.remove("a"));
        assert_eq!((snap.len(), set.len()), (1, 0));
        assert_eq!(snap.to_vec(), vec![l]);
    }

    #[test]
    fn changes_since_names_each_added_changed_and_removed_lease_up_to_a_limit() {
        let lease = |s: &str, ip: &str| {
            let mut a = attrs(BackendType::Udp, None);
            a.public_ip = Some(ip.parse().unwrap());
            a.lease(Some(format!("10.5.{s}.0/24").parse().unwrap()), None, s)
        };
        let old: LeaseSet = (0..250).map(|i| lease(&i.to_string(), "192.0.2.1")).collect();
        let mut new = old.clone();
        assert_eq!(new.changes_since(&old, 8), Some(vec![]));
        new.upsert("250", lease("250", "192.0.2.1"));
        new.upsert("7", lease("7", "192.0.2.2"));
        new.remove("9");
        let changes = new.changes_since(&old, 8).unwrap();
        let shown: Vec<(&str, bool, bool)> = changes.iter().map(|(s, o, n)| (*s, o.is_some(), n.is_some())).collect();
        assert_eq!(shown, [("250", false, true), ("7", true, true), ("9", true, false)]);
        assert_eq!(changes[1].2.unwrap().public_ip4(), Some("192.0.2.2".parse().unwrap()));
        assert_eq!(new.changes_since(&old, 2), None, "more than the limit");
    }
}
