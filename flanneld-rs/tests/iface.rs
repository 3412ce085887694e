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
    pick_in(ns, args, false)
}

/// As [`pick`], in a dual-stack network (EnableIPv6).
fn pick6(ns: &Netns, args: &[&str]) -> Result<ExtIface, String> {
    pick_in(ns, args, true)
}

fn pick_in(ns: &Netns, args: &[&str], ipv6: bool) -> Result<ExtIface, String> {
    pick_families(ns, args, true, ipv6)
}

/// As [`pick`], in an IPv6-only network (EnableIPv4 false).
fn pick6_only(ns: &Netns, args: &[&str]) -> Result<ExtIface, String> {
    pick_families(ns, args, false, true)
}

fn pick_families(ns: &Netns, args: &[&str], ipv4: bool, ipv6: bool) -> Result<ExtIface, String> {
    let cli = Cli::parse_go(std::iter::once("flanneld-rs").chain(args.iter().copied())).unwrap();
    let mut selection = flanneld_rs::iface::Selection::from_opts(&cli.opts).map_err(|e| e.to_string())?;
    selection.ipv6 = ipv6;
    selection.ipv4 = ipv4;
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
    let name = |args: &[&str]| pick(&ns, args).map(|e| (e.name, e.public_ip.unwrap().to_string()));
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
    assert_eq!(e.addr.unwrap().to_string(), "169.254.7.7/16");
    ns.run_ok("ip", &["addr", "add", "192.0.2.99/32", "dev", "eth9"]);
    assert_eq!(pick(&ns, &["-iface=eth9"]).unwrap().addr.unwrap().to_string(), "192.0.2.99/32");
    // IPv6 values are refused by name in an IPv4-only network; an
    // IPv4-mapped one is its IPv4 address, as in Go.
    let e = pick(&ns, &["-iface-can-reach=2001:db8::1"]).unwrap_err();
    assert!(e.contains("--iface-can-reach 2001:db8::1") && e.contains("IPv4 only"), "{e}");
    let e = pick(&ns, &["-public-ip=2001:db8::1", "-iface=eth1"]).unwrap_err();
    assert!(e.contains("--public-ip 2001:db8::1") && e.contains("--public-ipv6"), "{e}");
    let e = pick(&ns, &["-iface=2001:db8::1"]).unwrap_err();
    assert!(e.contains("--iface 2001:db8::1") && e.contains("IPv6"), "{e}");
    assert_eq!(name(&["-iface=::ffff:198.51.100.10"]).unwrap(), "eth1");
    assert_eq!(name(&["-iface-can-reach=::ffff:198.51.100.7"]).unwrap(), "eth1");
    // --public-ipv6 alone: flannel stops; beside another choice it has no effect.
    let e = pick(&ns, &["-public-ipv6=2001:db8::5"]).unwrap_err();
    assert!(e.contains("--public-ipv6 2001:db8::5"), "{e}");
    assert_eq!(name(&["-public-ipv6=2001:db8::5", "-iface=eth1"]).unwrap(), "eth1");
}

/// `host()` with IPv6: eth0 2001:db8:1::10/64 (and an IPv6 default route),
/// eth1 2001:db8:2::10/64, ens5 link-local only.
fn host6() -> Netns {
    let ns = host();
    for (name, addr) in [("eth0", "2001:db8:1::10/64"), ("eth1", "2001:db8:2::10/64"), ("ens5", "fe80::5/64")] {
        ns.run_ok("ip", &["-6", "addr", "add", addr, "dev", name, "nodad"]);
    }
    ns
}

