#!/usr/bin/env bash
# The demo: one node in a network namespace, two pods plugged in by the
# flannel-rs CNI plugin, traffic between them; prints the bridge and the
# addresses, then removes everything (also when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
need_root
install_packages "${FLANNEL_RS_PACKAGES[@]}"
ensure_rust
cargo build --release --quiet -p cni-plugin -p netns-fixtures

fixture=target/release/netns-fixture
plugin=$PWD/target/release/flannel
tag="demo$$"
work=$(mktemp -d)
teardown() {
  "$fixture" down --name "$tag" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap teardown EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a node (network namespace) on an underlay"
"$fixture" up --nodes 1 --name "$tag"
node="flt-$tag-node0"
ip netns list | grep -qw "$node" || { echo "node namespace $node not found" >&2; exit 1; }

# What flanneld writes once it holds a lease (flannel's format).
cat > "$work/subnet.env" <<ENV
FLANNEL_NETWORK=10.244.0.0/16
FLANNEL_SUBNET=10.244.1.1/24
FLANNEL_MTU=1450
FLANNEL_IPMASQ=true
ENV
conf=$(cat <<JSON
{"cniVersion":"1.0.0","name":"cbr0","type":"flannel",
 "subnetFile":"$work/subnet.env","dataDir":"$work/data",
 "delegate":{"hairpinMode":true,"isDefaultGateway":true}}
JSON
)

cni() { # verb pod
  echo "$conf" | CNI_COMMAND="$1" CNI_CONTAINERID="$2" CNI_NETNS="/run/netns/flt-$tag-$2" \
    CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni ip netns exec "$node" "$plugin"
}

declare -A ip
for pod in pod-a pod-b; do
  ip netns add "flt-$tag-$pod"
  say "CNI ADD $pod"
  result=$(cni ADD "$pod")
  echo "$result" | jq -c .
  ip[$pod]=$(echo "$result" | jq -r '.ips[0].address | split("/")[0]')
done

say "pod-a (${ip[pod-a]}) pings pod-b (${ip[pod-b]})"
ip netns exec "flt-$tag-pod-a" ping -c 3 -i 0.2 "${ip[pod-b]}"

say "TCP from pod-b to pod-a"
ip netns exec "flt-$tag-pod-a" socat -T 5 TCP-LISTEN:8080,reuseaddr SYSTEM:'echo hello from pod-a' &
server=$!
for _ in $(seq 50); do
  ip netns exec "flt-$tag-pod-a" ss -Hltn 'sport = :8080' | grep -q . && break
  sleep 0.1
done
ip netns exec "flt-$tag-pod-b" socat -T 5 - TCP:"${ip[pod-a]}":8080 </dev/null
wait "$server"

say "the node's bridge and the pods' addresses"
ip -n "$node" -br addr show dev cni0
ip -n "$node" -br link show master cni0
for pod in pod-a pod-b; do
  printf '%s: ' "$pod"; ip -n "flt-$tag-$pod" -br addr show dev eth0
  ip -n "flt-$tag-$pod" route | sed 's/^/    /'
done

say "CNI DEL both pods"
for pod in pod-a pod-b; do cni DEL "$pod"; done
ip -n "$node" -br link show master cni0 | wc -l | xargs echo "veths left on cni0:"
ls "$work/data/networks/cbr0"
say "done; removing the namespaces"
