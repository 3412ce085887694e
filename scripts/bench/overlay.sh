#!/usr/bin/env bash
# flanneld-rs benchmarks, each beside a reference measured in the same run:
# start-up with 1000 and 5000 peers against `ip -batch`, lease-to-route
# latency, RSS and idle CPU, and iperf3/ping through the overlay against
# hand-programmed VXLAN (with --ipv6 also over IPv6 against a hand-programmed
# flannel-v6.1). Usage: scripts/bench/overlay.sh [--peers 1000,5000] [--leases 200] [--ipv6]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p e2e-tests -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/overlay-bench "$@"
