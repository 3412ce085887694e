//! Property tests of the parsers of what the runtime hands the plugin: the
//! network configuration on stdin ([`crate::config`]) and the `CNI_*`
//! environment ([`crate::env`]). Whatever the input: no panic, memory
//! proportional to the input, and every rejection a CNI error with the right
//! code that names the field or variable.
//!
//! Each property runs `PROPTEST_CASES` cases (default 256) and prints how
//! many it ran; a longer fuzzing run sets the variable.

use netns_fixtures::prop::check;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use std::fmt::Debug;

use crate::config::NetConf;
use crate::env::{self, Command};
use crate::error::code;

#[global_allocator]
static ALLOC: netns_fixtures::CountingAlloc = netns_fixtures::CountingAlloc;

/// Memory a parser may hold at its peak for `len` bytes of input: a constant
/// factor of the input (a JSON value costs some 32 bytes per 2-byte element)
/// plus a constant.
fn memory_bound(len: usize) -> usize {
    64 * len + 64 * 1024
}

#[test]
fn the_allocation_counter_counts() {
    // Without it every memory bound below would hold trivially.
    let (v, peak) = netns_fixtures::peak_alloc(|| vec![1u8; 1 << 20]);
    assert!(peak >= 1 << 20, "{peak}");
    drop(v);
}

// ---- the network configuration -------------------------------------------

/// Every key the configuration knows, at any level.
const FIELDS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "subnetFile",
    "dataDir",
    "delegate",
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "hairpinMode",
    "ipMasq",
    "mtu",
    "ipam",
    "routes",
    "dst",
    "gw",
    "prevResult",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
];

/// Parses and checks what every outcome must satisfy; returns the outcome.
fn parse_checked(bytes: &[u8]) -> Result<Result<NetConf, crate::error::CniError>, TestCaseError> {
    let (parsed, peak) = netns_fixtures::peak_alloc(|| NetConf::parse(bytes));
    prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held for {} bytes of input", bytes.len());
    if let Err(e) = &parsed {
        prop_assert!(!e.msg.is_empty());
        match e.code {
            code::DECODE => prop_assert!(e.msg.starts_with("network configuration: "), "{}", e.msg),
            code::INCOMPATIBLE_VERSION => prop_assert!(e.msg.contains("cniVersion"), "{}", e.msg),
            code::INVALID_CONFIG => {
                // A field's name, or the configuration as a whole (not an object).
                let names_field = FIELDS.iter().any(|f| e.msg.contains(f)) || e.msg.contains("expected struct NetConf");
                prop_assert!(names_field, "code 7 without a field: {}", e.msg);
            }
            other => prop_assert!(false, "unexpected code {other}: {}", e.msg),
        }
    }
    Ok(parsed)
}

/// A string of the kinds found in configurations, and junk.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0.3.1",
            "1.0.0",
            "1.1.0",
            "cbr0",
            "cni0",
            "bridge",
            "10.244.0.0/16",
            "10.244.1.1",
            "fc00::/64",
            "eth0",
            ""
        ])
        .prop_map(String::from),
        "\\PC{0,24}",
        "[ -~]{0,24}",
    ]
}

/// Any JSON value whose object keys are mostly the configuration's own.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        any_string().prop_map(Value::from),
    ];
    let key = prop_oneof![3 => prop::sample::select(FIELDS).prop_map(String::from), 1 => any_string()];
    leaf.prop_recursive(5, 96, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A field that may be absent, JSON null, or a value.
#[derive(Debug, Clone)]
enum Opt<T> {
    Absent,
    Null,
    Set(T),
}

fn opt<T: Debug + Clone + 'static>(s: impl Strategy<Value = T> + 'static) -> BoxedStrategy<Opt<T>> {
    prop_oneof![1 => Just(Opt::Absent), 1 => Just(Opt::Null), 3 => s.prop_map(Opt::Set)].boxed()
}

impl<T: Clone> Opt<T> {
    fn get(&self) -> Option<T> {
        match self {
            Opt::Set(v) => Some(v.clone()),
            _ => None,
        }
    }
}

