//! `subnet.env`: the node's lease as the daemon hands it to the CNI plugin.
//!
//! The format is flannel's, byte for byte, because flannel's own CNI plugin, our
//! plugin and third-party tools all read this file:
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//!
//! `FLANNEL_SUBNET` carries the node subnet's first host address (the bridge's
//! gateway address) with the subnet's prefix length.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

/// Keys of `subnet.env`, as flannel names them.
pub mod keys {
    /// The cluster's IPv4 network(s), comma separated.
    pub const NETWORK: &str = "FLANNEL_NETWORK";
    /// This node's IPv4 subnet, as gateway address / prefix.
    pub const SUBNET: &str = "FLANNEL_SUBNET";
    /// The cluster's IPv6 network(s), comma separated.
    pub const IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
    /// This node's IPv6 subnet, as gateway address / prefix.
    pub const IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
    /// MTU for pod interfaces.
    pub const MTU: &str = "FLANNEL_MTU";
    /// Whether the daemon masquerades traffic leaving the cluster network.
    pub const IPMASQ: &str = "FLANNEL_IPMASQ";
}

/// The parsed contents of `subnet.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// Cluster IPv4 networks (`FLANNEL_NETWORK`).
    pub networks: Vec<Ipv4Net>,
    /// This node's IPv4 subnet; `addr()` is the gateway (`FLANNEL_SUBNET`).
    pub subnet: Option<Ipv4Net>,
    /// Cluster IPv6 networks (`FLANNEL_IPV6_NETWORK`).
    pub ipv6_networks: Vec<Ipv6Net>,
    /// This node's IPv6 subnet; `addr()` is the gateway (`FLANNEL_IPV6_SUBNET`).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// Pod MTU (`FLANNEL_MTU`).
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: the daemon already masquerades, so the plugin need not.
    pub ipmasq: bool,
}

/// Why a `subnet.env` could not be read or parsed. Each variant names the file,
/// and where it applies the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file is absent: flanneld writes it once it holds a lease.
    #[error("{path} does not exist: the node's flanneld (flanneld-rs) is not running or has not acquired a subnet lease yet")]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not `KEY=VALUE`.
    #[error("{path}: line {line}: {text:?} is not KEY=VALUE")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A value does not parse.
    #[error("{path}: {key}={value:?}: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The raw value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required key is absent.
    #[error("{path}: {key} is missing")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The absent key.
        key: &'static str,
    },
}

