//! Property tests of `subnet.env` (`SubnetEnv`): the file the daemon writes
//! and the CNI plugin reads on every pod, so a parser that must not panic
//! on anything and must give back exactly what was written.
//!
//! Each property runs `PROPTEST_CASES` cases (256 unless set; `scripts/fuzz.sh`
//! sets it high) and prints `proptest <name>: <n> cases passed`.

use std::fmt::Debug;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use flannel_net::subnet_env::{keys, SubnetEnvError};
use flannel_net::SubnetEnv;
use ipnet::{Ipv4Net, Ipv6Net};
use netns_fixtures::prop::{cases, check, check_n};
use proptest::prelude::*;
use proptest::sample::select;

const PATH: &str = "/run/flannel/subnet.env";

fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
    SubnetEnv::parse(Path::new(PATH), text)
}

/// What any accepted file promises, and that it renders back to itself.
fn check_env(env: &SubnetEnv) -> Result<(), TestCaseError> {
    prop_assert!(env.subnet.is_some() || env.ipv6_subnet.is_some());
    prop_assert!((68..=65535).contains(&env.mtu));
    if let Some(s) = env.subnet {
        prop_assert!(s.prefix_len() <= 30);
        prop_assert!(env.networks.iter().any(|n| n.contains(&s.network())));
    }
    if let Some(s) = env.ipv6_subnet {
        prop_assert!(s.prefix_len() <= 126);
        prop_assert!(env.ipv6_networks.iter().any(|n| n.contains(&s.network())));
    }
    let again = parse(&env.render());
    prop_assert!(again.as_ref().ok() == Some(env), "render then parse: {:?}\n{}", again, env.render());
    Ok(())
}

/// What any error from parsing `text` (read from `path`) promises: the
/// path, and the key with its value, or the line.
fn check_error(e: &SubnetEnvError, text: &str, path: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert!(shown.contains(path), "{shown}");
    match e {
        SubnetEnvError::Syntax { line, text: bad, .. } => {
            prop_assert_eq!(text.lines().nth(line - 1), Some(bad.as_str()), "line {} of\n{}", line, text);
        }
        SubnetEnvError::Value { key, value, .. } => prop_assert!(shown.contains(key) && text.contains(value.as_str())),
        SubnetEnvError::MissingKey { key, .. } => prop_assert!(shown.contains(key)),
        other => prop_assert!(false, "parse from text cannot fail with {other:?}"),
    }
    Ok(())
}

// ------------------------------------------------------------ near-valid

/// A value as written on a line: meant to be valid, or not.
#[derive(Debug, Clone)]
enum Val<T> {
    Good(T),
    Bad(String),
}

/// One line of a near-valid file.
#[derive(Debug, Clone)]
enum Line {
    Network(Val<Vec<Ipv4Net>>),
    Subnet(Val<Ipv4Net>),
    Ipv6Network(Val<Vec<Ipv6Net>>),
    Ipv6Subnet(Val<Ipv6Net>),
    Mtu(Val<u32>),
    Ipmasq(Val<bool>),
    /// Ignored: unknown keys (a newer daemon's), comments, blank lines.
    Ignored(String),
    /// Not KEY=VALUE.
    Junk(String),
}

fn v4net() -> BoxedStrategy<Ipv4Net> {
    prop_oneof![
        3 => (any::<u8>(), 8u8..=24).prop_map(|(b, p)| Ipv4Net::new(Ipv4Addr::new(10, b, 0, 0), p).unwrap().trunc()),
        1 => (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(a), p).unwrap()),
    ]
    .boxed()
}

fn v6net() -> BoxedStrategy<Ipv6Net> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, p)| Ipv6Net::new(Ipv6Addr::from(a), p).unwrap()).boxed()
}

fn list<T: Debug + Clone + 'static>(item: BoxedStrategy<T>) -> BoxedStrategy<Vec<T>> {
    prop::collection::vec(item, 1..4).boxed()
}