fn put<T: Into<Value> + Clone>(obj: &mut Map<String, Value>, key: &str, v: &Opt<T>) {
    match v {
        Opt::Absent => {}
        Opt::Null => {
            obj.insert(key.into(), Value::Null);
        }
        Opt::Set(x) => {
            obj.insert(key.into(), x.clone().into());
        }
    }
}

/// A valid configuration, field by field.
#[derive(Debug, Clone)]
struct Valid {
    version: String,
    name: String,
    subnet_file: Opt<String>,
    data_dir: Opt<String>,
    kind: Opt<String>,
    bridge: Opt<String>,
    is_gateway: Opt<bool>,
    is_default_gateway: Opt<bool>,
    hairpin: Opt<bool>,
    ip_masq: Opt<bool>,
    mtu: Opt<u32>,
    routes: Option<Vec<(String, Option<String>)>>,
    attachments: Option<Vec<(String, String)>>,
    prev_result: Option<Value>,
}

impl Valid {
    fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert("cniVersion".into(), json!(self.version));
        top.insert("name".into(), json!(self.name));
        top.insert("type".into(), json!("flannel"));
        put(&mut top, "subnetFile", &self.subnet_file);
        put(&mut top, "dataDir", &self.data_dir);
        let mut d = Map::new();
        put(&mut d, "type", &self.kind);
        put(&mut d, "bridge", &self.bridge);
        put(&mut d, "isGateway", &self.is_gateway);
        put(&mut d, "isDefaultGateway", &self.is_default_gateway);
        put(&mut d, "hairpinMode", &self.hairpin);
        put(&mut d, "ipMasq", &self.ip_masq);
        put(&mut d, "mtu", &self.mtu);
        top.insert("delegate".into(), Value::Object(d));
        if let Some(routes) = &self.routes {
            let routes: Vec<Value> = routes
                .iter()
                .map(|(dst, gw)| match gw {
                    Some(gw) => json!({"dst": dst, "gw": gw}),
                    None => json!({"dst": dst}),
                })
                .collect();
            top.insert("ipam".into(), json!({ "routes": routes }));
        }
        if let Some(a) = &self.attachments {
            let a: Vec<Value> = a.iter().map(|(c, i)| json!({"containerID": c, "ifname": i})).collect();
            top.insert("cni.dev/valid-attachments".into(), Value::Array(a));
        }
        if let Some(p) = &self.prev_result {
            top.insert("prevResult".into(), p.clone());
        }
        Value::Object(top)
    }
}

fn ip_and_prefix() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32, any::<[u8; 4]>()).prop_map(|(a, p, g)| (
            format!("{}/{p}", std::net::Ipv4Addr::from(a)),
            std::net::Ipv4Addr::from(g).to_string()
        )),
        (any::<[u8; 16]>(), 0u8..=128, any::<[u8; 16]>()).prop_map(|(a, p, g)| (
            format!("{}/{p}", std::net::Ipv6Addr::from(a)),
            std::net::Ipv6Addr::from(g).to_string()
        )),
    ]
}

fn valid_config() -> impl Strategy<Value = Valid> {
    let name = "\\PC{1,24}".prop_filter("a valid network name", |n| !n.contains('/') && n != "." && n != "..");
    let route = (ip_and_prefix(), any::<bool>()).prop_map(|((dst, gw), with_gw)| (dst, with_gw.then_some(gw)));
    (
        (
            prop::sample::select(crate::version::SUPPORTED).prop_map(String::from),
            name,
            opt("\\PC{0,30}"),
            opt("\\PC{0,30}"),
        ),
        (opt(Just("bridge".to_string())), opt("[a-z][a-z0-9-]{0,14}"), opt(any::<bool>()), opt(any::<bool>())),
        (opt(any::<bool>()), opt(any::<bool>()), opt(68u32..=65535)),
        prop::option::of(prop::collection::vec(route, 0..4)),
        prop::option::of(prop::collection::vec(("[a-z0-9]{1,16}", "[a-z0-9]{1,15}"), 0..4)),
        prop::option::of(json_value()),
    )
        .prop_map(
            |(
                (version, name, subnet_file, data_dir),
                (kind, bridge, is_gateway, is_default_gateway),
                (hairpin, ip_masq, mtu),
                routes,
                attachments,
                prev_result,
            )| Valid {
                version,
                name,
                subnet_file,
                data_dir,
                kind,
                bridge,
                is_gateway,
                is_default_gateway,
                hairpin,
                ip_masq,
                mtu,
                routes,
                attachments,
                prev_result,
            },
        )
}

