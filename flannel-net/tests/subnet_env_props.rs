//! Property tests of the `subnet.env` parser, which reads what the daemon
//! (or an older flannel) wrote: whatever the text, no panic, memory
//! proportional to the text, every rejection naming the file and the key or
//! line, and what `render` writes parses back to the same lease.
//!
//! Each property runs `PROPTEST_CASES` cases (default 256) and prints how
//! many it ran.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use flannel_net::subnet_env::{SubnetEnv, SubnetEnvError};
use ipnet::{Ipv4Net, Ipv6Net};
use netns_fixtures::prop::check;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[global_allocator]
static ALLOC: netns_fixtures::CountingAlloc = netns_fixtures::CountingAlloc;

const PATH: &str = "/run/flannel/subnet.env";

const KEYS: &[&str] = &[
    "FLANNEL_NETWORK",
    "FLANNEL_SUBNET",
    "FLANNEL_IPV6_NETWORK",
    "FLANNEL_IPV6_SUBNET",
    "FLANNEL_MTU",
    "FLANNEL_IPMASQ",
];

/// A value of the kinds the keys take, and junk.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=40).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        (any::<[u8; 16]>(), 0u8..=140).prop_map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(a))),
        prop::collection::vec((any::<[u8; 4]>(), 0u8..=32), 1..4).prop_map(|v| v
            .iter()
            .map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(*a)))
            .collect::<Vec<_>>()
            .join(",")),
        prop::sample::select(vec!["10.244.0.0/16", "10.244.1.1/24", "1450", "65536", "67", "true", "false", "", ","])
            .prop_map(String::from),
        any::<u64>().prop_map(|n| n.to_string()),
        "\\PC{0,30}",
    ]
}

/// Lines of a subnet.env: keys with plausible or junk values, comments,
/// blank lines, lines without `=`, CRLF endings and stray spaces.
fn text() -> impl Strategy<Value = String> {
    let key = prop_oneof![4 => prop::sample::select(KEYS).prop_map(String::from), 1 => "[A-Z_]{0,12}"];
    let line = prop_oneof![
        8 => (key, value(), " {0,2}", " {0,2}").prop_map(|(k, v, a, b)| format!("{a}{k}{b}={v}")),
        1 => "#\\PC{0,20}",
        1 => Just(String::new()),
        1 => "[^=\\n]{1,20}",
    ];
    let ending = prop::sample::select(vec!["\n", "\r\n"]);
    // A lease the daemon wrote, with a line dropped, its value replaced, or
    // the prefix length of its value changed: near-valid files, where the
    // checks of accepted values matter.
    let edit = (any::<prop::sample::Index>(), value(), 0u8..=130, 0u8..3);
    let edited = (lease(), prop::collection::vec(edit, 0..3)).prop_map(|(env, edits)| {
        let mut lines: Vec<String> = env.render().lines().map(String::from).collect();
        for (at, v, prefix, op) in edits {
            let i = at.index(lines.len());
            let (key, old) = lines[i].split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap();
            match op {
                0 => {
                    lines.remove(i);
                }
                1 => lines[i] = format!("{key}={v}"),
                _ => lines[i] = format!("{key}={}/{prefix}", old.split('/').next().unwrap()),
            }
            if lines.is_empty() {
                break;
            }
        }
        lines.join("\n")
    });
    // A lease with its subnets' prefix lengths changed, or moved to another
    // address: the limits on them, and that they lie inside the networks.
    let p4 = prop_oneof![28u8..=33, 0u8..=33];
    let p6 = prop_oneof![124u8..=129, 0u8..=129];
    let moved = (prop::option::of(any::<u32>()), prop::option::of(any::<u128>()));
    let resized = (lease(), p4, p6, moved).prop_map(|(env, p4, p6, (a4, a6))| {
        let addr4 = |old: &str| a4.map_or(old.to_string(), |a| Ipv4Addr::from(a).to_string());
        let addr6 = |old: &str| a6.map_or(old.to_string(), |a| Ipv6Addr::from(a).to_string());
        let lines: Vec<String> = env
            .render()
            .lines()
            .map(|l| match l.split_once('=') {
                Some((k @ "FLANNEL_SUBNET", v)) => format!("{k}={}/{p4}", addr4(v.split('/').next().unwrap())),
                Some((k @ "FLANNEL_IPV6_SUBNET", v)) => format!("{k}={}/{p6}", addr6(v.split('/').next().unwrap())),
                _ => l.to_string(),
            })
            .collect();
        lines.join("\n")
    });
    prop_oneof![
        3 => prop::collection::vec((line, ending), 0..12).prop_map(|l| l.into_iter().map(|(l, e)| l + e).collect()),
        3 => edited,
        2 => resized,
        1 => "\\PC{0,200}",
    ]
}

