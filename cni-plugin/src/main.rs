//! `flannel`: flannel-rs's CNI plugin, a drop-in for flannel's.
//!
//! One process per call, no daemon round trip and no second exec: ADD is a
//! handful of netlink requests and an IPAM file operation under a lock.
//!
//! The entry point is a C `main`, not std's: std's start-up costs 50-60 µs
//! of every call (see `flannel_net::entry`); the parts the plugin relies on
//! it does itself. Unit tests keep the harness's own `main`.
#![cfg_attr(not(test), no_main)]

mod cmd;
mod config;
mod delegate;
mod env;
mod error;
mod install;
mod ipam;
mod masq;
#[cfg(test)]
mod proptests;
mod result;
mod version;

use std::io::{Read, Write};

use serde_json::{json, Value};

use config::NetConf;
use env::Command;
use error::{code, CniError};

#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main(argc: std::ffi::c_int, argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    flannel_net::entry::prepare_process();
    // From main's own arguments, not std::env::args(), which only glibc's
    // start-up fills without std's.
    // SAFETY: the C runtime passes argc valid NUL-terminated strings.
    let args = (1..usize::try_from(argc).unwrap_or(0))
        .map(|i| unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) }.to_string_lossy().into_owned())
        .collect();
    plugin_main(args)
}

#[cfg_attr(test, allow(dead_code))]
fn plugin_main(args: Vec<String>) -> ! {
    if args.first().map(String::as_str) == Some(cmd::del::TEARDOWN_ARG) {
        // The detached half of DEL (see cmd::del): nobody reads its output.
        std::process::exit(i32::from(cmd::del::teardown(&args[1..]).is_err()));
    }
    if args.first().map(String::as_str) == Some(install::INSTALL_ARG) {
        // The DaemonSet's init containers: copy this binary or the conflist
        // onto the host atomically (the image has no shell).
        std::process::exit(install::main(&args[1..]));
    }
    if std::env::var_os("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        // Run by hand: say what this is, as flannel's plugin does (on
        // stderr, exit status 0), without waiting for a configuration.
        eprintln!("{}", version::about());
        eprintln!("CNI protocol versions supported: {}", version::SUPPORTED.join(", "));
        std::process::exit(0);
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let get = |k: &str| std::env::var(k).ok();
    let outcome = match read {
        Ok(_) => env::reject_non_utf8(std::env::vars_os()).and_then(|()| run(&get, &stdin)),
        Err(e) => Err(CniError::new(code::IO, format!("read network configuration from stdin: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    let status = match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&error_version(&stdin)));
            1
        }
    };
    let _ = out.flush();
    std::process::exit(status);
}

/// The version to report an error in: the configuration's when we support it.
fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::LATEST.to_string())
}

fn run(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let cmd = env::command(get)?;
    if cmd == Command::Version {
        return Ok(Some(json!({
            "cniVersion": error_version(stdin),
            "supportedVersions": version::SUPPORTED,
        })));
    }
    // Malformed JSON is left to NetConf::parse, after the environment, so
    // the errors come in the order they always did.
    let raw: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    if let Some(why) = raw.is_object().then(|| delegate::fast_path(&raw)).flatten() {
        return run_delegated(cmd, get, &raw, &why);
    }
    let env = env::load(cmd, get)?;
    let conf = NetConf::parse(stdin)?;
    match cmd {
        Command::Check => version::require(&conf.cni_version, "CHECK", "0.4.0")?,
        Command::Status => version::require(&conf.cni_version, "STATUS", "1.1.0")?,
        Command::Gc => version::require(&conf.cni_version, "GC", "1.1.0")?,
        _ => {}
    }
    let mut saved_for_rollback = false;
    if cmd == Command::Check && !delegate::added_in_process(&conf, &env) {
        // A pod flannel's plugin added (before the node moved): our veth
        // naming and IPAM record do not apply; check it as a delegated one.
        if delegate::saved(&raw, &env.container_id)?.is_some() {
            return delegate::check(&raw, &env).map(|()| None);
        }
    }
    if cmd == Command::Del {
        // A pod added through a delegate (flannel's own plugin, before this
        // node was migrated, or ours for another configuration) is deleted
        // the way it was added.
        if let Some((path, saved)) = delegate::saved(&raw, &env.container_id)? {
            if !delegate::added_in_process(&conf, &env) {
                return delegate::del(&path, &saved, &env).map(|()| None);
            }
            // Ours, saved only for a rollback (see delegate::save_for_rollback).
            saved_for_rollback = true;
        }
    }
    if cmd == Command::Status {
        return cmd::status::run(&conf).map(|()| None);
    }
    // A single-threaded runtime: the plugin does one thing at a time, and a
    // current-thread runtime starts in microseconds with no worker threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start async runtime: {e}")))?;
    rt.block_on(async {
        match cmd {
            Command::Add => cmd::add::run(&conf, &env, &raw).await.map(|r| Some(r.encode(&conf.cni_version))),
            Command::Del => {
                // The pod's network first (it is cut off even if the file
                // system has turned read-only). A DEL killed between the
                // release and the removal leaves a saved configuration
                // without an index entry: a retried DEL takes it for a pod of
                // flannel's plugin and runs the bridge plugin's DEL, which
                // finds nothing left to do and the file goes.
                cmd::del::run(&conf, &env).await?;
                if saved_for_rollback {
                    delegate::remove_saved(&conf.data_dir(), &env.container_id)?;
                }
                Ok(None)
            }
            Command::Check => cmd::check::run(&conf, &env).await.map(|()| None),
            Command::Gc => cmd::gc::run(&conf).await.map(|()| None),
            Command::Status | Command::Version => unreachable!("handled above"),
        }
    })
}

/// A configuration the in-process path does not implement exactly (`why`):
/// everything goes through the delegate, as with flannel's plugin.
fn run_delegated(
    cmd: Command,
    get: &dyn Fn(&str) -> Option<String>,
    raw: &Value,
    why: &str,
) -> Result<Option<Value>, CniError> {
    let cni_version = raw["cniVersion"].as_str().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "network configuration: cniVersion: missing or not a string")
    })?;
    version::check_supported(cni_version)?;
    if raw["name"].as_str().is_none_or(|n| n.is_empty() || n.contains('/') || n == "." || n == "..") {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("network configuration: name {} must be a non-empty string without '/'", raw["name"]),
        ));
    }
    let env = env::load_attachment(cmd, get)?;
    eprintln!("flannel: {why}: delegating {} to the plugins the configuration names", cmd.as_str());
    match cmd {
        Command::Add => delegate::add(raw, &env.container_id).map(Some),
        Command::Del => match delegate::saved(raw, &env.container_id)? {
            Some((path, saved)) => delegate::del(&path, &saved, &env).map(|()| None),
            // Never added, or already deleted: nothing to do (flannel's answer too).
            None => Ok(None),
        },
        Command::Check => {
            version::require(cni_version, "CHECK", "0.4.0")?;
            match delegate::saved(raw, &env.container_id)? {
                Some(_) => delegate::check(raw, &env).map(|()| None),
                None => Err(CniError::new(
                    code::INTERNAL,
                    format!("CHECK: no saved delegate configuration for container {}", env.container_id),
                )),
            }
        }
        Command::Status | Command::Gc => {
            version::require(cni_version, cmd.as_str(), "1.1.0")?;
            delegate::status_or_gc(raw, cmd).map(|()| None)
        }
        Command::Version => unreachable!("handled before"),
    }
}
