//! The reachability matrix, many times over: random sets of policies built
//! from every field of the API, and for each, every probe of the lab on
//! every node: the compiled rules must decide exactly as the reference does.

use serde_json::{json, Value};

use super::{assert_agree, disagreements, lab_cluster, policies};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick(&mut self, pool: &[Value]) -> Value {
        pool[self.below(pool.len())].clone()
    }

    /// 0 to `max` picks from `pool`.
    fn some(&mut self, pool: &[Value], max: usize) -> Vec<Value> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.pick(pool)).collect()
    }
}

fn pod_selectors() -> Vec<Value> {
    vec![
        json!({}),
        json!({"matchLabels": {"pod": "a"}}),
        json!({"matchLabels": {"pod": "b"}}),
        json!({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "c"]}]}),
        json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}),
        json!({"matchExpressions": [{"key": "pod", "operator": "Exists"}]}),
        json!({"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}),
        json!({"matchLabels": {"k8s-app": "kube-dns"}}),
    ]
}

fn namespace_selectors() -> Vec<Value> {
    vec![
        json!({}),
        json!({"matchLabels": {"ns": "y"}}),
        json!({"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}),
        json!({"matchExpressions": [{"key": "ns", "operator": "In", "values": ["x", "z"]}]}),
        json!({"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}),
    ]
}

fn peers(rng: &mut Rng) -> Vec<Value> {
    let pods = pod_selectors();
    let nss = namespace_selectors();
    let mut out = vec![
        json!({"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}),
        json!({"ipBlock": {"cidr": "10.244.1.10/31"}}),
        json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16", "192.0.2.0/24"]}}),
        json!({"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.11/32"]}}),
        json!({"ipBlock": {"cidr": "2001:db8:2440::/44", "except": ["2001:db8:2442::/64"]}}),
        json!({"ipBlock": {"cidr": "2001:db8:2441::a/127"}}),
        json!({"ipBlock": {"cidr": "::/0", "except": ["2001:db8:2441::/64", "2001:db8:ff::12/128"]}}),
        json!({"ipBlock": {"cidr": "10.244.0.0/16", "except": ["2001:db8:2441::/64"]}}),
    ];
    out.push(json!({"podSelector": rng.pick(&pods)}));
    out.push(json!({"namespaceSelector": rng.pick(&nss)}));
    out.push(json!({"podSelector": rng.pick(&pods), "namespaceSelector": rng.pick(&nss)}));
    out
}

fn ports() -> Vec<Value> {
    vec![
        json!({"port": 80}),
        json!({"protocol": "UDP", "port": 81}),
        json!({"port": 80, "endPort": 81}),
        json!({"protocol": "UDP", "port": 53, "endPort": 82}),
        json!({"port": "http"}),
        json!({"port": "serve-81-udp", "protocol": "UDP"}),
        json!({"port": "dns", "protocol": "UDP"}),
        json!({"port": "nope"}),
        json!({"protocol": "SCTP"}),
        json!({"protocol": "TCP"}),
        json!({"protocol": "SCTP", "port": 82}),
    ]
}

fn rules(rng: &mut Rng, peer_key: &str) -> Vec<Value> {
    let n = rng.below(3);
    (0..n)
        .map(|_| {
            let pool = peers(rng);
            let mut rule = serde_json::Map::new();
            // An absent list and an empty one both mean "all".
            match rng.below(4) {
                0 => {}
                1 => {
                    rule.insert(peer_key.into(), json!([]));
                }
                _ => {
                    rule.insert(peer_key.into(), Value::Array(rng.some(&pool, 2)));
                }
            }
            if rng.below(3) > 0 {
                rule.insert("ports".into(), Value::Array(rng.some(&ports(), 3)));
            }
            Value::Object(rule)
        })
        .collect()
}

fn random_policy(rng: &mut Rng, i: usize) -> Value {
    let ns = ["x", "y", "z", "kube-system"][rng.below(4)];
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".into(), rng.pick(&pod_selectors()));
    if rng.below(2) == 0 {
        spec.insert("ingress".into(), Value::Array(rules(rng, "from")));
    }
    if rng.below(2) == 0 {
        spec.insert("egress".into(), Value::Array(rules(rng, "to")));
    }
    match rng.below(5) {
        0 => {
            spec.insert("policyTypes".into(), json!(["Ingress"]));
        }
        1 => {
            spec.insert("policyTypes".into(), json!(["Egress"]));
        }
        2 => {
            spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
        }
        _ => {}
    }
    json!({"metadata": {"namespace": ns, "name": format!("p{i}")}, "spec": spec})
}

#[test]
fn policy_random_matrix_compiled_agrees_with_reference() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut allowed_somewhere = 0;
    for scenario in 0..150 {
        let n = 1 + rng.below(4);
        let manifests: Vec<Value> = (0..n).map(|i| random_policy(&mut rng, i)).collect();
        let cluster = lab_cluster(&policies(&manifests));
        let bad = disagreements(&cluster, None);
        let pretty = serde_json::to_string_pretty(&manifests).unwrap();
        assert_agree(&format!("scenario {scenario} with policies {pretty}"), &bad);
        allowed_somewhere += usize::from(cluster.iter().any(|(_, r)| !r.chains.is_empty()));
    }
    // The generator must really produce enforcement, not only no-ops.
    assert!(allowed_somewhere > 100, "only {allowed_somewhere} scenarios enforce anything");
}
