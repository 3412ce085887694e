//! The overlay part of the netlink facade against the real kernel, inside a
//! throw-away namespace, checked with `ip -j` and `bridge -j`.

use std::net::Ipv4Addr;

use flannel_net::netlink::{Fdb, Neigh, Netlink, VxlanSpec};
use flannel_net::netns::NetNs;
use netns_fixtures::{require_root, Netns};

/// Runs `f` on a runtime whose sockets live in `ns`.
fn in_ns<T: Send>(ns: &Netns, f: impl std::future::Future<Output = T> + Send) -> T {
    let handle = NetNs::open(ns.path()).unwrap();
    handle.run(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)).unwrap()
}

#[test]
fn vxlan_neighbours_and_fdb_round_trip() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("nl").unwrap();
    ns.run_ok("ip", &["link", "add", "eth0", "type", "bridge"]);
    ns.run_ok("ip", &["addr", "add", "192.0.2.5/24", "dev", "eth0"]);
    ns.run_ok("ip", &["link", "set", "eth0", "up"]);
    let dev = ns.ip_json(&["link", "show", "eth0"])[0]["ifindex"].as_u64().unwrap() as u32;
    let spec = VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: "192.0.2.5".parse().unwrap(),
        dev,
        port: 8472,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac: "02:00:00:00:00:05".parse().unwrap(),
        tx_checksum: None,
    };
    let neigh = Neigh { ip: "10.244.2.0".parse().unwrap(), mac: "02:00:00:00:00:02".parse().unwrap() };
    let fdb = Fdb { mac: neigh.mac, dst: "192.0.2.6".parse().unwrap() };
    let idx = in_ns(&ns, async {
        let nl = Netlink::connect().unwrap();
        nl.add_vxlan(&spec).await.unwrap();
        let v = nl.vxlan_by_name("flannel.1").await.unwrap().unwrap();
        assert!(v.incompatibilities(&spec).is_empty(), "{:?}", v.incompatibilities(&spec));
        // A new VXLAN device has transmit checksum offload on; it is turned
        // off and read back through the ioctl.
        assert_eq!(v.tx_checksum, Some(true));
        nl.set_tx_checksum("flannel.1", false).unwrap();
        assert_eq!(nl.vxlan_by_name("flannel.1").await.unwrap().unwrap().tx_checksum, Some(false));
        let err = nl.set_tx_checksum("no-such-dev", false).unwrap_err().to_string();
        assert!(err.starts_with("ethtool -K no-such-dev tx off: "), "{err}");
        nl.set_neigh(v.index, "flannel.1", &neigh).await.unwrap();
        nl.set_fdb(v.index, "flannel.1", &fdb).await.unwrap();
        v.index
    });
    // Independent eyes.
    let k = ns.run_ok("ethtool", &["-k", "flannel.1"]);
    assert!(k.lines().any(|l| l == "tx-checksumming: off"), "{k}");
    let link = &ns.ip_json(&["-d", "link", "show", "flannel.1"])[0];
    assert_eq!(link["address"], "02:00:00:00:00:05");
    assert_eq!(link["linkinfo"]["info_data"]["port"], 8472);
    let n = ns.ip_json(&["neigh", "show", "dev", "flannel.1"]);
    assert_eq!(n[0]["dst"], "10.244.2.0");
    assert_eq!(n[0]["lladdr"], "02:00:00:00:00:02");
    // An entry someone else appended is seen too (diagnose reports it as stale).
    ns.run_ok(
        "bridge",
        &["fdb", "append", "02:aa:bb:cc:dd:ee", "dev", "flannel.1", "dst", "192.0.2.99", "self", "permanent"],
    );
    let (neighs, mut fdbs) = in_ns(&ns, async {
        let nl = Netlink::connect().unwrap();
        (nl.neighs(idx).await.unwrap(), nl.fdbs(idx).await.unwrap())
    });
    fdbs.sort();
    assert_eq!(neighs, vec![neigh]);
    let stray = Fdb { mac: "02:aa:bb:cc:dd:ee".parse().unwrap(), dst: Ipv4Addr::new(192, 0, 2, 99).into() };
    let mut want = vec![fdb, stray];
    want.sort();
    assert_eq!(fdbs, want);
    in_ns(&ns, async {
        let nl = Netlink::connect().unwrap();
        nl.del_fdb(idx, "flannel.1", &stray).await.unwrap();
        nl.del_neigh(idx, "flannel.1", &neigh).await.unwrap();
    });
    let left = ns.bridge_json(&["fdb", "show", "dev", "flannel.1"]);
    assert!(!left.to_string().contains("02:aa:bb:cc:dd:ee"), "{left}");
    assert_eq!(ns.ip_json(&["neigh", "show", "dev", "flannel.1"]).as_array().unwrap().len(), 0);
}