fn val<T: Debug + Clone + 'static>(good: BoxedStrategy<T>, bad: &'static [&'static str]) -> BoxedStrategy<Val<T>> {
    prop_oneof![
        6 => good.prop_map(Val::Good),
        1 => select(bad).prop_map(|s| Val::Bad(s.to_string())),
        1 => "[^\n\r]{0,12}".prop_map(Val::Bad),
    ]
    .boxed()
}

const BAD_NET: &[&str] =
    &["", "10.0.0.0", "10.0.0.0/33", "10.0.0.0/8,", ",10.0.0.0/8", "fc00::/48", "10.0.0.0/8;10.1.0.0/16"];
const BAD_NET6: &[&str] = &["", "fc00::", "fc00::/129", "10.0.0.0/8", "fc00::/48,", "fc00::/48 fc01::/48"];
const BAD_MTU: &[&str] = &["", "0", "67", "65536", "4294967296", "-1", "1450.0", "big", "1450 bytes"];
const BAD_BOOL: &[&str] = &["", "True", "TRUE", "1", "0", "yes", "no", "truee"];

fn line() -> BoxedStrategy<Line> {
    let mtu = prop_oneof![select(vec![68u32, 1450, 1500, 8950, 65535]), 68u32..=65535].boxed();
    // A subnet inside one of the usual networks (10.x.0.0/16), or anywhere.
    let subnet = prop_oneof![
        3 => (any::<u8>(), any::<u16>(), 16u8..=30).prop_map(|(b, h, p)| {
            Ipv4Net::new(Ipv4Addr::new(10, b, (h >> 8) as u8, h as u8), p).unwrap()
        }),
        1 => v4net(),
    ];
    prop_oneof![
        2 => val(list(v4net()), BAD_NET).prop_map(Line::Network),
        2 => val(subnet.boxed(), BAD_NET).prop_map(Line::Subnet),
        1 => val(list(v6net()), BAD_NET6).prop_map(Line::Ipv6Network),
        1 => val(v6net(), BAD_NET6).prop_map(Line::Ipv6Subnet),
        2 => val(mtu, BAD_MTU).prop_map(Line::Mtu),
        2 => val(any::<bool>().boxed(), BAD_BOOL).prop_map(Line::Ipmasq),
        1 => prop_oneof![
            Just(String::new()),
            Just("# written by flanneld-rs".to_string()),
            Just("FLANNEL_FUTURE=anything".to_string()),
            Just("flannel_mtu=1450".to_string()),
            Just("FLANNEL_MTU_EXTRA=1".to_string()),
            Just("export FLANNEL_MTU=1450".to_string()),
            "[A-Z_]{1,12}=[^\n\r]{0,12}".prop_filter("a known key", |l| !l.starts_with("FLANNEL_")),
        ]
        .prop_map(Line::Ignored),
        1 => prop_oneof![
            Just("FLANNEL_MTU".to_string()),
            Just("FLANNEL_MTU 1450".to_string()),
            "[^\n\r=#]{1,16}".prop_filter("blank", |l| !l.trim().is_empty() && !l.trim().starts_with('#')),
        ]
        .prop_map(Line::Junk),
    ]
    .boxed()
}

fn join<T: std::fmt::Display>(items: &[T], sep: &str) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(sep)
}

/// The text of a line, with the spacing given.
fn render_line(l: &Line, pad: (&str, &str, &str, &str), list_sep: &str) -> String {
    let (pre, before_eq, after_eq, post) = pad;
    let kv = |k: &str, v: String| format!("{pre}{k}{before_eq}={after_eq}{v}{post}");
    match l {
        Line::Network(v) => kv(keys::NETWORK, text(v, |n| join(n, list_sep))),
        Line::Subnet(v) => kv(keys::SUBNET, text(v, |s| s.to_string())),
        Line::Ipv6Network(v) => kv(keys::IPV6_NETWORK, text(v, |n| join(n, list_sep))),
        Line::Ipv6Subnet(v) => kv(keys::IPV6_SUBNET, text(v, |s| s.to_string())),
        Line::Mtu(v) => kv(keys::MTU, text(v, |m| m.to_string())),
        Line::Ipmasq(v) => kv(keys::IPMASQ, text(v, |b| b.to_string())),
        Line::Ignored(s) | Line::Junk(s) => s.clone(),
    }
}

