//! Interface selection against real links in a throw-away namespace.

use flannel_net::netlink::Netlink;
use flannel_net::netns::NetNs;
use flanneld_rs::flags::Cli;
use flanneld_rs::iface::{select, ExtIface};
use netns_fixtures::{require_root, Netns};

/// A namespace with `eth0` 192.0.2.10/24 (default route), `eth1`
/// 198.51.100.10/24 and `ens5` 203.0.113.10/24 (bridges stand in for NICs).
fn host() -> Netns {
    let ns = Netns::new("iface").unwrap();
    for (name, addr) in [("eth0", "192.0.2.10/24"), ("eth1", "198.51.100.10/24"), ("ens5", "203.0.113.10/24")] {
        ns.run_ok("ip", &["link", "add", name, "mtu", "1500", "type", "bridge"]);
        ns.run_ok("ip", &["addr", "add", addr, "dev", name]);
        ns.run_ok("ip", &["link", "set", name, "up"]);
    }
    ns.run_ok("ip", &["route", "add", "default", "via", "192.0.2.1", "dev", "eth0", "onlink"]);
    ns
}

fn pick(ns: &Netns, args: &[&str]) -> Result<ExtIface, String> {
    let cli = Cli::parse_go(std::iter::once("flanneld-rs").chain(args.iter().copied())).unwrap();
    let selection = flanneld_rs::iface::Selection::from_opts(&cli.opts).map_err(|e| e.to_string())?;
    NetNs::open(ns.path())
        .unwrap()
        .run(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let nl = Netlink::connect().unwrap();
                select(&nl, &selection).await.map_err(|e| e.to_string())
            })
        })
        .unwrap()
}

#[test]
fn every_selection_rule() {
    if !require_root() {
        return;
    }
    let ns = host();
    let name = |args: &[&str]| pick(&ns, args).map(|e| (e.name, e.public_ip.to_string()));
    // Default: the default route's interface.
    assert_eq!(name(&[]).unwrap(), ("eth0".into(), "192.0.2.10".into()));
    // --iface by name and by address; first match wins.
    assert_eq!(name(&["--iface", "eth1"]).unwrap().0, "eth1");
    assert_eq!(name(&["--iface", "203.0.113.10"]).unwrap().0, "ens5");
    assert_eq!(name(&["--iface", "nope", "--iface", "ens5", "--iface", "eth1"]).unwrap().0, "ens5");
    // --iface-regex: addresses first, then names.
    assert_eq!(name(&["--iface-regex", "^198\\.51\\."]).unwrap().0, "eth1");
    assert_eq!(name(&["--iface-regex", "^ens[0-9]+$"]).unwrap().0, "ens5");
    // --iface-can-reach: the interface the kernel would route through.
    assert_eq!(name(&["--iface-can-reach", "198.51.100.77"]).unwrap().0, "eth1");
    assert_eq!(name(&["--iface-can-reach", "10.1.2.3"]).unwrap().0, "eth0");
    // --public-ip: the interface that holds it, advertised as given.
    assert_eq!(name(&["--public-ip", "203.0.113.10"]).unwrap(), ("ens5".into(), "203.0.113.10".into()));
    // --public-ip that no interface holds, alone: flannel stops (it looks
    // for the interface holding it); with --iface it is advertised as given.
    let e = pick(&ns, &["--public-ip", "203.0.113.99"]).unwrap_err();
    assert!(e.contains("--public-ip 203.0.113.99") && e.contains("give --iface"), "{e}");
    assert_eq!(name(&["-iface=eth1", "-public-ip=203.0.113.99"]).unwrap(), ("eth1".into(), "203.0.113.99".into()));
    assert_eq!(
        name(&["-iface-regex=^eth0$", "-public-ip=203.0.113.99"]).unwrap(),
        ("eth0".into(), "203.0.113.99".into())
    );
    // FLANNELD_* environment (through clap's env support) is covered by the daemon's tests.
    // Nothing matches: the error names what was tried and what exists.
    let e = pick(&ns, &["--iface", "wlan0", "--iface", "10.9.9.9"]).unwrap_err();
    assert!(e.contains("wlan0") && e.contains("10.9.9.9") && e.contains("eth1 [198.51.100.10/24]"), "{e}");
    let e = pick(&ns, &["--iface-regex", "^zzz"]).unwrap_err();
    assert!(e.contains("^zzz"), "{e}");
    let e = pick(&ns, &["--iface-regex", "("]).unwrap_err();
    assert!(e.contains("not a regular expression"), "{e}");
    // A value is one entry: a comma does not make two.
    let e = pick(&ns, &["--iface", "eth1,ens5"]).unwrap_err();
    assert!(e.contains("repeat --iface"), "{e}");
    // A regex with a comma in it is one regex.
    assert_eq!(name(&["-iface-regex", "^203\\.0\\.113\\.[0-9]{1,3}$"]).unwrap().0, "ens5");
    let mtu = pick(&ns, &["--iface", "eth1"]).unwrap().mtu;
    assert_eq!(mtu, 1500);
}

