//! Delegation, as flannel's own plugin does it, for every configuration the
//! in-process path does not implement exactly.
//!
//! flannel's plugin builds a configuration for its `delegate` (by default the
//! reference `bridge` plugin with `host-local` IPAM) from `subnet.env`, saves
//! it as `<dataDir>/<container ID>` for DEL, and executes the delegate found
//! on `CNI_PATH`. We do the same work in process when every key of
//! `delegate` and `ipam` is one we implement exactly ([`fast_path`]); any
//! other configuration (another delegate type, another IPAM plugin, a bridge
//! or host-local key we do not implement, a `runtimeConfig`) is delegated
//! exactly as flannel does, so no configuration that works with flannel is
//! refused or silently changed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::{json, Map, Value};

use crate::env::Command;
use crate::error::{code, CniError};

/// `delegate` keys the in-process path implements (the bridge plugin's).
const BRIDGE_KEYS: &[&str] = &["type", "bridge", "isGateway", "isDefaultGateway", "hairpinMode", "ipMasq", "mtu"];
/// `ipam` keys the in-process path implements (host-local's).
const IPAM_KEYS: &[&str] = &["type", "routes", "dataDir"];
/// Keys of one `ipam.routes` entry the in-process path implements.
const ROUTE_KEYS: &[&str] = &["dst", "gw"];

/// Why a configuration cannot take the in-process path (`None`: it can).
/// Malformed sections (not objects, a non-string type) are left to the
/// in-process parser, whose errors name the field.
pub fn fast_path(conf: &Value) -> Option<String> {
    let foreign = |section: &str, obj: &Map<String, Value>, known: &[&str]| {
        obj.keys().find(|k| !known.contains(&k.as_str())).map(|k| format!("{section}.{k} is set"))
    };
    if let Some(d) = conf["delegate"].as_object() {
        match d.get("type") {
            Some(Value::String(t)) if t != "bridge" => return Some(format!("delegate.type is {t:?}")),
            _ => {}
        }
        if let Some(why) = foreign("delegate", d, BRIDGE_KEYS) {
            return Some(why);
        }
    }
    if let Some(i) = conf["ipam"].as_object() {
        match i.get("type") {
            Some(Value::String(t)) if t != "host-local" => return Some(format!("ipam.type is {t:?}")),
            _ => {}
        }
        if let Some(why) = foreign("ipam", i, IPAM_KEYS) {
            return Some(why);
        }
        for (n, r) in i.get("routes").and_then(Value::as_array).into_iter().flatten().enumerate() {
            if let Some(why) = r.as_object().and_then(|r| foreign(&format!("ipam.routes[{n}]"), r, ROUTE_KEYS)) {
                return Some(why);
            }
        }
    }
    match &conf["runtimeConfig"] {
        Value::Null => {}
        Value::Object(o) if o.is_empty() => {}
        _ => return Some("runtimeConfig is set".into()),
    }
    None
}

