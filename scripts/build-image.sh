#!/usr/bin/env bash
# Builds flannel-rs's container image as an OCI archive, with no container
# engine and no registry: release binaries from cargo, a root filesystem put
# together by hand (the two binaries, Debian's nft and iptables (nft and legacy), and
# every shared library and iptables extension they load), one reproducible
# layer, and the OCI JSON documents.
#
# Usage: scripts/build-image.sh [OUTPUT.oci.tar] [NAME:TAG]
#   default output target/image/flannel-rs-<version>.oci.tar,
#   default tag    flannel-rs:<version> (imported as docker.io/library/flannel-rs:<version>)
# Load it into a node's containerd:
#   ctr -n k8s.io images import target/image/flannel-rs-<version>.oci.tar
# Environment:
#   FLANNEL_RS_PREBUILT=1  take the binaries already in target/ instead of running cargo
#   CARGO_TARGET_DIR       cargo's, where the binaries are (default target)
#   SOURCE_DATE_EPOCH      time stamp of every file and of the image (default: HEAD's commit time)
#
# The image's plugin is linked statically: the init container copies it onto
# the host, where it runs with the host's libc, which may be older than this
# machine's. The daemon runs inside the image, next to the libraries copied
# here, and stays dynamic (glibc's resolver wants its shared libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
umask 022

version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')
target=${CARGO_TARGET_DIR:-target}
out=${1:-$target/image/flannel-rs-$version.oci.tar}
ref=${2:-flannel-rs:$version}
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
arch=$(dpkg --print-architecture)

if ! [ -x /usr/sbin/nft ]; then
  [ "$(id -u)" -eq 0 ] || { echo "$0: /usr/sbin/nft is missing: apt-get install nftables" >&2; exit 1; }
  install_packages nftables
fi
# The daemon writes flannel's iptables chains with iptables-restore (iptables-nft).
xtables=/usr/sbin/xtables-nft-multi
xtables_legacy=/usr/sbin/xtables-legacy-multi
if ! [ -x "$xtables" ] || ! [ -x "$xtables_legacy" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "$0: $xtables is missing: apt-get install iptables" >&2; exit 1; }
  install_packages iptables
fi
xtables_libdir=$(find /usr/lib -maxdepth 2 -type d -name xtables | sort | sed -n 1p)
[ -n "$xtables_libdir" ] || { echo "$0: iptables' extensions (/usr/lib/<arch>/xtables) are missing" >&2; exit 1; }

triple=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
if [ "${FLANNEL_RS_PREBUILT:-0}" != 1 ]; then
  ensure_rust
  triple=$(rustc -vV | sed -n 's/^host: //p')
  echo "== cargo build --release (flanneld-rs; the plugin static for $triple)" >&2
  cargo build --release --quiet -p flanneld-rs
  # With an explicit --target, RUSTFLAGS reach only the target's crates, not
  # build scripts and proc macros, which must stay dynamic.
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --quiet -p cni-plugin --target "$triple"
fi
daemon=$target/release/flanneld-rs
plugin=$target/$triple/release/flannel
for b in "$daemon" "$plugin"; do
  [ -x "$b" ] || { echo "$0: $b is missing (unset FLANNEL_RS_PREBUILT to build it)" >&2; exit 1; }
done
# ldd exits 1 on a static non-PIE binary ("not a dynamic executable"), which
# pipefail would make a pipeline's status: its output is taken whole first.
linkage=$(ldd "$plugin" 2>&1 || true)
if ! grep -qE 'statically linked|not a dynamic executable' <<<"$linkage"; then
  echo "$0: $plugin is dynamically linked; it must run on any node's libc" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/flannel-rs-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

# Debian's merged /usr: /bin, /sbin, /lib and /lib64 are links into /usr.
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/usr/lib/flannel-rs "$root"/{etc,run,proc,sys,dev}
mkdir -m 1777 "$root/tmp"
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"

install -m 0755 "$daemon" "$root/usr/bin/flanneld-rs"
install -m 0755 "$plugin" "$root/usr/lib/flannel-rs/flannel"
install -m 0755 /usr/sbin/nft "$root/usr/sbin/nft"
install -m 0755 "$xtables" "$root/usr/sbin/xtables-nft-multi"
install -m 0755 "$xtables_legacy" "$root/usr/sbin/xtables-legacy-multi"
# iptables is iptables-nft, as Debian's default; the daemon picks the legacy
# variant on a node whose kubelet uses it (as flannel's iptables-wrapper).
for name in iptables iptables-save iptables-restore iptables-nft iptables-nft-save iptables-nft-restore \
            ip6tables ip6tables-save ip6tables-restore ip6tables-nft ip6tables-nft-save ip6tables-nft-restore; do
  ln -s xtables-nft-multi "$root/usr/sbin/$name"
done
for name in iptables-legacy iptables-legacy-save iptables-legacy-restore \
            ip6tables-legacy ip6tables-legacy-save ip6tables-legacy-restore; do
  ln -s xtables-legacy-multi "$root/usr/sbin/$name"
done
# Extensions (comment, mark, MASQUERADE, and whatever kube-proxy's rules in the
# same tables use, which iptables-save must read), loaded with dlopen.
mkdir -p "$root$xtables_libdir"
for ext in "$xtables_libdir"/*.so; do
  install -m 0644 "$(readlink -f "$ext")" "$root$xtables_libdir/$(basename "$ext")"
done

# Every library the dynamic binaries load, and the dynamic loader, each at the
# path ldd resolved (under /usr, as in the merged layout), content dereferenced.
# (ldd's output is read whole: a reader that quit at the first match could
# kill ldd with SIGPIPE, which pipefail would make the pipeline's status.)
libs() {
  local deps
  deps=$(ldd "$1") || { echo "$0: ldd $1 failed" >&2; exit 1; }
  if grep -q 'not found' <<<"$deps"; then
    echo "$0: $1 needs a library that is not installed:" >&2
    grep 'not found' <<<"$deps" >&2
    exit 1
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps"
}
# Listed first, so that a libs failure stops the build: a `for` over a
# command substitution would ignore its status.
all_libs=$( { libs "$daemon"; libs /usr/sbin/nft; libs "$xtables"; libs "$xtables_legacy"; for ext in "$xtables_libdir"/*.so; do libs "$ext"; done; } | sort -u)
for lib in $all_libs; do
  case $lib in
    /usr/*) dest=$lib ;;
    *) dest=/usr$lib ;;
  esac
  real=$(readlink -f "$lib")
  install -D -m "$(stat -c %a "$real")" "$real" "$root$dest"
done

printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
# nft looks protocol and service names up here.
for f in /etc/protocols /etc/services; do
  [ -f "$f" ] && install -m 0644 "$f" "$root$f"
done

# One layer, byte-for-byte reproducible: sorted, one time stamp, owner 0,
# no atime/ctime or PID-dependent names in pax headers.
reproducible_tar() { # DIR OUT
  local dir=$1 out=$2
  (cd "$dir" && LC_ALL=C tar --sort=name --format=posix \
     --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
     --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
     -cf "$out" $(LC_ALL=C ls -A))
}
reproducible_tar "$root" "$work/layer.tar"
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"

digest=$(python3 scripts/lib/oci-layout.py "$work/oci" "$work/layer.tar" "$work/layer.tar.gz" "$ref" "$version" "$epoch" "$arch")

mkdir -p "$(dirname "$out")"
reproducible_tar "$work/oci" "$work/image.tar"
mv "$work/image.tar" "$out"
echo "$out"
echo "digest: $digest"