#[test]
fn dual_stack_selection_takes_a_global_ipv6_address_as_flannel_does() {
    if !require_root() {
        return;
    }
    let ns = host6();
    let six = |args: &[&str]| {
        pick6(&ns, args).map(|e| {
            let v6 = e.v6.expect("an IPv6 side");
            (e.name, e.public_ip.unwrap().to_string(), v6.addr.to_string(), v6.public_ip.to_string())
        })
    };
    // No IPv6 default route: flannel checks the default interface against it.
    let e = pick6(&ns, &[]).unwrap_err();
    assert!(e.contains("no IPv6 default route") && e.contains("--iface"), "{e}");
    ns.run_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "eth0"]);
    assert_eq!(
        six(&[]).unwrap(),
        ("eth0".into(), "192.0.2.10".into(), "2001:db8:1::10/64".into(), "2001:db8:1::10".into())
    );
    // An IPv4-only network ignores the IPv6 addresses.
    assert_eq!(pick(&ns, &[]).unwrap().v6, None);
    // --iface by name: its first global IPv6 address (a link-local one never).
    assert_eq!(six(&["--iface", "eth1"]).unwrap().2, "2001:db8:2::10/64");
    let e = pick6(&ns, &["--iface", "ens5"]).unwrap_err();
    assert!(e.contains("ens5 has no global IPv6 address (link-local ones only)"), "{e}");
    // The first in the kernel's order, as Go's net.Interface.Addrs lists
    // them (the kernel lists a newer IPv6 address first).
    ns.run_ok("ip", &["-6", "addr", "add", "2001:db8:2::99/64", "dev", "eth1", "nodad"]);
    let first = ns.run_ok("ip", &["-6", "-o", "addr", "show", "dev", "eth1", "scope", "global"]);
    let first = first.split_whitespace().nth(3).unwrap().to_string();
    assert_eq!(six(&["--iface", "eth1"]).unwrap().2, first);
    // --iface-regex matching addresses: an IPv6 one of the interface it
    // matches too is preferred (flannel matches both families).
    assert_eq!(six(&["--iface-regex", "^198\\.51\\.|^2001:db8:2::99$"]).unwrap().2, "2001:db8:2::99/64");
    assert_eq!(six(&["--iface-regex", "^198\\.51\\.|^2001:db8:2::10$"]).unwrap().2, "2001:db8:2::10/64");
    // --iface with an IPv6 address: the interface holding it.
    assert_eq!(
        six(&["--iface", "2001:db8:2::99"]).unwrap(),
        ("eth1".into(), "198.51.100.10".into(), "2001:db8:2::99/64".into(), "2001:db8:2::99".into())
    );
    // --iface-can-reach with an IPv6 target: the route's interface and source.
    assert_eq!(six(&["--iface-can-reach", "2001:db8:2::77"]).unwrap().0, "eth1");
    assert_eq!(six(&["--iface-can-reach", "2001:db8:77::1"]).unwrap().0, "eth0");
    // --public-ipv6 with --iface: advertised as given, held or not.
    let got = six(&["--iface", "eth1", "--public-ipv6", "2001:db8:99::1"]).unwrap();
    assert_eq!((got.2.as_str(), got.3.as_str()), (first.as_str(), "2001:db8:99::1"));
    // --public-ipv6 alone: the interface holding it (flannel's rule).
    assert_eq!(six(&["--public-ipv6", "2001:db8:2::10"]).unwrap().0, "eth1");
    let e = pick6(&ns, &["--public-ipv6", "2001:db8:99::1"]).unwrap_err();
    assert!(e.contains("--public-ipv6 2001:db8:99::1") && e.contains("no interface has the address"), "{e}");
    // With --public-ip, both on one interface.
    assert_eq!(six(&["--public-ip", "198.51.100.10", "--public-ipv6", "2001:db8:2::10"]).unwrap().0, "eth1");
    let e = pick6(&ns, &["--public-ip", "198.51.100.10", "--public-ipv6", "2001:db8:1::10"]).unwrap_err();
    assert!(e.contains("--public-ipv6 2001:db8:1::10 is on interface eth0") && e.contains("eth1"), "{e}");
    // A link-local or IPv4 --public-ipv6 is refused by name.
    let e = pick6(&ns, &["--iface", "eth1", "--public-ipv6", "fe80::1"]).unwrap_err();
    assert!(e.contains("--public-ipv6 fe80::1 is link-local"), "{e}");
    let e = pick6(&ns, &["--iface", "eth1", "--public-ipv6", "192.0.2.1"]).unwrap_err();
    assert!(e.contains("--public-ipv6 192.0.2.1: not an IPv6 address"), "{e}");
    // The IPv6 default route through another interface than the IPv4 one.
    ns.run_ok("ip", &["-6", "route", "replace", "default", "via", "2001:db8:2::1", "dev", "eth1"]);
    let e = pick6(&ns, &[]).unwrap_err();
    assert!(e.contains("IPv6 default route leaves through eth1, the IPv4 one through eth0"), "{e}");
}

