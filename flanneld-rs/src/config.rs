//! The network configuration: `net-conf.json` in Kubernetes mode, the etcd key
//! `<prefix>/config` in etcd mode. flannel's field names, matched without
//! regard to case as flannel's Go decoder does, and flannel's defaults.
//!
//! ```json
//! {"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The IPv4 network (`Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`);
    /// `None` with `EnableIPv4` false (an IPv6-only cluster).
    pub ipv4: Option<Ipv4Config>,
    /// The IPv6 network (`EnableIPv6` with `IPv6Network`, `IPv6SubnetLen`,
    /// `IPv6SubnetMin`, `IPv6SubnetMax`); `None` without `EnableIPv6`.
    pub ipv6: Option<Ipv6Config>,
    /// `EnableNFTables`: masquerade and forward rules in flannel's nftables
    /// tables instead of its iptables chains.
    pub enable_nftables: bool,
    /// The backend and its options.
    pub backend: BackendConfig,
}

/// The IPv4 network: each node leases one /`subnet_len` of `network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Config {
    /// The cluster network (`Network`).
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet (`SubnetLen`).
    pub subnet_len: u8,
    /// First subnet that may be leased (`SubnetMin`).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased (`SubnetMax`).
    pub subnet_max: Ipv4Addr,
}

impl Ipv4Config {
    /// Every subnet that may be leased, in order. Lazy (a /0 Network holds
    /// up to 2^30 subnets), with an exact `size_hint`, from either end.
    pub fn subnets(&self) -> impl DoubleEndedIterator<Item = Ipv4Net> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        let (min, max) = (u32::from(self.subnet_min), u32::from(self.subnet_max));
        (0..=(max - min) / size)
            .map(move |i| Ipv4Net::new(Ipv4Addr::from(min + i * size), self.subnet_len).expect("valid prefix"))
    }
}

/// The IPv6 network: each node leases one /`subnet_len` of `network`, as
/// with IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Config {
    /// `IPv6Network`.
    pub network: Ipv6Net,
    /// `IPv6SubnetLen` (default 64, or prefix+2 for a network smaller than a /62).
    pub subnet_len: u8,
    /// `IPv6SubnetMin` (default: the second subnet).
    pub subnet_min: Ipv6Addr,
    /// `IPv6SubnetMax` (default: the last subnet).
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Config {
    /// How many subnets may be leased (saturating: a /0 of /64s is 2^64).
    pub fn count(&self) -> u128 {
        let size = self.size();
        (u128::from(self.subnet_max) - u128::from(self.subnet_min)) / size + 1
    }

    /// The `i`-th subnet that may be leased, from `IPv6SubnetMin`.
    pub fn nth(&self, i: u128) -> Option<Ipv6Net> {
        if i >= self.count() {
            return None;
        }
        let start = u128::from(self.subnet_min) + i * self.size();
        Some(Ipv6Net::new(Ipv6Addr::from(start), self.subnet_len).expect("valid prefix"))
    }

    /// Whether `subnet` is one that may be leased: a /`subnet_len` between
    /// `IPv6SubnetMin` and `IPv6SubnetMax`.
    pub fn allows(&self, subnet: Ipv6Net) -> bool {
        let a = u128::from(subnet.network());
        subnet.prefix_len() == self.subnet_len
            && subnet.trunc() == subnet
            && a >= u128::from(self.subnet_min)
            && a <= u128::from(self.subnet_max)
    }

    fn size(&self) -> u128 {
        1u128.checked_shl(u32::from(128 - self.subnet_len)).unwrap_or(u128::MAX)
    }
}

/// `Backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    /// `{"Type":"vxlan", ...}`
    Vxlan(VxlanConfig),
    /// `{"Type":"udp","Port":8285}`
    Udp {
        /// UDP port of the tunnel.
        port: u16,
    },
    /// `{"Type":"host-gw"}`
    HostGw,
    /// `{"Type":"wireguard", ...}`
    Wireguard(WireguardConfig),
}

/// The WireGuard backend's options, flannel's names and defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort` (default 51820): our UDP port for IPv4 peers, advertised
    /// in our lease.
    pub listen_port: u16,
    /// `ListenPortV6` (default 51821): the port of the IPv6 device.
    pub listen_port_v6: u16,
    /// `MTU` of the underlay to derive from (default: the interface's); the
    /// device gets 80 bytes less, as in flannel.
    pub mtu: Option<u32>,
    /// `PSK`: a pre-shared key mixed into every handshake (32 bytes, base64
    /// in the configuration).
    pub psk: Option<[u8; 32]>,
    /// `PersistentKeepaliveInterval`, in seconds (0, the default: off).
    pub persistent_keepalive: u16,
    /// `Mode` (default `separate`).
    pub mode: WireguardMode,
}

impl std::fmt::Debug for WireguardConfig {
    // The PSK is a secret: logs say only whether there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardConfig")
            .field("listen_port", &self.listen_port)
            .field("listen_port_v6", &self.listen_port_v6)
            .field("mtu", &self.mtu)
            .field("psk", &self.psk.map(|_| "(set)"))
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Default for WireguardConfig {
    fn default() -> WireguardConfig {
        WireguardConfig {
            listen_port: 51820,
            listen_port_v6: 51821,
            mtu: None,
            psk: None,
            persistent_keepalive: 0,
            mode: WireguardMode::Separate,
        }
    }
}

/// The WireGuard backend's `Mode`: which devices carry which family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireguardMode {
    /// `separate`: `flannel-wg` for IPv4 over IPv4, `flannel-wg-v6` for
    /// IPv6 over IPv6.
    Separate,
    /// `auto`: one device for both families, each peer over IPv4 or IPv6,
    /// whichever it has (IPv4 first).
    Auto,
    /// `ipv4`: one device, every peer over IPv4.
    Ipv4,
    /// `ipv6`: one device, every peer over IPv6.
    Ipv6,
}