impl SubnetEnv {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SubnetEnvError::Missing { path: path.to_path_buf() })
            }
            Err(source) => Err(SubnetEnvError::Io { path: path.to_path_buf(), source }),
        }
    }

    /// Parses `text`; `path` is used only in error messages. Unknown keys are
    /// ignored so that a newer daemon can add keys without breaking older plugins.
    pub fn parse(path: &Path, text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut networks = None;
        let mut subnet = None;
        let mut ipv6_networks = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        let bad = |key: &'static str, value: &str, reason: String| SubnetEnvError::Value {
            path: path.to_path_buf(),
            key,
            value: value.to_string(),
            reason,
        };
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(SubnetEnvError::Syntax { path: path.to_path_buf(), line: n + 1, text: raw.to_string() });
            };
            let value = value.trim();
            match key.trim() {
                keys::NETWORK => {
                    networks = Some(parse_list::<Ipv4Net>(value).map_err(|r| bad(keys::NETWORK, value, r))?)
                }
                keys::SUBNET => {
                    subnet = Some(value.parse::<Ipv4Net>().map_err(|e| bad(keys::SUBNET, value, e.to_string()))?)
                }
                keys::IPV6_NETWORK => {
                    ipv6_networks = Some(parse_list::<Ipv6Net>(value).map_err(|r| bad(keys::IPV6_NETWORK, value, r))?)
                }
                keys::IPV6_SUBNET => {
                    ipv6_subnet =
                        Some(value.parse::<Ipv6Net>().map_err(|e| bad(keys::IPV6_SUBNET, value, e.to_string()))?)
                }
                keys::MTU => {
                    let v: u32 = value.parse().map_err(|_| bad(keys::MTU, value, "not an unsigned integer".into()))?;
                    if !(68..=65535).contains(&v) {
                        return Err(bad(keys::MTU, value, "outside 68..=65535".into()));
                    }
                    mtu = Some(v);
                }
                keys::IPMASQ => {
                    ipmasq = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(keys::IPMASQ, value, "want true or false".into())),
                    })
                }
                _ => {}
            }
        }
        let missing = |key| SubnetEnvError::MissingKey { path: path.to_path_buf(), key };
        if subnet.is_some() && networks.is_none() {
            return Err(missing(keys::NETWORK));
        }
        if ipv6_subnet.is_some() && ipv6_networks.is_none() {
            return Err(missing(keys::IPV6_NETWORK));
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            return Err(missing(keys::SUBNET));
        }
        let env = SubnetEnv {
            networks: networks.unwrap_or_default(),
            subnet,
            ipv6_networks: ipv6_networks.unwrap_or_default(),
            ipv6_subnet,
            mtu: mtu.ok_or_else(|| missing(keys::MTU))?,
            ipmasq: ipmasq.ok_or_else(|| missing(keys::IPMASQ))?,
        };
        if let Some(s) = env.subnet {
            if s.prefix_len() > 30 {
                return Err(bad(keys::SUBNET, &s.to_string(), "prefix longer than /30 leaves no pod address".into()));
            }
            if !env.networks.iter().any(|n| n.contains(&s.network())) {
                return Err(bad(
                    keys::SUBNET,
                    &s.to_string(),
                    format!("not inside {}={}", keys::NETWORK, join(&env.networks)),
                ));
            }
        }
        if let Some(s) = env.ipv6_subnet {
            if s.prefix_len() > 126 {
                return Err(bad(
                    keys::IPV6_SUBNET,
                    &s.to_string(),
                    "prefix longer than /126 leaves no pod address".into(),
                ));
            }
            // As for IPv4: pods get routes to the cluster networks only, so
            // a subnet outside them would leave its pods unreachable.
            if !env.ipv6_networks.iter().any(|n| n.contains(&s.network())) {
                return Err(bad(
                    keys::IPV6_SUBNET,
                    &s.to_string(),
                    format!("not inside {}={}", keys::IPV6_NETWORK, join(&env.ipv6_networks)),
                ));
            }
        }
        Ok(env)
    }

    /// The file's text, in flannel's key order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.networks.is_empty() {
            let _ = writeln!(out, "{}={}", keys::NETWORK, join(&self.networks));
        }
        if let Some(s) = self.subnet {
            let _ = writeln!(out, "{}={}", keys::SUBNET, s);
        }
        if !self.ipv6_networks.is_empty() {
            let _ = writeln!(out, "{}={}", keys::IPV6_NETWORK, join(&self.ipv6_networks));
        }
        if let Some(s) = self.ipv6_subnet {
            let _ = writeln!(out, "{}={}", keys::IPV6_SUBNET, s);
        }
        let _ = writeln!(out, "{}={}", keys::MTU, self.mtu);
        let _ = writeln!(out, "{}={}", keys::IPMASQ, self.ipmasq);
        out
    }

    /// Writes the file atomically (a temporary file in the same directory, then
    /// rename), mode 0644, so a plugin never reads half a file.
    ///
    /// Nothing half-written is left: the temporary file is removed when any
    /// step fails, and the ones an earlier, killed writer of the same file
    /// left (`.<name>.<pid>.tmp`) are removed first.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        remove_stale_temporaries(dir, path);
        let (tmp, mut file) = tempfile_in(dir, path)?;
        let written = file
            .write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// `.<name>.<pid>.tmp`: where [`SubnetEnv::write_atomic`] writes before the rename.