/// flannel's own checks of `delegate` before it builds anything.
fn check_delegate(conf: &Value) -> Result<(), CniError> {
    let invalid = |msg: &str| Err(CniError::new(code::INVALID_CONFIG, format!("network configuration: {msg}")));
    match &conf["delegate"] {
        Value::Null => Ok(()),
        Value::Object(d) => {
            if d.get("type").is_some_and(|t| !t.is_string()) {
                return invalid("delegate.type must be a string");
            }
            if d.contains_key("name") {
                return invalid("delegate.name must not be set: flannel sets it to the network's name");
            }
            if d.contains_key("ipam") {
                return invalid("delegate.ipam must not be set: flannel builds it from ipam and subnet.env");
            }
            Ok(())
        }
        other => invalid(&format!("delegate: invalid type: {}, expected an object", json_kind(other))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// flannel's `subnetFile` and `dataDir`, with its defaults.
fn paths(conf: &Value) -> Result<(PathBuf, PathBuf), CniError> {
    let get = |key: &str, default: &str| match &conf[key] {
        Value::Null => Ok(PathBuf::from(default)),
        Value::String(s) => Ok(PathBuf::from(s)),
        other => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("network configuration: {key}: invalid type: {}, expected a string", json_kind(other)),
        )),
    };
    Ok((get("subnetFile", crate::config::DEFAULT_SUBNET_FILE)?, get("dataDir", crate::config::DEFAULT_DATA_DIR)?))
}

/// The delegate's configuration, built as flannel builds it: the `delegate`
/// object plus `name`, `cniVersion`, `runtimeConfig`, `type` (default
/// `bridge`), `ipMasq` (default: not `FLANNEL_IPMASQ`), `mtu` (default
/// `FLANNEL_MTU`), `isGateway` (default true for `bridge`), and `ipam`: the
/// configuration's `ipam` with `type` defaulting to `host-local`, `ranges`
/// replaced by the lease's subnets and the cluster networks appended to
/// `routes`.
pub fn build(conf: &Value) -> Result<Value, CniError> {
    check_delegate(conf)?;
    let (subnet_file, _) = paths(conf)?;
    let lease = crate::cmd::load_lease(&subnet_file)?;
    build_from(conf, &lease)
}

/// [`build`] with the lease already read.
fn build_from(conf: &Value, lease: &flannel_net::subnet_env::SubnetEnv) -> Result<Value, CniError> {
    let mut d = conf["delegate"].as_object().cloned().unwrap_or_default();
    if let Some(rc) = conf.get("runtimeConfig").filter(|v| !v.is_null()) {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d.insert("name".into(), conf["name"].clone());
    d.entry("type").or_insert_with(|| json!("bridge"));
    d.entry("ipMasq").or_insert_with(|| json!(!lease.ipmasq));
    d.entry("mtu").or_insert_with(|| json!(lease.mtu));
    if d["type"] == "bridge" {
        d.entry("isGateway").or_insert(json!(true));
    }
    if let Some(v) = conf.get("cniVersion").filter(|v| v.as_str().is_some_and(|s| !s.is_empty())) {
        d.insert("cniVersion".into(), v.clone());
    }
    let mut ipam = match &conf["ipam"] {
        Value::Null => Map::new(),
        Value::Object(o) => o.clone(),
        other => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network configuration: ipam: invalid type: {}, expected an object", json_kind(other)),
            ))
        }
    };
    ipam.entry("type").or_insert_with(|| json!("host-local"));
    let mut ranges = Vec::new();
    if let Some(s) = lease.subnet {
        ranges.push(json!([{ "subnet": s.trunc().to_string() }]));
    }
    if let Some(s) = lease.ipv6_subnet {
        ranges.push(json!([{ "subnet": s.trunc().to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network configuration: ipam.routes: invalid type: {}, expected an array", json_kind(other)),
            ))
        }
    };
    for n in crate::cmd::networks(lease) {
        routes.push(json!({ "dst": n.to_string() }));
    }
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    Ok(Value::Object(d))
}