impl WireguardMode {
    /// The mode as `Backend.Mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            WireguardMode::Separate => "separate",
            WireguardMode::Auto => "auto",
            WireguardMode::Ipv4 => "ipv4",
            WireguardMode::Ipv6 => "ipv6",
        }
    }
}

/// The VXLAN backend's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    /// `VNI` (default 1).
    pub vni: u32,
    /// `Port` (0: the kernel's default, 8472).
    pub port: u16,
    /// `MTU` of the underlay to derive from, when set.
    pub mtu: Option<u32>,
    /// `GBP`: group-based policy extension.
    pub gbp: bool,
    /// `Learning`: let the kernel learn FDB entries.
    pub learning: bool,
    /// `DirectRouting`: plain routes to peers on the same L2 segment.
    pub direct_routing: bool,
}

impl BackendConfig {
    /// The type name flannel uses in leases and annotations.
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendConfig::Vxlan(_) => "vxlan",
            BackendConfig::Udp { .. } => "udp",
            BackendConfig::HostGw => "host-gw",
            BackendConfig::Wireguard(_) => "wireguard",
        }
    }
}

/// A configuration that cannot be used; the message names the field and value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("network configuration {source_name}: {msg}")]
pub struct ConfigError {
    /// Where the configuration came from (a path or an etcd key).
    pub source_name: String,
    /// What is wrong, naming the field and the value.
    pub msg: String,
}

/// Top-level fields, as flannel spells them.
const ROOT_FIELDS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Backend",
];

/// Fields of `Backend`, any type's.
const BACKEND_FIELDS: &[&str] = &[
    "Type",
    "VNI",
    "Port",
    "MTU",
    "GBP",
    "Learning",
    "DirectRouting",
    "ListenPort",
    "ListenPortV6",
    "PSK",
    "PersistentKeepaliveInterval",
    "Mode",
];

/// Top-level fields flannel reads only with `EnableIPv4` (the default):
/// warned about with `EnableIPv4` false.
const IPV4_FIELDS: &[&str] = &["Network", "SubnetLen", "SubnetMin", "SubnetMax"];

/// Top-level fields flannel reads only with `EnableIPv6`: warned about
/// without it, as they have no effect.
const IPV6_ONLY_FIELDS: &[&str] = &["IPv6Network", "IPv6SubnetMin", "IPv6SubnetMax", "IPv6SubnetLen"];

/// The `Backend` fields each type reads (flannel's, on Linux); others are
/// warned about.
fn backend_fields_of(btype: &str) -> &'static [&'static str] {
    match btype {
        "vxlan" => &["Type", "VNI", "Port", "MTU", "GBP", "Learning", "DirectRouting"],
        "udp" => &["Type", "Port"],
        "wireguard" => &["Type", "ListenPort", "ListenPortV6", "MTU", "PSK", "PersistentKeepaliveInterval", "Mode"],
        _ => &["Type"],
    }
}

/// What flannel's Go decoder would silently ignore in `o` (`prefix` + key),
/// each as a note naming the key: unknown keys, and keys `known` does not
/// hold but `no_effect` explains.
fn ignored_keys(
    o: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    no_effect: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut notes = Vec::new();
    for k in o.keys() {
        if known.iter().any(|f| f.eq_ignore_ascii_case(k)) {
            continue;
        }
        notes.push(match no_effect(k) {
            Some(why) => format!("{prefix}{k} has no effect: {why}"),
            None => format!("unknown key {prefix}{k} is ignored (a typo? flannel ignores it too)"),
        });
    }
    notes
}

/// An object's members under lower-cased keys, so `"network"`, `"Network"`
/// and `"NETWORK"` all match. A field given under two spellings is an
/// error naming it (`prefix` + its name): flannel's Go decoder would take
/// whichever comes last, silently; unknown keys are ignored either way.
fn fold(o: &Map<String, Value>, fields: &[&str], prefix: &str) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    let mut spelt: BTreeMap<String, &str> = BTreeMap::new();
    for (k, v) in o {
        let lower = k.to_ascii_lowercase();
        if let Some(field) = fields.iter().find(|f| f.eq_ignore_ascii_case(k)) {
            if let Some(first) = spelt.insert(lower.clone(), k) {
                return Err(format!(
                    "{prefix}{field} is given twice, as {first:?} and {k:?}: field names match regardless of case"
                ));
            }
        }
        out.insert(lower, v.clone());
    }
    Ok(out)
}

/// `IPv6Network`, parsed whether or not `EnableIPv6` is set (flannel's
/// decoder refuses a malformed one either way).
fn parse_ipv6_network(raw: Option<String>) -> Result<Option<Ipv6Net>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let network: Ipv6Net = match raw.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V6(n)) => n,
        Ok(ipnet::IpNet::V4(_)) => return Err(format!("IPv6Network {raw:?} is an IPv4 CIDR, not an IPv6 one")),
        Err(_) => return Err(format!("IPv6Network {raw:?} is not an IPv6 CIDR")),
    };
    if network.trunc() != network {
        return Err(format!("IPv6Network {raw:?} has host bits set (did you mean {}?)", network.trunc()));
    }
    Ok(Some(network))
}

