#!/usr/bin/env bash
# Checks an OCI archive from scripts/build-image.sh the way a node uses it: a
# private containerd (Debian's package; its own root, state and socket under a
# temporary directory, no CRI plugin) imports the archive, lists it under the
# name the DaemonSet asks for, and runs the image's programs with runc:
# `flanneld-rs --version`, `nft --version`, `iptables-restore --version`,
# `ip6tables-restore --version`
# (iptables-nft), the plugin's VERSION command and
# its `install` mode (what the init containers run). Everything it started is
# stopped and removed at the end, also on failure. Needs root.
#
# Usage: scripts/check-image.sh [ARCHIVE] [NAME:TAG]
#   defaults: target/image/flannel-rs-<version>.oci.tar, flannel-rs:<version>
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
need_root

version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')
archive=${1:-target/image/flannel-rs-$version.oci.tar}
ref=${2:-flannel-rs:$version}
[ -f "$archive" ] || { echo "$0: $archive is missing: run scripts/build-image.sh first" >&2; exit 1; }
install_packages containerd runc
archive=$(readlink -f "$archive")
# The name containerd stores, as oci-layout.py qualifies it.
case ${ref%%/*} in
  "$ref") name=docker.io/library/$ref ;;
  *.*|*:*|localhost) name=$ref ;;
  *) name=docker.io/$ref ;;
esac

tmp=$(mktemp -d /tmp/flannel-rs-containerd.XXXXXX)
sock=$tmp/containerd.sock
ns=flannel-rs-check
containerd_pid=
# The shims put their sockets under /run/containerd/s whatever the state
# directory; remove what this run leaves there when it was not there before.
run_dir_was_there=$([ -e /run/containerd ] && echo yes || true)
ctr_() { ctr --address "$sock" --namespace "$ns" "$@"; }
cleanup() {
  set +e
  if [ -n "$containerd_pid" ]; then
    for t in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1
      ctr_ tasks delete -f "$t" >/dev/null 2>&1
    done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1; done
    kill "$containerd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$containerd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$containerd_pid" 2>/dev/null
    wait "$containerd_pid" 2>/dev/null
  fi
  # Snapshot mounts left by a container that did not exit cleanly.
  awk -v p="$tmp/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
  rm -rf "$tmp"
  # ctr puts each container's cgroup under /<namespace>/; runc removes the
  # container's, the namespace's empty parent is ours to remove.
  for d in /sys/fs/cgroup/"$ns" /sys/fs/cgroup/*/"$ns"; do [ -d "$d" ] && rmdir "$d" 2>/dev/null; done
  [ -n "$run_dir_was_there" ] || rmdir /run/containerd/s /run/containerd 2>/dev/null
}
trap cleanup EXIT

cat >"$tmp/config.toml" <<EOF
version = 2
root = "$tmp/root"
state = "$tmp/state"
# Only images, snapshots and tasks: no CRI, no kubelet.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$tmp/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$tmp/opt"
EOF
containerd --version
runc --version | sed -n 1p
containerd --config "$tmp/config.toml" --log-level warn >"$tmp/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do
  ctr_ version >/dev/null 2>&1 && break
  kill -0 "$containerd_pid" 2>/dev/null || { cat "$tmp/containerd.log" >&2; echo "$0: containerd exited" >&2; exit 1; }
  sleep 0.1
done
ctr_ version >/dev/null

echo "== ctr images import $archive"
ctr_ images import "$archive"
echo "== ctr images ls"
ctr_ images ls
want=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["manifests"][0]["digest"])' < <(tar -xOf "$archive" index.json))
got=$(ctr_ images ls | awk -v n="$name" '$1 == n { print $3 }')
if [ "$got" != "$want" ]; then
  echo "$0: expected $name with digest $want after import, got '${got:-nothing}'" >&2
  exit 1
fi
echo "imported $name $got"

run() { # ID EXPECTED-SUBSTRING [ctr run options --] ARGS...
  local id=$1 expect=$2; shift 2
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  echo "== ctr run $name ${*}"
  # Output to a file and no stdin at all: ctr does not pass the end of its
  # own stdin on to the container, and the plugin reads stdin to the end.
  local log=$tmp/$id.log out
  if ! out=$(timeout -k 10 60 ctr --address "$sock" --namespace "$ns" run --rm --runc-root "$tmp/runc" --log-uri "file://$log" "${opts[@]}" "$name" "flannel-rs-check-$id-$$" "$@" 2>&1); then
    echo "$out" >&2
    cat "$log" >&2 2>/dev/null
    echo "$0: ctr run $* failed" >&2
    exit 1
  fi
  out=$(cat "$log")
  echo "$out"
  case $out in
    *"$expect"*) ;;
    *) echo "$0: expected '$expect' in the output" >&2; exit 1 ;;
  esac
}
run daemon "flanneld-rs $version" -- /usr/bin/flanneld-rs --version
run nft "nftables v" -- /usr/sbin/nft --version
run iptables "(nf_tables)" -- /usr/sbin/iptables-restore --version
# Dual-stack: the same chains in ip6tables.
run ip6tables "(nf_tables)" -- /usr/sbin/ip6tables-restore --version
run plugin '"supportedVersions"' --env CNI_COMMAND=VERSION -- /usr/lib/flannel-rs/flannel
run install "installed /usr/lib/flannel-rs/flannel as /tmp/bin/flannel" -- \
  /usr/lib/flannel-rs/flannel install /usr/lib/flannel-rs/flannel /tmp/bin/flannel
echo "image ok: $name"