/// Where the delegate's configuration of a container is saved for DEL.
pub fn saved_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// The saved delegate configuration of a container, if any.
pub fn saved(conf: &Value, container_id: &str) -> Result<Option<(PathBuf, Vec<u8>)>, CniError> {
    let (_, data_dir) = paths(conf)?;
    let path = saved_path(&data_dir, container_id);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some((path, bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // A directory of that name is our own IPAM state (`networks`), never a container's.
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => Ok(None),
        Err(e) => Err(CniError::new(code::IO, format!("read {}: {e}", path.display()))),
    }
}

/// ADD through the delegate: build, save, execute; the delegate's result
/// (or error) is ours. The saved file stays when the delegate fails, as with
/// flannel, so that the runtime's DEL can undo what the delegate did.
pub fn add(conf: &Value, container_id: &str) -> Result<Value, CniError> {
    let delegate = build(conf)?;
    let (_, data_dir) = paths(conf)?;
    let bytes = serde_json::to_vec(&delegate).expect("a JSON value serializes");
    save(&data_dir, container_id, &bytes)?;
    let kind = delegate["type"].as_str().expect("type set by build").to_string();
    exec(&kind, Command::Add, &bytes)?
        .ok_or_else(|| CniError::new(code::INTERNAL, format!("delegate plugin {kind:?} printed no result for ADD")))
}

/// DEL through a saved configuration: the delegate's DEL, then the file goes.
/// When the delegate is no longer on `CNI_PATH` and the configuration is
/// flannel's usual bridge + host-local one, we do what their DEL does
/// ourselves ([`del_in_process`]): a pod must stay deletable.
pub fn del(path: &Path, saved: &[u8], env: &crate::env::CniEnv) -> Result<(), CniError> {
    let kind = saved_type(path, saved)?;
    match find_plugin(&kind) {
        Ok(_) => {
            exec(&kind, Command::Del, saved)?;
        }
        Err(missing) => {
            let v: Value = serde_json::from_slice(saved).unwrap_or(Value::Null);
            let ipam = v["ipam"]["type"].as_str().unwrap_or("host-local");
            if kind != "bridge" || ipam != "host-local" {
                return Err(missing);
            }
            eprintln!("flannel: {}: deleting the pod as bridge and host-local would", missing.msg);
            del_in_process(&v, env)?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::new(code::IO, format!("remove {}: {e}", path.display()))),
    }
}

/// What the bridge and host-local plugins' DEL do for a pod, without them:
/// host-local's reservation files of the attachment are removed (under
/// host-local's lock), and the pod's interface is deleted, which deletes its
/// veth's host end too. The bridge plugin's masquerade chain (`ipMasq`,
/// iptables) cannot be removed without it: that is said on stderr.
fn del_in_process(v: &Value, env: &crate::env::CniEnv) -> Result<(), CniError> {
    let name = v["name"].as_str().unwrap_or_default();
    let base = v["ipam"]["dataDir"].as_str().unwrap_or("/var/lib/cni/networks");
    let released = crate::ipam::release_host_local(&Path::new(base).join(name), &env.container_id, &env.ifname)?;
    for ip in &released {
        eprintln!("flannel: released {ip} of {}/{} in host-local's store", env.container_id, env.ifname);
    }
    if v["ipMasq"] == json!(true) {
        eprintln!(
            "flannel: the bridge plugin's masquerade rules for container {} (iptables nat chain CNI-...) stay: put the bridge plugin back on CNI_PATH to remove them",
            env.container_id
        );
    }
    if env.netns.is_empty() {
        return Ok(());
    }
    let Ok(ns) = flannel_net::netns::NetNs::open(&env.netns) else { return Ok(()) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start async runtime: {e}")))?;
    rt.block_on(async {
        let pod = flannel_net::netlink::Netlink::connect_in(&ns)?;
        if let Some(link) = pod.link_by_name(&env.ifname).await? {
            pod.del_link(link.index, &env.ifname).await?;
        }
        Ok(())
    })
}

/// Whether the in-process path added this attachment (our store indexes
/// it): then its saved configuration is only for a rollback, and DEL is ours.
pub fn added_in_process(conf: &crate::config::NetConf, env: &crate::env::CniEnv) -> bool {
    crate::ipam::Store::indexes(&conf.data_dir(), &conf.name, &env.container_id, &env.ifname)
}

/// CHECK of a delegated attachment (its saved configuration exists): the
/// pod's interface is there and holds every address of `prevResult`.
///
/// flannel's plugin answers CHECK without looking, and its chain could not
/// do better by asking the delegate: the reference bridge plugin's CHECK
/// rejects the gateway-less routes flannel hands it ("Expected Route
/// {Dst:10.244.0.0/16 GW:<nil>} not found"), so every healthy pod would fail.
pub fn check(conf: &Value, env: &crate::env::CniEnv) -> Result<(), CniError> {
    let prev = conf
        .get("prevResult")
        .filter(|v| !v.is_null())
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network configuration: CHECK needs prevResult"))?;
    let prev = crate::result::CniResult::decode(prev)?;
    let netns = crate::cmd::open_netns(&env.netns)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start async runtime: {e}")))?;
    rt.block_on(async {
        let pod = flannel_net::netlink::Netlink::connect_in(&netns)?;
        let Some(link) = pod.link_by_name(&env.ifname).await? else {
            return Err(CniError::new(
                code::INTERNAL,
                format!("CHECK: interface {} is missing from {}", env.ifname, env.netns),
            ));
        };
        let have = pod.addrs(link.index).await?;
        let pod_if = prev.interfaces.iter().position(|i| i.name == env.ifname && i.sandbox.is_some());
        let missing: Vec<String> = prev
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none() || ip.interface == pod_if)
            .filter(|ip| !have.contains(&ip.address))
            .map(|ip| format!("address {} is missing from {} in {}", ip.address, env.ifname, env.netns))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(code::INTERNAL, format!("CHECK: {}", missing.join("; "))))
        }
    })
}

