#!/usr/bin/env bash
# CNI ADD/DEL latency: flannel-rs's plugin against Debian's reference bridge +
# host-local, and against upstream flannel's own plugin delegating to them
# (flannel -> bridge -> host-local, what flannel users run today): same run,
# same machine, fresh node namespaces for each.
# Usage: scripts/bench/cni-latency.sh [--count 200] [--concurrent 20] [--rounds 1] [--dual-stack] [--compare PLUGIN]
# --compare: another build of our plugin measured in the same rounds (an A/B).
# Without --dual-stack, a "kernel floor" row: cni-plugin's netlink-floor
# example, started the same way, sending only the netlink requests our ADD
# sends (no configuration, lease, IPAM files or runtime); "flannel-rs above
# the floor" is what the plugin itself costs beyond the kernel's work.
# --dual-stack: the lease has an IPv6 subnet too (every pod gets both families;
# the reference bridge + host-local gets both range sets).
# Upstream's plugin comes from $FLANNEL_RS_UPSTREAM_CNI, else from its
# build script as scripts/test.sh finds it (ensure_upstream_flannel in
# scripts/lib/common.sh); without either the flannel row is left out, saying so.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
cargo build --release --quiet -p e2e-tests -p netns-fixtures
# The plugin as the image ships it (scripts/build-image.sh): statically
# linked, so no process start-up goes to the dynamic loader and libgcc_s.
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --quiet -p cni-plugin --target "$triple" --bin flannel --example netlink-floor
trap 'target/release/netns-fixture cleanup >/dev/null 2>&1 || true' EXIT
upstream=${FLANNEL_RS_UPSTREAM_CNI:-}
if [ -z "$upstream" ]; then
  upstream=$(ensure_upstream_flannel | sed -n 's/^cni=//p')
fi
extra=()
# The kernel's floor under an ADD (IPv4): the same netlink requests from a
# static program started the same way, and nothing else.
case " $* " in *" --dual-stack "*) ;; *) extra+=(--floor "target/$triple/release/examples/netlink-floor") ;; esac
if [ -n "$upstream" ]; then
  extra+=(--upstream "$upstream")
else
  echo "cni-latency: upstream flannel's plugin not found (no build script, FLANNEL_RS_UPSTREAM_CNI unset): its row is left out" >&2
fi
target/release/cni-bench --plugin "target/$triple/release/flannel" "${extra[@]}" "$@"
