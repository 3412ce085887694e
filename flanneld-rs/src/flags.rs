//! Command-line flags: flannel's names and defaults, in the syntax of Go's
//! flag package, which flannel's users write (`-iface=eth1`, `--ip-masq=1`,
//! `-etcd-endpoints http://...`): see [`normalize_args`]. Every flag can also
//! come from `FLANNELD_<FLAG_IN_UPPER_CASE_WITH_UNDERSCORES>` (klog's too:
//! `FLANNELD_V`), as flannel reads them; the command line wins, and an empty
//! variable counts as unset.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::logger::LogFormat;

/// flanneld-rs: flannel's per-node daemon, as a self-healing reconcile loop.
#[derive(Debug, Parser)]
#[command(name = "flanneld-rs", version, about, disable_version_flag = true, args_override_self = true)]
pub struct Cli {
    /// Print the version and exit.
    #[arg(long, action = ArgAction::Version)]
    pub version: Option<bool>,
    /// A tool instead of the daemon.
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// The daemon's options.
    #[command(flatten)]
    pub opts: Opts,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Compare the kernel with the lease store and say what differs; exit 0
    /// only when the node is converged.
    Diagnose {
        /// Machine-readable output.
        #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
        json: bool,
    },
}

/// A boolean flag Go-style: `--flag`, `--flag=<v>` with any spelling Go's
/// `strconv.ParseBool` takes (a value needs `=`, as in Go's flag package, so
/// `--ip-masq diagnose` means what it says).
macro_rules! go_bool {
    () => {
        ArgAction::Set
    };
}

/// The daemon's options.
#[derive(Debug, Clone, Args)]
pub struct Opts {
    /// Interface (name or IP) for inter-host traffic; repeat the flag to try
    /// several in order, first match wins (a value is never split on commas).
    #[arg(long, env = "FLANNELD_IFACE", action = ArgAction::Append, global = true)]
    pub iface: Vec<String>,
    /// Regex matched against interface addresses, then names; repeat the
    /// flag for several (tried after every --iface).
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append, global = true)]
    pub iface_regex: Vec<String>,
    /// Use the interface through which the kernel would route to this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", value_parser = parse_go_ip, global = true)]
    pub iface_can_reach: Option<IpAddr>,
    /// Address other nodes use to reach this one (default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IP", value_parser = parse_go_ip, global = true)]
    pub public_ip: Option<IpAddr>,
    /// IPv6 address other nodes use to reach this one (dual-stack; default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", value_parser = parse_go_ip, global = true)]
    pub public_ipv6: Option<IpAddr>,
    /// Take the lease from the Kubernetes API (the Node's podCIDR) instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", global = true)]
    pub kube_api_url: Option<String>,
    /// Kubeconfig file.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", global = true)]
    pub kubeconfig_file: Option<PathBuf>,
    /// Prefix of the node annotations: a DNS name, optionally with one `/`
    /// and a name part (`example.com/x` makes `example.com/x-backend-type`).
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = "flannel.alpha.coreos.com", global = true)]
    pub kube_annotation_prefix: String,
    /// etcd endpoints, comma separated (the last --etcd-endpoints wins, as in flannel).
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        action = ArgAction::Set,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        global = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = "/coreos.com/network", global = true)]
    pub etcd_prefix: String,
    /// TLS key for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", global = true)]
    pub etcd_keyfile: Option<PathBuf>,
    /// TLS certificate for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", global = true)]
    pub etcd_certfile: Option<PathBuf>,
    /// TLS CA for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", global = true)]
    pub etcd_cafile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", global = true)]
    pub etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", global = true)]
    pub etcd_password: Option<String>,
    /// Where to write the lease for the CNI plugin.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = "/run/flannel/subnet.env", global = true)]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires (0 < v < 1440).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value = "60", value_parser = parse_renew_margin, global = true)]
    pub subnet_lease_renew_margin: u32,
    /// Masquerade traffic leaving the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq: bool,
    /// Masquerade without --random-fully.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq_fully_random_disable: bool,
    /// Accept forwarded traffic from and to the cluster network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = parse_go_bool)]
    pub iptables_forward_rules: bool,
    /// Re-assert the firewall rules (and the blackhole route) every this many
    /// seconds (0: every second).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value = "5", value_parser = parse_resync, global = true)]
    pub iptables_resync: u64,
    /// net-conf.json (Kubernetes mode).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = "/etc/kube-flannel/net-conf.json", global = true)]
    pub net_config_path: PathBuf,
    /// Address (or host name) of the health and metrics listener; `::` for
    /// every IPv6 and IPv4 address.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0", global = true)]
    pub healthz_ip: String,
    /// Port of the health and metrics listener (0 or negative: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value = "0", value_parser = parse_healthz_port, global = true)]
    pub healthz_port: u16,
    /// Set the NetworkUnavailable node condition (Kubernetes mode).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = parse_go_bool)]
    pub set_node_network_unavailable: bool,
    /// Enforce Kubernetes NetworkPolicy for this node's pods (Kubernetes mode;
    /// needs the extra RBAC of deploy/network-policy.yml).
    #[arg(long, env = "FLANNELD_NETWORK_POLICY", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub network_policy: bool,
    /// Keep transmit checksum offload off on the VXLAN devices (`ethtool -K
    /// flannel.1 tx off`, kept by the reconcile), for kernels and
    /// kube-proxy versions (before 1.19) that send SNATed NodePort traffic
    /// onto the overlay with bad checksums. Off by default, as in flannel,
    /// whose documentation has users do it by hand: it costs throughput.
    #[arg(long, env = "FLANNELD_VXLAN_TX_CHECKSUM_OFF", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub vxlan_tx_checksum_off: bool,
    /// Keep a blackhole route for the node's own subnet (for CNI setups
    /// without the bridge, e.g. Canal), re-asserted with every resync.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_blackhole_route: bool,
    /// Log line format: `text` (timestamp, level, target, message) or `json`
    /// (one object per line). The filter comes from FLANNELD_LOG or RUST_LOG.
    #[arg(long, env = "FLANNELD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// klog's verbosity for flanneld-rs's own lines (`-v=4`, `--v 4`): 0-3
    /// info, 4-5 debug, 6 and more trace; wins over FLANNELD_LOG.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", value_name = "N", allow_negative_numbers = true, global = true)]
    pub v: Option<i32>,
    /// klog's per-file verbosity (`kube=4,vxlan*=6`): each pattern is matched
    /// against flanneld-rs's module names (`subnet::kube` is `kube`).
    #[arg(long = "vmodule", env = "FLANNELD_VMODULE", value_name = "PATTERN=N,...", value_parser = parse_vmodule, global = true)]
    pub vmodule: Option<VModule>,
    /// klog's `file.go:N` stack-trace trigger: accepted, and warned about at
    /// start (flanneld-rs has no Go source lines).
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT", value_name = "FILE:N", value_parser = parse_backtrace_at, global = true)]
    pub log_backtrace_at: Option<String>,
}