/// STATUS and GC through the delegate, with the configuration ADD would build
/// now (GC gets the runtime's valid attachments).
pub fn status_or_gc(conf: &Value, cmd: Command) -> Result<(), CniError> {
    let mut delegate = build(conf)?;
    if cmd == Command::Gc {
        delegate["cni.dev/valid-attachments"] = conf["cni.dev/valid-attachments"].clone();
    }
    let kind = delegate["type"].as_str().expect("type set by build").to_string();
    exec(&kind, cmd, &serde_json::to_vec(&delegate).expect("a JSON value serializes")).map(|_| ())
}

fn saved_type(path: &Path, saved: &[u8]) -> Result<String, CniError> {
    let v: Value = serde_json::from_slice(saved)
        .map_err(|e| CniError::new(code::DECODE, format!("saved delegate configuration {}: {e}", path.display())))?;
    v["type"].as_str().map(str::to_string).ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, format!("saved delegate configuration {} has no type", path.display()))
    })
}

/// After an in-process ADD: saves the configuration flannel's plugin would
/// have saved for this pod (the in-process path takes only configurations
/// whose delegate is exactly that), so that after a rollback to flannel's
/// plugin its DEL of this pod works: the bridge plugin deletes the pod's
/// interface, host-local releases the reservation file we mirrored. Not
/// synced (flannel syncs): our own DEL does not need the file, and ADD does
/// not pay for a disk flush.
pub fn save_for_rollback(
    conf: &Value,
    lease: &flannel_net::subnet_env::SubnetEnv,
    data_dir: &Path,
    container_id: &str,
) -> Result<(), CniError> {
    if Path::new(container_id) == Path::new(crate::ipam::NETWORKS_DIR) {
        // The one name our own IPAM directory takes in dataDir.
        eprintln!(
            "flannel: container ID {container_id:?} names our IPAM directory: no configuration saved for a rollback"
        );
        return Ok(());
    }
    let delegate = build_from(conf, lease)?;
    let bytes = serde_json::to_vec(&delegate).expect("a JSON value serializes");
    // Without a runtimeConfig the file is the same for every pod of the
    // network (the configuration and the lease alone make it): pods share
    // one copy, each file a hard link to it, which costs a directory entry
    // where a file of its own costs a new inode (0.1 to 0.3 ms on ext4 here).
    let template = match conf.get("runtimeConfig").filter(|v| !v.is_null()) {
        None => conf["name"].as_str().map(|n| crate::ipam::Store::dir_for(data_dir, n).join(ROLLBACK_TEMPLATE)),
        Some(_) => None,
    };
    let Some(template) = template else { return write(data_dir, container_id, &bytes, false) };
    let path = saved_path(data_dir, container_id);
    match std::fs::hard_link(&template, &path) {
        // The content is checked through the new name: that is the file
        // this pod now holds, whatever happens to the template meanwhile.
        Ok(()) if std::fs::read(&path).is_ok_and(|held| held == bytes) => return Ok(()),
        Ok(()) => {
            let _ = std::fs::remove_file(&path);
        }
        // This pod's file is there already (a retried ADD): it gets a file
        // of its own; the template is not in question.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return write(data_dir, container_id, &bytes, false);
        }
        Err(_) => {}
    }
    write(data_dir, container_id, &bytes, false)?;
    // The template is missing or stale (a new lease): this pod's file
    // becomes it. Removed, then linked, with no temporary name: a kill in
    // between leaves no template, which the next pod makes again; ADDs at
    // once at worst share one copy fewer (each checks what it links).
    let _ = std::fs::remove_file(&template);
    let _ = std::fs::hard_link(&path, &template);
    Ok(())
}

/// The shared copy of the configuration saved for a rollback, in our IPAM
/// directory of the network (its name is no address, so IPAM ignores it).
pub const ROLLBACK_TEMPLATE: &str = "rollback-delegate.json";

