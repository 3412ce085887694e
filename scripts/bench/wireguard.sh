#!/usr/bin/env bash
# The wireguard backend through the real daemon (two flanneld-rs in
# wireguard mode, user-space path, real etcd, pods plugged in by the real CNI
# plugin) beside our udp backend (the same data path shape without
# encryption) and Debian's wireguard-go configured with wg, same run: iperf3
# pod to pod (1 and 4 streams, rounds rotating the order, medians), CPU
# seconds per gigabit (the relays' processes and the whole machine), ping
# p50/p99, and the ratios against the targets (>= 2x wireguard-go, >= 60 %
# of udp). --stages also measures the data path started by hand with its
# speed-ups turned on one at a time.
# --ipv6 measures only our daemons on a dual-stack pair, pod to pod over
# IPv4 (flannel-wg) and IPv6 (flannel-wg-v6), same pods, same run.
# Usage: scripts/bench/wireguard.sh [--seconds 4] [--rounds 3] [--stages | --stages-only] [--ours-only] [--ipv6]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
# Two builds: a --bin filter would apply to every -p and skip the daemon's
# and the plugin's binaries, which the benchmark runs.
cargo build --release --quiet -p flanneld-rs -p cni-plugin -p netns-fixtures --bins
cargo build --release --quiet -p e2e-tests --bin wireguard-bench
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
target/release/wireguard-bench "$@"
