//! nft itself on our text: `nft -c` (the kernel validates the transaction,
//! then it is rolled back) for every case, and a real load whose result is
//! read back with `nft -j`. Only in a throw-away network namespace; needs
//! root (skips without it, fails with CI=true).

use std::io::Write;
use std::process::{Command, Stdio};

use netns_fixtures::Netns;

use super::golden::scenarios;
use super::{lab_input, policies};
use crate::policy::{compile, teardown_script, TABLE};

fn nft(ns: &Netns, args: &[&str], script: &str) -> Result<String, String> {
    let mut cmd: Command = ns.command(flannel_net::host::nft_binary());
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| format!("write to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("wait for nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Every ruleset the golden scenarios and the reachability cases compile
/// to, named for the failure message.
fn rulesets() -> Vec<(String, crate::policy::PolicyInput)> {
    let mut inputs: Vec<(String, crate::policy::PolicyInput)> =
        scenarios().into_iter().map(|(n, i)| (format!("golden {n}"), i)).collect();
    for (name, manifests, _) in super::cases::all() {
        for node in 0..2 {
            let input = lab_input(&policies(&manifests), node);
            inputs.push((format!("case {name:?} on node {node}"), input));
        }
    }
    inputs
}

/// `nft -c` of each ruleset; the refusals.
fn refused(ns: &Netns, inputs: &[(String, crate::policy::PolicyInput)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, input) in inputs {
        let text = compile(input).render();
        if let Err(e) = nft(ns, &["-c", "-f", "-"], &text) {
            failures.push(format!("{name}: {e}\n{text}"));
        }
    }
    failures
}

#[test]
fn policy_nft_accepts_every_ruleset() {
    if !netns_fixtures::require_root() {
        return;
    }
    let ns = Netns::new("policy").expect("a network namespace");
    let inputs = rulesets();
    let failures = refused(&ns, &inputs);
    assert!(failures.is_empty(), "nft -c refused {} rulesets:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn policy_nft_loads_replaces_and_removes_the_table() {
    if !netns_fixtures::require_root() {
        return;
    }
    let ns = Netns::new("policy").expect("a network namespace");
    let (_, input) = scenarios().into_iter().find(|(n, _)| *n == "ingress-deny-and-allow").expect("scenario");
    let text = compile(&input).render();
    // Twice: the second run replaces the table the first created.
    for _ in 0..2 {
        nft(&ns, &["-f", "-"], &text).unwrap_or_else(|e| panic!("nft -f: {e}"));
    }
    let listed = nft(&ns, &["-j", "list", "table", "inet", TABLE], "").expect("list table");
    let v: serde_json::Value = serde_json::from_str(&listed).expect("nft -j output");
    let items = v["nftables"].as_array().expect("nftables array");
    let mut chains: Vec<&str> = items.iter().filter_map(|o| o["chain"]["name"].as_str()).collect();
    chains.sort();
    assert_eq!(chains, ["in_x_default-deny", "in_x_web-from-y", "ingress"]);
    let isolated = items
        .iter()
        .find(|o| o["set"]["name"] == "isolated_ingress")
        .map(|o| o["set"]["elem"].clone())
        .expect("set isolated_ingress");
    assert_eq!(isolated, serde_json::json!(["10.244.1.10", "10.244.1.11"]));
    let hook = items.iter().find(|o| o["chain"]["name"] == "ingress").expect("chain ingress");
    assert_eq!(hook["chain"]["hook"], "forward");
    assert_eq!(hook["chain"]["prio"], 1);
    nft(&ns, &["-f", "-"], &teardown_script()).expect("teardown");
    assert_eq!(nft(&ns, &["list", "ruleset"], "").expect("list ruleset").trim(), "");
}