/// Removes a container's saved configuration, if any. GC passes IDs read
/// from records, and a record cut short by a kill has an empty one: what is
/// not a container ID (`CNI_CONTAINERID`'s rule) names no saved file.
pub fn remove_saved(data_dir: &Path, container_id: &str) -> Result<(), CniError> {
    let is_id = container_id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && container_id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !is_id || container_id == crate::ipam::NETWORKS_DIR {
        return Ok(());
    }
    let path = saved_path(data_dir, container_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::new(code::IO, format!("remove {}: {e}", path.display()))),
    }
}

/// Writes the file flannel writes (mode 0600 in a 0700 directory), synced.
fn save(data_dir: &Path, container_id: &str, bytes: &[u8]) -> Result<(), CniError> {
    write(data_dir, container_id, bytes, true)
}

fn write(data_dir: &Path, container_id: &str, bytes: &[u8], sync: bool) -> Result<(), CniError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |what: String| move |e: std::io::Error| CniError::new(code::IO, format!("{what}: {e}"));
    let path = saved_path(data_dir, container_id);
    // A file of its own, never written through an existing name: that may be
    // a hard link to the rollback template (see save_for_rollback), which
    // other pods' files share.
    let open = || std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
    let replace = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::AlreadyExists => std::fs::remove_file(&path).and_then(|()| open()),
        _ => Err(e),
    };
    // The directory is there but for the first pod: try the file first.
    let opened = match open().or_else(replace) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(io(format!("create {}", data_dir.display())))?;
            open().or_else(replace)
        }
        other => other,
    };
    let mut f = opened.map_err(io(format!("create {}", path.display())))?;
    let written = f.write_all(bytes).and_then(|()| if sync { f.sync_all() } else { Ok(()) });
    if written.is_err() {
        // Nothing half-made: a truncated configuration would make DEL fail.
        let _ = std::fs::remove_file(&path);
    }
    written.map_err(io(format!("write {}", path.display())))
}

