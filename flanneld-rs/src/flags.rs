//! Command-line flags: flannel's names and defaults. Every flag can also come
//! from `FLANNELD_<FLAG_IN_UPPER_CASE_WITH_UNDERSCORES>`; the command line wins.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::logger::LogFormat;

/// flanneld-rs: flannel's per-node daemon, as a self-healing reconcile loop.
#[derive(Debug, Parser)]
#[command(name = "flanneld-rs", version, about, disable_version_flag = true)]
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
        #[arg(long)]
        json: bool,
    },
}

/// A boolean flag Go-style: `--flag`, `--flag=true`, `--flag=false` (a value
/// needs `=`, as in Go's flag package, so `--ip-masq diagnose` means what it says).
macro_rules! go_bool {
    () => {
        ArgAction::Set
    };
}

/// The daemon's options.
#[derive(Debug, Clone, Args)]
pub struct Opts {
    /// Interface (name or IP) for inter-host traffic; repeatable, first match wins.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',', global = true)]
    pub iface: Vec<String>,
    /// Regex matched against interface addresses, then names; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',', global = true)]
    pub iface_regex: Vec<String>,
    /// Use the interface through which the kernel would route to this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", global = true)]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// Address other nodes use to reach this one (default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IP", global = true)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 public address (accepted; IPv6 is not implemented yet).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", global = true)]
    pub public_ipv6: Option<String>,
    /// Take the lease from the Kubernetes API (the Node's podCIDR) instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", global = true)]
    pub kube_api_url: Option<String>,
    /// Kubeconfig file.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", global = true)]
    pub kubeconfig_file: Option<PathBuf>,
    /// Prefix of the node annotations.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = "flannel.alpha.coreos.com", global = true)]
    pub kube_annotation_prefix: String,
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
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
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..1440), global = true)]
    pub subnet_lease_renew_margin: u32,
    /// Masquerade traffic leaving the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub ip_masq: bool,
    /// Masquerade without --random-fully.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub ip_masq_fully_random_disable: bool,
    /// Accept forwarded traffic from and to the cluster network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true")]
    pub iptables_forward_rules: bool,
    /// Re-assert the firewall rules every this many seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5, global = true)]
    pub iptables_resync: u64,
    /// net-conf.json (Kubernetes mode).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = "/etc/kube-flannel/net-conf.json", global = true)]
    pub net_config_path: PathBuf,
    /// Address of the health and metrics listener.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0", global = true)]
    pub healthz_ip: Ipv4Addr,
    /// Port of the health and metrics listener (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0, global = true)]
    pub healthz_port: u16,
    /// Set the NetworkUnavailable node condition (Kubernetes mode).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true")]
    pub set_node_network_unavailable: bool,
    /// Enforce Kubernetes NetworkPolicy for this node's pods (Kubernetes mode;
    /// needs the extra RBAC of deploy/network-policy.yml).
    #[arg(long, env = "FLANNELD_NETWORK_POLICY", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub network_policy: bool,
    /// Install a blackhole route for the node's subnet.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", global = true, action = go_bool!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub ip_blackhole_route: bool,
    /// Log line format: `text` (timestamp, level, target, message) or `json`
    /// (one object per line). The filter comes from FLANNELD_LOG or RUST_LOG.
    #[arg(long, env = "FLANNELD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// klog's verbosity for flanneld-rs's own lines (`-v 4`, `--v=4`): 0-3
    /// info, 4-5 debug, 6 and more trace; wins over FLANNELD_LOG. A klog flag,
    /// so, as in flannel, not read from the environment.
    #[arg(short = 'v', long = "v", value_name = "N", global = true)]
    pub v: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flanneld-rs").chain(args.iter().copied()))
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
