//! The real binary's log lines: a missing net-conf.json makes the daemon fail
//! before it touches the kernel (no root needed), with one error line on
//! stderr, which must say when, how bad and where, as text and as JSON.

use std::process::{Command, Output};

/// Runs the daemon in Kubernetes mode with a net-conf.json that does not
/// exist, with a clean logging environment plus `envs`.
fn run_without_config(args: &[&str], envs: &[(&str, &str)]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("net-conf.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flanneld-rs"));
    cmd.arg("--kube-subnet-mgr")
        .arg("--net-config-path")
        .arg(&missing)
        .arg("--subnet-file")
        .arg(dir.path().join("subnet.env"))
        .args(args);
    for var in ["FLANNELD_LOG", "FLANNELD_LOG_FORMAT", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    cmd.envs(envs.iter().copied());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    (out, missing.display().to_string())
}

#[test]
fn text_lines_have_a_timestamp_level_and_target() {
    let (out, missing) = run_without_config(&[], &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line =
        regex::Regex::new(r"(?m)^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z +ERROR (flanneld_rs(::\w+)*): (.*)$")
            .unwrap();
    let caps = line.captures(&stderr).unwrap_or_else(|| panic!("no timestamped error line in:\n{stderr}"));
    assert!(caps[4].contains(&missing), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in:\n{stderr}");
}

#[test]
fn json_lines_parse_and_carry_the_same_facts() {
    for (args, envs) in [(&["--log-format", "json"][..], &[][..]), (&[][..], &[("FLANNELD_LOG_FORMAT", "json")][..])] {
        let (out, missing) = run_without_config(args, envs);
        let stderr = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in:\n{stderr}")))
            .collect();
        let error = lines.iter().find(|l| l["level"] == "ERROR").unwrap_or_else(|| panic!("no error in:\n{stderr}"));
        let ts = error["timestamp"].as_str().unwrap();
        assert!(ts.len() > 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert!(error["target"].as_str().unwrap().starts_with("flanneld_rs"), "{error}");
        assert!(error["message"].as_str().unwrap().contains(&missing), "{error}");
    }
}

#[test]
fn a_log_filter_silences_and_an_unknown_format_is_refused() {
    let (out, _) = run_without_config(&[], &[("FLANNELD_LOG", "off")]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    let out = Command::new(env!("CARGO_BIN_EXE_flanneld-rs")).args(["--log-format", "xml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--log-format") && stderr.contains("xml"), "{stderr}");
}