#[test]
fn config_parser_takes_any_bytes_and_mangled_configs_without_panic() {
    // Mangled: a valid configuration's text cut short, with bytes replaced
    // or inserted (syntax errors in every position).
    let mangled = (valid_config(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4))
        .prop_map(|(v, edits)| {
            let mut bytes = v.to_json().to_string().into_bytes();
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes.truncate(i),
                    1 => bytes[i] = byte,
                    _ => bytes.insert(i, byte),
                }
            }
            bytes
        });
    let input = prop_oneof![prop::collection::vec(any::<u8>(), 0..512), mangled];
    check("config_any_bytes", input, |bytes| parse_checked(&bytes).map(drop));
}

#[test]
fn config_parser_takes_any_json_shape_and_accepts_only_valid_values() {
    let input = prop::collection::vec((prop::sample::select(FIELDS).prop_map(String::from), json_value()), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()));
    check("config_any_json", input, |v| {
        if let Ok(conf) = parse_checked(v.to_string().as_bytes())? {
            // What was accepted is what ADD can use.
            prop_assert!(crate::version::SUPPORTED.contains(&conf.cni_version.as_str()));
            prop_assert!(!conf.name.is_empty() && !conf.name.contains('/'));
            let s = conf.bridge_settings(1450, true);
            prop_assert!(crate::env::validate_ifname(&s.bridge).is_ok(), "bridge {:?}", s.bridge);
            prop_assert!((68..=65535).contains(&s.mtu));
        }
        Ok(())
    });
}

#[test]
fn valid_configs_are_accepted_as_written() {
    check("config_valid", valid_config(), |v| {
        let conf = match parse_checked(v.to_json().to_string().as_bytes())? {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("rejected: {e}"))),
        };
        prop_assert_eq!(&conf.cni_version, &v.version);
        prop_assert_eq!(&conf.name, &v.name);
        prop_assert_eq!(
            conf.subnet_file(),
            std::path::PathBuf::from(v.subnet_file.get().unwrap_or_else(|| crate::config::DEFAULT_SUBNET_FILE.into()))
        );
        prop_assert_eq!(
            conf.data_dir(),
            std::path::PathBuf::from(v.data_dir.get().unwrap_or_else(|| crate::config::DEFAULT_DATA_DIR.into()))
        );
        let s = conf.bridge_settings(1450, true);
        prop_assert_eq!(s.bridge, v.bridge.get().unwrap_or_else(|| "cni0".into()));
        let idg = v.is_default_gateway.get().unwrap_or(false);
        prop_assert_eq!(s.is_default_gateway, idg);
        prop_assert_eq!(s.is_gateway, v.is_gateway.get().unwrap_or(true) || idg);
        prop_assert_eq!(s.hairpin, v.hairpin.get().unwrap_or(false));
        prop_assert_eq!(s.ip_masq, v.ip_masq.get().unwrap_or(false));
        prop_assert_eq!(s.mtu, v.mtu.get().unwrap_or(1450));
        let routes = conf.ipam.map(|i| i.routes.len()).unwrap_or(0);
        prop_assert_eq!(routes, v.routes.as_ref().map_or(0, Vec::len));
        prop_assert_eq!(conf.valid_attachments.map(|a| a.len()), v.attachments.as_ref().map(Vec::len));
        Ok(())
    });
}

/// A value of another JSON type than `kind` ("string", "bool", "u32", "object", "array").
fn wrong_type(kind: &'static str) -> impl Strategy<Value = Value> {
    let all = prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(|f| json!(f + 0.5)),
        "\\PC{0,8}".prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
    ];
    all.prop_filter("a value of another type", move |v| match kind {
        "string" => !v.is_string(),
        "bool" => !v.is_boolean(),
        "u32" => v.as_u64().is_none_or(|n| n > u32::MAX as u64),
        "object" => !v.is_object(),
        "array" => !v.is_array(),
        _ => unreachable!(),
    })
}

