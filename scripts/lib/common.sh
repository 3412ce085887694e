# Shared by the README's commands and the benchmarks: install what is missing,
# and make sure a Rust toolchain is there. Source it; it changes nothing else.

# Debian packages the demo, tests and benchmarks need at run time.
FLANNEL_RS_PACKAGES=(iproute2 iputils-ping nftables iptables containernetworking-plugins socat iperf3 procps jq util-linux etcd-server etcd-client protobuf-compiler openssl conntrack ethtool nginx wrk curl wireguard-go wireguard-tools)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (it creates network namespaces)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: installing Debian's (the workspace needs Rust >= 1.85)" >&2
    install_packages cargo rustc
  fi
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 && rustup component add rustfmt clippy >/dev/null 2>&1 || true
  fi
}

# Removes namespaces left by killed test or demo runs (names start with flt-).
cleanup_leftovers() {
  local bin="$1"
  [ -x "$bin" ] && "$bin" cleanup || true
}

# Builds (once, cached) kube-apiserver and kube-proxy, kubectl when the
# machine has none, and the cmd/... given as arguments, from Debian's
# kubernetes source package; exports FLANNEL_RS_KUBE_DIR.
ensure_kube_binaries() {
  local whats=(cmd/kube-apiserver cmd/kube-proxy "$@")
  command -v kubectl >/dev/null || whats+=(cmd/kubectl)
  FLANNEL_RS_KUBE_DIR=$(scripts/lib/kube-binaries.sh "${whats[@]}")
  export FLANNEL_RS_KUBE_DIR
}

# Builds (once, cached under /var/cache/flannel-rs/upstream/) upstream
# flannel's flanneld and CNI plugin with its build script:
# $UPSTREAM_FLANNEL_BUILD, else ../shared/upstream-flannel/build.sh beside
# the checkout, else /work/shared/upstream-flannel/build.sh (where the
# tests look for its sources); prints its flanneld=/cni= lines. Without the
# script it says so and carries on: the tests that need upstream's
# binaries then fail, each naming what is missing.
ensure_upstream_flannel() {
  local build
  for build in "${UPSTREAM_FLANNEL_BUILD:-}" ../shared/upstream-flannel/build.sh /work/shared/upstream-flannel/build.sh; do
    if [ -n "$build" ] && [ -f "$build" ]; then
      bash "$build"
      return
    fi
  done
  echo "warning: upstream flannel's build script not found (set UPSTREAM_FLANNEL_BUILD): tests that run upstream flannel will fail" >&2
}
