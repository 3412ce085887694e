#!/usr/bin/env bash
# The udp backend through the real daemon (two flanneld-rs in udp mode, real
# etcd, pods plugged in by the real CNI plugin) beside our VXLAN (two
# flanneld-rs in vxlan mode) and a per-packet socat relay, same run: iperf3
# pod to pod (1 and 4 streams), CPU seconds per gigabit, ping p50/p99, and the
# time traffic takes to resume after a udp daemon restart. The udp data path
# started by hand and kernel VXLAN programmed by hand are extra reference
# lines, and a bare relay with the same system calls and no work per packet
# is the floor of any user-space relay; --stages also measures the data path
# with its speed-ups turned on one at a time; --gso-caps measures the udp
# daemons alone with and without a cap on the TCP super-packets' segments.
# --pair runs only the udp and the VXLAN daemons, printing each round's
# Gbit/s (many rounds quickly).
# Usage: scripts/bench/udp.sh [--seconds 4] [--rounds 3] [--restarts 5] [--stages | --stages-only] [--ours-only | --pair | --gso-caps]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
# Two builds: a --bin filter would apply to every -p and skip the daemon's
# and the plugin's binaries, which the benchmark runs.
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p netns-fixtures --bins
cargo build --release --quiet -p e2e-tests --bin udp-bench
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/udp-bench "$@"
