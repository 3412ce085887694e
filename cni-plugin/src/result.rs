//! The ADD result, encoded in the version the configuration asked for.
//!
//! - 0.1.0, 0.2.0: `ip4`/`ip6` objects, no interfaces.
//! - 0.3.0, 0.3.1, 0.4.0: `interfaces`, `ips` (each with `"version"`), `routes`.
//! - 1.0.0: as 0.4.0 without `ips[].version`.
//! - 1.1.0: as 1.0.0, interfaces may carry `mtu`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use crate::error::{code, CniError};
use crate::version::at_least;

/// An interface in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address, `aa:bb:..`.
    pub mac: Option<String>,
    /// The namespace path, for interfaces inside the container.
    pub sandbox: Option<String>,
    /// MTU (shown from 1.1.0).
    pub mtu: Option<u32>,
}

/// An address in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with the subnet's prefix.
    pub address: IpNet,
    /// Default gateway of the subnet.
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// A route in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
}

/// The result of ADD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// Bridge, host veth, pod interface.
    pub interfaces: Vec<Interface>,
    /// The pod's addresses.
    pub ips: Vec<IpConfig>,
    /// The pod's routes.
    pub routes: Vec<RouteEntry>,
}

fn route_json(r: &RouteEntry) -> Value {
    let mut v = json!({ "dst": r.dst.to_string() });
    if let Some(gw) = r.gw {
        v["gw"] = json!(gw.to_string());
    }
    v
}

impl CniResult {
    /// The result as JSON in `version`.
    pub fn encode(&self, version: &str) -> Value {
        if !at_least(version, "0.3.0") {
            return self.encode_legacy(version);
        }
        let with_ip_version = !at_least(version, "1.0.0");
        let with_mtu = at_least(version, "1.1.0");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), json!(i.name));
                if let Some(mac) = &i.mac {
                    o.insert("mac".into(), json!(mac));
                }
                if let (true, Some(mtu)) = (with_mtu, i.mtu) {
                    o.insert("mtu".into(), json!(mtu));
                }
                if let Some(s) = &i.sandbox {
                    o.insert("sandbox".into(), json!(s));
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if with_ip_version {
                    o.insert("version".into(), json!(if ip.address.addr().is_ipv4() { "4" } else { "6" }));
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), json!(i));
                }
                o.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), json!(gw.to_string()));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self.routes.iter().map(route_json).collect();
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }

    fn encode_legacy(&self, version: &str) -> Value {
        let mut out = json!({ "cniVersion": version, "dns": {} });
        for (key, v4) in [("ip4", true), ("ip6", false)] {
            let Some(ip) = self.ips.iter().find(|i| i.address.addr().is_ipv4() == v4) else {
                continue;
            };
            let routes: Vec<Value> =
                self.routes.iter().filter(|r| r.dst.addr().is_ipv4() == v4).map(route_json).collect();
            let mut o = json!({ "ip": ip.address.to_string(), "routes": routes });
            if let Some(gw) = ip.gateway {
                o["gateway"] = json!(gw.to_string());
            }
            out[key] = o;
        }
        out
    }

    /// Reads a `prevResult` (0.3.0 and later layouts) for CHECK.
    pub fn decode(v: &Value) -> Result<CniResult, CniError> {
        let bad = |what: String| CniError::new(code::INVALID_CONFIG, format!("prevResult: {what}"));
        let parse_net = |s: &Value, field: &str| -> Result<IpNet, CniError> {
            s.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("{field} {s} is not an address/prefix")))
        };
        let parse_ip = |s: &Value, field: &str| -> Result<IpAddr, CniError> {
            s.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("{field} {s} is not an IP address")))
        };
        let mut out = CniResult::default();
        for (n, i) in v["interfaces"].as_array().into_iter().flatten().enumerate() {
            out.interfaces.push(Interface {
                name: i["name"].as_str().ok_or_else(|| bad(format!("interfaces[{n}].name is missing")))?.to_string(),
                mac: i["mac"].as_str().map(str::to_string),
                sandbox: i["sandbox"].as_str().map(str::to_string),
                mtu: i["mtu"].as_u64().map(|m| m as u32),
            });
        }
        for (n, ip) in v["ips"].as_array().into_iter().flatten().enumerate() {
            out.ips.push(IpConfig {
                address: parse_net(&ip["address"], &format!("ips[{n}].address"))?,
                gateway: match &ip["gateway"] {
                    Value::Null => None,
                    g => Some(parse_ip(g, &format!("ips[{n}].gateway"))?),
                },
                interface: ip["interface"].as_u64().map(|i| i as usize),
            });
        }
        for (n, r) in v["routes"].as_array().into_iter().flatten().enumerate() {
            out.routes.push(RouteEntry {
                dst: parse_net(&r["dst"], &format!("routes[{n}].dst"))?,
                gw: match &r["gw"] {
                    Value::Null => None,
                    g => Some(parse_ip(g, &format!("routes[{n}].gw"))?),
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result as ADD builds it for one IPv4 pod.
    pub(crate) fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: Some("0a:58:0a:f4:01:01".into()),
                    sandbox: None,
                    mtu: Some(1450),
                },
                Interface {
                    name: "veth0123456789a".into(),
                    mac: Some("6a:1f:00:00:00:01".into()),
                    sandbox: None,
                    mtu: Some(1450),
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:f4:01:02".into()),
                    sandbox: Some("/run/netns/pod".into()),
                    mtu: Some(1450),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(2),
            }],
            routes: vec![
                RouteEntry { dst: "10.244.0.0/16".parse().unwrap(), gw: Some("10.244.1.1".parse().unwrap()) },
                RouteEntry { dst: "0.0.0.0/0".parse().unwrap(), gw: Some("10.244.1.1".parse().unwrap()) },
            ],
        }
    }

    /// Golden files: one per supported version, in `tests/golden/`.
    #[test]
    fn golden_results_for_every_version() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        for v in crate::version::SUPPORTED {
            let got = serde_json::to_string_pretty(&sample().encode(v)).unwrap() + "\n";
            let path = dir.join(format!("result-{v}.json"));
            if netns_fixtures::update_golden() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create)", path.display()));
            assert_eq!(got, want, "result for cniVersion {v} differs from {}", path.display());
        }
    }

    #[test]
    fn decode_reads_what_encode_writes() {
        for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let back = CniResult::decode(&sample().encode(v)).unwrap();
            let mut want = sample();
            if v != "1.1.0" {
                for i in want.interfaces.iter_mut() {
                    i.mtu = None;
                }
            }
            assert_eq!(back, want, "version {v}");
        }
        let e = CniResult::decode(&json!({"ips":[{"address":"nope"}]})).unwrap_err();
        assert!(e.msg.contains("ips[0].address"), "{}", e.msg);
    }
}
