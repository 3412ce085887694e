#!/usr/bin/env bash
# HTTP through a ClusterIP Service to a pod on another node (requests per
# second, p50 and p99 latency, wrk --latency against nginx), the real
# kube-proxy in front: flanneld-rs (vxlan, our CNI plugin) against Debian's
# bridge + host-local with VXLAN programmed by hand, same cluster, same run,
# rounds alternating. Usage: scripts/bench/services.sh [--rounds 5]
# [--seconds 10] [--connections 16] [--threads 1]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
ensure_kube_binaries
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/services-bench "$@"
