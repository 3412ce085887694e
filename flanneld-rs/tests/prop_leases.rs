//! Property tests of the lease parsers, the outside input both stores read:
//! etcd lease values and keys, and Kubernetes Node annotations. Arbitrary
//! and near-valid input never panics, every rejection names where the input
//! came from, and what we write reads back as what we meant.
//!
//! Cases per property: 256, or `PROPTEST_CASES` (`scripts/fuzz.sh` runs many more).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flannel_net::MacAddr;
use flanneld_rs::config::NetworkConfig;
use flanneld_rs::lease::{decode_value, encode_value, BackendType, LeaseAttrs, VxlanData};
use flanneld_rs::subnet::etcd::{decode_entry, parse_subnet_key, subnet_key};
use flanneld_rs::subnet::kube_annotations::{lease_from_node, own_annotations, Prefix, DEFAULT_PREFIX};
use ipnet::Ipv4Net;
use proptest::prelude::*;
use serde_json::{json, Value};

const KEY: &str = "/coreos.com/network/subnets/10.5.1.0-24";

fn cfg() -> NetworkConfig {
    NetworkConfig::parse(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#, "prop").unwrap()
}

/// A node's address as a lease may carry it (unicast, not loopback).
fn public_ip() -> impl Strategy<Value = Ipv4Addr> {
    (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
        .prop_filter("not loopback", |(a, ..)| *a != 127)
        .prop_map(|(a, b, c, d)| Ipv4Addr::new(a, b, c, d))
}

fn unicast_mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(|mut b| {
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    })
}

fn backend() -> impl Strategy<Value = BackendType> {
    prop_oneof![
        Just(BackendType::Vxlan),
        Just(BackendType::HostGw),
        Just(BackendType::Udp),
        "[a-z]{1,8}".prop_map(|s| BackendType::parse(Some(&s))),
    ]
}

fn attrs() -> impl Strategy<Value = LeaseAttrs> {
    (public_ip(), backend(), 0u32..=0xff_ffff, unicast_mac()).prop_map(|(public_ip, backend, vni, mac)| {
        let vxlan = (backend == BackendType::Vxlan).then_some(VxlanData { vni, vtep_mac: mac });
        LeaseAttrs {
            public_ip: Some(public_ip),
            backend,
            vxlan,
            public_ipv6: None,
            vxlan6: None,
            wireguard: None,
            wireguard6: None,
        }
    })
}

/// JSON values of every kind, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
        Just(json!("192.0.2.7")),
        Just(json!("02:00:00:00:00:01")),
        Just(json!("vxlan")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A lease-shaped object: the real field names in random case, each with a
/// random value or a plausible one, plus extra fields.
fn lease_object() -> impl Strategy<Value = Value> {
    let name = |n: &'static str| {
        prop::collection::vec(any::<bool>(), n.len()).prop_map(move |up| {
            n.chars().zip(up).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect()
        })
    };
    let data = prop_oneof![
        json_value(),
        (any::<u32>(), prop_oneof![unicast_mac().prop_map(|m| m.to_string()), ".{0,20}"])
            .prop_map(|(vni, mac)| json!({"VNI": vni, "VtepMAC": mac})),
    ];
    (
        name("PublicIP"),
        prop_oneof![public_ip().prop_map(|ip| json!(ip.to_string())), json_value()],
        name("BackendType"),
        prop_oneof![Just(json!("vxlan")), Just(json!("")), json_value()],
        name("BackendData"),
        data,
        prop::collection::btree_map("[A-Za-z]{1,10}", json_value(), 0..3),
        any::<[bool; 3]>(),
    )
        .prop_map(|(n1, v1, n2, v2, n3, v3, extra, keep)| {
            let mut o: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, (n, v)) in [(n1, v1), (n2, v2), (n3, v3)].into_iter().enumerate() {
                if keep[k] {
                    o.insert(n, v);
                }
            }
            Value::Object(o)
        })
}

