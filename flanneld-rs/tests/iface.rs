//! Interface selection against real links in a throw-away namespace.

use clap::Parser;
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
    let cli = Cli::try_parse_from(std::iter::once("flanneld-rs").chain(args.iter().copied())).unwrap();
    NetNs::open(ns.path())
        .unwrap()
        .run(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let nl = Netlink::connect().unwrap();
                select(&nl, &flanneld_rs::iface::Selection::from_opts(&cli.opts)).await.map_err(|e| e.to_string())
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
    // --public-ip not on any interface: the default route's, advertising the public IP.
    assert_eq!(name(&["--public-ip", "203.0.113.99"]).unwrap(), ("eth0".into(), "203.0.113.99".into()));
    // FLANNELD_* environment (through clap's env support) is covered by the daemon's tests.
    // Nothing matches: the error names what was tried and what exists.
    let e = pick(&ns, &["--iface", "wlan0", "--iface", "10.9.9.9"]).unwrap_err();
    assert!(e.contains("wlan0") && e.contains("10.9.9.9") && e.contains("eth1 [198.51.100.10/24]"), "{e}");
    let e = pick(&ns, &["--iface-regex", "^zzz"]).unwrap_err();
    assert!(e.contains("^zzz"), "{e}");
    let e = pick(&ns, &["--iface-regex", "("]).unwrap_err();
    assert!(e.contains("not a regular expression"), "{e}");
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
