#!/usr/bin/env bash
# CNI ADD/DEL latency: flannel-rs's plugin against Debian's reference bridge +
# host-local, same run, same machine, fresh node namespaces for each.
# Usage: scripts/bench/cni-latency.sh [--count 200] [--concurrent 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
cargo build --release --quiet -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/cni-bench --plugin target/release/flannel "$@"
