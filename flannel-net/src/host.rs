//! Host-side helpers both programs need: running an nftables transaction and
//! turning on forwarding.

use std::io::Write;
use std::process::{Command, Stdio};

/// The `nft` binary: its usual places, else whatever `PATH` finds (CNI
/// runtimes often call plugins with a minimal `PATH`).
pub fn nft_binary() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nft")
}

/// Applies `script` with `nft -f -`: one atomic transaction. The error says
/// which step failed and carries nft's own message.
pub fn nft_apply(script: &str) -> Result<(), String> {
    let mut child = Command::new(nft_binary())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e} (is the nftables package installed?)"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|e| format!("write to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("wait for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft -f failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Whether the nftables table `family name` exists (in the caller's namespace).
pub fn nft_table_exists(family: &str, name: &str) -> bool {
    Command::new(nft_binary())
        .args(["list", "table", family, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sysctl that turns on IPv4 forwarding (of the caller's namespace).
pub const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Sysctl that turns on IPv6 forwarding.
pub const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Writes `1` to the sysctl at `path` unless it already reads `1` (the common
/// case then costs one read and no write).
pub fn ensure_sysctl_on(path: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).map(|v| v.trim() == "1").unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| format!("write 1 to {path}: {e}"))
}
