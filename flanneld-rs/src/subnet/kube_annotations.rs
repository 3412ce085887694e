//! Kubernetes mode's lease format: a Node's `spec.podCIDR` plus flannel's
//! annotations (prefix `flannel.alpha.coreos.com/` unless
//! `--kube-annotation-prefix` says otherwise). Pure conversions, so that the
//! exact formats flannel writes and reads are tested without an API server;
//! the API client that fetches and patches Nodes builds on these.
//!
//! Written by a node on itself (on `nodes/status`):
//! `kube-subnet-manager: "true"`, `backend-type: "vxlan"`,
//! `backend-data: {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, `public-ip`.
//! Set by users: `public-ip-overwrite` (advertised instead of the detected
//! address) and `node-public-ip` (used instead of `--public-ip` at start).
//!
//! Dual-stack (`EnableIPv6`), as flannel writes them: `backend-v6-data`
//! (the IPv6 VTEP's `{"VNI":1,"VtepMAC":"..."}`, `null` for host-gw) and
//! `public-ipv6`, written by a vxlan node with an IPv6 VTEP or a host-gw
//! node with an IPv6 address; set by users: `public-ipv6-overwrite` and
//! (newer flannel) `node-public-ipv6`. The IPv6 subnet is the Node's IPv6
//! entry of `spec.podCIDRs`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetworkConfig;
use crate::lease::{
    decode_backend_data, decode_wireguard_data, encode_backend_data, encode_backend_v6_data, parse_public_ip,
    parse_public_ipv6, BackendType, Lease, Lease4, Lease6, LeaseAttrs,
};

/// flannel's default annotation prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Annotation names (without the prefix).
pub mod keys {
    /// `"true"` on nodes whose lease is managed this way; others are ignored.
    pub const SUBNET_MANAGER: &str = "kube-subnet-manager";
    /// `vxlan`, `udp`, `host-gw`.
    pub const BACKEND_TYPE: &str = "backend-type";
    /// Backend data JSON (`{"VNI":1,"VtepMAC":"..."}`, `null` for host-gw).
    pub const BACKEND_DATA: &str = "backend-data";
    /// The node's advertised IPv4 address.
    pub const PUBLIC_IP: &str = "public-ip";
    /// Set by users: advertise this instead of the detected address.
    pub const PUBLIC_IP_OVERWRITE: &str = "public-ip-overwrite";
    /// Set by users: use this instead of `--public-ip` at start.
    pub const NODE_PUBLIC_IP: &str = "node-public-ip";
    /// Dual-stack: the IPv6 VTEP's data (`null` for host-gw).
    pub const BACKEND_V6_DATA: &str = "backend-v6-data";
    /// Dual-stack: the node's advertised IPv6 address.
    pub const PUBLIC_IPV6: &str = "public-ipv6";
    /// Set by users: advertise this IPv6 address instead of the detected one.
    pub const PUBLIC_IPV6_OVERWRITE: &str = "public-ipv6-overwrite";
    /// Set by users: use this instead of `--public-ipv6` at start (newer flannel).
    pub const NODE_PUBLIC_IPV6: &str = "node-public-ipv6";
}

/// `--kube-annotation-prefix`, normalised as flannel normalises it: every
/// annotation name is the normalised prefix followed by the name, made by
/// [`Prefix::key`] and nowhere else.
///
/// - no `/`: the prefix is a DNS name, `/` is appended
///   (`flannel.alpha.coreos.com` -> `flannel.alpha.coreos.com/backend-type`);
/// - one `/` with a name part: `-` is appended unless it ends with `-`
///   (`example.com/x` -> `example.com/x-backend-type`);
/// - ending with `/`: used as is;
/// - more than one `/`, a part before the `/` that is not a dotted DNS name,
///   or anything but lower-case letters, digits, `_`, `-`, `.`: refused.
///
/// One deliberate difference: flannel's check is not anchored at the
/// start, so it lets through prefixes such as `Example.com` or `a b.example.com`
/// whose annotations the API server then refuses; we refuse them at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// Normalises and checks `raw`; the error names the flag and the value.
    pub fn new(raw: &str) -> Result<Prefix, String> {
        let bad = |why: &str| format!("--kube-annotation-prefix {raw:?}: {why}");
        let mut p = raw.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(bad("may hold at most one '/'")),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        static SHAPE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        let shape = SHAPE.get_or_init(|| {
            regex::Regex::new(r"^(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").expect("a valid regex")
        });
        if !shape.is_match(&p) {
            return Err(bad("want a DNS name with at least one dot, optionally '/' and a name part \
                 (lower-case letters, digits, '_', '-', '.'), e.g. flannel.alpha.coreos.com or example.com/x"));
        }
        Ok(Prefix(p))
    }

    /// The annotation called `name` (`backend-type`) under this prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }

    /// The normalised prefix (`flannel.alpha.coreos.com/`, `example.com/x-`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix::new(DEFAULT_PREFIX).expect("the default prefix is valid")
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn key(prefix: &Prefix, name: &str) -> String {
    prefix.key(name)
}

