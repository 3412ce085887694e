#!/usr/bin/env bash
# Counts the tests of a `cargo test --no-fail-fast` log for scripts/test.sh.
#
#   scripts/lib/test-summary.sh LOG CARGO_EXIT_STATUS
#
# Prints "PASSED FAILED SKIPPED" on stdout, and on stderr one line per
# failure that is not a failing test (a test binary that died, a target that
# did not compile, cargo failing with no failure found).
#
# `test result:` lines alone are not enough: a test binary that aborts, dies
# on a signal or calls exit() prints none, and a target that does not compile
# runs nothing, so their tests would count as neither passed nor failed. So:
#
# - every test binary cargo starts ("     Running ..." or "   Doc-tests
#   ...") must reach its `test result:` line before the next one starts or
#   the log ends; one that does not counts as one failure;
# - each "error: could not compile ..." counts as one failure;
# - a non-zero CARGO_EXIT_STATUS with no failure found counts as one.
#
# A test that skipped (netns_fixtures::skip_or_fail prints "SKIPPED: <test>:
# <why>" to the real stderr, past libtest's capture) counts as skipped, not
# passed, unless it then failed.
set -euo pipefail
log=$1 status=$2

awk -v status="$status" '
function report(msg) { print msg > "/dev/stderr"; extra++ }
# The binary that was running when the next one started (or the log ended)
# never printed its result.
function close_section() {
  if (section != "") report("no test result from " section ": it aborted, died on a signal or exited early")
  section = ""
}
{ gsub(/\033\[[0-9;]*[A-Za-z]/, "") }
/^     Running .*\(.*\)$/ || /^   Doc-tests [^ ]+$/ {
  close_section()
  section = $0
  sub(/^ +/, "", section)
  nsections++
  delete failed_names
  next
}
# The last "failures:" block before the result lists the failed tests, one
# per line, indented by four spaces.
/^failures:$/ { in_failures = 1; delete failed_names; next }
in_failures && /^    [^ ]+$/ { failed_names[substr($0, 5)] = 1; next }
in_failures && !/^    / { in_failures = 0 }
/SKIPPED: / {
  rest = substr($0, index($0, "SKIPPED: ") + 9)
  name = substr(rest, 1, index(rest ": ", ": ") - 1)
  skips[nsections, name] = name
}
/^test result:/ {
  p = 0; f = 0
  for (i = 1; i < NF; i++) {
    if ($(i + 1) ~ /^passed/) p = $i
    if ($(i + 1) ~ /^failed/) f = $i
  }
  # Skipped tests of this binary were counted as passed; one that skipped
  # and then failed is a failure only.
  nfailed_skips = 0
  for (k in skips) {
    split(k, key, SUBSEP)
    if (key[1] != nsections || k in settled) continue
    settled[k] = 1
    if (skips[k] in failed_names) failed_skips[++nfailed_skips] = k
    else if (p > 0) p--
  }
  for (j = 1; j <= nfailed_skips; j++) delete skips[failed_skips[j]]
  passed += p; failed += f
  section = ""
  next
}
/^error: could not compile / { report($0) }
END {
  close_section()
  if (status != 0 && failed + extra == 0) report("cargo test exited with status " status " but no failing test was found")
  nskipped = 0
  for (k in skips) nskipped++
  print passed + 0, failed + extra, nskipped
}
' "$log"