#[test]
fn any_text_parses_or_is_rejected_naming_the_file_and_the_key_or_line() {
    check("subnet_env_any_text", text(), |text| {
        let (parsed, peak) = netns_fixtures::peak_alloc(|| SubnetEnv::parse(Path::new(PATH), &text));
        prop_assert!(peak <= 64 * text.len() + 64 * 1024, "{peak} bytes held for {} bytes", text.len());
        match parsed {
            Ok(env) => {
                // What was accepted is a lease the plugin can use.
                prop_assert!((68..=65535).contains(&env.mtu));
                prop_assert!(env.subnet.is_some() || env.ipv6_subnet.is_some());
                if let Some(s) = env.subnet {
                    prop_assert!(s.prefix_len() <= 30);
                    prop_assert!(env.networks.iter().any(|n| n.contains(&s.network())));
                }
                if let Some(s) = env.ipv6_subnet {
                    prop_assert!(s.prefix_len() <= 126);
                    prop_assert!(env.ipv6_networks.iter().any(|n| n.contains(&s.network())));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(PATH), "{msg:?} lacks the path");
                match &e {
                    SubnetEnvError::Value { key, .. } => prop_assert!(msg.contains(&format!("{key}=")), "{msg:?}"),
                    SubnetEnvError::MissingKey { key, .. } => prop_assert!(msg.contains(key), "{msg:?}"),
                    SubnetEnvError::Syntax { line, .. } => {
                        prop_assert!(msg.contains(&format!("line {line}")), "{msg:?}");
                        prop_assert!(text.lines().nth(line - 1).is_some_and(|l| !l.contains('=')));
                    }
                    other => prop_assert!(false, "unexpected error {other:?}"),
                }
            }
        }
        Ok(())
    });
}

/// A lease as the daemon could write it.
fn lease() -> impl Strategy<Value = SubnetEnv> {
    let v4 = prop::collection::vec((any::<u32>(), 0u8..=30), 1..3).prop_flat_map(|nets| {
        let networks: Vec<Ipv4Net> = nets.iter().map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(*a), *p).unwrap()).collect();
        let pick = networks[0];
        (Just(networks), pick.prefix_len()..=30, any::<u32>()).prop_map(move |(networks, p, host)| {
            // An address inside the first network, with a longer prefix.
            let mask = u32::MAX.checked_shr(pick.prefix_len() as u32).unwrap_or(0);
            let addr = (u32::from(pick.network()) & !mask) | (host & mask);
            (networks, Ipv4Net::new(Ipv4Addr::from(addr), p).unwrap())
        })
    });
    let v6 = prop::collection::vec((any::<u128>(), 0u8..=126), 1..3).prop_flat_map(|nets| {
        let networks: Vec<Ipv6Net> = nets.iter().map(|(a, p)| Ipv6Net::new(Ipv6Addr::from(*a), *p).unwrap()).collect();
        let pick = networks[0];
        (Just(networks), pick.prefix_len()..=126, any::<u128>()).prop_map(move |(networks, p, host)| {
            // An address inside the first network, with a longer prefix.
            let mask = u128::MAX.checked_shr(pick.prefix_len() as u32).unwrap_or(0);
            let addr = (u128::from(pick.network()) & !mask) | (host & mask);
            (networks, Ipv6Net::new(Ipv6Addr::from(addr), p).unwrap())
        })
    });
    (prop::option::of(v4), prop::option::of(v6), 68u32..=65535, any::<bool>())
        .prop_filter("a lease has a subnet", |(v4, v6, _, _)| v4.is_some() || v6.is_some())
        .prop_map(|(v4, v6, mtu, ipmasq)| SubnetEnv {
            networks: v4.as_ref().map(|(n, _)| n.clone()).unwrap_or_default(),
            subnet: v4.map(|(_, s)| s),
            ipv6_networks: v6.as_ref().map(|(n, _)| n.clone()).unwrap_or_default(),
            ipv6_subnet: v6.map(|(_, s)| s),
            mtu,
            ipmasq,
        })
}

#[test]
fn what_render_writes_parses_back_to_the_same_lease() {
    check("subnet_env_round_trip", lease(), |env| {
        let text = env.render();
        let back = SubnetEnv::parse(Path::new(PATH), &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &env);
        prop_assert_eq!(back.render(), text);
        Ok(())
    });
}