/// The annotations a node writes on itself (flannel's exact formats).
/// `public-ip-overwrite`, when the user set it, is what gets advertised.
/// Dual-stack, flannel's condition: `backend-v6-data` and `public-ipv6`
/// are written by a vxlan node with an IPv6 VTEP, a wireguard node with
/// `flannel-wg-v6`, or a host-gw node with an IPv6 address (its
/// `backend-v6-data` is `null`); by no other. An
/// IPv6-only node (no IPv4 address in `attrs`) writes no `backend-data`
/// and `public-ip`: flannel's vxlan node writes none either (its host-gw
/// node writes `null` and `0.0.0.0`, which no reader of an IPv6-only
/// cluster looks at).
pub fn own_annotations(prefix: &Prefix, attrs: &LeaseAttrs, overwrite: Option<Ipv4Addr>) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([
        (key(prefix, keys::SUBNET_MANAGER), "true".to_string()),
        (key(prefix, keys::BACKEND_TYPE), attrs.backend.wire_name().to_string()),
    ]);
    if let Some(ip) = attrs.public_ip {
        a.insert(key(prefix, keys::BACKEND_DATA), encode_backend_data(attrs));
        a.insert(key(prefix, keys::PUBLIC_IP), overwrite.unwrap_or(ip).to_string());
    }
    let v6 = match attrs.backend {
        BackendType::Vxlan => attrs.vxlan6.is_some(),
        BackendType::HostGw => attrs.public_ipv6.is_some(),
        // wireguard: with its IPv6 device's data (`{"PublicKey","Port"}`).
        _ => attrs.wireguard6.is_some(),
    };
    if v6 {
        a.insert(key(prefix, keys::BACKEND_V6_DATA), encode_backend_v6_data(attrs));
        if let Some(ip) = attrs.public_ipv6 {
            a.insert(key(prefix, keys::PUBLIC_IPV6), ip.to_string());
        }
    }
    a
}

/// A user's `node-public-ipv6` or `public-ipv6-overwrite`, when set and
/// valid (an address peers can reach: not link-local, ...).
pub fn user_ipv6(
    prefix: &Prefix,
    name: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Ipv6Addr>, String> {
    match annotations.get(&key(prefix, name)) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse_public_ipv6(v.trim(), &format!("annotation {} =", key(prefix, name))).map(Some),
    }
}

/// The IPv6 podCIDR of a dual-stack Node, checked against `IPv6Network`;
/// the error names the node, the field and the value.
pub fn subnet6_of(node: &str, cidr: &str, network: Ipv6Net) -> Result<Ipv6Net, String> {
    let bad = |what: String| format!("node {node}: {what}");
    let subnet: Ipv6Net = cidr.parse().map_err(|_| bad(format!("spec.podCIDRs entry {cidr:?} is not an IPv6 CIDR")))?;
    if subnet != subnet.trunc() {
        return Err(bad(format!("spec.podCIDRs entry {cidr} has host bits set")));
    }
    if !network.contains(&subnet) {
        return Err(bad(format!(
            "spec.podCIDRs IPv6 entry {subnet} is outside IPv6Network {network} (net-conf.json); \
             kube-controller-manager's --cluster-cidr must match it"
        )));
    }
    Ok(subnet)
}

/// A user's `node-public-ip` or `public-ip-overwrite`, when set and valid.
pub fn user_ip(
    prefix: &Prefix,
    name: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Ipv4Addr>, String> {
    match annotations.get(&key(prefix, name)) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("annotation {} = {v:?} is not an IPv4 address", key(prefix, name))),
    }
}