/// Reads a string field by lower-cased key, naming it in errors.
type GetStr<'a> = &'a dyn Fn(&str, &str) -> Result<Option<String>, ConfigError>;
/// Reads an unsigned field (key, name, maximum) of an object.
type GetU<'a> = &'a dyn Fn(&BTreeMap<String, Value>, &str, &str, u64) -> Result<Option<u64>, ConfigError>;

/// The IPv4 half of the configuration, with flannel's defaults and checks.
fn parse_ipv4(f: &BTreeMap<String, Value>, get_str: GetStr<'_>, get_u: GetU<'_>) -> Result<Ipv4Config, String> {
    let network_raw = get_str("network", "Network").map_err(|e| e.msg)?.ok_or(
        "Network is missing (the IPv4 cluster network, e.g. \"10.244.0.0/16\"; an IPv6-only cluster sets \
         EnableIPv4 false)",
    )?;
    let network: Ipv4Net = network_raw.parse().map_err(|_| format!("Network {network_raw:?} is not an IPv4 CIDR"))?;
    if network.trunc() != network {
        return Err(format!("Network {network_raw:?} has host bits set (did you mean {}?)", network.trunc()));
    }
    // Checked here, not through SubnetLen: no SubnetLen fits a smaller
    // Network, and the default one would be blamed for it.
    if network.prefix_len() > 28 {
        return Err(format!(
            "Network {network} is too small: it must hold 4 subnets of at least 4 addresses (a /28 or larger)"
        ));
    }
    let prefix = network.prefix_len();
    let subnet_len = match get_u(f, "subnetlen", "SubnetLen", 32).map_err(|e| e.msg)? {
        Some(n) => n as u8,
        None if prefix <= 22 => 24,
        None => prefix + 2,
    };
    if subnet_len > 30 {
        return Err(format!("SubnetLen {subnet_len} is longer than 30: a subnet needs room for pods"));
    }
    if subnet_len < prefix + 2 {
        return Err(format!(
            "SubnetLen {subnet_len} leaves fewer than 4 subnets in Network {network} (want at least /{})",
            prefix + 2
        ));
    }
    let size = 1u32 << (32 - subnet_len);
    let start = u32::from(network.network());
    let last = u32::from(network.broadcast()) - size + 1;
    let bound = |key: &str, name: &str, default: u32| -> Result<Ipv4Addr, String> {
        let Some(s) = get_str(key, name).map_err(|e| e.msg)? else {
            return Ok(Ipv4Addr::from(default));
        };
        let ip: Ipv4Addr = s.parse().map_err(|_| format!("{name} {s:?} is not an IPv4 address"))?;
        if !network.contains(&ip) {
            return Err(format!("{name} {s} is outside Network {network}"));
        }
        if (u32::from(ip) - start) % size != 0 {
            return Err(format!("{name} {s} is not the start of a /{subnet_len} subnet"));
        }
        Ok(ip)
    };
    let subnet_min = bound("subnetmin", "SubnetMin", start + size)?;
    let subnet_max = bound("subnetmax", "SubnetMax", last)?;
    if u32::from(subnet_min) > u32::from(subnet_max) {
        return Err(format!("SubnetMin {subnet_min} is after SubnetMax {subnet_max}"));
    }
    Ok(Ipv4Config { network, subnet_len, subnet_min, subnet_max })
}

/// The IPv6 half of the configuration, with flannel's defaults and checks.
fn parse_ipv6(
    f: &BTreeMap<String, Value>,
    network: Option<Ipv6Net>,
    get_str: GetStr<'_>,
    get_u: GetU<'_>,
) -> Result<Ipv6Config, String> {
    let network =
        network.ok_or("EnableIPv6 true needs IPv6Network (the IPv6 cluster network, e.g. \"2001:db8:10::/56\")")?;
    let prefix = network.prefix_len();
    if prefix > 124 {
        return Err(format!(
            "IPv6Network {network} is too small: it must hold 4 subnets of at least 4 addresses (a /124 or larger)"
        ));
    }
    let subnet_len = match get_u(f, "ipv6subnetlen", "IPv6SubnetLen", 128).map_err(|e| e.msg)? {
        Some(n) => n as u8,
        None if prefix <= 62 => 64,
        None => prefix + 2,
    };
    if subnet_len > 126 {
        return Err(format!("IPv6SubnetLen {subnet_len} is longer than 126: a subnet needs room for pods"));
    }
    if subnet_len < prefix + 2 {
        return Err(format!(
            "IPv6SubnetLen {subnet_len} leaves fewer than 4 subnets in IPv6Network {network} (want at least /{})",
            prefix + 2
        ));
    }
    let size = 1u128 << (128 - subnet_len);
    let start = u128::from(network.network());
    let last = u128::from(network.broadcast()) - size + 1;
    let bound = |key: &str, name: &str, default: u128| -> Result<Ipv6Addr, String> {
        let Some(s) = get_str(key, name).map_err(|e| e.msg)? else {
            return Ok(Ipv6Addr::from(default));
        };
        let ip: Ipv6Addr = s.parse().map_err(|_| format!("{name} {s:?} is not an IPv6 address"))?;
        if !network.contains(&ip) {
            return Err(format!("{name} {s} is outside IPv6Network {network}"));
        }
        if (u128::from(ip) - start) % size != 0 {
            return Err(format!("{name} {s} is not the start of a /{subnet_len} subnet"));
        }
        Ok(ip)
    };
    let subnet_min = bound("ipv6subnetmin", "IPv6SubnetMin", start + size)?;
    let subnet_max = bound("ipv6subnetmax", "IPv6SubnetMax", last)?;
    if u128::from(subnet_min) > u128::from(subnet_max) {
        return Err(format!("IPv6SubnetMin {subnet_min} is after IPv6SubnetMax {subnet_max}"));
    }
    Ok(Ipv6Config { network, subnet_len, subnet_min, subnet_max })
}

