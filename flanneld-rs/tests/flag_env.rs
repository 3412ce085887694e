//! `FLANNELD_*` variables, read as flannel reads them (its flags' syntax,
//! Go's booleans, an empty variable as unset). One test in its own process:
//! the environment is process-wide.

use flanneld_rs::flags::Cli;

fn parse(args: &[&str]) -> Result<Cli, String> {
    Cli::parse_go(std::iter::once("flanneld-rs").chain(args.iter().copied())).map_err(|e| e.to_string())
}

#[test]
fn flanneld_variables_take_what_the_flags_take() {
    // SAFETY (of the env calls): the only test in this binary, no other threads.
    for v in ["1", "t", "T", "TRUE", "true", "True"] {
        std::env::set_var("FLANNELD_IP_MASQ", v);
        assert!(parse(&[]).unwrap().opts.ip_masq, "FLANNELD_IP_MASQ={v}");
    }
    for v in ["0", "f", "F", "FALSE", "false", "False"] {
        std::env::set_var("FLANNELD_IP_MASQ", v);
        assert!(!parse(&[]).unwrap().opts.ip_masq, "FLANNELD_IP_MASQ={v}");
    }
    // The command line wins.
    std::env::set_var("FLANNELD_IP_MASQ", "1");
    assert!(!parse(&["-ip-masq=false"]).unwrap().opts.ip_masq);
    std::env::set_var("FLANNELD_IP_MASQ", "yes");
    let e = parse(&[]).unwrap_err();
    assert!(e.contains("FLANNELD_IP_MASQ=yes") && e.contains("--ip-masq") && e.contains("not a boolean"), "{e}");
    // Empty is unset, as flannel's flagutil reads it.
    std::env::set_var("FLANNELD_IP_MASQ", "");
    std::env::set_var("FLANNELD_IFACE", "");
    std::env::set_var("FLANNELD_HEALTHZ_PORT", "");
    let o = parse(&[]).unwrap().opts;
    assert!(!o.ip_masq && o.iface.is_empty() && o.healthz_port == 0);
    // One entry, not split on commas (flannel appends the whole value).
    std::env::set_var("FLANNELD_IFACE", "eth0,eth1");
    std::env::set_var("FLANNELD_IFACE_REGEX", "^10\\.[0-9]{1,3}\\.");
    let o = parse(&[]).unwrap().opts;
    assert_eq!(o.iface, ["eth0,eth1"]);
    assert_eq!(o.iface_regex, ["^10\\.[0-9]{1,3}\\."]);
    // klog's flags too, and Go's integers.
    std::env::set_var("FLANNELD_V", "10");
    std::env::set_var("FLANNELD_VMODULE", "kube=4");
    std::env::set_var("FLANNELD_HEALTHZ_PORT", "0x1f90");
    let o = parse(&[]).unwrap().opts;
    assert_eq!((o.v, o.healthz_port), (Some(10), 8080));
    assert_eq!(o.vmodule.unwrap().0, [("kube".to_string(), 4)]);
    std::env::set_var("FLANNELD_HEALTHZ_PORT", "http");
    let e = parse(&[]).unwrap_err();
    assert!(e.contains("FLANNELD_HEALTHZ_PORT=http") && e.contains("--healthz-port"), "{e}");
}