/// The plugin `kind` on `CNI_PATH`.
fn find_plugin(kind: &str) -> Result<PathBuf, CniError> {
    if kind.is_empty() || kind.contains('/') {
        return Err(CniError::new(code::INVALID_CONFIG, format!("delegate plugin type {kind:?} is not a plugin name")));
    }
    let path = std::env::var("CNI_PATH").unwrap_or_default();
    if path.is_empty() {
        return Err(CniError::new(code::INVALID_ENV, format!("CNI_PATH is not set: needed to find plugin {kind:?}")));
    }
    for dir in std::env::split_paths(&path).filter(|d| !d.as_os_str().is_empty()) {
        let candidate = dir.join(kind);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(CniError::new(code::INVALID_CONFIG, format!("failed to find plugin {kind:?} in CNI_PATH {path}")))
}

/// Executes the plugin `kind` for `cmd` with `stdin`, in our environment
/// (with `CNI_COMMAND` set to `cmd`). Its error, when it reports one, is
/// ours verbatim, as flannel's plugin passes it on.
fn exec(kind: &str, cmd: Command, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let binary = find_plugin(kind)?;
    let mut child = Process::new(&binary)
        .env("CNI_COMMAND", cmd.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::new(code::IO, format!("run {}: {e}", binary.display())))?;
    let written = child.stdin.take().expect("piped").write_all(stdin);
    let out =
        child.wait_with_output().map_err(|e| CniError::new(code::IO, format!("run {}: {e}", binary.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<Value> = serde_json::from_str(text.trim()).ok();
    if !out.status.success() {
        if let Some(e) = parsed.as_ref().filter(|v| v["code"].is_u64()) {
            let c = e["code"].as_u64().unwrap_or(code::INTERNAL as u64) as u32;
            let msg = e["msg"].as_str().unwrap_or_default();
            return Err(CniError::new(c, msg).with_details(e["details"].as_str().unwrap_or_default()));
        }
        return Err(CniError::new(
            code::INTERNAL,
            format!("delegate plugin {} {} failed ({}): {}", binary.display(), cmd.as_str(), out.status, text.trim()),
        ));
    }
    if let Err(e) = written {
        return Err(CniError::new(code::IO, format!("write configuration to {}: {e}", binary.display())));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    parsed.map(Some).ok_or_else(|| {
        CniError::new(code::DECODE, format!("delegate plugin {} printed non-JSON: {}", binary.display(), text.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_one_rollback_file_per_configuration_and_lease() {
        use flannel_net::subnet_env::SubnetEnv;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        std::fs::create_dir_all(crate::ipam::Store::dir_for(data, "cbr0")).unwrap();
        let lease = |subnet: &str| {
            let text = format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
            );
            SubnetEnv::parse(Path::new("subnet.env"), &text).unwrap()
        };
        let conf = json!({"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true}});
        let (one, two) = (lease("10.244.1.1/24"), lease("10.244.2.1/24"));
        let want = |l: &SubnetEnv| serde_json::to_vec(&build_from(&conf, l).unwrap()).unwrap();
        let meta = |id: &str| std::fs::metadata(saved_path(data, id)).unwrap();
        save_for_rollback(&conf, &one, data, "a").unwrap();
        save_for_rollback(&conf, &one, data, "b").unwrap();
        assert_eq!(std::fs::read(saved_path(data, "b")).unwrap(), want(&one));
        assert_eq!(meta("a").ino(), meta("b").ino(), "one file, several names");
        assert_eq!(meta("a").mode() & 0o777, 0o600);
        // A new lease: the next pod gets the new content, the earlier ones keep theirs.
        save_for_rollback(&conf, &two, data, "c").unwrap();
        assert_eq!(std::fs::read(saved_path(data, "c")).unwrap(), want(&two));
        assert_eq!(std::fs::read(saved_path(data, "a")).unwrap(), want(&one));
        save_for_rollback(&conf, &two, data, "d").unwrap();
        assert_eq!(meta("c").ino(), meta("d").ino());
        // Writing a pod's file (a retried ADD through the delegate) replaces
        // that name only, never the file the others share.
        save(data, "c", b"{}").unwrap();
        assert_eq!(std::fs::read(saved_path(data, "d")).unwrap(), want(&two));
        assert_eq!(std::fs::read(saved_path(data, "c")).unwrap(), b"{}");
        // With a runtimeConfig (per pod) each pod has a file of its own.
        let rc = json!({"cniVersion":"1.0.0","name":"cbr0","runtimeConfig":{"portMappings":[]}});
        save_for_rollback(&rc, &two, data, "e").unwrap();
        assert_eq!(meta("e").nlink(), 1);
        remove_saved(data, "d").unwrap();
        assert!(!saved_path(data, "d").exists());
        assert_eq!(std::fs::read(saved_path(data, "c")).unwrap(), b"{}");
        // A template a kill took away (between its removal and its link)
        // is made again by the next pod; no other name is ever left there.
        let template = crate::ipam::Store::dir_for(data, "cbr0").join(ROLLBACK_TEMPLATE);
        std::fs::remove_file(&template).unwrap();
        save_for_rollback(&conf, &two, data, "f").unwrap();
        save_for_rollback(&conf, &two, data, "g").unwrap();
        assert_eq!((meta("f").ino(), meta("f").nlink()), (meta("g").ino(), 3));
        let names: Vec<_> =
            std::fs::read_dir(template.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [ROLLBACK_TEMPLATE]);
        // A retried ADD: the pod's name gets a file of its own, the shared one stays.
        save_for_rollback(&conf, &two, data, "f").unwrap();
        assert_eq!(std::fs::read(saved_path(data, "f")).unwrap(), want(&two));
        assert_eq!((meta("f").nlink(), meta("g").nlink()), (1, 2));
        assert_eq!(meta("g").ino(), std::fs::metadata(&template).unwrap().ino());
    }

    #[test]
    fn only_configurations_we_implement_exactly_take_the_fast_path() {
        let fast = [
            json!({"name":"cbr0","delegate":{"hairpinMode":true,"isDefaultGateway":true}}),
            json!({"name":"cbr0"}),
            json!({"delegate":{"type":"bridge","bridge":"br9","mtu":1400,"ipMasq":true,"isGateway":false}}),
            json!({"ipam":{"type":"host-local","dataDir":"/x","routes":[{"dst":"192.0.2.0/24","gw":"10.244.1.9"}]}}),
            json!({"runtimeConfig":{}}),
            // Malformed: the in-process parser names the field.
            json!({"delegate":[1],"ipam":"x"}),
        ];
        for c in fast {
            assert_eq!(fast_path(&c), None, "{c}");
        }
        let exec = [
            (json!({"delegate":{"type":"macvlan","master":"eth0"}}), "delegate.type is \"macvlan\""),
            (json!({"delegate":{"forceAddress":true}}), "delegate.forceAddress is set"),
            (json!({"ipam":{"type":"static"}}), "ipam.type is \"static\""),
            (json!({"ipam":{"rangeStart":"10.244.1.10"}}), "ipam.rangeStart is set"),
            (json!({"ipam":{"routes":[{"dst":"192.0.2.0/24","mtu":1300}]}}), "ipam.routes[0].mtu is set"),
            (json!({"runtimeConfig":{"mac":"0a:00:00:00:00:01"}}), "runtimeConfig is set"),
        ];
        for (c, why) in exec {
            assert_eq!(fast_path(&c).as_deref(), Some(why), "{c}");
        }
    }

    #[test]
    fn remove_saved_never_touches_what_is_not_a_containers_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("networks/cbr0")).unwrap();
        std::fs::write(dir.path().join("ctr"), "{}").unwrap();
        for id in ["", "networks", "..", "a/b", "-x"] {
            remove_saved(dir.path(), id).unwrap();
        }
        assert!(dir.path().join("networks/cbr0").is_dir());
        remove_saved(dir.path(), "ctr").unwrap();
        assert!(!dir.path().join("ctr").exists());
        remove_saved(dir.path(), "ctr").unwrap();
    }

    #[test]
    fn an_ipv6_only_lease_gives_the_delegate_one_ipv6_range_set_and_route() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("subnet.env");
        std::fs::write(
            &env,
            "FLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let d = build(&json!({"cniVersion":"1.0.0","name":"cbr0","subnetFile":env})).unwrap();
        assert_eq!(
            d["ipam"],
            json!({"type":"host-local","ranges":[[{"subnet":"2001:db8:10:1::/64"}]],"routes":[{"dst":"2001:db8:10::/56"}]})
        );
    }

    #[test]
    fn the_delegate_configuration_is_flannels() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("subnet.env");
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let conf = json!({"cniVersion":"1.0.0","name":"cbr0","type":"flannel","subnetFile":env,
            "delegate":{"hairpinMode":true,"forceAddress":true},
            "ipam":{"routes":[{"dst":"192.0.2.0/24"}]},"runtimeConfig":{"mac":"0a:00:00:00:00:01"}});
        let d = build(&conf).unwrap();
        assert_eq!(
            d,
            json!({"cniVersion":"1.0.0","name":"cbr0","type":"bridge","hairpinMode":true,"forceAddress":true,
                "ipMasq":false,"mtu":1450,"isGateway":true,"runtimeConfig":{"mac":"0a:00:00:00:00:01"},
                "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"fc00:0:0:1::/64"}]],
                    "routes":[{"dst":"192.0.2.0/24"},{"dst":"10.244.0.0/16"},{"dst":"fc00::/48"}]}})
        );
        // Not a bridge: no isGateway; the user's ipMasq and mtu stay.
        let conf = json!({"cniVersion":"0.4.0","name":"n","subnetFile":env,
            "delegate":{"type":"macvlan","master":"eth0","ipMasq":true,"mtu":1300},"ipam":{"type":"static"}});
        let d = build(&conf).unwrap();
        assert_eq!(d["isGateway"], Value::Null);
        assert_eq!((d["ipMasq"].clone(), d["mtu"].clone()), (json!(true), json!(1300)));
        assert_eq!(d["ipam"]["type"], "static");
        for (bad, why) in [
            (json!({"name":"n","subnetFile":env,"delegate":{"name":"x"}}), "delegate.name"),
            (json!({"name":"n","subnetFile":env,"delegate":{"ipam":{}}}), "delegate.ipam"),
            (json!({"name":"n","subnetFile":env,"delegate":{"type":7}}), "delegate.type must be a string"),
        ] {
            let e = build(&bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG);
            assert!(e.msg.contains(why), "{}", e.msg);
        }
    }
}