/// A field of a valid configuration replaced with a value it does not take,
/// and its path (segments like `routes[0]`), which the error must name.
fn one_wrong_field() -> impl Strategy<Value = (Valid, Vec<String>, Value)> {
    let slots: Vec<(&'static [&'static str], BoxedStrategy<Value>)> = vec![
        (&["cniVersion"], prop_oneof![wrong_type("string"), Just(Value::Null)].boxed()),
        (
            &["name"],
            prop_oneof![
                wrong_type("string"),
                Just(Value::Null),
                Just(json!("a/b")),
                Just(json!("")),
                Just(json!(".."))
            ]
            .boxed(),
        ),
        (&["subnetFile"], wrong_type("string").boxed()),
        (&["dataDir"], wrong_type("string").boxed()),
        (&["delegate"], wrong_type("object").boxed()),
        (&["delegate", "type"], wrong_type("string").boxed()),
        (
            &["delegate", "bridge"],
            prop_oneof![
                wrong_type("string"),
                Just(json!("")),
                Just(json!("a/b")),
                Just(json!("has space")),
                "[a-z]{16,40}".prop_map(Value::from)
            ]
            .boxed(),
        ),
        (&["delegate", "isGateway"], wrong_type("bool").boxed()),
        (&["delegate", "isDefaultGateway"], wrong_type("bool").boxed()),
        (&["delegate", "hairpinMode"], wrong_type("bool").boxed()),
        (&["delegate", "ipMasq"], wrong_type("bool").boxed()),
        (
            &["delegate", "mtu"],
            prop_oneof![
                wrong_type("u32"),
                (0u64..68).prop_map(Value::from),
                (65536u64..=u32::MAX as u64).prop_map(Value::from)
            ]
            .boxed(),
        ),
        (&["ipam"], wrong_type("object").boxed()),
        (&["ipam", "routes"], wrong_type("array").boxed()),
        (
            &["ipam", "routes[0]", "dst"],
            prop_oneof![wrong_type("string"), Just(json!("10.0.0.0")), Just(json!("10.0.0.0/33")), Just(json!("nope"))]
                .boxed(),
        ),
        (
            &["ipam", "routes[0]", "gw"],
            prop_oneof![wrong_type("string"), Just(json!("10.0.0.1/24")), Just(json!("nope")), Just(json!("fc00::1"))]
                .boxed(),
        ),
        (&["cni.dev/valid-attachments"], wrong_type("array").boxed()),
        (
            &["cni.dev/valid-attachments[0]", "containerID"],
            prop_oneof![wrong_type("string"), Just(Value::Null)].boxed(),
        ),
        (&["cni.dev/valid-attachments[0]", "ifname"], prop_oneof![wrong_type("string"), Just(Value::Null)].boxed()),
    ];
    let slots: Vec<BoxedStrategy<(&'static [&'static str], Value)>> =
        slots.into_iter().map(|(path, s)| s.prop_map(move |v| (path, v)).boxed()).collect();
    (valid_config(), prop::strategy::Union::new(slots)).prop_map(|(mut valid, (path, value))| {
        // The slot must exist for the error to be about it: an IPv4 route
        // (so that an IPv6 gw is of the wrong family) and an attachment.
        valid.routes = Some(vec![("10.9.0.0/16".into(), Some("10.244.1.1".into()))]);
        valid.attachments = Some(vec![("c1".into(), "eth0".into())]);
        (valid, path.iter().map(|p| p.to_string()).collect(), value)
    })
}

/// Sets `path` (segments like `routes[0]`) in `root` to `value`.
fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, Some(rest.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (seg.as_str(), None),
        };
        let last = i + 1 == path.len();
        if last && index.is_none() {
            cur[key] = value;
            return;
        }
        cur = &mut cur[key];
        if let Some(n) = index {
            if last {
                cur[n] = value;
                return;
            }
            cur = &mut cur[n];
        }
    }
}