#[test]
fn no_default_route_and_nothing_named_is_a_clear_error() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("iface2").unwrap();
    let e = pick(&ns, &[]).unwrap_err();
    assert!(e.contains("no default route"), "{e}");
}

#[test]
fn selection_falls_through_as_flannels_does() {
    if !require_root() {
        return;
    }
    let ns = host();
    let name = |args: &[&str]| pick(&ns, args).map(|e| e.name);
    // --iface entries that match nothing, then the regexes, then can-reach.
    assert_eq!(name(&["-iface=wlan0", "-iface-regex=^ens"]).unwrap(), "ens5");
    assert_eq!(name(&["-iface=wlan0", "-iface-regex=^zzz", "-iface-can-reach=198.51.100.7"]).unwrap(), "eth1");
    assert_eq!(name(&["-iface-regex=(", "-iface-regex=^eth1$"]).unwrap(), "eth1", "a bad regex is passed over");
    // The first kind that matches wins, whatever the order on the command line.
    assert_eq!(name(&["-iface-can-reach=198.51.100.7", "-iface=ens5"]).unwrap(), "ens5");
    // Nothing at all: every attempt is named.
    ns.run_ok("ip", &["route", "add", "unreachable", "203.0.113.128/25"]);
    let e = pick(&ns, &["-iface=wlan0", "-iface-regex=^zzz", "-iface-can-reach=203.0.113.200"]).unwrap_err();
    assert!(
        e.contains("--iface wlan0")
            && e.contains("--iface-regex ^zzz")
            && e.contains("--iface-can-reach 203.0.113.200"),
        "{e}"
    );
    // An interface matched by name without an IPv4 address is no match.
    ns.run_ok("ip", &["link", "add", "eth9", "type", "bridge"]);
    assert_eq!(name(&["-iface=eth9", "-iface=eth1"]).unwrap(), "eth1");
    // A link-local address does when nothing better is there (flannel's order).
    ns.run_ok("ip", &["addr", "add", "169.254.7.7/16", "dev", "eth9"]);
    let e = pick(&ns, &["-iface=eth9"]).unwrap();
    assert_eq!(e.addr.to_string(), "169.254.7.7/16");
    ns.run_ok("ip", &["addr", "add", "192.0.2.99/32", "dev", "eth9"]);
    assert_eq!(pick(&ns, &["-iface=eth9"]).unwrap().addr.to_string(), "192.0.2.99/32");
    // IPv6 values are refused by name (no dual-stack yet); an IPv4-mapped
    // one is its IPv4 address, as in Go.
    for args in [&["-iface-can-reach=2001:db8::1"][..], &["-public-ip=2001:db8::1", "-iface=eth1"]] {
        let e = pick(&ns, args).unwrap_err();
        assert!(e.contains("2001:db8::1") && e.contains("IPv6 is not supported yet"), "{e}");
    }
    let e = pick(&ns, &["-iface=2001:db8::1"]).unwrap_err();
    assert!(e.contains("--iface 2001:db8::1") && e.contains("IPv6"), "{e}");
    assert_eq!(name(&["-iface=::ffff:198.51.100.10"]).unwrap(), "eth1");
    assert_eq!(name(&["-iface-can-reach=::ffff:198.51.100.7"]).unwrap(), "eth1");
    // --public-ipv6 alone: flannel stops; beside another choice it has no effect.
    let e = pick(&ns, &["-public-ipv6=2001:db8::5"]).unwrap_err();
    assert!(e.contains("--public-ipv6 2001:db8::5"), "{e}");
    assert_eq!(name(&["-public-ipv6=2001:db8::5", "-iface=eth1"]).unwrap(), "eth1");
}