fn temporary_name(target: &Path, pid: &str) -> String {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("subnet.env");
    format!(".{name}.{pid}.tmp")
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let tmp = dir.join(temporary_name(target, &std::process::id().to_string()));
    let file = std::fs::File::create(&tmp)?;
    Ok((tmp, file))
}

/// Removes the temporary files of `target` that writers killed before their
/// rename left in `dir` (best effort: a file that cannot be removed stays).
/// Only one writer writes a given file, so any but our own pid's is stale.
fn remove_stale_temporaries(dir: &Path, target: &Path) {
    let (prefix, suffix) = {
        let t = temporary_name(target, "\0");
        let (p, s) = t.split_once('\0').expect("the marker is in the name");
        (p.to_string(), s.to_string())
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let pid = name.strip_prefix(prefix.as_str()).and_then(|r| r.strip_suffix(suffix.as_str()));
        if pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn parse_list<T: std::str::FromStr>(value: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    let items: Result<Vec<T>, String> =
        value.split(',').map(|v| v.trim().parse::<T>().map_err(|e| format!("{v:?}: {e}"))).collect();
    let items = items?;
    if items.is_empty() {
        return Err("empty list".into());
    }
    Ok(items)
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let env = SubnetEnv::parse(Path::new("x"), SAMPLE).unwrap();
        // A killed writer's leftover, and a file that only looks alike.
        std::fs::write(dir.path().join(".subnet.env.4242.tmp"), "half").unwrap();
        std::fs::write(dir.path().join(".subnet.env.mine.tmp"), "keep").unwrap();
        env.write_atomic(&dir.path().join("subnet.env")).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [".subnet.env.mine.tmp", "subnet.env"]);
        // The rename fails (the target is a directory): the error, and no temporary file.
        std::fs::create_dir(dir.path().join("taken")).unwrap();
        assert!(env.write_atomic(&dir.path().join("taken")).is_err());
        assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.starts_with(".taken.") && n.ends_with(".tmp")
        }));
    }

    const SAMPLE: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        SubnetEnv::parse(Path::new("/run/flannel/subnet.env"), text)
    }

    #[test]
    fn parses_and_renders_flannels_format() {
        let env = parse(SAMPLE).unwrap();
        assert_eq!(env.networks, vec!["10.244.0.0/16".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(env.subnet.unwrap().to_string(), "10.244.1.1/24");
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(env.render(), SAMPLE);
    }

    #[test]
    fn dual_stack_and_lists() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        let env = parse(text).unwrap();
        assert_eq!(env.networks.len(), 2);
        assert_eq!(env.ipv6_subnet.unwrap().to_string(), "fc00:0:0:1::1/64");
        assert_eq!(env.render(), text);
    }

    #[test]
    fn errors_name_key_and_value() {
        let cases = [
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/33\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true",
                "FLANNEL_SUBNET=\"10.244.1.1/33\"",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=big\nFLANNEL_IPMASQ=true",
                "FLANNEL_MTU=\"big\"",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes",
                "FLANNEL_IPMASQ=\"yes\"",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true",
                "not inside FLANNEL_NETWORK=10.244.0.0/16",
            ),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true", "FLANNEL_SUBNET is missing"),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true",
                "FLANNEL_MTU is missing",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true",
                "FLANNEL_IPV6_SUBNET=\"fd00:0:0:1::1/64\": not inside FLANNEL_IPV6_NETWORK=fc00::/48",
            ),
            ("garbage\n", "line 1"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(err.contains("/run/flannel/subnet.env"), "{err:?} lacks the path");
        }
    }

    #[test]
    fn missing_file_blames_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let err = SubnetEnv::load(&dir.path().join("subnet.env")).unwrap_err().to_string();
        assert!(err.contains("flanneld"), "{err}");
    }

    #[test]
    fn write_atomic_round_trips_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flannel/subnet.env");
        let env = parse(SAMPLE).unwrap();
        env.write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::load(&path).unwrap(), env);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "temp file left behind");
    }
}