/// IPv6-only: an interface with no IPv4 address at all is chosen, by the
/// IPv6 default route, by name, by IPv6 address, by regex or by an IPv6
/// target; `--public-ipv6` chooses or is advertised; IPv4 values are
/// refused by name.
#[test]
fn ipv6_only_selection_needs_no_ipv4_address() {
    if !require_root() {
        return;
    }
    let ns = host6();
    // eth2: IPv6 only (no IPv4 address), and the IPv6 default route.
    ns.run_ok("ip", &["link", "add", "eth2", "mtu", "1480", "type", "bridge"]);
    ns.run_ok("ip", &["-6", "addr", "add", "2001:db8:3::10/64", "dev", "eth2", "nodad"]);
    ns.run_ok("ip", &["link", "set", "eth2", "up"]);
    let e = pick6_only(&ns, &[]).unwrap_err();
    assert!(e.contains("IPv6-only") && e.contains("no IPv6 default route"), "{e}");
    ns.run_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:3::1", "dev", "eth2"]);
    let got = |args: &[&str]| {
        pick6_only(&ns, args).map(|e| {
            assert_eq!((e.addr, e.public_ip), (None, None), "{e:?}");
            let v6 = e.v6.expect("the IPv6 side");
            (e.name, v6.addr.to_string(), v6.public_ip.to_string(), e.mtu)
        })
    };
    assert_eq!(got(&[]).unwrap(), ("eth2".into(), "2001:db8:3::10/64".into(), "2001:db8:3::10".into(), 1480));
    assert_eq!(got(&["--iface", "eth1"]).unwrap().1, "2001:db8:2::10/64");
    assert_eq!(got(&["--iface", "2001:db8:1::10"]).unwrap().0, "eth0");
    assert_eq!(got(&["--iface-regex", "^2001:db8:2:"]).unwrap().0, "eth1");
    assert_eq!(got(&["--iface-can-reach", "2001:db8:2::77"]).unwrap().0, "eth1");
    // --public-ipv6: alone it chooses the interface holding it; beside
    // another choice it is what is advertised.
    assert_eq!(got(&["--public-ipv6", "2001:db8:1::10"]).unwrap().0, "eth0");
    assert_eq!(got(&["--public-ipv6", "2001:db8:99::1", "--iface", "eth2"]).unwrap().2, "2001:db8:99::1");
    // IPv4 values name themselves; an interface without a global IPv6
    // address is skipped with its reason.
    let e = pick6_only(&ns, &["--public-ip", "192.0.2.10"]).unwrap_err();
    assert!(e.contains("--public-ip 192.0.2.10") && e.contains("IPv6-only"), "{e}");
    let e = pick6_only(&ns, &["--iface", "192.0.2.10"]).unwrap_err();
    assert!(e.contains("--iface 192.0.2.10 (an IPv4 address"), "{e}");
    assert_eq!(got(&["--iface", "ens5", "--iface", "eth2"]).unwrap().0, "eth2");
    let e = pick6_only(&ns, &["--iface", "ens5"]).unwrap_err();
    assert!(e.contains("ens5 has no global IPv6 address (link-local ones only)"), "{e}");
}
