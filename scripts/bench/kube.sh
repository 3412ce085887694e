#!/usr/bin/env bash
# flanneld-rs in Kubernetes mode against etcd mode, same run, same peers:
# start-up with N peers, new-peer-to-route latency, RSS. Needs the
# kube-apiserver that scripts/lib/kube-binaries.sh builds (once; cached).
# Usage: scripts/bench/kube.sh [--peers 1000] [--new 100]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
ensure_kube_binaries
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/kube-bench "$@"
