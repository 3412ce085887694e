//! The network configuration on stdin: flannel's CNI configuration, unchanged.
//!
//! ```json
//! {"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
//!  "delegate":{"hairpinMode":true,"isDefaultGateway":true}}
//! ```
//!
//! flannel's plugin hands `delegate` to the reference `bridge` plugin with a
//! `host-local` IPAM section built from `subnet.env`; we do the same work in one
//! process, so the `delegate` keys keep the bridge plugin's meaning.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{code, CniError};

/// Where flanneld writes the lease, unless `subnetFile` says otherwise.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Where flannel's plugin keeps its state, unless `dataDir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// The bridge pods are plugged into, unless `delegate.bridge` says otherwise.
pub const DEFAULT_BRIDGE: &str = "cni0";

/// The whole configuration object. Keys not listed here (`type`,
/// `runtimeConfig`, `args`, and whatever a runtime adds) are accepted and
/// ignored, as the spec asks of plugins.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version the runtime speaks; the result is encoded in it.
    pub cni_version: String,
    /// Network name; also names the IPAM directory.
    pub name: String,
    /// Path of `subnet.env`.
    #[serde(default)]
    pub subnet_file: Option<PathBuf>,
    /// Directory for IPAM state.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Bridge options (the reference bridge plugin's keys).
    #[serde(default)]
    pub delegate: Delegate,
    /// Extra IPAM options: additional routes for the pod.
    #[serde(default)]
    pub ipam: Option<Ipam>,
    /// The previous plugin's (or our own ADD's) result: CHECK verifies it.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still holds.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// serde takes a JSON array for a struct, as its fields in order, so
/// `"ipam": []` would pass as "no routes" and `"delegate": [null, "br0"]` as
/// bridge `br0`, with errors naming positions instead of keys. flannel's Go
/// plugin rejects such configurations, and so do we: each object of the
/// configuration must be a JSON object (null stays null).
fn reject_arrays_for_objects(conf: &serde_json::Value) -> Result<(), CniError> {
    let array = |path: String| {
        Err(CniError::new(
            code::INVALID_CONFIG,
            format!("network configuration: {path}invalid type: array, expected an object"),
        ))
    };
    if conf.is_array() {
        return array(String::new());
    }
    for key in ["delegate", "ipam"] {
        if conf[key].is_array() {
            return array(format!("{key}: "));
        }
    }
    for (list, items) in
        [("ipam.routes", &conf["ipam"]["routes"]), ("cni.dev/valid-attachments", &conf["cni.dev/valid-attachments"])]
    {
        for (i, item) in items.as_array().into_iter().flatten().enumerate() {
            if item.is_array() {
                return array(format!("{list}[{i}]: "));
            }
        }
    }
    Ok(())
}

/// `delegate`: how the pod is plugged into the bridge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delegate {
    /// `bridge` (the default) on the in-process path; other types are
    /// executed. Parsed so that a non-string is refused naming the field.
    #[allow(dead_code)]
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Bridge name (default `cni0`).
    #[serde(default)]
    pub bridge: Option<String>,
    /// Give the bridge the gateway address (default true, as flannel sets it).
    #[serde(default)]
    pub is_gateway: Option<bool>,
    /// Give the pod a default route via the gateway.
    #[serde(default)]
    pub is_default_gateway: Option<bool>,
    /// Hairpin mode on the pod's bridge port.
    #[serde(default)]
    pub hairpin_mode: Option<bool>,
    /// Masquerade the pod's traffic leaving the cluster (default: not FLANNEL_IPMASQ).
    #[serde(default)]
    pub ip_masq: Option<bool>,
    /// Pod and bridge MTU (default FLANNEL_MTU).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// `ipam`: the keys of host-local's the in-process path implements (see
/// [`crate::delegate::fast_path`]); any other key sends the configuration
/// to the plugins it names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ipam {
    /// `host-local` (the default): anything else is executed. Parsed so
    /// that a non-string is refused naming the field.
    #[allow(dead_code)]
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// host-local's state directory: where upstream's pods hold their
    /// addresses, and where ours are mirrored (see [`crate::ipam`]).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Routes added in the pod besides the cluster networks'.
    #[serde(default)]
    pub routes: Vec<RouteConf>,
}

