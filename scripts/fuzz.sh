#!/usr/bin/env bash
# Fuzzing on stable Rust: runs every property test of the workspace (every
# test source that uses proptest) with many more cases than `cargo test`'s
# 256, prints each test's result and case count, and fails if any fails.
#
#   scripts/fuzz.sh [CASES]      CASES per property, default 100000
#
# Needs no root. Builds with the `fuzz` profile (defined below, on the
# command line): the workspace's code and the crates the properties spend
# their time in optimised, everything else as in a debug build, overflow
# checks and debug assertions on everywhere; its output goes to target/fuzz.
# A property that fails prints its minimal (shrunk) input.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_rust

cases="${1:-100000}"
if ! [[ "$cases" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [CASES]   (a positive number of cases per property; default 100000)" >&2
  exit 2
fi

profile=(
  --config 'profile.fuzz.inherits="dev"'
  --config 'profile.fuzz.opt-level=2'
  --config 'profile.fuzz.debug="line-tables-only"'
  --config 'profile.fuzz.package."*".opt-level=0'
)
# Dependencies that the properties run (as opposed to the daemon's
# Kubernetes, etcd and TLS stacks, which they only link).
for dep in proptest rand rand_core rand_chacha rand_xorshift regex-syntax serde_json ipnet; do
  profile+=(--config "profile.fuzz.package.$dep.opt-level=2")
done

# Test targets, as "package|--test NAME" or "package|--lib|FILTER": a file
# under <crate>/tests/ is its own target (or part of the one its directory
# names); one under <crate>/src/ is a unit test of the library, selected by
# its module path.
declare -A targets=()
while IFS= read -r file; do
  dir=$(dirname "$file")
  while [ ! -f "$dir/Cargo.toml" ]; do dir=$(dirname "$dir"); done
  pkg=$(sed -n '/^name = "\(.*\)"$/{s//\1/p;q}' "$dir/Cargo.toml")
  rel=${file#"$dir"/}
  case "$rel" in
    tests/*/*.rs) t=${rel#tests/}; targets["$pkg|--test ${t%%/*}|"]=1 ;;
    tests/*.rs) t=${rel#tests/}; targets["$pkg|--test ${t%.rs}|"]=1 ;;
    src/main.rs | src/bin/*) echo "skipping $file: property tests of a binary are not supported here" >&2 ;;
    src/*.rs)
      mod=${rel#src/}
      mod=${mod%.rs}
      mod=${mod%/mod}
      mod=${mod//\//::}
      if [ "$mod" = lib ]; then targets["$pkg|--lib|"]=1; else targets["$pkg|--lib|$mod::"]=1; fi
      ;;
    *) echo "skipping $file: not a test or library source" >&2 ;;
  esac
done < <(git ls-files -- '*.rs' | xargs grep -lE '^\s*use proptest|proptest!' || true)

if [ ${#targets[@]} -eq 0 ]; then
  echo "no property tests found" >&2
  exit 1
fi

mapfile -t order < <(printf '%s\n' "${!targets[@]}" | sort)

echo "== building the property tests (profile fuzz, into target/fuzz)"
for t in "${order[@]}"; do
  IFS='|' read -r pkg target filter <<<"$t"
  # $target unquoted: "--lib", or "--test" and a name.
  # shellcheck disable=SC2086
  cargo "${profile[@]}" test --profile fuzz --quiet --no-run -p "$pkg" $target
done

status=0
summary=()
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for t in "${order[@]}"; do
  IFS='|' read -r pkg target filter <<<"$t"
  label="$pkg ${target#--test }${filter:+ $filter}"
  log="$logs/${label//[^A-Za-z0-9_-]/_}.log"
  echo "== $label: PROPTEST_CASES=$cases"
  start=$SECONDS
  set +e
  # --show-output: each passing test's output (its case count) comes at the
  # end, grouped under its name, rather than interleaved with the others'.
  # Not cargo's --quiet: it would make the test harness print dots.
  # shellcheck disable=SC2086
  PROPTEST_CASES=$cases RUST_BACKTRACE=0 cargo "${profile[@]}" test --profile fuzz -p "$pkg" $target \
    -- --show-output ${filter:+"$filter"} >"$log" 2>&1
  rc=$?
  set -e
  secs=$((SECONDS - start))
  # Per test: its result, and the case counts its properties printed.
  report=$(awk '
    /^---- .* stdout ----$/ { cur = $2; next }
    /^proptest [^ ]+: [0-9]+ cases passed$/ { sub(":", "", $2); counts[cur] = counts[cur] sep[cur] $2 " " $3; sep[cur] = ", "; next }
    /^test .* \.\.\. (ok|FAILED|ignored)$/ { result[$2] = $NF; order[++n] = $2 }
    END {
      for (i = 1; i <= n; i++) {
        t = order[i]
        if (t in counts) c = counts[t] " cases"
        else if (result[t] == "FAILED") c = "see its failure below"
        else c = "no count (a plain test; or a proptest! macro, which prints none)"
        printf "  %-7s %s: %s\n", result[t], t, c
      }
    }' "$log")
  echo "$report"
  if [ $rc -ne 0 ]; then
    status=1
    echo "-- $label FAILED after ${secs}s; its failures:"
    # The failing tests' output, with each minimal failing input.
    sed -n '/^failures:$/,/^test result:/p' "$log"
    grep -E '^error' "$log" || true
  fi
  summary+=("$(printf '%-6s %4ss  %s' "$([ $rc -eq 0 ] && echo ok || echo FAILED)" "$secs" "$label")")
done

echo "== summary (PROPTEST_CASES=$cases)"
printf '%s\n' "${summary[@]}"
exit $status
