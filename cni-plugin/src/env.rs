//! The runtime's `CNI_*` environment variables.

use std::ffi::OsString;

use crate::error::{code, CniError};

/// The verb the runtime asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Report readiness.
    Status,
    /// Release what no valid attachment holds.
    Gc,
    /// List supported versions.
    Version,
}

impl Command {
    /// The `CNI_COMMAND` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// The parsed environment.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`, empty when the runtime gave none (DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
}

/// The `CNI_ARGS` pairs we understand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IP=`: specific addresses the runtime asks for, comma-separated as
    /// host-local reads them (one per family on a dual-stack node).
    pub ips: Vec<std::net::IpAddr>,
    /// `K8S_POD_NAMESPACE`/`K8S_POD_NAME`, recorded for humans.
    pub pod: Option<(String, String)>,
}

/// Rejects a `CNI_*` variable whose value is not UTF-8 (code 4, naming it).
/// Read as a `String` it would look unset ("CNI_IFNAME is not set"), and a
/// lossy conversion would pass for another name or path than the runtime's.
pub fn reject_non_utf8(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<(), CniError> {
    for (key, value) in vars {
        let Some(key) = key.to_str().filter(|k| k.starts_with("CNI_")) else { continue };
        if value.to_str().is_none() {
            return Err(CniError::new(code::INVALID_ENV, format!("{key}={value:?} is not valid UTF-8")));
        }
    }
    Ok(())
}

/// Reads `CNI_COMMAND`.
pub fn command(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    let raw = get("CNI_COMMAND").unwrap_or_default();
    Ok(match raw.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        "VERSION" => Command::Version,
        "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
            ))
        }
    })
}

/// Reads the variables `cmd` needs, rejecting absent or malformed ones (code 4).
pub fn load(cmd: Command, get: &dyn Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
    let mut env = load_attachment(cmd, get)?;
    if matches!(cmd, Command::Add | Command::Del | Command::Check) {
        env.args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
    }
    Ok(env)
}

/// Like [`load`] but leaves `CNI_ARGS` alone: for a delegated configuration,
/// whose plugins read it themselves.
pub fn load_attachment(cmd: Command, get: &dyn Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
    let mut env = CniEnv::default();
    let needs_attachment = matches!(cmd, Command::Add | Command::Del | Command::Check);
    if !needs_attachment {
        return Ok(env);
    }
    let required = |key: &str| -> Result<String, CniError> {
        match get(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CniError::new(code::INVALID_ENV, format!("{key} is not set"))),
        }
    };
    env.container_id = required("CNI_CONTAINERID")?;
    validate_container_id(&env.container_id)?;
    env.ifname = required("CNI_IFNAME")?;
    validate_ifname(&env.ifname)?;
    env.netns = if cmd == Command::Del { get("CNI_NETNS").unwrap_or_default() } else { required("CNI_NETNS")? };
    Ok(env)
}

/// The spec's container ID rule: starts alphanumeric, then `[A-Za-z0-9_.-]`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID={id:?}: must start with a letter or digit and hold only letters, digits, '_', '.', '-'"),
        ))
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not `.`/`..`.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME={name:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"),
        ))
    }
}

/// Parses `K=V;K=V`. Keys we do not know are an error unless `IgnoreUnknown`
/// is true, as libcni's argument loader does; the order of pairs is free.
pub fn parse_args(raw: &str) -> Result<CniArgs, CniError> {
    let mut pairs = Vec::new();
    for part in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("CNI_ARGS: {part:?} is not KEY=VALUE")))?;
        pairs.push((k, v));
    }
    let ignore_unknown =
        pairs.iter().any(|(k, v)| *k == "IgnoreUnknown" && matches!(v.to_ascii_lowercase().as_str(), "1" | "true"));
    let mut args = CniArgs::default();
    let (mut ns, mut name) = (None, None);
    for (k, v) in pairs {
        match k {
            "IgnoreUnknown" | "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
            "K8S_POD_NAMESPACE" => ns = Some(v.to_string()),
            "K8S_POD_NAME" => name = Some(v.to_string()),
            "IP" => {
                args.ips = v
                    .split(',')
                    .map(|one| {
                        one.trim().parse().map_err(|_| {
                            CniError::new(
                                code::INVALID_ENV,
                                format!("CNI_ARGS: IP={v:?}: {:?} is not an IP address", one.trim()),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            other if !ignore_unknown => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: unknown key {other:?} (add IgnoreUnknown=1 to pass it anyway)"),
                ))
            }
            _ => {}
        }
    }
    if let (Some(ns), Some(name)) = (ns, name) {
        args.pod = Some((ns, name));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn getter(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn args_in_any_order_with_ignore_unknown() {
        let a = parse_args("K8S_POD_NAME=web;Foo=bar;IgnoreUnknown=1;K8S_POD_NAMESPACE=default").unwrap();
        assert_eq!(a.pod, Some(("default".into(), "web".into())));
        let e = parse_args("Foo=bar").unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("Foo"));
        assert_eq!(parse_args("IP=10.244.1.9").unwrap().ips, ["10.244.1.9".parse::<std::net::IpAddr>().unwrap()]);
        let both: Vec<std::net::IpAddr> = vec!["10.244.1.9".parse().unwrap(), "2001:db8:10:1::9".parse().unwrap()];
        assert_eq!(parse_args("IP=10.244.1.9, 2001:db8:10:1::9").unwrap().ips, both);
        let e = parse_args("IP=10.244.1.9,nope").unwrap_err();
        assert_eq!((e.code, e.msg.contains("\"nope\" is not an IP address")), (code::INVALID_ENV, true), "{}", e.msg);
        assert_eq!(parse_args("IP=nope").unwrap_err().code, 4);
        assert_eq!(parse_args("novalue").unwrap_err().code, 4);
        assert_eq!(parse_args("").unwrap(), CniArgs::default());
    }

    #[test]
    fn a_variable_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(b"eth\xff".to_vec());
        let e = reject_non_utf8([("PATH".into(), "/bin".into()), ("CNI_IFNAME".into(), bad.clone())]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.starts_with("CNI_IFNAME=") && e.msg.contains("not valid UTF-8"), "{}", e.msg);
        // Only CNI_* variables are the runtime's business.
        assert!(reject_non_utf8([("OTHER".into(), bad)]).is_ok());
    }

    #[test]
    fn required_variables_per_command() {
        let full = [("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/run/netns/x"), ("CNI_IFNAME", "eth0")];
        assert!(load(Command::Add, &getter(&full)).is_ok());
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let pairs: Vec<_> = full.iter().copied().filter(|(k, _)| *k != missing).collect();
            let e = load(Command::Add, &getter(&pairs)).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains(missing), "{}", e.msg);
        }
        let del = [("CNI_CONTAINERID", "abc"), ("CNI_NETNS", ""), ("CNI_IFNAME", "eth0")];
        assert_eq!(load(Command::Del, &getter(&del)).unwrap().netns, "");
        assert!(load(Command::Status, &getter(&[])).is_ok());
        let bad_if = [("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "a/b")];
        assert_eq!(load(Command::Add, &getter(&bad_if)).unwrap_err().code, 4);
        let bad_id = [("CNI_CONTAINERID", "-abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")];
        assert_eq!(load(Command::Add, &getter(&bad_id)).unwrap_err().code, 4);
        assert_eq!(command(&getter(&[("CNI_COMMAND", "FOO")])).unwrap_err().code, 4);
        assert_eq!(command(&getter(&[])).unwrap_err().code, 4);
    }
}