/// The wireguard backend's options from the folded `Backend` object `b`,
/// with flannel's defaults; a bad value is refused naming the field.
fn parse_wireguard(b: &BTreeMap<String, Value>, get_u: GetU<'_>) -> Result<WireguardConfig, ConfigError> {
    let msg = |m: String| ConfigError { source_name: String::new(), msg: m };
    let mut wg = WireguardConfig::default();
    let port = |key: &str, name: &str, default: u16| -> Result<u16, ConfigError> {
        match get_u(b, key, name, 65535)? {
            None => Ok(default),
            // flannel hands 0 to the kernel, which picks a random port, and
            // then advertises 0, which peers read as their own port: refused.
            Some(0) => Err(msg(format!(
                "{name} 0: the port is advertised to peers in the lease and must be fixed (1..=65535)"
            ))),
            Some(p) => Ok(p as u16),
        }
    };
    wg.listen_port = port("listenport", "Backend.ListenPort", 51820)?;
    wg.listen_port_v6 = port("listenportv6", "Backend.ListenPortV6", 51821)?;
    wg.mtu = get_u(b, "mtu", "Backend.MTU", 65535)?.map(|m| m as u32);
    if let Some(m) = wg.mtu {
        if m < 68 + 80 {
            return Err(msg(format!(
                "Backend.MTU {m} is too small: the device gets 80 bytes less, and IPv4 needs at least 68"
            )));
        }
    }
    // A number of seconds (flannel multiplies the decoded Duration by a
    // second); WireGuard keeps it in 16 bits.
    wg.persistent_keepalive =
        get_u(b, "persistentkeepaliveinterval", "Backend.PersistentKeepaliveInterval", 65535)?.unwrap_or(0) as u16;
    wg.psk = match b.get("psk") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(decode_key(s).map_err(|why| msg(format!("Backend.PSK is {why}")))?),
        Some(other) => return Err(msg(format!("Backend.PSK {other} is not a string"))),
    };
    wg.mode = match b.get("mode") {
        None | Some(Value::Null) => WireguardMode::Separate,
        // flannel compares the mode exactly, without folding case.
        Some(Value::String(s)) => match s.as_str() {
            "separate" => WireguardMode::Separate,
            "auto" => WireguardMode::Auto,
            "ipv4" => WireguardMode::Ipv4,
            "ipv6" => WireguardMode::Ipv6,
            _ => return Err(msg(format!("Backend.Mode {s:?} is not one of separate, auto, ipv4, ipv6"))),
        },
        Some(other) => return Err(msg(format!("Backend.Mode {other} is not a string"))),
    };
    Ok(wg)
}

/// A WireGuard key (private, public or pre-shared) as `wg` and flannel
/// write it: 32 bytes in standard base64 with padding (44 characters).
/// The error says what is wrong without showing the text (it may be a
/// secret).
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| format!("not base64 ({} characters; want 44 characters of standard base64)", text.len()))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes of base64, not 32 (a WireGuard key is 32 bytes)", bytes.len()))
}

