#!/usr/bin/env bash
# Runs every test of flannel-rs, as root, on a fresh Debian machine: installs
# what it needs, then cargo fmt --check, clippy with warnings denied, and every
# test including the root-only ones (which build their own network namespaces
# and never touch the root namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
# This command runs as root and installs every prerequisite, so a test that
# finds one missing must fail here, not skip (netns_fixtures::skip_or_fail).
export CI=true
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
# The counting at the end must itself be right (sample logs).
scripts/lib/test-summary-check.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== Kubernetes binaries (built once from Debian's source package, then cached)"
# Every one a test or scripts/k8s-e2e.sh below runs (kube-controller-manager:
# tests/tests/kube.rs's mixed DaemonSets), so that none is missing when a
# test starts on a fresh machine.
ensure_kube_binaries cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet
echo "using $FLANNEL_RS_KUBE_DIR"
echo "== upstream flannel (flanneld and its CNI plugin, built once, then cached)"
ensure_upstream_flannel
echo "== cargo build"
cargo build --workspace --bins --quiet
fixture=target/debug/netns-fixture
cleanup_leftovers "$fixture"
trap 'cleanup_leftovers "$fixture"' EXIT

echo "== cargo test"
log=$(mktemp)
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
cargo_status=${PIPESTATUS[0]}
status=$cargo_status
set -e
# The whole path on a real cluster (kubelet, containerd, the DaemonSet):
# about 4 minutes with the Kubernetes binaries cached; its image is the one
# the deploy tests just built from this tree.
echo "== scripts/k8s-e2e.sh"
e2e_passed=0 e2e_failed=0
if scripts/k8s-e2e.sh; then e2e_passed=1; else e2e_failed=1; status=1; fi
# The same cluster dual-stack (a shorter run: addresses, HTTP over both
# families, release).
echo "== K8S_E2E_DUAL_STACK=1 scripts/k8s-e2e.sh"
if K8S_E2E_DUAL_STACK=1 scripts/k8s-e2e.sh; then e2e_passed=$((e2e_passed + 1)); else e2e_failed=$((e2e_failed + 1)); status=1; fi
# And IPv6-only (no IPv4 on the underlay, IPv6 podCIDRs only; addresses,
# HTTP, release, Services, ingress, NodePort and rollout over IPv6), with the
# host-gw backend: its DaemonSet rollout under Service and NodePort traffic
# (the IPv6-only vxlan path is tests/tests/ipv6only.rs's).
echo "== K8S_E2E_IPV6_ONLY=1 K8S_E2E_BACKEND=host-gw scripts/k8s-e2e.sh"
if K8S_E2E_IPV6_ONLY=1 K8S_E2E_BACKEND=host-gw scripts/k8s-e2e.sh; then e2e_passed=$((e2e_passed + 1)); else e2e_failed=$((e2e_failed + 1)); status=1; fi
# A test binary that died, or a target that did not compile, counts as a
# failure too (scripts/lib/test-summary.sh says which).
summary=$(scripts/lib/test-summary.sh "$log" "$cargo_status")
read -r passed failed skipped <<<"$summary"
[ "$failed" -eq 0 ] || status=1
rm -f "$log"
echo
echo "tests: $((passed + e2e_passed)) passed, $((failed + e2e_failed)) failed, $skipped skipped"
leftover=$(ip netns list | grep -c '^flt-' || true)
if [ "$leftover" -gt 0 ]; then
  echo "error: $leftover test namespace(s) left behind:" >&2
  ip netns list | grep '^flt-' >&2
  exit 1
fi
exit "$status"
