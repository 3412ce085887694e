#!/usr/bin/env bash
# Checks scripts/lib/test-summary.sh on sample logs, cut from real
# `cargo test --no-fail-fast` runs (cargo 1.9x, libtest): a binary that
# aborts, one killed by a signal, one that calls exit(0) halfway, a skip, a
# failure, a target that does not compile. scripts/test.sh runs this first:
# a counter that misses failures would make every later line meaningless.
set -euo pipefail
here=$(dirname "$0")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bad=0

expect() { # NAME CARGO_STATUS "PASSED FAILED SKIPPED" (the log on stdin)
  cat >"$tmp/$1.log"
  local got
  got=$("$here/test-summary.sh" "$tmp/$1.log" "$2" 2>/dev/null)
  if [ "$got" != "$3" ]; then
    echo "test-summary-check: $1: counted \"$got\", want \"$3\"" >&2
    bad=1
  fi
}

expect healthy 0 "4 0 0" <<'LOG'
     Running unittests src/lib.rs (target/debug/deps/netns_fixtures-2c5e133aee827921)

running 3 tests
test a ... ok
test b ... ok
test c ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

   Doc-tests flannel_net

running 1 test
test flannel-net/src/lib.rs - x (line 3) ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s

LOG

expect died 101 "1 4 1" <<'LOG'
     Running tests/zz_exp_abort.rs (target/debug/deps/zz_exp_abort-07a2164d608221a4)

running 2 tests
error: test failed, to rerun pass `-p netns-fixtures --test zz_exp_abort`

Caused by:
  process didn't exit successfully: `/work/target/debug/deps/zz_exp_abort-07a2164d608221a4 zz_` (signal: 6, SIGABRT: process abort signal)
     Running tests/zz_exp_exit.rs (target/debug/deps/zz_exp_exit-b600ddb95bc83dee)

running 1 test
     Running tests/zz_exp_mixed.rs (target/debug/deps/zz_exp_mixed-f00cdd511544a82b)

running 3 tests
test zz_passes ... ok
SKIPPED: zz_skips: experiment: a missing prerequisite
test zz_skips ... ok
test zz_fails ... FAILED

failures:

---- zz_fails stdout ----

thread 'zz_fails' (17399) panicked at netns-fixtures/tests/zz_exp_mixed.rs:12:5:
experiment: an ordinary failure


failures:
    zz_fails

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.27s

error: test failed, to rerun pass `-p netns-fixtures --test zz_exp_mixed`
     Running tests/zz_exp_signal.rs (target/debug/deps/zz_exp_signal-571bee26b457e434)

running 1 test
error: test failed, to rerun pass `-p netns-fixtures --test zz_exp_signal`

Caused by:
  process didn't exit successfully: `/work/target/debug/deps/zz_exp_signal-571bee26b457e434 zz_` (signal: 9, SIGKILL: kill)
error: 3 targets failed:
    `-p netns-fixtures --test zz_exp_abort`
    `-p netns-fixtures --test zz_exp_mixed`
    `-p netns-fixtures --test zz_exp_signal`
LOG

# One test thread: libtest prints the test's name before it runs, so the
# skip note lands on the same line. A test that skipped and then failed
# counts as failed only.
expect one_thread 101 "1 2 1" <<'LOG'
     Running tests/zz_exp_mixed.rs (target/debug/deps/zz_exp_mixed-f00cdd511544a82b)

running 3 tests
test zz_fails ... FAILED
test zz_passes ... ok
test zz_skips ... SKIPPED: zz_skips: experiment: a missing prerequisite
ok
test zz_skips_then_fails ... SKIPPED: zz_skips_then_fails: no prerequisite
FAILED

failures:

---- zz_fails stdout ----
    not_a_test_name

failures:
    zz_fails
    zz_skips_then_fails

test result: FAILED. 2 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.31s

LOG

expect build_failure 101 "0 1 0" <<'LOG'
error[E0308]: mismatched types
 --> netns-fixtures/tests/zz_exp_broken.rs:1:38
  |
1 | #[test] fn zz_broken() { let x: u32 = "no"; }
  |                                 ---   ^^^^ expected `u32`, found `&str`

For more information about this error, try `rustc --explain E0308`.
error: could not compile `netns-fixtures` (test "zz_exp_broken") due to 1 previous error
LOG

expect silent_failure 101 "0 1 0" </dev/null

[ "$bad" -eq 0 ] && echo "test-summary-check: ok"
exit "$bad"
