#!/usr/bin/env bash
# Builds kube-apiserver (and, when asked, kube-controller-manager, kubelet)
# from Debian's `kubernetes` source package and caches them outside the
# repository, keyed by the package version, so that later runs reuse them.
# Usage: scripts/lib/kube-binaries.sh [cmd/kube-apiserver ...]; prints the cache dir.
set -euo pipefail
whats=("$@")
[ ${#whats[@]} -gt 0 ] || whats=(cmd/kube-apiserver)

version=1.20.5+really1.20.2-1.1+deb12u1
cache=/var/cache/flannel-rs/kubernetes-$version
mkdir -p "$cache"
missing=()
for w in "${whats[@]}"; do [ -x "$cache/$(basename "$w")" ] || missing+=("$w"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$cache"; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
src_list=/etc/apt/sources.list.d/flannel-rs-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src_list"
fi
apt-get update -qq >&2
apt-get install -y -qq golang-1.19 dpkg-dev etcd-server rsync make >/dev/null

work=/var/cache/flannel-rs/src
mkdir -p "$work"
tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' -print -quit)
if [ -z "$tree" ]; then
  (cd "$work" && apt-get source -qq "kubernetes=$version" >&2)
  tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' -print -quit)
fi
cat > "$work/version" <<V
KUBE_GIT_VERSION='v1.20.2'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
V
for w in "${missing[@]}"; do
  rm -rf "$tree/_output"
  (cd "$tree" && PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off CGO_ENABLED=0 GOLDFLAGS="-s -w" \
     KUBE_GIT_VERSION_FILE="$work/version" make WHAT="$w" >&2)
  cp "$tree/_output/bin/$(basename "$w")" "$cache/"
done
echo "$cache"