/// A value's text: a good one formatted, a bad one as generated.
fn text<T>(v: &Val<T>, format: impl Fn(&T) -> String) -> String {
    match v {
        Val::Good(t) => format(t),
        Val::Bad(s) => s.clone(),
    }
}

/// The error parsing must give: the first bad line's exactly; else any of
/// the keys missing or inconsistent.
#[derive(Debug)]
enum Expect {
    Syntax(usize),
    Value(&'static str),
    AnyOf(Vec<&'static str>),
}

/// A value as the parser should read it: a `Bad` one that happens to be
/// valid (a generated string can be) is read as the key's type.
fn read<T: Clone>(v: &Val<T>, key: &'static str, read: impl Fn(&str) -> Option<T>) -> Result<T, Expect> {
    match v {
        Val::Good(t) => Ok(t.clone()),
        Val::Bad(s) => read(s.trim()).ok_or(Expect::Value(key)),
    }
}

fn read_list<T: std::str::FromStr>(s: &str) -> Option<Vec<T>> {
    s.split(',').map(|i| i.trim().parse().ok()).collect()
}

/// flannel's rules for the file, applied to what the lines meant to say.
fn expect(lines: &[Line]) -> Result<SubnetEnv, Expect> {
    let (mut net, mut sub, mut net6, mut sub6, mut mtu, mut masq) = (None, None, None, None, None, None);
    for (n, l) in lines.iter().enumerate() {
        // A later line with the same key wins; the first bad line ends it.
        match l {
            Line::Network(v) => net = Some(read(v, keys::NETWORK, read_list)?),
            Line::Subnet(v) => sub = Some(read(v, keys::SUBNET, |s| s.parse().ok())?),
            Line::Ipv6Network(v) => net6 = Some(read(v, keys::IPV6_NETWORK, read_list)?),
            Line::Ipv6Subnet(v) => sub6 = Some(read(v, keys::IPV6_SUBNET, |s| s.parse().ok())?),
            Line::Mtu(v) => {
                let m = read(v, keys::MTU, |s| s.parse::<u32>().ok())?;
                if !(68..=65535).contains(&m) {
                    return Err(Expect::Value(keys::MTU));
                }
                mtu = Some(m);
            }
            Line::Ipmasq(v) => {
                masq = Some(read(v, keys::IPMASQ, |s| match s {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                })?)
            }
            Line::Ignored(_) => {}
            Line::Junk(_) => return Err(Expect::Syntax(n + 1)),
        }
    }
    let mut wrong = Vec::new();
    if sub.is_some() && net.is_none() {
        wrong.push(keys::NETWORK);
    }
    if sub6.is_some() && net6.is_none() {
        wrong.push(keys::IPV6_NETWORK);
    }
    if sub.is_none() && sub6.is_none() {
        wrong.push(keys::SUBNET);
    }
    if mtu.is_none() {
        wrong.push(keys::MTU);
    }
    if masq.is_none() {
        wrong.push(keys::IPMASQ);
    }
    if let Some(s) = sub {
        let inside = net.as_ref().is_some_and(|ns: &Vec<Ipv4Net>| ns.iter().any(|n| n.contains(&s.network())));
        if s.prefix_len() > 30 || !inside {
            wrong.push(keys::SUBNET);
        }
    }
    if let Some(s) = sub6 {
        let inside = net6.as_ref().is_some_and(|ns: &Vec<Ipv6Net>| ns.iter().any(|n| n.contains(&s.network())));
        if s.prefix_len() > 126 || !inside {
            wrong.push(keys::IPV6_SUBNET);
        }
    }
    if !wrong.is_empty() {
        return Err(Expect::AnyOf(wrong));
    }
    Ok(SubnetEnv {
        networks: net.unwrap_or_default(),
        subnet: sub,
        ipv6_networks: net6.unwrap_or_default(),
        ipv6_subnet: sub6,
        mtu: mtu.expect("checked"),
        ipmasq: masq.expect("checked"),
    })
}

/// Near-valid files: the lines, the spacing around keys and values, the
/// list separator, and the line ending.
fn near_valid() -> impl Strategy<Value = (Vec<Line>, Vec<usize>, &'static str, &'static str)> {
    (
        prop::collection::vec(line(), 0..12),
        prop::collection::vec(0usize..6, 4),
        select(vec![",", ", ", " , "]),
        select(vec!["\n", "\r\n"]),
    )
}

const PADS: [&str; 6] = ["", "", " ", "\t", "  ", "\u{a0}"];

// ------------------------------------------------------------ properties

#[test]
fn arbitrary_text_is_handled() {
    check("subnet_env_arbitrary_text", any::<String>(), |text| match parse(&text) {
        Ok(env) => check_env(&env),
        Err(e) => check_error(&e, &text, PATH),
    });
}

#[test]
fn key_value_like_text_is_handled() {
    let token = select(vec![
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
        "FLANNEL_IPV6_NETWORK",
        "FLANNEL_IPV6_SUBNET",
        "=",
        "\n",
        "\r\n",
        "#",
        " ",
        ",",
        "10.244.0.0/16",
        "10.244.1.1/24",
        "1450",
        "true",
        "fc00::/48",
        "fc00::1/64",
        "/",
        "\u{0}",
    ]);
    check("subnet_env_key_value_like_text", prop::collection::vec(token, 0..40).prop_map(|t| t.concat()), |text| {
        match parse(&text) {
            Ok(env) => check_env(&env),
            Err(e) => check_error(&e, &text, PATH),
        }
    });
}

#[test]
fn near_valid_files_parse_as_meant() {
    check("subnet_env_near_valid", near_valid(), |(lines, pad, sep, eol)| {
        let pad = (PADS[pad[0]], PADS[pad[1]], PADS[pad[2]], PADS[pad[3]]);
        let text: String = lines.iter().map(|l| render_line(l, pad, sep) + eol).collect();
        let got = parse(&text);
        match (&got, expect(&lines)) {
            (Ok(env), Ok(want)) => {
                prop_assert_eq!(env, &want);
                check_env(env)?;
            }
            (Err(e), Err(want)) => {
                check_error(e, &text, PATH)?;
                match (e, want) {
                    (SubnetEnvError::Syntax { line, .. }, Expect::Syntax(n)) => prop_assert_eq!(*line, n),
                    (SubnetEnvError::Value { key, .. }, Expect::Value(k)) => prop_assert_eq!(*key, k),
                    (SubnetEnvError::Value { key, .. } | SubnetEnvError::MissingKey { key, .. }, Expect::AnyOf(ks)) => {
                        prop_assert!(ks.contains(key), "{} not among {:?}", key, ks)
                    }
                    (e, want) => prop_assert!(false, "got {e:?}, want {want:?}\n{text}"),
                }
            }
            (Err(e), Ok(want)) => prop_assert!(false, "refused ({e}), want {want:?}\n{text}"),
            (Ok(env), want) => prop_assert!(false, "accepted {env:?}, want {want:?}\n{text}"),
        }
        Ok(())
    });
}

/// Any valid value: IPv4, IPv6 or both; subnets anywhere inside a network
/// (the address is the gateway, so host bits are kept).
fn valid_env() -> impl Strategy<Value = SubnetEnv> {
    let v4 =
        (list(v4net()), any::<prop::sample::Index>(), any::<u32>(), 0u8..=30).prop_map(|(mut nets, i, host, len)| {
            // The subnet's network needs room for a /30 at least.
            let i = i.index(nets.len());
            if nets[i].prefix_len() > 30 {
                nets[i] = Ipv4Net::new(nets[i].addr(), 30).unwrap();
            }
            let n = nets[i];
            let len = len.max(n.prefix_len());
            let span = if n.prefix_len() == 0 { u32::MAX } else { !(u32::MAX << (32 - n.prefix_len())) };
            let s = Ipv4Net::new(Ipv4Addr::from(u32::from(n.network()) | (host & span)), len).unwrap();
            (nets, s)
        });
    let v6 =
        (list(v6net()), any::<prop::sample::Index>(), any::<u128>(), 0u8..=126).prop_map(|(mut nets, i, host, len)| {
            // As for IPv4: the subnet lies inside one of the networks.
            let i = i.index(nets.len());
            if nets[i].prefix_len() > 126 {
                nets[i] = Ipv6Net::new(nets[i].addr(), 126).unwrap();
            }
            let n = nets[i];
            let len = len.max(n.prefix_len());
            let span = if n.prefix_len() == 0 { u128::MAX } else { !(u128::MAX << (128 - n.prefix_len())) };
            let s = Ipv6Net::new(std::net::Ipv6Addr::from(u128::from(n.network()) | (host & span)), len).unwrap();
            (nets, s)
        });
    let stacks = prop_oneof![
        (v4.clone(), Just(None), prop::option::of(list(v6net()))).prop_map(|((n, s), s6, n6)| (
            n,
            Some(s),
            n6.unwrap_or_default(),
            s6
        )),
        (v6.clone(), prop::option::of(list(v4net()))).prop_map(|((n6, s6), n)| (
            n.unwrap_or_default(),
            None,
            n6,
            Some(s6)
        )),
        (v4, v6).prop_map(|((n, s), (n6, s6))| (n, Some(s), n6, Some(s6))),
    ];
    (stacks, 68u32..=65535, any::<bool>()).prop_map(|((networks, subnet, ipv6_networks, ipv6_subnet), mtu, ipmasq)| {
        SubnetEnv { networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq }
    })
}

#[test]
fn valid_values_round_trip() {
    check("subnet_env_round_trip", valid_env(), |env| {
        prop_assert_eq!(parse(&env.render()).ok(), Some(env.clone()), "{}", env.render());
        Ok(())
    });
}

#[test]
fn valid_values_round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flannel/subnet.env");
    // At most 1,000 cases: each write syncs the file to disk, which costs
    // more than all else here; the text is what the in-memory property
    // covers at full count.
    check_n("subnet_env_round_trip_file", cases().min(1000), valid_env(), |env| {
        env.write_atomic(&path).map_err(|e| TestCaseError::fail(format!("write {}: {e}", path.display())))?;
        prop_assert_eq!(SubnetEnv::load(&path).ok(), Some(env));
        Ok(())
    });
}

#[test]
fn arbitrary_bytes_from_a_file_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subnet.env");
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        "[ -~\n]{0,200}".prop_map(String::into_bytes),
        (near_valid(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|((lines, _, sep, eol), i, b)| {
            let mut t: Vec<u8> =
                lines.iter().flat_map(|l| (render_line(l, ("", "", "", ""), sep) + eol).into_bytes()).collect();
            if !t.is_empty() {
                let at = i.index(t.len());
                t[at] = b;
            }
            t
        }),
    ];
    check("subnet_env_arbitrary_bytes", bytes, |b| {
        std::fs::write(&path, &b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let shown = path.display().to_string();
        match (SubnetEnv::load(&path), std::str::from_utf8(&b)) {
            (Ok(env), Ok(_)) => check_env(&env)?,
            (Err(SubnetEnvError::Io { source, .. }), Err(_)) => {
                prop_assert_eq!(source.kind(), std::io::ErrorKind::InvalidData)
            }
            (Err(e), Ok(text)) => check_error(&e, text, &shown)?,
            (r, Err(_)) => prop_assert!(false, "not UTF-8, yet {r:?}"),
        }
        Ok(())
    });
}
