#!/usr/bin/env bash
# Runs every test of flannel-rs, as root, on a fresh Debian machine: installs
# what it needs, then cargo fmt --check, clippy with warnings denied, and every
# test including the root-only ones (which build their own network namespaces
# and never touch the root namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== Kubernetes binaries (built once from Debian's source package, then cached)"
ensure_kube_binaries
echo "using $FLANNEL_RS_KUBE_DIR"
echo "== cargo build"
cargo build --workspace --bins --quiet
fixture=target/debug/netns-fixture
cleanup_leftovers "$fixture"
trap 'cleanup_leftovers "$fixture"' EXIT

echo "== cargo test"
log=$(mktemp)
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The whole path on a real cluster (kubelet, containerd, the DaemonSet):
# about 4 minutes with the Kubernetes binaries cached; its image is the one
# the deploy tests just built from this tree.
echo "== scripts/k8s-e2e.sh"
if scripts/k8s-e2e.sh 2>&1 | tee -a "$log"; then
  echo "test result: ok. 1 passed; 0 failed (k8s-e2e)" >> "$log"
else
  echo "test result: FAILED. 0 passed; 1 failed (k8s-e2e)" >> "$log"
  status=1
fi
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log")
rm -f "$log"
echo
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
leftover=$(ip netns list | grep -c '^flt-' || true)
if [ "$leftover" -gt 0 ]; then
  echo "error: $leftover test namespace(s) left behind:" >&2
  ip netns list | grep '^flt-' >&2
  exit 1
fi
exit "$status"