/// `-vmodule`: (glob pattern, level) pairs, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VModule(pub Vec<(String, i32)>);

/// Go's `strconv.ParseBool`: every spelling it takes, nothing else.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("not a boolean: want 1, t, T, TRUE, true, True, 0, f, F, FALSE, false or False".into()),
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`, which Go's flag package uses for
/// integer flags: an optional sign, then decimal, `0x` hex, `0o` or leading-`0`
/// octal, or `0b` binary, with `_` allowed between digits.
pub fn parse_go_int(s: &str) -> Result<i64, String> {
    let bad = || "not an integer (Go syntax: 42, 0x2a, 0o52, 052, 0b101010, 1_000)".to_string();
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d, true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d, true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d, true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..], true)
    } else {
        (10, lower.as_str(), false)
    };
    // Go's underscoreOK: each '_' separates two digits (or the base prefix
    // and a digit).
    let chars: Vec<char> = digits.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == '_' {
            let before_ok = if i == 0 { prefixed } else { chars[i - 1] != '_' };
            let after_ok = chars.get(i + 1).is_some_and(|n| *n != '_');
            if !before_ok || !after_ok {
                return Err(bad());
            }
        }
    }
    let clean: String = chars.iter().filter(|c| **c != '_').collect();
    if clean.is_empty() {
        return Err(bad());
    }
    let n = u64::from_str_radix(&clean, radix).map_err(|_| bad())?;
    match (neg, i64::try_from(n)) {
        (false, Ok(v)) => Ok(v),
        (true, Ok(v)) => Ok(-v),
        (true, Err(_)) if n == 1 << 63 => Ok(i64::MIN),
        _ => Err("out of range for a 64-bit integer".to_string()),
    }
}

/// Go's `net.ParseIP`: an IPv4 or IPv6 literal; an IPv4-mapped IPv6
/// address is the IPv4 address (as Go's `To4` sees it).
pub fn parse_go_ip(s: &str) -> Result<IpAddr, String> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Ok(v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))),
        Ok(v4) => Ok(v4),
        Err(_) => Err("not an IPv4 or IPv6 address".into()),
    }
}

fn parse_renew_margin(s: &str) -> Result<u32, String> {
    match parse_go_int(s)? {
        n @ 1..=1439 => Ok(n as u32),
        n => Err(format!("{n} is out of range: want 1 to 1439 minutes")),
    }
}

fn parse_resync(s: &str) -> Result<u64, String> {
    match parse_go_int(s)? {
        n if n < 0 => Err(format!("{n} is negative: want seconds, 0 or more")),
        n => Ok(n as u64),
    }
}

/// As flannel: a port of 0 or below turns the listener off.
fn parse_healthz_port(s: &str) -> Result<u16, String> {
    match parse_go_int(s)? {
        n if n <= 0 => Ok(0),
        n => u16::try_from(n).map_err(|_| format!("{n} is not a TCP port (1 to 65535; 0 for off)")),
    }
}

/// klog's `-vmodule` syntax: comma-separated `pattern=N`, empty items skipped.
pub fn parse_vmodule(s: &str) -> Result<VModule, String> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?} is not pattern=N (want a comma-separated list of pattern=N)");
        let (pattern, level) = item.split_once('=').ok_or_else(bad)?;
        if pattern.is_empty() || level.contains('=') {
            return Err(bad());
        }
        let level: i32 = level.parse().map_err(|_| bad())?;
        if level < 0 {
            return Err(bad());
        }
        out.push((pattern.to_string(), level));
    }
    Ok(VModule(out))
}

/// klog's `-log_backtrace_at` syntax: `file.go:N` (empty: none).
fn parse_backtrace_at(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let bad = || "want file.go:N".to_string();
    let (file, line) = s.rsplit_once(':').ok_or_else(bad)?;
    if file.is_empty() || line.parse::<u32>().is_err() {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// How a long flag takes its value, for [`normalize_args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// Only with `=` (booleans, `--help`, `--version`).
    OnlyWithEquals,
    /// With `=` or as the next argument, whatever that looks like.
    Value,
}

