#!/usr/bin/env bash
# The udp backend's data path beside kernel VXLAN and a per-packet socat
# relay, same fixture, same run: iperf3 pod to pod (1 and 4 streams), CPU
# seconds per gigabit, ping p50/p99; --stages also measures our data path
# with its speed-ups turned on one at a time.
# Usage: scripts/bench/udp.sh [--seconds 4] [--rounds 3] [--stages]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages iproute2 iputils-ping iperf3 socat procps
ensure_rust
cargo build --release --quiet -p e2e-tests --bin udp-bench -p netns-fixtures
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/udp-bench "$@"