/// The lease a Node stands for. `Ok(None)` for nodes that do not take part
/// (no `kube-subnet-manager: "true"`, no podCIDR yet); `Err` names the node,
/// the annotation and the value that do not parse.
pub fn lease_from_node(
    node: &str,
    pod_cidr: Option<&str>,
    pod_cidr6: Option<&str>,
    annotations: &BTreeMap<String, String>,
    prefix: &Prefix,
    cfg: &NetworkConfig,
) -> Result<Option<Lease>, String> {
    let get = |name: &str| annotations.get(&key(prefix, name));
    if get(keys::SUBNET_MANAGER).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    let bad = |what: String| format!("node {node}: {what}");
    // flannel's udp backend annotates an empty type; a missing one is read the same way.
    let backend = BackendType::parse(get(keys::BACKEND_TYPE).map(String::as_str));
    let cidr4 = pod_cidr.filter(|c| !c.is_empty());
    let cidr6 = pod_cidr6.filter(|c| !c.is_empty());
    // A Node takes part once it has the podCIDR of the cluster's first
    // family (IPv4, or IPv6 in an IPv6-only cluster).
    let ipv4 = match (&cfg.ipv4, cidr4) {
        (None, _) => None,
        (Some(_), None) => return Ok(None),
        (Some(c4), Some(cidr)) => {
            let subnet: Ipv4Net =
                cidr.parse().map_err(|_| bad(format!("spec.podCIDR {cidr:?} is not an IPv4 CIDR")))?;
            if !c4.network.contains(&subnet) {
                return Err(bad(format!("spec.podCIDR {subnet} is outside Network {}", c4.network)));
            }
            let ip_key = key(prefix, keys::PUBLIC_IP);
            let ip_raw = get(keys::PUBLIC_IP).ok_or_else(|| bad(format!("annotation {ip_key} is missing")))?;
            let public_ip = parse_public_ip(ip_raw, &format!("annotation {ip_key} =")).map_err(bad)?;
            let data_key = key(prefix, keys::BACKEND_DATA);
            let data_raw = get(keys::BACKEND_DATA).map(String::as_str).unwrap_or("null");
            let data: serde_json::Value = serde_json::from_str(data_raw)
                .map_err(|e| bad(format!("annotation {data_key} = {data_raw:?} is not JSON: {e}")))?;
            let vxlan =
                decode_backend_data(&backend, Some(&data).filter(|d| !d.is_null()), &format!("annotation {data_key}"))
                    .map_err(|e| bad(format!("{e} (value {data_raw:?})")))?;
            let wireguard = decode_wireguard_data(
                &backend,
                Some(&data).filter(|d| !d.is_null()),
                &format!("annotation {data_key}"),
            )
            .map_err(|e| bad(format!("{e} (value {data_raw:?})")))?;
            Some(Lease4 { subnet, public_ip, vxlan, wireguard })
        }
    };
    // The IPv6 half, when the Node has an IPv6 podCIDR (in a dual-stack
    // cluster a Node with none, e.g. not yet given one, takes part in IPv4
    // only).
    let ipv6 = match (&cfg.ipv6, cidr6) {
        (Some(c6), Some(cidr6)) => {
            let subnet = subnet6_of(node, cidr6, c6.network)?;
            let ip_key = key(prefix, keys::PUBLIC_IPV6);
            let public_ip = match get(keys::PUBLIC_IPV6).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => None,
                Some(v) => Some(parse_public_ipv6(v, &format!("annotation {ip_key} =")).map_err(bad)?),
            };
            let data_key = key(prefix, keys::BACKEND_V6_DATA);
            let (vxlan, wireguard) = match get(keys::BACKEND_V6_DATA).map(String::as_str) {
                None | Some("null") | Some("") => (None, None),
                Some(raw) => {
                    let data: serde_json::Value = serde_json::from_str(raw)
                        .map_err(|e| bad(format!("annotation {data_key} = {raw:?} is not JSON: {e}")))?;
                    let what = format!("annotation {data_key}");
                    (
                        decode_backend_data(&backend, Some(&data), &what)
                            .map_err(|e| bad(format!("{e} (value {raw:?})")))?,
                        decode_wireguard_data(&backend, Some(&data), &what)
                            .map_err(|e| bad(format!("{e} (value {raw:?})")))?,
                    )
                }
            };
            Some(Lease6 { subnet, public_ip, vxlan, wireguard })
        }
        (Some(_), None) if ipv4.is_none() => return Ok(None),
        _ => None,
    };
    Ok(Some(Lease { ipv4, backend, source: format!("node {node}"), ipv6 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::VxlanData;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, "net-conf.json").unwrap()
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string())).collect()
    }

    #[test]
    fn a_node_annotated_the_way_flannel_annotates_it() {
        // As flannel v0.2x writes them (kubectl get node -o yaml).
        let a = ann(&[
            ("backend-data", r#"{"VNI":1,"VtepMAC":"9a:4f:7e:12:34:56"}"#),
            ("backend-type", "vxlan"),
            ("kube-subnet-manager", "true"),
            ("public-ip", "192.0.2.11"),
        ]);
        let l =
            lease_from_node("worker-1", Some("10.244.1.0/24"), None, &a, &Prefix::default(), &cfg()).unwrap().unwrap();
        assert_eq!(l.subnet4().unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(l.public_ip4().unwrap().to_string(), "192.0.2.11");
        assert_eq!(l.ipv4.unwrap().vxlan, Some(VxlanData { vni: 1, vtep_mac: "9a:4f:7e:12:34:56".parse().unwrap() }));
        assert_eq!(l.source, "node worker-1");
    }

    #[test]
    fn we_write_flannels_exact_formats_and_read_them_back() {
        let attrs = LeaseAttrs {
            public_ip: Some("192.0.2.10".parse().unwrap()),
            backend: BackendType::Vxlan,
            vxlan: Some(VxlanData { vni: 1, vtep_mac: "02:00:00:00:00:10".parse().unwrap() }),
            public_ipv6: None,
            vxlan6: None,
            wireguard: None,
            wireguard6: None,
        };
        let a = own_annotations(&Prefix::default(), &attrs, None);
        assert_eq!(a["flannel.alpha.coreos.com/backend-data"], r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:10"}"#);
        assert_eq!(a["flannel.alpha.coreos.com/backend-type"], "vxlan");
        assert_eq!(a["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "192.0.2.10");
        assert_eq!(a.len(), 4);
        let back = lease_from_node("me", Some("10.244.9.0/24"), None, &a, &Prefix::default(), &cfg()).unwrap().unwrap();
        assert_eq!(back.ipv4.unwrap().vxlan, attrs.vxlan);
        // public-ip-overwrite is what gets advertised; host-gw has null data.
        let over = own_annotations(&Prefix::default(), &attrs, Some("203.0.113.5".parse().unwrap()));
        assert_eq!(over["flannel.alpha.coreos.com/public-ip"], "203.0.113.5");
        let hg = LeaseAttrs { backend: BackendType::HostGw, vxlan: None, ..attrs };
        assert_eq!(
            own_annotations(&Prefix::new("example.com/").unwrap(), &hg, None)["example.com/backend-data"],
            "null"
        );
    }

    fn cfg6() -> NetworkConfig {
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#,
            "net-conf.json",
        )
        .unwrap()
    }

    fn dual_attrs(backend: BackendType) -> LeaseAttrs {
        let vx = backend == BackendType::Vxlan;
        LeaseAttrs {
            public_ip: Some("192.0.2.10".parse().unwrap()),
            backend,
            vxlan: vx.then(|| VxlanData { vni: 1, vtep_mac: "02:00:00:00:00:10".parse().unwrap() }),
            public_ipv6: Some("2001:db8::10".parse().unwrap()),
            vxlan6: vx.then(|| VxlanData { vni: 1, vtep_mac: "02:00:00:00:06:10".parse().unwrap() }),
            wireguard: None,
            wireguard6: None,
        }
    }

    #[test]
    fn dual_stack_annotations_are_flannels_and_read_back() {
        let p = Prefix::default();
        let a = own_annotations(&p, &dual_attrs(BackendType::Vxlan), None);
        assert_eq!(a["flannel.alpha.coreos.com/backend-v6-data"], r#"{"VNI":1,"VtepMAC":"02:00:00:00:06:10"}"#);
        assert_eq!(a["flannel.alpha.coreos.com/public-ipv6"], "2001:db8::10");
        assert_eq!(a.len(), 6);
        let l =
            lease_from_node("me", Some("10.244.9.0/24"), Some("2001:db8:10:9::/64"), &a, &p, &cfg6()).unwrap().unwrap();
        assert_eq!(
            l,
            dual_attrs(BackendType::Vxlan).lease(
                Some("10.244.9.0/24".parse().unwrap()),
                Some("2001:db8:10:9::/64".parse().unwrap()),
                "node me"
            )
        );
        // Without EnableIPv6 the IPv6 half is not read.
        assert_eq!(
            lease_from_node("me", Some("10.244.9.0/24"), Some("2001:db8:10:9::/64"), &a, &p, &cfg())
                .unwrap()
                .unwrap()
                .ipv6,
            None
        );
        // A node without an IPv6 podCIDR takes part in IPv4 only.
        assert_eq!(lease_from_node("me", Some("10.244.9.0/24"), None, &a, &p, &cfg6()).unwrap().unwrap().ipv6, None);
        // host-gw: backend-v6-data null and public-ipv6, as flannel.
        let hg = own_annotations(&p, &dual_attrs(BackendType::HostGw), None);
        assert_eq!(hg["flannel.alpha.coreos.com/backend-v6-data"], "null");
        assert_eq!(hg["flannel.alpha.coreos.com/public-ipv6"], "2001:db8::10");
        let l = lease_from_node("hg", Some("10.244.9.0/24"), Some("2001:db8:10:9::/64"), &hg, &p, &cfg6())
            .unwrap()
            .unwrap();
        assert_eq!(l.ipv6.unwrap().public_ip, Some("2001:db8::10".parse().unwrap()));
        // No IPv6 side (vxlan without an IPv6 VTEP, host-gw without an
        // IPv6 address, udp): neither annotation, as flannel.
        for backend in [BackendType::Vxlan, BackendType::HostGw, BackendType::Udp] {
            let mut a = dual_attrs(backend.clone());
            a.vxlan6 = None;
            if backend != BackendType::Vxlan {
                a.public_ipv6 = None;
            }
            let got = own_annotations(&p, &a, None);
            assert!(!got.keys().any(|k| k.contains("v6")), "{backend}: {got:?}");
        }
    }

    #[test]
    fn wireguard_dual_stack_writes_both_devices_data_and_reads_them_back() {
        let p = Prefix::default();
        let wg = |port| crate::lease::WireguardData { public_key: [7u8; 32], port: Some(port) };
        let attrs = LeaseAttrs {
            backend: BackendType::parse(Some("wireguard")),
            wireguard: Some(wg(51820)),
            wireguard6: Some(wg(51821)),
            ..dual_attrs(BackendType::HostGw)
        };
        let a = own_annotations(&p, &attrs, None);
        let key = crate::config::encode_key(&[7u8; 32]);
        assert_eq!(a["flannel.alpha.coreos.com/backend-data"], format!(r#"{{"PublicKey":"{key}","Port":51820}}"#));
        assert_eq!(a["flannel.alpha.coreos.com/backend-v6-data"], format!(r#"{{"PublicKey":"{key}","Port":51821}}"#));
        assert_eq!(a["flannel.alpha.coreos.com/public-ipv6"], "2001:db8::10");
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"wireguard"}}"#,
            "net-conf.json",
        )
        .unwrap();
        let l =
            lease_from_node("me", Some("10.244.9.0/24"), Some("2001:db8:10:9::/64"), &a, &p, &cfg).unwrap().unwrap();
        assert_eq!(l.ipv4.unwrap().wireguard, Some(wg(51820)));
        assert_eq!(l.ipv6.unwrap().wireguard, Some(wg(51821)));
        // Without the IPv6 device: no IPv6 annotation.
        let v4 = own_annotations(&p, &LeaseAttrs { wireguard6: None, ..attrs }, None);
        assert!(!v4.keys().any(|k| k.contains("v6")), "{v4:?}");
    }

    #[test]
    fn ipv6_only_nodes_write_and_read_only_the_ipv6_half() {
        let p = Prefix::default();
        let v6only = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#,
            "net-conf.json",
        )
        .unwrap();
        let attrs = LeaseAttrs { public_ip: None, vxlan: None, ..dual_attrs(BackendType::Vxlan) };
        let a = own_annotations(&p, &attrs, None);
        let keys: Vec<&str> = a.keys().map(|k| k.trim_start_matches("flannel.alpha.coreos.com/")).collect();
        assert_eq!(keys, ["backend-type", "backend-v6-data", "kube-subnet-manager", "public-ipv6"]);
        // The IPv6 podCIDR is the lease; an IPv4 one beside it is not read.
        for cidr4 in [None, Some("10.244.9.0/24")] {
            let l = lease_from_node("me", cidr4, Some("2001:db8:10:9::/64"), &a, &p, &v6only).unwrap().unwrap();
            assert_eq!(l, attrs.lease(None, Some("2001:db8:10:9::/64".parse().unwrap()), "node me"));
        }
        // Without an IPv6 podCIDR a node does not take part yet.
        assert_eq!(lease_from_node("me", Some("10.244.9.0/24"), None, &a, &p, &v6only).unwrap(), None);
    }

    #[test]
    fn bad_dual_stack_input_names_node_field_and_value() {
        let p = Prefix::default();
        let a = own_annotations(&p, &dual_attrs(BackendType::Vxlan), None);
        let err = |cidr6: &str, a: &BTreeMap<String, String>| {
            lease_from_node("worker-6", Some("10.244.9.0/24"), Some(cidr6), a, &p, &cfg6()).unwrap_err()
        };
        let e = err("2001:db8:99::/64", &a);
        assert!(
            e.contains("node worker-6")
                && e.contains("spec.podCIDRs IPv6 entry 2001:db8:99::/64 is outside IPv6Network 2001:db8:10::/56"),
            "{e}"
        );
        let e = err("2001:db8:10:9::1/64", &a);
        assert!(e.contains("spec.podCIDRs entry 2001:db8:10:9::1/64 has host bits set"), "{e}");
        let e = err("nope", &a);
        assert!(e.contains("spec.podCIDRs entry \"nope\" is not an IPv6 CIDR"), "{e}");
        let mut ll = a.clone();
        ll.insert("flannel.alpha.coreos.com/public-ipv6".into(), "fe80::10".into());
        let e = err("2001:db8:10:9::/64", &ll);
        assert!(e.contains("annotation flannel.alpha.coreos.com/public-ipv6 = fe80::10 is link-local"), "{e}");
        let mut bad = a.clone();
        bad.insert("flannel.alpha.coreos.com/backend-v6-data".into(), r#"{"VNI":1}"#.into());
        let e = err("2001:db8:10:9::/64", &bad);
        assert!(e.contains("annotation flannel.alpha.coreos.com/backend-v6-data.VtepMAC is missing"), "{e}");
        // The users' annotations.
        let u = BTreeMap::from([
            ("flannel.alpha.coreos.com/public-ipv6-overwrite".to_string(), "2001:db8::99".to_string()),
            ("flannel.alpha.coreos.com/node-public-ipv6".to_string(), "fe80::1".to_string()),
        ]);
        assert_eq!(user_ipv6(&p, keys::PUBLIC_IPV6_OVERWRITE, &u).unwrap(), Some("2001:db8::99".parse().unwrap()));
        let e = user_ipv6(&p, keys::NODE_PUBLIC_IPV6, &u).unwrap_err();
        assert!(e.contains("annotation flannel.alpha.coreos.com/node-public-ipv6 = fe80::1 is link-local"), "{e}");
    }

    #[test]
    fn nodes_that_do_not_take_part_are_ignored() {
        let a = ann(&[("public-ip", "192.0.2.11")]);
        assert_eq!(lease_from_node("n", Some("10.244.1.0/24"), None, &a, &Prefix::default(), &cfg()).unwrap(), None);
        let a = ann(&[("kube-subnet-manager", "true"), ("public-ip", "192.0.2.11"), ("backend-type", "vxlan")]);
        assert_eq!(lease_from_node("n", None, None, &a, &Prefix::default(), &cfg()).unwrap(), None);
        // Another prefix: flannel's annotations are not ours.
        assert_eq!(
            lease_from_node("n", Some("10.244.1.0/24"), None, &a, &Prefix::new("example.com").unwrap(), &cfg())
                .unwrap(),
            None
        );
    }

    #[test]
    fn bad_annotations_name_the_node_the_key_and_the_value() {
        let base = [("kube-subnet-manager", "true"), ("backend-type", "vxlan"), ("public-ip", "192.0.2.11")];
        let with = |extra: &[(&str, &str)]| {
            let mut a = ann(&base);
            a.extend(ann(extra));
            a
        };
        let cases: Vec<(BTreeMap<String, String>, &str, &str)> = vec![
            (with(&[("backend-data", r#"{"VNI":1,"VtepMAC":"nope"}"#)]), "10.244.1.0/24", "VtepMAC \"nope\""),
            (with(&[("backend-data", "{not json")]), "10.244.1.0/24", "is not JSON"),
            (with(&[("backend-data", r#"{"VNI":-3,"VtepMAC":"02:00:00:00:00:01"}"#)]), "10.244.1.0/24", "VNI -3"),
            (
                with(&[("public-ip", "somewhere"), ("backend-data", r#"{"VtepMAC":"02:00:00:00:00:01"}"#)]),
                "10.244.1.0/24",
                "public-ip = \"somewhere\"",
            ),
            (with(&[("backend-data", r#"{"VtepMAC":"02:00:00:00:00:01"}"#)]), "10.9.1.0/24", "outside Network"),
            (with(&[("backend-data", r#"{"VtepMAC":"02:00:00:00:00:01"}"#)]), "bogus", "spec.podCIDR \"bogus\""),
        ];
        for (a, cidr, want) in cases {
            let e = lease_from_node("worker-7", Some(cidr), None, &a, &Prefix::default(), &cfg()).unwrap_err();
            assert!(e.contains("worker-7") && e.contains(want), "{e:?} lacks {want:?}");
        }
        let a = ann(&[("node-public-ip", "203.0.113.9"), ("public-ip-overwrite", "x")]);
        assert_eq!(
            user_ip(&Prefix::default(), keys::NODE_PUBLIC_IP, &a).unwrap(),
            Some("203.0.113.9".parse().unwrap())
        );
        assert!(user_ip(&Prefix::default(), keys::PUBLIC_IP_OVERWRITE, &a)
            .unwrap_err()
            .contains("public-ip-overwrite"));
        assert_eq!(user_ip(&Prefix::default(), keys::PUBLIC_IP, &BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn prefixes_are_normalised_and_checked_as_flannel_does() {
        // flannel's own cases (pkg/subnet/kube/annotations_test.go), in our words.
        let good = [
            ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
            ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
            ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type"),
            ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type"),
            ("org.com", "org.com/backend-type"),
            ("org9.com", "org9.com/backend-type"),
            ("org.com/9", "org.com/9-backend-type"),
            ("example.com/x", "example.com/x-backend-type"),
            ("a_b.c-d.example/x_y-z", "a_b.c-d.example/x_y-z-backend-type"),
        ];
        for (raw, want) in good {
            let p = Prefix::new(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(p.key(keys::BACKEND_TYPE), want, "{raw}");
        }
        let bad = [
            "org",            // not a DNS name with a dot
            "org/",           // the same before the slash
            "org/prefix",     // the same
            "org.COM",        // upper case
            "org.com/PREFIX", // upper case in the name part
            "a.com/b/c",      // two slashes
            "a.com/b.c",      // a dot in the name part
            "Example.com",    // flannel lets this through (unanchored); the API server would not
            "a b.example.com",
            "",
        ];
        for raw in bad {
            let e = Prefix::new(raw).unwrap_err();
            assert!(e.contains("--kube-annotation-prefix") && e.contains(&format!("{raw:?}")), "{e}");
        }
        // Every annotation we write or read goes through the prefix.
        let p = Prefix::new("example.com/x").unwrap();
        let attrs = LeaseAttrs {
            public_ip: Some("192.0.2.10".parse().unwrap()),
            backend: BackendType::Vxlan,
            vxlan: Some(VxlanData { vni: 1, vtep_mac: "02:00:00:00:00:10".parse().unwrap() }),
            public_ipv6: None,
            vxlan6: None,
            wireguard: None,
            wireguard6: None,
        };
        let a = own_annotations(&p, &attrs, None);
        let names: Vec<&str> = a.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "example.com/x-backend-data",
                "example.com/x-backend-type",
                "example.com/x-kube-subnet-manager",
                "example.com/x-public-ip"
            ]
        );
        let back = lease_from_node("me", Some("10.244.9.0/24"), None, &a, &p, &cfg()).unwrap().unwrap();
        assert_eq!(back.public_ip4().unwrap().to_string(), "192.0.2.10");
        let user = BTreeMap::from([("example.com/x-node-public-ip".to_string(), "203.0.113.9".to_string())]);
        assert_eq!(user_ip(&p, keys::NODE_PUBLIC_IP, &user).unwrap(), Some("203.0.113.9".parse().unwrap()));
    }
}