/// A WireGuard key in the form [`decode_key`] reads.
pub fn encode_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl NetworkConfig {
    /// Parses and validates `text`; `source` names it in errors. Keys that
    /// have no effect (unknown ones, another backend's options, Windows-only
    /// ones) are logged as warnings naming them.
    pub fn parse(text: &str, source: &str) -> Result<NetworkConfig, ConfigError> {
        let mut notes = Vec::new();
        let cfg = NetworkConfig::parse_noting(text, source, &mut notes)?;
        for n in notes {
            log::warn!("network configuration {source}: {n}");
        }
        Ok(cfg)
    }

    /// [`NetworkConfig::parse`], with the warnings into `notes`.
    pub fn parse_noting(text: &str, source: &str, notes: &mut Vec<String>) -> Result<NetworkConfig, ConfigError> {
        let err = |msg: String| ConfigError { source_name: source.to_string(), msg };
        let root: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let Some(root) = root.as_object() else {
            return Err(err(format!("want a JSON object, got {root}")));
        };
        let f = fold(root, ROOT_FIELDS, "").map_err(err)?;
        let get_str = |key: &str, name: &str| -> Result<Option<String>, ConfigError> {
            match f.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(err(format!("{name} {other} is not a string"))),
            }
        };
        let get_bool =
            |map: &BTreeMap<String, Value>, key: &str, name: &str, default: bool| -> Result<bool, ConfigError> {
                match map.get(key) {
                    None | Some(Value::Null) => Ok(default),
                    Some(Value::Bool(b)) => Ok(*b),
                    Some(other) => Err(err(format!("{name} {other} is not true or false"))),
                }
            };
        let get_u =
            |map: &BTreeMap<String, Value>, key: &str, name: &str, max: u64| -> Result<Option<u64>, ConfigError> {
                match map.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => match v.as_u64() {
                        Some(n) if n <= max => Ok(Some(n)),
                        _ => Err(err(format!("{name} {v} is not an integer in 0..={max}"))),
                    },
                }
            };

        let enable_ipv4 = get_bool(&f, "enableipv4", "EnableIPv4", true)?;
        let enable_ipv6 = get_bool(&f, "enableipv6", "EnableIPv6", false)?;
        let enable_nftables = get_bool(&f, "enablenftables", "EnableNFTables", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(err("EnableIPv4 and EnableIPv6 are both false: the cluster needs at least one family".into()));
        }
        let ipv4 = if enable_ipv4 {
            Some(parse_ipv4(&f, &get_str, &get_u).map_err(err)?)
        } else {
            // flannel's decoder still refuses a malformed Network.
            if let Some(raw) = get_str("network", "Network")? {
                raw.parse::<Ipv4Net>().map_err(|_| err(format!("Network {raw:?} is not an IPv4 CIDR")))?;
            }
            for k in root.keys() {
                if let Some(field) = IPV4_FIELDS.iter().find(|f| f.eq_ignore_ascii_case(k)) {
                    notes.push(format!("{field} has no effect with EnableIPv4 false (flannel ignores it too)"));
                }
            }
            None
        };
        let ipv6_network = parse_ipv6_network(get_str("ipv6network", "IPv6Network")?).map_err(err)?;
        let ipv6 = if enable_ipv6 {
            Some(parse_ipv6(&f, ipv6_network, &get_str, &get_u).map_err(err)?)
        } else {
            for k in root.keys() {
                if let Some(field) = IPV6_ONLY_FIELDS.iter().find(|f| f.eq_ignore_ascii_case(k)) {
                    notes.push(format!("{field} has no effect without EnableIPv6 true (flannel ignores it too)"));
                }
            }
            None
        };
        notes.extend(ignored_keys(root, ROOT_FIELDS, "", |_| None));

        let b = match f.get("backend") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(o)) => fold(o, BACKEND_FIELDS, "Backend.").map_err(err)?,
            // Not the default udp backend, silently: flannel refuses it too.
            Some(other) => return Err(err(format!("Backend {other} is not an object like {{\"Type\":\"vxlan\"}}"))),
        };
        let btype = match b.get("type") {
            None | Some(Value::Null) => "udp".to_string(),
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            Some(other) => return Err(err(format!("Backend.Type {other} is not a string"))),
        };
        if let Some(Value::Object(o)) = f.get("backend") {
            notes.extend(ignored_keys(o, backend_fields_of(&btype), "Backend.", |k| {
                if k.eq_ignore_ascii_case("MacPrefix") {
                    Some("flannel uses it on Windows only (VXLAN MACs on Linux are the kernel's)".into())
                } else if BACKEND_FIELDS.iter().any(|b| b.eq_ignore_ascii_case(k)) {
                    Some(format!("Type {btype} does not read it"))
                } else {
                    None
                }
            }));
        }
        let backend = match btype.as_str() {
            "vxlan" => BackendConfig::Vxlan(VxlanConfig {
                vni: get_u(&b, "vni", "Backend.VNI", 0xff_ffff)?.unwrap_or(1) as u32,
                port: get_u(&b, "port", "Backend.Port", 65535)?.unwrap_or(0) as u16,
                mtu: get_u(&b, "mtu", "Backend.MTU", 65535)?.map(|m| m as u32),
                gbp: get_bool(&b, "gbp", "Backend.GBP", false)?,
                learning: get_bool(&b, "learning", "Backend.Learning", false)?,
                direct_routing: get_bool(&b, "directrouting", "Backend.DirectRouting", false)?,
            }),
            "udp" => BackendConfig::Udp { port: get_u(&b, "port", "Backend.Port", 65535)?.unwrap_or(8285) as u16 },
            "host-gw" => BackendConfig::HostGw,
            "wireguard" => BackendConfig::Wireguard(parse_wireguard(&b, &get_u).map_err(|e| err(e.msg))?),
            other => {
                return Err(err(format!("Backend.Type {other:?} is not one of vxlan, udp, host-gw, wireguard")));
            }
        };
        if let BackendConfig::Wireguard(wg) = &backend {
            // Peers over a family the cluster does not run cannot work
            // (flannel would configure endpoints without an address).
            if wg.mode == WireguardMode::Ipv6 && ipv6.is_none() {
                return Err(err(
                    "Backend.Mode \"ipv6\" (peers over IPv6) needs EnableIPv6 true; use \"separate\" (the default)"
                        .into(),
                ));
            }
            if wg.mode == WireguardMode::Ipv4 && ipv4.is_none() {
                return Err(err(
                    "Backend.Mode \"ipv4\" (peers over IPv4) in an IPv6-only network (EnableIPv4 false); use \
                     \"separate\" (the default) or \"ipv6\""
                        .into(),
                ));
            }
            if ipv6.is_some()
                && ipv4.is_some()
                && wg.mode == WireguardMode::Separate
                && wg.listen_port == wg.listen_port_v6
            {
                // Both devices bind their port on the one host: flannel's
                // second device would fail to come up.
                return Err(err(format!(
                    "Backend.ListenPortV6 {} is Backend.ListenPort's too: flannel-wg and flannel-wg-v6 each need \
                     their own port",
                    wg.listen_port_v6
                )));
            }
            // The port of a device this cluster does not make: the IPv6
            // one's without EnableIPv6 (flannel reads it only then) or with
            // one device for both families (which listens on ListenPort),
            // the IPv4 one's in an IPv6-only network with Mode separate.
            let given = |k: &str| b.get(k).is_some_and(|v| !v.is_null());
            if given("listenportv6") {
                if ipv6.is_none() {
                    notes.push(
                        "Backend.ListenPortV6 has no effect without EnableIPv6 true (flannel ignores it too)".into(),
                    );
                } else if wg.mode != WireguardMode::Separate {
                    notes.push(format!(
                        "Backend.ListenPortV6 has no effect with Backend.Mode {:?}: one device, flannel-wg, carries \
                         both families on Backend.ListenPort",
                        wg.mode.name()
                    ));
                }
            }
            if given("listenport") && ipv4.is_none() && wg.mode == WireguardMode::Separate {
                notes.push(
                    "Backend.ListenPort has no effect in an IPv6-only network with Backend.Mode \"separate\": \
                     flannel-wg-v6 listens on Backend.ListenPortV6 (flannel ignores it too)"
                        .into(),
                );
            }
        }
        if ipv6.is_some() && matches!(backend, BackendConfig::Udp { .. }) {
            return Err(err(
                "EnableIPv6 true with Backend.Type udp: the udp backend carries IPv4 only (flannel's too, which \
                 ignores IPv6 with it); use vxlan or host-gw for dual-stack and IPv6-only"
                    .into(),
            ));
        }
        Ok(NetworkConfig { ipv4, ipv6, enable_nftables, backend })
    }

    /// The VXLAN options, when that is the backend.
    pub fn vxlan(&self) -> Option<&VxlanConfig> {
        match &self.backend {
            BackendConfig::Vxlan(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(t, "/etc/kube-flannel/net-conf.json")
    }

    /// What parsing `t` notes (keys without effect); `t` must parse.
    fn notes(t: &str) -> Vec<String> {
        let mut n = Vec::new();
        NetworkConfig::parse_noting(t, "net-conf.json", &mut n).unwrap_or_else(|e| panic!("{t}: {e}"));
        n
    }

    #[test]
    fn flannels_defaults() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 24);
        assert_eq!(c.ipv4.unwrap().subnet_min.to_string(), "10.244.1.0");
        assert_eq!(c.ipv4.unwrap().subnet_max.to_string(), "10.244.255.0");
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 1,
                port: 0,
                mtu: None,
                gbp: false,
                learning: false,
                direct_routing: false
            })
        );
        assert_eq!(c.ipv4.as_ref().unwrap().subnets().count(), 255);
        assert!(!c.enable_nftables);
        assert!(parse(r#"{"Network":"10.244.0.0/16","enableNFTables":true}"#).unwrap().enable_nftables);
        // A small network gets prefix+2.
        let c = parse(r#"{"Network":"10.5.0.0/24"}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 26);
        assert_eq!(c.backend, BackendConfig::Udp { port: 8285 });
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnets().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["10.5.0.64/26", "10.5.0.128/26", "10.5.0.192/26"]
        );
    }

    #[test]
    fn ipv6_defaults_and_bounds_are_flannels() {
        let c = parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#).unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min.to_string(), "2001:db8:10:1::");
        assert_eq!(v6.subnet_max.to_string(), "2001:db8:10:ff::");
        assert_eq!(v6.count(), 255);
        assert_eq!(v6.nth(0).unwrap().to_string(), "2001:db8:10:1::/64");
        assert_eq!(v6.nth(254).unwrap().to_string(), "2001:db8:10:ff::/64");
        assert_eq!(v6.nth(255), None);
        assert!(v6.allows("2001:db8:10:5::/64".parse().unwrap()));
        assert!(!v6.allows("2001:db8:10::/64".parse().unwrap()));
        assert!(!v6.allows("2001:db8:10:5::/65".parse().unwrap()));
        // A network smaller than a /62 gets prefix+2, as flannel.
        let c = parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/120","IPv6SubnetMax":"2001:db8::80","Backend":{"Type":"vxlan"}}"#).unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!((v6.subnet_len, v6.count()), (122, 2));
        // A /0 holds 2^64 /64s; counting does not overflow.
        let c =
            parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"::/0","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.ipv6.unwrap().count(), (1u128 << 64) - 1);
    }

    #[test]
    fn ipv6_only_has_no_ipv4_half_and_notes_the_ipv4_keys() {
        let text =
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"host-gw"}}"#;
        let c = parse(text).unwrap();
        assert_eq!(c.ipv4, None);
        assert_eq!(c.ipv6.unwrap().network.to_string(), "2001:db8:10::/56");
        assert_eq!(c.backend, BackendConfig::HostGw);
        let with_v4 = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#;
        assert_eq!(
            notes(with_v4),
            [
                "Network has no effect with EnableIPv4 false (flannel ignores it too)",
                "SubnetLen has no effect with EnableIPv4 false (flannel ignores it too)",
            ]
        );
    }

    #[test]
    fn repeated_keys_and_unknown_keys_in_any_case_are_not_ambiguous() {
        // The same spelling twice is JSON's business: the last one wins.
        let c = parse(r#"{"Network":"10.1.0.0/16","Network":"10.2.0.0/16"}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().network.to_string(), "10.2.0.0/16");
        // Unknown fields are ignored, whatever their spellings.
        assert!(parse(r#"{"Network":"10.1.0.0/16","Extra":1,"extra":2}"#).is_ok());
        // The smallest Network that can be split: 4 subnets of /30.
        let c = parse(r#"{"Network":"10.1.0.0/28"}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 30);
        assert_eq!(c.ipv4.as_ref().unwrap().subnets().count(), 3);
    }

    #[test]
    fn keys_match_without_case_and_backend_options_parse() {
        let c = parse(r#"{"network":"10.1.0.0/16","SUBNETLEN":26,"subnetMin":"10.1.1.0","backend":{"type":"VXLAN","vni":4096,"Port":4789,"DirectRouting":true,"GBP":true}}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 26);
        assert_eq!(c.ipv4.unwrap().subnet_min.to_string(), "10.1.1.0");
        let v = c.vxlan().unwrap();
        assert_eq!((v.vni, v.port, v.direct_routing, v.gbp, v.learning), (4096, 4789, true, true, false));
        assert_eq!(
            parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap().backend,
            BackendConfig::HostGw
        );
    }

    #[test]
    fn errors_name_field_and_value() {
        let cases = [
            ("nope", "not JSON"),
            (r#"{"Backend":{"Type":"vxlan"}}"#, "Network is missing"),
            (r#"{"Network":"10.244.0.0/33"}"#, "Network \"10.244.0.0/33\""),
            (r#"{"Network":"10.244.1.0/16"}"#, "host bits"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, "SubnetLen 31"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#, "SubnetLen 17"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#, "SubnetLen \"24\""),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.1.0"}"#, "SubnetMin 10.245.1.0 is outside"),
            (r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.1.7"}"#, "SubnetMax 10.244.1.7 is not the start"),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#, "after SubnetMax"),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguardx"}}"#, "Backend.Type \"wireguardx\""),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":-1}}"#, "Backend.VNI -1"),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#,
                "Backend.DirectRouting \"yes\"",
            ),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#, "EnableIPv6 true needs IPv6Network"),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"10.9.0.0/16"}"#,
                "IPv6Network \"10.9.0.0/16\" is an IPv4 CIDR",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::1/56"}"#,
                "IPv6Network \"2001:db8::1/56\" has host bits",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/125"}"#,
                "IPv6Network 2001:db8::/125 is too small",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","IPv6SubnetLen":57}"#,
                "IPv6SubnetLen 57 leaves fewer than 4",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","IPv6SubnetLen":127}"#,
                "IPv6SubnetLen 127 is longer than 126",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","IPv6SubnetMin":"2001:db9::"}"#,
                "IPv6SubnetMin 2001:db9:: is outside",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","IPv6SubnetMax":"2001:db8:0:1::1"}"#,
                "IPv6SubnetMax 2001:db8:0:1::1 is not the start",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"udp"}}"#,
                "EnableIPv6 true with Backend.Type udp",
            ),
            (r#"{"EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#, "EnableIPv4 and EnableIPv6 are both false"),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#,
                "EnableIPv6 true needs IPv6Network",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"udp"}}"#,
                "EnableIPv6 true with Backend.Type udp",
            ),
            (
                r#"{"Network":"10.244.0.0/33","EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56"}"#,
                "Network \"10.244.0.0/33\" is not an IPv4 CIDR",
            ),
            (r#"{"Network":"10.244.0.0/16","EnableNFTables":"yes"}"#, "EnableNFTables \"yes\""),
            // Found by tests/prop_parsers (net_conf_near_valid): the default
            // SubnetLen (prefix+2) was blamed for a Network too small.
            (r#"{"network":"0.0.0.0/29"}"#, "Network 0.0.0.0/29 is too small"),
            (r#"{"Network":"10.0.0.0/29","SubnetLen":30}"#, "Network 10.0.0.0/29 is too small"),
            // Found the same way: a Backend that is not an object was taken
            // as the default (udp) backend.
            (r#"{"Network":"10.244.0.0/16","Backend":false}"#, "Backend false is not an object"),
            (r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#, "Backend \"vxlan\" is not an object"),
            // And a field under two spellings was decided by key order.
            (
                r#"{"Network":"10.244.0.0/16","network":"10.245.0.0/16"}"#,
                "Network is given twice, as \"Network\" and \"network\"",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"GBP":null,"gBP":false,"type":"host-gw"}}"#,
                "Backend.GBP is given twice",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(e.contains("net-conf.json"), "{e}");
        }
    }

    #[test]
    fn wireguard_options_have_flannels_names_and_defaults() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#).unwrap();
        assert_eq!(c.backend, BackendConfig::Wireguard(WireguardConfig::default()));
        assert_eq!(c.backend.type_name(), "wireguard");
        let BackendConfig::Wireguard(wg) = c.backend else { unreachable!() };
        assert_eq!((wg.listen_port, wg.listen_port_v6, wg.persistent_keepalive), (51820, 51821, 0));
        assert_eq!((wg.mode, wg.psk, wg.mtu), (WireguardMode::Separate, None, None));
        let psk = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
        let text = format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"type":"WireGuard","listenPort":51000,"ListenPortV6":51001,"PSK":"{psk}","PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400}}}}"#
        );
        let BackendConfig::Wireguard(wg) = parse(&text).unwrap().backend else { panic!("not wireguard") };
        let want: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        assert_eq!(
            wg,
            WireguardConfig {
                listen_port: 51000,
                listen_port_v6: 51001,
                mtu: Some(1400),
                psk: Some(want),
                persistent_keepalive: 25,
                mode: WireguardMode::Auto,
            }
        );
        // The PSK never reaches a log.
        assert!(!format!("{wg:?}").contains(psk) && format!("{wg:?}").contains("(set)"));
        assert_eq!(encode_key(&want), psk);
        // An empty PSK is none, as in flannel; so is ipv4 mode the same as
        // separate in an IPv4-only cluster.
        let BackendConfig::Wireguard(wg) =
            parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"","Mode":"ipv4"}}"#)
                .unwrap()
                .backend
        else {
            panic!("not wireguard")
        };
        assert_eq!((wg.psk, wg.mode), (None, WireguardMode::Ipv4));
    }

    #[test]
    fn wireguard_bad_values_are_refused_by_name() {
        let wg = |b: &str| format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard",{b}}}}}"#);
        let ds = |b: &str| {
            format!(
                r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{{"Type":"wireguard",{b}}}}}"#
            )
        };
        let cases = [
            (wg(r#""PSK":"c2VjcmV0""#), "Backend.PSK is 6 bytes of base64, not 32"),
            (wg(r#""PSK":"not base64 at all!""#), "Backend.PSK is not base64 (18 characters"),
            (wg(r#""PSK":32"#), "Backend.PSK 32 is not a string"),
            (wg(r#""ListenPort":70000"#), "Backend.ListenPort 70000 is not an integer in 0..=65535"),
            (wg(r#""ListenPort":0"#), "Backend.ListenPort 0: the port is advertised"),
            (wg(r#""ListenPortV6":"51821""#), "Backend.ListenPortV6 \"51821\" is not an integer"),
            (wg(r#""PersistentKeepaliveInterval":-1"#), "Backend.PersistentKeepaliveInterval -1"),
            (wg(r#""PersistentKeepaliveInterval":2.5"#), "Backend.PersistentKeepaliveInterval 2.5"),
            (wg(r#""PersistentKeepaliveInterval":65536"#), "Backend.PersistentKeepaliveInterval 65536"),
            (wg(r#""Mode":"Separate""#), "Backend.Mode \"Separate\" is not one of separate, auto, ipv4, ipv6"),
            (wg(r#""Mode":1"#), "Backend.Mode 1 is not a string"),
            (wg(r#""Mode":"ipv6""#), "Backend.Mode \"ipv6\" (peers over IPv6) needs EnableIPv6 true"),
            (wg(r#""MTU":100"#), "Backend.MTU 100 is too small"),
            (wg(r#""psk":"","PSK":"""#), "Backend.PSK is given twice"),
            (wg(r#""ListenPortV6":70000"#), "Backend.ListenPortV6 70000 is not an integer in 0..=65535"),
            (wg(r#""ListenPortV6":0"#), "Backend.ListenPortV6 0: the port is advertised"),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","Mode":"ipv4"}}"#
                    .to_string(),
                "Backend.Mode \"ipv4\" (peers over IPv4) in an IPv6-only network",
            ),
            (ds(r#""ListenPortV6":51820"#), "Backend.ListenPortV6 51820 is Backend.ListenPort's too"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(e.contains("net-conf.json"), "{e}");
        }
        // A PSK is never shown, even a malformed one.
        let e = parse(&wg(r#""PSK":"c2VjcmV0""#)).unwrap_err().to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn wireguard_runs_dual_stack_and_ipv6_only_with_mode_separate() {
        for text in [
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","ListenPortV6":51900}}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","Mode":"separate"}}"#,
        ] {
            assert!(parse(text).unwrap().ipv6.is_some(), "{text}");
            assert_eq!(notes(text), Vec::<String>::new(), "{text}");
        }
    }

    #[test]
    fn wireguard_notes_other_backends_keys() {
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","VNI":2,"Port":8285,"MTU":1500}}"#),
            [
                "Backend.Port has no effect: Type wireguard does not read it",
                "Backend.VNI has no effect: Type wireguard does not read it",
            ]
        );
        // ListenPortV6 is the IPv6 device's, and this cluster has none.
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPortV6":51001}}"#),
            ["Backend.ListenPortV6 has no effect without EnableIPv6 true (flannel ignores it too)"]
        );
        // One device for both families listens on ListenPort alone.
        assert_eq!(
            notes(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","Mode":"auto","ListenPortV6":51001}}"#
            ),
            ["Backend.ListenPortV6 has no effect with Backend.Mode \"auto\": one device, flannel-wg, carries both \
                 families on Backend.ListenPort"]
        );
        assert_eq!(
            notes(
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","Mode":"ipv6","ListenPortV6":51001,"ListenPort":51002}}"#
            ),
            ["Backend.ListenPortV6 has no effect with Backend.Mode \"ipv6\": one device, flannel-wg, carries both \
                 families on Backend.ListenPort"]
        );
        // IPv6-only with a device per family: flannel-wg-v6 alone.
        assert_eq!(
            notes(
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/56","Backend":{"Type":"wireguard","ListenPort":51002}}"#
            ),
            ["Backend.ListenPort has no effect in an IPv6-only network with Backend.Mode \"separate\": \
                 flannel-wg-v6 listens on Backend.ListenPortV6 (flannel ignores it too)"]
        );
        // And the others do not read the wireguard keys.
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","ListenPort":1}}"#),
            ["Backend.ListenPort has no effect: Type vxlan does not read it"]
        );
    }

    #[test]
    fn keys_without_effect_are_noted_by_name() {
        assert!(notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4,"MTU":1400}}"#).is_empty());
        assert!(notes(r#"{"network":"10.244.0.0/16","EnableIPv6":false,"EnableIPv4":true}"#).is_empty());
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Netwrok":"x","Backend":{"Type":"vxlan","MacPrefix":"0E-2A","Vni":2,"Directrouting":true,"Colour":1}}"#),
            [
                "unknown key Netwrok is ignored (a typo? flannel ignores it too)",
                "unknown key Backend.Colour is ignored (a typo? flannel ignores it too)",
                "Backend.MacPrefix has no effect: flannel uses it on Windows only (VXLAN MACs on Linux are the kernel's)",
            ]
        );
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","VNI":2,"DirectRouting":true}}"#),
            [
                "Backend.DirectRouting has no effect: Type host-gw does not read it",
                "Backend.VNI has no effect: Type host-gw does not read it"
            ]
        );
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":8285,"MTU":1400}}"#),
            ["Backend.MTU has no effect: Type udp does not read it"]
        );
        assert_eq!(
            notes(r#"{"Network":"10.244.0.0/16","IPv6Network":"2001:db8::/56","IPv6SubnetLen":64}"#),
            [
                "IPv6Network has no effect without EnableIPv6 true (flannel ignores it too)",
                "IPv6SubnetLen has no effect without EnableIPv6 true (flannel ignores it too)",
            ]
        );
        // Handled by another part of the daemon: no note here.
        assert!(notes(r#"{"Network":"10.244.0.0/16","EnableNFTables":false}"#).is_empty());
    }
}
