#!/usr/bin/env bash
# NetworkPolicy enforcement: update latency (policy applied -> enforced) and
# the throughput cost of 100 policies, on the policy lab with a real
# kube-apiserver. Usage: scripts/bench/netpol.sh [--updates 30] [--policies 100]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
ensure_kube_binaries
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/netpol-bench "$@"