proptest! {
    #[test]
    fn any_bytes_as_an_etcd_lease_value_are_decoded_or_refused_by_name(value in prop::collection::vec(any::<u8>(), 0..512)) {
        let s: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        if let Err(e) = decode_value(KEY, s, None, &value) {
            prop_assert!(e.contains(KEY), "{e}");
        }
    }

    #[test]
    fn lease_shaped_values_are_decoded_consistently(obj in lease_object()) {
        let s: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        let text = obj.to_string();
        match decode_value(KEY, s, None, text.as_bytes()) {
            Ok(l) => {
                // What was decoded is what the object says.
                let field = |name: &str| obj.as_object().unwrap().iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).filter(|v| !v.is_null());
                prop_assert_eq!(Some(json!(l.public_ip4().unwrap().to_string())), field("PublicIP"));
                prop_assert_eq!(l.backend.clone(), BackendType::parse(field("BackendType").as_ref().and_then(Value::as_str)));
                prop_assert_eq!(l.ipv4.unwrap().vxlan.is_some(), l.backend == BackendType::Vxlan);
                if let Some(d) = l.ipv4.unwrap().vxlan {
                    prop_assert!(d.vni <= 0xff_ffff);
                    prop_assert!(d.vtep_mac.0[0] & 1 == 0 && d.vtep_mac.0 != [0; 6]);
                }
                prop_assert_eq!(l.subnet4(), Some(s));
            }
            Err(e) => {
                prop_assert!(e.contains(KEY) && e.contains("lease "), "{}", e);
            }
        }
    }

    #[test]
    fn what_we_write_to_etcd_reads_back(a in attrs()) {
        let s: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        let l = decode_value(KEY, s, None, encode_value(&a).as_bytes()).unwrap();
        prop_assert_eq!(l, a.lease(Some(s), None, KEY));
    }

    #[test]
    fn any_subnet_key_is_parsed_canonically_or_refused(tail in prop_oneof![
        ".{0,40}",
        (any::<[u8; 4]>(), 0u8..=40).prop_map(|(ip, len)| format!("{}-{len}", Ipv4Addr::from(ip))),
        (any::<[u8; 4]>(), 0u8..=32, ".{0,10}").prop_map(|(ip, len, v6)| format!("{}-{len}&{v6}", Ipv4Addr::from(ip))),
    ], value in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Some(net) = parse_subnet_key(&tail) {
            prop_assert_eq!(net.trunc(), net);
            let key = subnet_key("/p", net);
            prop_assert_eq!(parse_subnet_key(key.rsplit('/').next().unwrap()), Some(net));
        }
        let key = format!("/coreos.com/network/subnets/{tail}");
        if let Err(e) = decode_entry("/coreos.com/network", &cfg(), &key, &value) {
            prop_assert!(e.contains(&key), "{}", e);
        }
    }

    #[test]
    fn any_annotations_are_read_or_refused_naming_the_node(
        values in prop::collection::vec(prop_oneof![".{0,30}".boxed(), json_value().prop_map(|v| v.to_string()).boxed()], 4),
        cidr in prop_oneof![Just(None), ".{0,20}".prop_map(Some), Just(Some("10.7.0.0/24".to_string()))],
        manager in prop_oneof![Just("true".to_string()), ".{0,5}"],
    ) {
        let names = ["backend-type", "backend-data", "public-ip", "public-ip-overwrite"];
        let mut a: BTreeMap<String, String> = names.iter().zip(&values)
            .map(|(n, v)| (format!("{DEFAULT_PREFIX}/{n}"), v.clone())).collect();
        a.insert(format!("{DEFAULT_PREFIX}/kube-subnet-manager"), manager);
        match lease_from_node("worker-9", cidr.as_deref(), None, &a, &Prefix::default(), &cfg()) {
            Ok(Some(l)) => {
                prop_assert!(cfg().ipv4.unwrap().network.contains(&l.subnet4().unwrap()));
                prop_assert_eq!(l.source, "node worker-9");
            }
            Ok(None) => {}
            Err(e) => prop_assert!(e.contains("worker-9"), "{}", e),
        }
    }

    #[test]
    fn what_we_annotate_reads_back(a in attrs(), third in 0u8..=255) {
        let ann = own_annotations(&Prefix::default(), &a, None);
        let cidr = format!("10.7.{third}.0/24");
        let l = lease_from_node("me", Some(&cidr), None, &ann, &Prefix::default(), &cfg()).unwrap().unwrap();
        prop_assert_eq!(l, a.lease(Some(cidr.parse().unwrap()), None, "node me"));
    }
}
