//! A dual-stack lease as upstream flanneld v0.20.2 writes it to etcd, read
//! by our etcd store: the key's IPv6 half and the value's IPv6 fields, and
//! our encoding of the same attributes gives the same bytes.

use e2e_tests::mixed::{require_upstream, start, Kind};
use e2e_tests::overlay::{etcdctl_ok, Overlay};
use flanneld_rs::config::NetworkConfig;
use flanneld_rs::lease::encode_value;
use flanneld_rs::subnet::etcd::{decode_entry, DEFAULT_PREFIX};
use netns_fixtures::require_root;

const DUAL_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"vxlan"}}"#;

#[test]
fn upstreams_dual_stack_etcd_lease_is_read_and_written_alike() {
    if !(require_root() && require_upstream()) {
        return;
    }
    let mut o = Overlay::with_conf(1, DUAL_CONF);
    // An IPv6 underlay address and default route on the node, as upstream
    // wants both default routes on one interface.
    let ns = &o.cluster.node(0).ns;
    ns.run_ok("ip", &["-6", "addr", "add", "2001:db8:ffff::10/64", "dev", "eth0", "nodad"]);
    ns.run_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:ffff::1", "dev", "eth0", "onlink"]);
    start(&mut o, 0, Kind::Upstream);
    let ns = &o.cluster.node(0).ns;
    let raw = etcdctl_ok(o.outside(), &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines.len(), 2, "one lease: {raw}");
    let (key, value) = (lines[0], lines[1]);
    // flannel's key: <IPv4>-<len>&<IPv6>-<len>.
    assert!(key.starts_with("/coreos.com/network/subnets/10.244.") && key.contains("&2001:db8:10:"), "{key}");
    let cfg = NetworkConfig::parse(DUAL_CONF, "test").unwrap();
    let lease = decode_entry(DEFAULT_PREFIX, &cfg, key, value.as_bytes()).unwrap();
    let v6 = lease.ipv6.expect("the IPv6 half");
    assert_eq!(v6.public_ip.unwrap().to_string(), "2001:db8:ffff::10");
    assert!(key.ends_with(&format!("&{}-{}", v6.subnet.network(), v6.subnet.prefix_len())), "{key}");
    // The IPv6 VTEP's MAC is flannel-v6.1's.
    let mac = ns.ip_json(&["link", "show", "flannel-v6.1"])[0]["address"].as_str().unwrap().to_string();
    assert_eq!(v6.vxlan.unwrap().vtep_mac.to_string(), mac);
    // Our encoding of the same attributes: the same bytes.
    let attrs = flanneld_rs::lease::LeaseAttrs {
        public_ip: lease.public_ip4(),
        backend: lease.backend.clone(),
        vxlan: lease.ipv4.unwrap().vxlan,
        public_ipv6: v6.public_ip,
        vxlan6: v6.vxlan,
        wireguard: None,
        wireguard6: None,
    };
    assert_eq!(encode_value(&attrs), value);
    // And our key for its subnets is its key.
    assert_eq!(flanneld_rs::subnet::etcd::lease_key(DEFAULT_PREFIX, lease.subnet4().unwrap(), Some(v6.subnet)), key);
    o.stop(0);
}