/// One route in `ipam.routes`.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConf {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; the gateway of the pod's subnet when absent.
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the container.
    pub ifname: String,
}

/// The bridge settings after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSettings {
    /// Bridge name.
    pub bridge: String,
    /// The bridge holds the gateway address.
    pub is_gateway: bool,
    /// The pod gets a default route.
    pub is_default_gateway: bool,
    /// Hairpin on the pod's port.
    pub hairpin: bool,
    /// Per-pod masquerade in our nftables table.
    pub ip_masq: bool,
    /// MTU for bridge, host veth and pod interface.
    pub mtu: u32,
}

impl NetConf {
    /// Parses stdin. Malformed JSON is a decoding failure (code 6); JSON of the
    /// wrong shape is an invalid configuration (code 7), and the message names
    /// the field (`delegate.hairpinMode: invalid type: string "yes", expected a
    /// boolean`).
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(code::DECODE, format!("network configuration: {e}")))?;
        reject_arrays_for_objects(&value)?;
        let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if path == "." || path.is_empty() {
                format!("network configuration: {inner}")
            } else {
                format!("network configuration: {path}: {inner}")
            };
            CniError::new(code::INVALID_CONFIG, msg)
        })?;
        crate::version::check_supported(&conf.cni_version)?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), CniError> {
        let invalid = |msg: String| Err(CniError::new(code::INVALID_CONFIG, msg));
        if self.name.is_empty() || self.name.contains('/') || self.name == "." || self.name == ".." {
            return invalid(format!(
                "network configuration: name {:?} must be non-empty and must not contain '/'",
                self.name
            ));
        }
        if let Some(b) = &self.delegate.bridge {
            if crate::env::validate_ifname(b).is_err() {
                return invalid(format!("network configuration: delegate.bridge {b:?} is not a valid interface name"));
            }
        }
        if let Some(mtu) = self.delegate.mtu {
            if !(68..=65535).contains(&mtu) {
                return invalid(format!("network configuration: delegate.mtu {mtu} is outside 68..=65535"));
            }
        }
        for (i, r) in self.ipam.iter().flat_map(|i| i.routes.iter()).enumerate() {
            if let Some(gw) = r.gw {
                if gw.is_ipv4() != r.dst.addr().is_ipv4() {
                    return invalid(format!(
                        "network configuration: ipam.routes[{i}]: gw {gw} is not of the family of dst {}",
                        r.dst
                    ));
                }
            }
        }
        Ok(())
    }

    /// Path of `subnet.env`.
    pub fn subnet_file(&self) -> PathBuf {
        self.subnet_file.clone().unwrap_or_else(|| DEFAULT_SUBNET_FILE.into())
    }

    /// Directory for IPAM state.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| DEFAULT_DATA_DIR.into())
    }

    /// host-local's directory for this network: `ipam.dataDir/<name>` when
    /// given; otherwise `networks/<name>` beside `dataDir`, which with
    /// flannel's defaults is host-local's own default,
    /// `/var/lib/cni/networks/<name>`.
    pub fn host_local_dir(&self) -> PathBuf {
        let base = match self.ipam.as_ref().and_then(|i| i.data_dir.clone()) {
            Some(d) => d,
            None => {
                let data = self.data_dir();
                data.parent().map(|p| p.join("networks")).unwrap_or_else(|| PathBuf::from("/var/lib/cni/networks"))
            }
        };
        base.join(&self.name)
    }

    /// Bridge settings with flannel's defaults: `isGateway` true, `ipMasq` the
    /// opposite of the daemon's masquerading, `mtu` the lease's; a default
    /// gateway needs the gateway address, so `isDefaultGateway` implies
    /// `isGateway`, as in the bridge plugin.
    pub fn bridge_settings(&self, env_mtu: u32, env_ipmasq: bool) -> BridgeSettings {
        let d = &self.delegate;
        let is_default_gateway = d.is_default_gateway.unwrap_or(false);
        BridgeSettings {
            bridge: d.bridge.clone().unwrap_or_else(|| DEFAULT_BRIDGE.into()),
            is_gateway: d.is_gateway.unwrap_or(true) || is_default_gateway,
            is_default_gateway,
            hairpin: d.hairpin_mode.unwrap_or(false),
            ip_masq: d.ip_masq.unwrap_or(!env_ipmasq),
            mtu: d.mtu.unwrap_or(env_mtu),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannels_own_config_parses_with_flannels_defaults() {
        let c = NetConf::parse(br#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#).unwrap();
        assert_eq!(c.subnet_file(), PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/cni/flannel"));
        let s = c.bridge_settings(1450, true);
        assert_eq!(
            s,
            BridgeSettings {
                bridge: "cni0".into(),
                is_gateway: true,
                is_default_gateway: true,
                hairpin: true,
                ip_masq: false,
                mtu: 1450
            }
        );
        assert!(c.bridge_settings(1450, false).ip_masq);
    }

    #[test]
    fn delegate_overrides() {
        let c = NetConf::parse(
            br#"{"name":"n","cniVersion":"1.0.0","type":"flannel","subnetFile":"/x/s.env","dataDir":"/x/d",
            "delegate":{"bridge":"br9","mtu":1400,"ipMasq":true,"isGateway":false,"forceAddress":true},
            "ipam":{"routes":[{"dst":"192.0.2.0/24"},{"dst":"198.51.100.0/24","gw":"10.244.1.254"}]},
            "runtimeConfig":{"portMappings":[]},"prevResult":{"cniVersion":"1.0.0"}}"#,
        )
        .unwrap();
        let s = c.bridge_settings(1450, true);
        assert_eq!((s.bridge.as_str(), s.mtu, s.ip_masq, s.is_gateway), ("br9", 1400, true, false));
        assert_eq!(c.ipam.unwrap().routes.len(), 2);
    }

    #[test]
    fn bad_configs_get_the_right_code_and_name_the_field() {
        let cases: &[(&[u8], u32, &str)] = &[
            (b"{not json", 6, "network configuration"),
            (b"", 6, "network configuration"),
            (br#"{"name":"n","type":"flannel"}"#, 7, "cniVersion"),
            (br#"{"cniVersion":"9.0.0","name":"n"}"#, 1, "9.0.0"),
            (br#"{"cniVersion":"1.0.0","name":"n","delegate":{"hairpinMode":"yes"}}"#, 7, "delegate.hairpinMode"),
            (br#"{"cniVersion":"1.0.0","name":"n","delegate":{"mtu":10}}"#, 7, "delegate.mtu 10"),
            (
                br#"{"cniVersion":"1.0.0","name":"n","delegate":{"bridge":"this-name-is-too-long"}}"#,
                7,
                "delegate.bridge",
            ),
            (br#"{"cniVersion":"1.0.0","name":"n","ipam":{"routes":[{"dst":"nope"}]}}"#, 7, "ipam.routes[0].dst"),
            (br#"{"cniVersion":"1.0.0","name":"a/b"}"#, 7, "name \"a/b\""),
            (br#"{"cniVersion":"1.0.0","name":"n","ipam":[]}"#, 7, "ipam: invalid type: array, expected an object"),
            (br#"{"cniVersion":"1.0.0","name":"n","delegate":[null,"br0"]}"#, 7, "delegate: invalid type: array"),
            (
                br#"{"cniVersion":"1.0.0","name":"n","ipam":{"routes":[["10.0.0.0/8"]]}}"#,
                7,
                "ipam.routes[0]: invalid type: array",
            ),
            (br#"["1.0.0","n"]"#, 7, "network configuration: invalid type: array"),
        ];
        for (input, want_code, want_text) in cases {
            let e = NetConf::parse(input).unwrap_err();
            assert_eq!(e.code, *want_code, "{e:?}");
            assert!(e.msg.contains(want_text), "{:?} lacks {want_text:?}", e.msg);
        }
    }
}