/// The long flags of the command and its subcommands.
fn long_flags() -> BTreeMap<String, Takes> {
    let mut cmd = Cli::command();
    // Built, so that every argument's number of values is settled.
    cmd.build();
    let mut out = BTreeMap::new();
    let mut add = |c: &clap::Command| {
        for a in c.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            let takes_next = a.get_action().takes_values() && a.get_num_args().is_some_and(|r| r.min_values() > 0);
            out.insert(long.to_string(), if takes_next { Takes::Value } else { Takes::OnlyWithEquals });
        }
    };
    add(&cmd);
    for sub in cmd.get_subcommands() {
        add(sub);
    }
    out.insert("help".into(), Takes::OnlyWithEquals);
    out
}

/// Rewrites a command line written for Go's flag package (flannel's) into
/// the form clap parses: `-flag` and `--flag` alike, `-flag value`,
/// `-flag=value` (`--flag=value` results). A value that follows its flag is
/// taken as is, even when it starts with `-` (as Go does). `-v 4`, `-v4`,
/// `-v=4`, single-letter flags, subcommands and everything after `--` pass
/// through unchanged.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let flags = long_flags();
    let mut it = args.into_iter().map(Into::into);
    let mut out: Vec<OsString> = it.next().into_iter().collect();
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            out.push(arg);
            out.extend(it);
            break;
        }
        let body = match s.strip_prefix("--").or_else(|| s.strip_prefix('-')) {
            Some(b) if !b.is_empty() && !b.starts_with('-') => b,
            _ => {
                out.push(arg);
                continue;
            }
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let single = !s.starts_with("--");
        match flags.get(name) {
            Some(Takes::Value) => match value {
                Some(v) => out.push(format!("--{name}={v}").into()),
                None => match it.next() {
                    Some(next) => {
                        let mut joined = OsString::from(format!("--{name}="));
                        joined.push(next);
                        out.push(joined);
                    }
                    None => out.push(format!("--{name}").into()),
                },
            },
            Some(Takes::OnlyWithEquals) => out.push(format!("--{s}", s = body).into()),
            // klog's -v with the level attached (`-v4`).
            None if single && name.len() > 1 && name.starts_with('v') && name[1..].parse::<i32>().is_ok() => {
                out.push(format!("--v={}", &name[1..]).into());
            }
            // One letter: a short flag for clap (`-h`, `-v`).
            None if single && name.chars().count() == 1 => out.push(arg),
            // Unknown: as a long flag, so that clap names it and suggests.
            None => out.push(format!("--{body}").into()),
        }
    }
    out
}

