#!/usr/bin/env bash
# The demo: a flannel-rs overlay in network namespaces. A real etcd, three
# nodes each running flanneld-rs (VXLAN), two pods per node plugged in by the
# flannel-rs CNI plugin, traffic across nodes; then one node's kernel state
# and `flanneld-rs diagnose`. Everything is removed at the end, also on failure.
# FLANNEL_RS_BIN=DIR uses the binaries already built in DIR (flanneld-rs,
# flannel, netns-fixture) instead of building release ones; the end-to-end
# test of this script (tests/tests/readme_behaviours.rs) does that.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
if [ -n "${FLANNEL_RS_BIN:-}" ]; then
  bin=$(cd "$FLANNEL_RS_BIN" && pwd)
else
  ensure_rust
  cargo build --release --quiet -p cni-plugin -p flanneld-rs -p netns-fixtures
  bin=$PWD/target/release
fi
tag="demo$$"
work=$(mktemp -d)
etcd_ep=http://192.0.2.200:2379
pids=()
teardown() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$bin/netns-fixture" down --name "$tag" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap teardown EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

say "an underlay (192.0.2.0/24) with three nodes and a host for etcd"
"$bin/netns-fixture" up --nodes 3 --outside --name "$tag"
out="flt-$tag-outside"

say "etcd on 192.0.2.200, with flannel's network configuration"
in_ns "$out" etcd --data-dir "$work/etcd" --listen-client-urls "$etcd_ep" --advertise-client-urls "$etcd_ep" \
  --listen-peer-urls http://127.0.0.1:2380 >"$work/etcd.log" 2>&1 &
pids+=($!)
etcd_healthy() { ETCDCTL_API=3 in_ns "$out" etcdctl --endpoints "$etcd_ep" endpoint health >/dev/null 2>&1; }
for _ in $(seq 100); do etcd_healthy && break; sleep 0.1; done
etcd_healthy || { cat "$work/etcd.log"; echo "etcd at $etcd_ep not healthy after 10 s"; exit 1; }
ETCDCTL_API=3 in_ns "$out" etcdctl --endpoints "$etcd_ep" put /coreos.com/network/config \
  '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'

say "flanneld-rs on every node"
for i in 0 1 2; do
  in_ns "flt-$tag-node$i" "$bin/flanneld-rs" --etcd-endpoints "$etcd_ep" --subnet-file "$work/subnet$i.env" \
    --ip-masq >"$work/flanneld$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 200); do grep -q " INFO .*: ready: " "$work/flanneld$i.log" && break; sleep 0.05; done
  grep -q " INFO .*: ready: " "$work/flanneld$i.log" || { cat "$work/flanneld$i.log"; exit 1; }
  printf 'node%s: ' "$i"; grep FLANNEL_SUBNET "$work/subnet$i.env"
done

say "two pods per node, plugged in by the CNI plugin"
declare -A addr
for i in 0 1 2; do
  for p in a b; do
    pod="flt-$tag-n$i-$p"
    ip netns add "$pod"
    conf="{\"cniVersion\":\"1.0.0\",\"name\":\"cbr0\",\"type\":\"flannel\",\"subnetFile\":\"$work/subnet$i.env\",\"dataDir\":\"$work/cni$i\",\"delegate\":{\"hairpinMode\":true,\"isDefaultGateway\":true}}"
    # (The plugin's error is its JSON on stdout: shown, not only the exit.)
    res=$(echo "$conf" | CNI_COMMAND=ADD CNI_CONTAINERID="n$i$p" CNI_NETNS="/run/netns/$pod" CNI_IFNAME=eth0 \
      CNI_PATH=/usr/lib/cni in_ns "flt-$tag-node$i" "$bin/flannel") || { echo "CNI ADD of $pod failed: $res"; exit 1; }
    addr[$i$p]=$(echo "$res" | jq -r '.ips[0].address | split("/")[0]')
    echo "node$i pod $p: ${addr[$i$p]}"
  done
done

say "every pod pings a pod on every other node"
for i in 0 1 2; do
  for j in 0 1 2; do
    [ "$i" = "$j" ] && continue
    for p in a b; do
      printf 'node%s/a -> node%s/%s (%s): ' "$i" "$j" "$p" "${addr[$j$p]}"
      in_ns "flt-$tag-n$i-a" ping -c 1 -W 2 "${addr[$j$p]}" | grep -o 'time=.*' || { echo FAILED; exit 1; }
    done
  done
done

say "TCP across nodes: node2/b serves, node0/a fetches"
in_ns "flt-$tag-n2-b" socat -T 5 TCP-LISTEN:8080,reuseaddr SYSTEM:'echo hello from node2' &
server=$!
pids+=("$server")  # stopped by the teardown if the demo fails before it ends
listening() { in_ns "flt-$tag-n2-b" ss -Hltn 'sport = :8080' | grep . >/dev/null; }
for _ in $(seq 50); do listening && break; sleep 0.1; done
listening || { echo "socat in node2/b does not listen on :8080 after 5 s"; exit 1; }
in_ns "flt-$tag-n0-a" socat -T 5 - TCP:"${addr[2b]}":8080 </dev/null
wait "$server"
unset 'pids[-1]'

say "node0: ip route show dev flannel.1"
ip -n "flt-$tag-node0" route show dev flannel.1
say "node0: ip neigh show dev flannel.1"
ip -n "flt-$tag-node0" neigh show dev flannel.1
say "node0: bridge fdb show dev flannel.1"
in_ns "flt-$tag-node0" bridge fdb show dev flannel.1
say "node0: a route deleted by hand comes back"
# awk and grep read all of ip's output: ip flushes per route, and a reader
# that quits early would kill it with SIGPIPE, which pipefail makes fatal.
gone=$(ip -n "flt-$tag-node0" route show dev flannel.1 | awk 'NR == 1 { print $1 }')
[ -n "$gone" ] || { echo "node0 has no route via flannel.1 to delete"; exit 1; }
ip -n "flt-$tag-node0" route del "$gone" dev flannel.1
deadline=$((SECONDS + 10))
until ip -n "flt-$tag-node0" route show "$gone" dev flannel.1 | grep . >/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "the route to $gone did not come back"; exit 1; }
  sleep 0.05
done
ip -n "flt-$tag-node0" route show dev flannel.1
say "node0: flanneld-rs diagnose"
in_ns "flt-$tag-node0" "$bin/flanneld-rs" --etcd-endpoints "$etcd_ep" --subnet-file "$work/subnet0.env" --ip-masq diagnose
say "done; removing everything"
