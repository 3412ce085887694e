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
kube_whats=(cmd/kube-apiserver)
command -v kubectl >/dev/null || kube_whats+=(cmd/kubectl)
FLANNEL_RS_KUBE_DIR=$(scripts/lib/kube-binaries.sh "${kube_whats[@]}")
export FLANNEL_RS_KUBE_DIR
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/netpol-bench "$@"
