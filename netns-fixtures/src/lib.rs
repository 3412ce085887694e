//! Throw-away network topologies built from network namespaces, for tests,
//! benchmarks and the demo.
//!
//! - [`Netns`]: one owned namespace, and fast ways to run commands inside it.
//! - [`Cluster`]: N [`Node`]s (and optionally an outside host) on an underlay
//!   L2 segment, 192.0.2.0/24 (TEST-NET-1, routed nowhere); dual-stack
//!   ([`Cluster::dual_stack`]) also 2001:db8::/64.
//! - [`single_node`]: one node namespace without underlay.
//! - [`cleanup_leftovers`], [`require_root`], [`wait_until`]: test plumbing.
//! - [`CountingAlloc`], [`peak_alloc`]: how much memory a call holds at its
//!   peak, for tests of parsers.
//!
//! Safety rules the whole crate follows, because tests run as root on a
//! developer's machine or a CI host and in parallel:
//!
//! - Nothing is configured in the root namespace: no address, route, rule
//!   or link. Veth pairs are created by an `ip` running inside one target
//!   namespace with the peer placed directly in the other.
//! - Every namespace is named `flt-<tag>-<role>`, where the tag is
//!   `<pid>x<counter>` (unique among live processes) or a user tag for the
//!   CLI. Dropping a value deletes what it created, also while a test
//!   unwinds from a panic; [`cleanup_leftovers`] removes what killed
//!   processes left.

#![warn(missing_docs)]

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod alloc;
mod cleanup;
mod cluster;
mod netns;
mod traffic;

pub use alloc::{peak_alloc, CountingAlloc};
pub use cleanup::{cleanup_all, cleanup_leftovers, cleanup_tag};
pub use cluster::{ipv6_of_node, single_node, Cluster, Node, MAX_NODES};
pub use netns::Netns;
pub use traffic::{echo, echo_server, echo_server_until_closed, tcp_connect, tcp_round_trip};

#[cfg(feature = "proptest")]
pub mod prop;

/// Prefix of every namespace this crate creates; cleanup only ever touches
/// names that start with it.
pub const PREFIX: &str = "flt-";

/// Prefix length of the underlay, 192.0.2.0/24. Node `i` is `192.0.2.(10+i)`.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;

/// Address of the switch's `br0`: the nodes' default gateway. It exists only
/// so that default routes resolve; the switch forwards nothing.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// Address of the outside host of [`Cluster::with_outside`].
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

/// Prefix length of the IPv6 underlay of a dual-stack cluster
/// ([`Cluster::dual_stack`]), 2001:db8::/64 (the documentation prefix).
/// Node `i` is [`ipv6_of_node`]`(i)`.
pub const UNDERLAY_V6_PREFIX_LEN: u8 = 64;

/// IPv6 address of the switch's `br0` in a dual-stack cluster: the nodes'
/// IPv6 default gateway (the switch forwards nothing).
pub const UNDERLAY_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// IPv6 address of the outside host of a dual-stack cluster.
pub const OUTSIDE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200);

/// Whether tests that need root and network namespaces can run here.
///
/// The first call really creates (and deletes) a namespace the way the
/// fixtures do, since being root is not enough (a container without
/// CAP_SYS_ADMIN, a read-only /run, no `ip`); the answer is cached. When it
/// is no, it calls [`skip_or_fail`]: with `CI=true` that panics, because CI
/// must not pass by skipping everything; otherwise it returns false, for
/// `if !netns_fixtures::require_root() { return; }`.
pub fn require_root() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = PROBE.get_or_init(probe);
    match result {
        Ok(()) => true,
        Err(why) => skip_or_fail(&format!("tests need root and network namespaces: {why}")),
    }
}

/// A test's prerequisite is missing. With `CI=true` this panics ("CI=true:
/// <why>"), because CI must not pass by skipping. Otherwise it prints
/// "SKIPPED: <test>: <why>" and returns false (for `return` in the test).
///
/// The line goes to the process's real stderr, past libtest's output
/// capture, so that it is in the log of every run: `scripts/test.sh`
/// (`scripts/lib/test-summary.sh`) counts these lines, and a test that
/// printed one is reported as skipped, not passed. `<test>` is the name of
/// the calling thread, which libtest names after the test.
pub fn skip_or_fail(why: &str) -> bool {
    if ci() {
        panic!("CI=true: {why}");
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed thread");
    // One write of the whole line, so that parallel tests do not interleave.
    let line = format!("SKIPPED: {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// Whether this run is CI's (`CI=true` or `CI=1`), where a missing
/// prerequisite fails instead of skipping and golden files are never
/// rewritten.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Whether a golden-file test should write what it got instead of comparing
/// (`UPDATE_GOLDEN` set). Panics under CI: a run that rewrites its golden
/// files compares nothing and passes whatever the code does.
pub fn update_golden() -> bool {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    assert!(
        !(update && ci()),
        "UPDATE_GOLDEN is set and so is CI: golden files are never rewritten in CI (a rewrite compares nothing); \
         regenerate them on a developer machine and commit the diff"
    );
    update
}

fn probe() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("running as uid {euid}, not root"));
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Err("the `ip` command (iproute2) is missing".into()),
    }
    Netns::new("probe").map(drop).map_err(|e| format!("cannot create a network namespace: {e}"))
}

/// Polls `cond` every 10 ms until it returns true; panics with `what` when
/// `timeout` passes first. Tests wait for the kernel or a daemon with this
/// instead of sleeping a fixed time, which is both slower and flaky.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