impl Cli {
    /// Parses a command line written the way flannel's users write it
    /// (see [`normalize_args`]), with `FLANNELD_*` for flags not given on it.
    ///
    /// The variables are read here rather than by clap, to read them as
    /// flannel does: an empty variable is unset, and a repeatable flag given
    /// on the command line is not added to from the environment. A bad value
    /// is refused naming the variable (flannel logs it and carries on with
    /// the default: a deliberate difference).
    pub fn parse_go<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut args = normalize_args(args);
        let documented = Cli::command();
        let envs: Vec<(String, String)> = documented
            .get_arguments()
            .filter_map(|a| Some((a.get_long()?.to_string(), a.get_env()?.to_str()?.to_string())))
            .collect();
        let cmd = documented.clone().mut_args(|a| a.env(None::<&str>));
        let given = |long: &str| {
            args.iter().filter_map(|a| a.to_str()).take_while(|a| *a != "--").any(|a| {
                a.strip_prefix("--").is_some_and(|f| f == long || f.starts_with(&format!("{long}=")))
                    || (long == "v" && a.starts_with("-v") && !a.starts_with("--"))
            })
        };
        let mut from_env = Vec::new();
        for (long, var) in &envs {
            let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else { continue };
            if given(long) {
                continue;
            }
            let mut arg = OsString::from(format!("--{long}="));
            arg.push(&value);
            // Alone, so that a bad value is blamed on the variable.
            if let Err(e) = cmd.clone().try_get_matches_from([OsString::from("flanneld-rs"), arg.clone()]) {
                let why = e.to_string();
                let why = why.lines().next().unwrap_or_default().trim_start_matches("error: ");
                return Err(cmd
                    .clone()
                    .error(clap::error::ErrorKind::InvalidValue, format!("{var}={}: {why}", value.to_string_lossy())));
            }
            from_env.push(arg);
        }
        // Right after the program name: before any subcommand or `--`.
        args.splice(1..1, from_env);
        match cmd.try_get_matches_from(&args) {
            Ok(m) => Cli::from_arg_matches(&m),
            // Help with the variables shown.
            Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {
                Err(documented.try_get_matches_from(&args).err().unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_go(std::iter::once("flanneld-rs").chain(args.iter().copied()))
    }

    #[test]
    fn go_flag_syntax_single_and_double_dash_with_and_without_equals() {
        let want = |o: &Opts| {
            assert_eq!(o.iface, ["eth1"]);
            assert_eq!(o.subnet_file, PathBuf::from("/tmp/s.env"));
            assert_eq!(o.etcd_endpoints, ["http://192.0.2.1:2379", "http://192.0.2.2:2379"]);
            assert!(o.ip_masq);
        };
        for args in [
            &[
                "-iface=eth1",
                "-subnet-file=/tmp/s.env",
                "-etcd-endpoints=http://192.0.2.1:2379,http://192.0.2.2:2379",
                "-ip-masq",
            ][..],
            &[
                "-iface",
                "eth1",
                "-subnet-file",
                "/tmp/s.env",
                "-etcd-endpoints",
                "http://192.0.2.1:2379,http://192.0.2.2:2379",
                "-ip-masq=true",
            ],
            &[
                "--iface=eth1",
                "--subnet-file=/tmp/s.env",
                "--etcd-endpoints=http://192.0.2.1:2379,http://192.0.2.2:2379",
                "--ip-masq=1",
            ],
            &[
                "--iface",
                "eth1",
                "--subnet-file",
                "/tmp/s.env",
                "--etcd-endpoints",
                "http://192.0.2.1:2379,http://192.0.2.2:2379",
                "--ip-masq",
            ],
        ] {
            want(&parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).opts);
        }
        // A value that starts with '-' is taken as the value, as Go does.
        assert_eq!(parse(&["-iface-regex", "-eth$"]).unwrap().opts.iface_regex, ["-eth$"]);
        assert_eq!(parse(&["--etcd-prefix", "-x"]).unwrap().opts.etcd_prefix, "-x");
        // The last of a repeated single-value flag wins, as in Go.
        let o = parse(&["-ip-masq", "-ip-masq=false", "-etcd-prefix=/a", "-etcd-prefix=/b"]).unwrap().opts;
        assert!(!o.ip_masq);
        assert_eq!(o.etcd_prefix, "/b");
        let o = parse(&[
            "-etcd-endpoints=http://192.0.2.1:2379,http://192.0.2.2:2379",
            "-etcd-endpoints=http://192.0.2.3:2379",
        ]);
        assert_eq!(o.unwrap().opts.etcd_endpoints, ["http://192.0.2.3:2379"]);
        // After `--` nothing is a flag.
        assert!(parse(&["--", "-ip-masq"]).is_err());
        // The subcommand and its flag in either form; global flags after it.
        for args in [&["diagnose", "-json"][..], &["-iface=eth1", "diagnose", "--json=T", "-v=4"]] {
            let cli = parse(args).unwrap();
            assert!(matches!(cli.cmd, Some(Cmd::Diagnose { json: true })), "{args:?}");
        }
        assert!(matches!(parse(&["diagnose"]).unwrap().cmd, Some(Cmd::Diagnose { json: false })));
        // Unknown flags are refused by name, whatever the dashes.
        for args in [&["-no-such-flag"][..], &["--no-such-flag=1"], &["-logtostderr"]] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains("--no-such-flag") || e.contains("--logtostderr"), "{e}");
        }
    }

    #[test]
    fn every_go_boolean_spelling() {
        for v in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(parse(&[&format!("--ip-masq={v}")]).unwrap().opts.ip_masq, "{v}");
            assert!(parse(&[&format!("-kube-subnet-mgr={v}")]).unwrap().opts.kube_subnet_mgr, "{v}");
            assert_eq!(parse_go_bool(v), Ok(true));
        }
        for v in ["0", "f", "F", "FALSE", "false", "False"] {
            assert!(!parse(&[&format!("-iptables-forward-rules={v}")]).unwrap().opts.iptables_forward_rules, "{v}");
            assert_eq!(parse_go_bool(v), Ok(false));
        }
        for v in ["yes", "on", "tRUE", "2", ""] {
            let e = parse(&[&format!("--ip-masq={v}")]).unwrap_err().to_string();
            assert!(e.contains("--ip-masq") && e.contains(&format!("'{v}'")) && e.contains("not a boolean"), "{e}");
        }
    }

    #[test]
    fn go_integers() {
        let cases = [("42", 42), ("+42", 42), ("-7", -7), ("0x2A", 42), ("0o52", 42), ("052", 42), ("0b101010", 42)];
        for (s, n) in cases {
            assert_eq!(parse_go_int(s), Ok(n), "{s}");
        }
        assert_eq!(parse_go_int("1_000"), Ok(1000));
        assert_eq!(parse_go_int("0x_1F"), Ok(31));
        assert_eq!(parse_go_int("0"), Ok(0));
        for s in ["", "-", "1__0", "_1", "1_", "0x", "08", "1e3", "ten", "9223372036854775808"] {
            assert!(parse_go_int(s).is_err(), "{s}");
        }
        assert_eq!(parse_go_int("-9223372036854775808"), Ok(i64::MIN));
        let o =
            parse(&["-subnet-lease-renew-margin=0x10", "-iptables-resync", "010", "-healthz-port=8_471"]).unwrap().opts;
        assert_eq!((o.subnet_lease_renew_margin, o.iptables_resync, o.healthz_port), (16, 8, 8471));
        // As in flannel, a negative port turns the listener off.
        assert_eq!(parse(&["-healthz-port=-1"]).unwrap().opts.healthz_port, 0);
        for (args, flag) in [
            (&["-healthz-port=65536"][..], "--healthz-port"),
            (&["-iptables-resync=-1"], "--iptables-resync"),
            (&["-subnet-lease-renew-margin=1440"], "--subnet-lease-renew-margin"),
            (&["-subnet-lease-renew-margin", "0"], "--subnet-lease-renew-margin"),
            (&["-healthz-port=http"], "--healthz-port"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn addresses_as_go_parses_them() {
        let o =
            parse(&["-public-ip=2001:db8::1", "-iface-can-reach", "::ffff:192.0.2.9", "-healthz-ip=::"]).unwrap().opts;
        assert_eq!(o.public_ip, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(o.iface_can_reach, Some("192.0.2.9".parse().unwrap()), "IPv4-mapped is IPv4, as Go's To4 sees it");
        assert_eq!(o.healthz_ip, "::");
        assert_eq!(
            parse(&["-public-ipv6=2001:db8::2"]).unwrap().opts.public_ipv6,
            Some("2001:db8::2".parse().unwrap())
        );
        let e = parse(&["-iface-can-reach=gateway"]).unwrap_err().to_string();
        assert!(e.contains("--iface-can-reach") && e.contains("gateway"), "{e}");
    }

    #[test]
    fn iface_and_iface_regex_are_never_split_on_commas() {
        let o = parse(&["-iface-regex", "^10\\.[0-9]{1,3}\\.", "--iface-regex=^eth[0-9]{1,2}$", "-iface=a,b"])
            .unwrap()
            .opts;
        assert_eq!(o.iface_regex, ["^10\\.[0-9]{1,3}\\.", "^eth[0-9]{1,2}$"]);
        assert_eq!(o.iface, ["a,b"]);
    }

    #[test]
    fn klog_flags() {
        for args in [&["-v=10"][..], &["--v=10"], &["-v", "10"], &["--v", "10"], &["-v10"]] {
            assert_eq!(parse(args).unwrap().opts.v, Some(10), "{args:?}");
        }
        assert_eq!(parse(&["-v=-1"]).unwrap().opts.v, Some(-1));
        let o = parse(&["-vmodule=kube=4,vxlan*=6,,", "-log_backtrace_at=main.go:120"]).unwrap().opts;
        assert_eq!(o.vmodule, Some(VModule(vec![("kube".into(), 4), ("vxlan*".into(), 6)])));
        assert_eq!(o.log_backtrace_at.as_deref(), Some("main.go:120"));
        assert_eq!(parse(&["--vmodule", "subnet/*=2"]).unwrap().opts.vmodule.unwrap().0.len(), 1);
        for (args, flag) in [
            (&["-vmodule=kube"][..], "--vmodule"),
            (&["-vmodule=kube=x"], "--vmodule"),
            (&["-vmodule==4"], "--vmodule"),
            (&["-vmodule=kube=-1"], "--vmodule"),
            (&["-log_backtrace_at=main.go"], "--log_backtrace_at"),
            (&["-log_backtrace_at=main.go:x"], "--log_backtrace_at"),
            (&["-v=loud"], "-v"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn flannels_defaults() {
        let o = parse(&[]).unwrap().opts;
        assert_eq!(o.etcd_endpoints, ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]);
        assert_eq!(o.etcd_prefix, "/coreos.com/network");
        assert_eq!(o.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(o.subnet_lease_renew_margin, 60);
        assert!(!o.ip_masq);
        assert!(o.iptables_forward_rules);
        assert_eq!(o.iptables_resync, 5);
        assert_eq!(o.healthz_port, 0);
        assert_eq!(o.kube_annotation_prefix, "flannel.alpha.coreos.com");
    }

    #[test]
    fn go_style_booleans_and_repeats() {
        let o = parse(&["--ip-masq", "--iptables-forward-rules=false", "--iface", "eth1", "--iface=10.0.0.1"])
            .unwrap()
            .opts;
        assert!(o.ip_masq);
        assert!(!o.iptables_forward_rules);
        assert_eq!(o.iface, ["eth1", "10.0.0.1"]);
        assert!(parse(&["--subnet-lease-renew-margin", "1440"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin", "0"]).is_err());
        let e = parse(&["--public-ip", "nope"]).unwrap_err().to_string();
        assert!(e.contains("--public-ip") && e.contains("nope"), "{e}");
    }

    #[test]
    fn log_format_and_klog_verbosity() {
        let o = parse(&[]).unwrap().opts;
        assert_eq!((o.log_format, o.v), (LogFormat::Text, None));
        assert_eq!(parse(&["--log-format", "json"]).unwrap().opts.log_format, LogFormat::Json);
        assert_eq!(parse(&["--log-format=text"]).unwrap().opts.log_format, LogFormat::Text);
        let e = parse(&["--log-format", "xml"]).unwrap_err().to_string();
        assert!(e.contains("--log-format") && e.contains("xml"), "{e}");
        for args in [&["-v", "4"][..], &["-v4"], &["-v=4"], &["--v=4"], &["--v", "4"]] {
            assert_eq!(parse(args).unwrap().opts.v, Some(4), "{args:?}");
        }
        // Global, like every daemon flag: also after the subcommand.
        let cli = parse(&["diagnose", "-v", "6", "--log-format", "json"]).unwrap();
        assert!(matches!(cli.cmd, Some(Cmd::Diagnose { .. })));
        assert_eq!((cli.opts.v, cli.opts.log_format), (Some(6), LogFormat::Json));
        let e = parse(&["-v", "loud"]).unwrap_err().to_string();
        assert!(e.contains("-v") && e.contains("loud"), "{e}");
    }
}
