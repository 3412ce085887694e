//! Removing what killed processes left behind, and what `up` kept.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::{ip_netns, NETNS_DIR};
use crate::PREFIX;

/// Names under /run/netns that start with [`PREFIX`].
fn our_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// The pid embedded in an auto name `flt-<pid>x<n>-<role>`; `None` for a name
/// made with a user tag (those start with a letter), which only `down` or
/// `cleanup --all` remove.
pub(crate) fn embedded_pid(name: &str) -> Option<u32> {
    let tag = name.strip_prefix(PREFIX)?.split('-').next()?;
    let (pid, n) = tag.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(pid) && digits(n) {
        pid.parse().ok()
    } else {
        None
    }
}

/// Sends SIGKILL to every process (other than this one) whose network
/// namespace is `(dev, ino)`. Returns how many it signalled. Processes
/// started inside a namespace keep it, and every link in it, alive after
/// `ip netns delete` removed its name; nothing could find and remove them
/// afterwards.
pub(crate) fn kill_processes_in((dev, ino): (u64, u64)) -> usize {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id();
    let mut killed = 0;
    for entry in proc_dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // stat follows the ns/net magic link to the namespace's nsfs inode.
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue; // exited meanwhile, or a kernel thread
        };
        if meta.dev() == dev && meta.ino() == ino {
            if let Ok(pid) = i32::try_from(pid) {
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
        }
    }
    killed
}

/// Kills what runs inside namespace `name`, then deletes it.
fn delete(name: &str) -> bool {
    if let Ok(meta) = std::fs::metadata(Path::new(NETNS_DIR).join(name)) {
        // An unmounted leftover file has the tmpfs's device; nothing can be
        // inside that, so only look for processes in real namespaces.
        if meta.dev() != std::fs::metadata(NETNS_DIR).map(|m| m.dev()).unwrap_or(0) {
            kill_processes_in((meta.dev(), meta.ino()));
        }
    }
    match ip_netns(&["delete", name]) {
        Ok(()) => true,
        // Another process cleaning up at the same time got it first.
        Err(_) if !Path::new(NETNS_DIR).join(name).exists() => false,
        Err(e) => {
            eprintln!("netns-fixtures: {e}");
            false
        }
    }
}

fn delete_where(pred: impl Fn(&str) -> bool) -> usize {
    our_namespaces().iter().filter(|n| pred(n)).filter(|n| delete(n)).count()
}

/// Deletes every `flt-` namespace whose name embeds the pid of a process that
/// no longer runs (what a killed test run left behind), and kills processes
/// still running inside them. Namespaces of live processes, and those of
/// user tags (`Cluster::new_named`, `netns-fixture up --name`), are left
/// alone. Returns how many it removed.
///
/// A pid reused by an unrelated process protects a leftover until that
/// process exits; `cleanup_all` removes it regardless.
pub fn cleanup_leftovers() -> usize {
    delete_where(|name| match embedded_pid(name) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    })
}

/// Deletes every `flt-` namespace, including those of running tests and of
/// kept clusters. Returns how many it removed. For the CLI's `cleanup --all`.
pub fn cleanup_all() -> usize {
    delete_where(|_| true)
}

/// Deletes the namespaces of one tag, `flt-<tag>-*` (a cluster kept by
/// `netns-fixture up --name <tag>`, and the pods made under it). Returns how
/// many it removed. Tags never contain `-`, so no other tag's names match.
pub fn cleanup_tag(tag: &str) -> std::io::Result<usize> {
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("tag {tag:?}")));
    }
    let prefix = format!("{PREFIX}{tag}-");
    Ok(delete_where(|name| name.starts_with(&prefix)))
}

#[cfg(test)]
mod tests {
    use super::embedded_pid;

    #[test]
    fn only_auto_names_carry_a_pid() {
        assert_eq!(embedded_pid("flt-123x0-node"), Some(123));
        assert_eq!(embedded_pid("flt-123x45-n0-web-1"), Some(123));
        assert_eq!(embedded_pid("flt-demo123-node0"), None);
        assert_eq!(embedded_pid("flt-123-node"), None);
        assert_eq!(embedded_pid("flt-x1-node"), None);
        assert_eq!(embedded_pid("sm-123x0-node"), None);
    }
}