#[test]
fn a_field_of_the_wrong_type_or_value_is_rejected_with_code_7_naming_it() {
    check("config_one_wrong_field", one_wrong_field(), |(valid, path, value)| {
        let mut v = valid.to_json();
        set_path(&mut v, &path, value);
        let bytes = v.to_string();
        let e = match parse_checked(bytes.as_bytes())? {
            Ok(_) => return Err(TestCaseError::fail("accepted")),
            Err(e) => e,
        };
        let field = path.last().unwrap();
        let parent = path[..path.len() - 1].join(".");
        prop_assert_eq!(e.code, code::INVALID_CONFIG, "{}", e.msg);
        prop_assert!(e.msg.contains(&parent) && e.msg.contains(field), "{:?} does not name {}", e.msg, path.join("."));
        Ok(())
    });
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // serde_json stops at 128 levels; the exact boundary is its business.
    for depth in [10, 100, 200, 1_000, 100_000] {
        for key in ["prevResult", "someUnknownKey"] {
            let text =
                format!(r#"{{"cniVersion":"1.0.0","name":"n","{key}":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
            let (parsed, peak) = netns_fixtures::peak_alloc(|| NetConf::parse(text.as_bytes()));
            assert!(peak <= memory_bound(text.len()), "{peak} bytes for depth {depth}");
            if depth > 128 {
                let e = parsed.expect_err("too deep");
                assert_eq!(e.code, code::DECODE, "{e}");
                assert!(e.msg.contains("recursion limit"), "{e}");
            } else {
                assert!(parsed.is_ok(), "depth {depth} under {key}: {:?}", parsed.err());
            }
        }
    }
}

// ---- the CNI_* environment -----------------------------------------------

/// A value of a `CNI_*` variable: absent, empty, plausible or junk.
fn env_value(plausible: &'static str) -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(String::new())),
        4 => plausible.prop_map(Some),
        2 => "\\PC{0,40}".prop_map(Some),
        1 => "[ -~]{0,300}".prop_map(Some),
    ]
}

/// The spec's container ID rule, restated.
fn container_id_ok(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

/// Whether Linux takes `name` as an interface name (`dev_valid_name`).
fn kernel_takes_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b" \t\n\x0b\x0c\r".contains(&b))
}

#[derive(Debug, Clone)]
struct EnvCase {
    command: Option<String>,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    args: Option<String>,
}

#[test]
fn environment_is_accepted_exactly_when_valid_and_errors_name_the_variable() {
    let case = (
        prop_oneof![
            4 => prop::sample::select(vec!["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]).prop_map(|c| Some(c.to_string())),
            1 => env_value("[A-Z]{0,8}"),
        ],
        env_value("[A-Za-z0-9][A-Za-z0-9_.-]{0,70}"),
        env_value("/run/netns/[a-z0-9-]{1,20}"),
        env_value("[a-z]{1,8}[0-9]{0,10}"),
        env_value("(IgnoreUnknown=1;)?(K8S_POD_NAME=[a-z]{1,8};)?(IP=10\\.244\\.1\\.[0-9]{1,3})?"),
    )
        .prop_map(|(command, container_id, netns, ifname, args)| EnvCase { command, container_id, netns, ifname, args });
    check("env_load", case, |c| {
        let get = |k: &str| -> Option<String> {
            match k {
                "CNI_COMMAND" => c.command.clone(),
                "CNI_CONTAINERID" => c.container_id.clone(),
                "CNI_NETNS" => c.netns.clone(),
                "CNI_IFNAME" => c.ifname.clone(),
                "CNI_ARGS" => c.args.clone(),
                _ => None,
            }
        };
        let input_len: usize = [&c.command, &c.container_id, &c.netns, &c.ifname, &c.args]
            .iter()
            .map(|v| v.as_ref().map_or(0, String::len))
            .sum();
        let (cmd, peak) = netns_fixtures::peak_alloc(|| env::command(&get));
        prop_assert!(peak <= 16 * input_len + 4096);
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(e) => {
                prop_assert_eq!(e.code, code::INVALID_ENV);
                prop_assert!(e.msg.contains("CNI_COMMAND"), "{}", e.msg);
                return Ok(());
            }
        };
        let (loaded, peak) = netns_fixtures::peak_alloc(|| env::load(cmd, &get));
        prop_assert!(peak <= 16 * input_len + 4096, "{peak} bytes for {input_len} bytes of environment");
        if !matches!(cmd, Command::Add | Command::Del | Command::Check) {
            prop_assert!(loaded.is_ok());
            return Ok(());
        }
        // Which variable is wrong, in the order the spec lists them.
        fn set(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|s| !s.is_empty())
        }
        let first_bad = if !set(&c.container_id).is_some_and(container_id_ok) {
            Some("CNI_CONTAINERID")
        } else if !set(&c.ifname).is_some_and(|n| kernel_takes_ifname(n) && !n.chars().any(char::is_whitespace)) {
            Some("CNI_IFNAME")
        } else if cmd != Command::Del && set(&c.netns).is_none() {
            Some("CNI_NETNS")
        } else if env::parse_args(c.args.as_deref().unwrap_or("")).is_err() {
            Some("CNI_ARGS")
        } else {
            None
        };
        match (loaded, first_bad) {
            (Ok(env), None) => {
                prop_assert_eq!(Some(env.container_id), c.container_id.clone());
                prop_assert_eq!(Some(&env.ifname), c.ifname.as_ref());
                prop_assert!(kernel_takes_ifname(&env.ifname));
                prop_assert_eq!(env.netns, c.netns.clone().unwrap_or_default());
            }
            (Err(e), Some(var)) => {
                prop_assert_eq!(e.code, code::INVALID_ENV);
                prop_assert!(e.msg.contains(var), "{:?} does not name {}", e.msg, var);
            }
            (Ok(_), Some(var)) => return Err(TestCaseError::fail(format!("accepted a bad {var}"))),
            (Err(e), None) => return Err(TestCaseError::fail(format!("rejected a valid environment: {}", e.msg))),
        }
        Ok(())
    });
}

