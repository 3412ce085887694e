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
    run_nft(script, false)
}

/// Like [`nft_apply`], but the `nft` process is killed when the thread that
/// started it dies (`PR_SET_PDEATHSIG`). For a short-lived single-threaded
/// caller such as the CNI plugin: when the runtime SIGKILLs the plugin (a
/// timeout) and then sends DEL, an orphaned `nft` must not commit the killed
/// call's change after DEL undid it.
pub fn nft_apply_dying_with_caller(script: &str) -> Result<(), String> {
    run_nft(script, true)
}

fn run_nft(script: &str, die_with_caller: bool) -> Result<(), String> {
    let mut cmd = Command::new(nft_binary());
    cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    if die_with_caller {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe, and building an
        // io::Error from an errno does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The caller died before the prctl: no signal will come.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    run_with_stdin(&mut cmd, script, "nft", "nftables")
        .map_err(|e| e.unwrap_or_else(|stderr| format!("nft -f failed: {stderr}")))
}

/// Runs `cmd` (its stdin piped) with `input` on stdin. `Err(Ok(msg))` when
/// it could not run (`program` from Debian package `package`, named in the
/// message), `Err(Err(stderr))` when it ran and failed.
pub fn run_with_stdin(
    cmd: &mut Command,
    input: &str,
    program: &str,
    package: &str,
) -> Result<(), Result<String, String>> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Ok(format!("run {program}: {e} (is the {package} package installed?)")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .map_err(|e| Ok(format!("write to {program}: {e}")))?;
    let out = child.wait_with_output().map_err(|e| Ok(format!("wait for {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
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