#[test]
fn cni_args_are_parsed_as_libcni_would_and_errors_name_cni_args() {
    let key = prop_oneof![
        prop::sample::select(vec![
            "IgnoreUnknown",
            "K8S_POD_NAMESPACE",
            "K8S_POD_NAME",
            "K8S_POD_INFRA_CONTAINER_ID",
            "K8S_POD_UID",
            "IP"
        ])
        .prop_map(String::from),
        "[A-Za-z_]{1,10}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec!["1", "true", "TRUE", "0", "false", "10.244.1.7", "fc00::7", "10.244.1.300", ""])
            .prop_map(String::from),
        "[^;]{0,12}",
    ];
    let pair = prop_oneof![
        8 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => "[^;=]{0,6}",
    ];
    let args = prop::collection::vec(pair, 0..6).prop_map(|p| p.join(";"));
    check("cni_args", args, |raw| {
        let (parsed, peak) = netns_fixtures::peak_alloc(|| env::parse_args(&raw));
        prop_assert!(peak <= 16 * raw.len() + 4096);
        // The oracle: libcni's rules (KEY=VALUE pairs; unknown keys are an
        // error unless IgnoreUnknown is 1 or true, in any case), but empty
        // pairs are skipped and a value may hold '='.
        let pairs: Vec<Option<(&str, &str)>> =
            raw.split(';').filter(|p| !p.is_empty()).map(|p| p.split_once('=')).collect();
        let known =
            ["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IP"];
        let ignore = pairs
            .iter()
            .flatten()
            .any(|(k, v)| *k == "IgnoreUnknown" && ["1", "true"].contains(&v.to_ascii_lowercase().as_str()));
        let valid = pairs.iter().all(|p| match p {
            None => false,
            Some(("IP", v)) => v.parse::<std::net::IpAddr>().is_ok(),
            Some((k, _)) => ignore || known.contains(k),
        });
        match parsed {
            Ok(a) => {
                prop_assert!(valid, "accepted {raw:?}");
                let last = |key: &str| pairs.iter().flatten().filter(|(k, _)| *k == key).map(|(_, v)| *v).next_back();
                prop_assert_eq!(
                    a.ips,
                    last("IP").map(|v| vec![v.parse::<std::net::IpAddr>().unwrap()]).unwrap_or_default()
                );
                let pod = last("K8S_POD_NAMESPACE").zip(last("K8S_POD_NAME"));
                prop_assert_eq!(a.pod, pod.map(|(n, p)| (n.to_string(), p.to_string())));
            }
            Err(e) => {
                prop_assert!(!valid, "rejected {raw:?}: {}", e.msg);
                prop_assert_eq!(e.code, code::INVALID_ENV);
                prop_assert!(e.msg.starts_with("CNI_ARGS: "), "{}", e.msg);
            }
        }
        Ok(())
    });
}
