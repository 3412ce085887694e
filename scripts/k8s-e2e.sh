#!/usr/bin/env bash
# The whole path on a real cluster: a control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) in the underlay's outside host and
# NODES nodes (containerd and kubelet, each node in its own network, mount and
# PID namespace), then `kubectl apply -f deploy/kube-flannel-rs.yml`, workload
# pods on every node talking HTTP across nodes, pod IP release, and pod start
# latency with our plugin against Debian's reference bridge plugin.
# Everything is removed at the end, also on failure: processes, mounts,
# namespaces, cgroups, and the sysctls kubelet changes. Needs root.
#
# Usage: scripts/k8s-e2e.sh
# Environment:
#   NODES=3            number of nodes (2 or more)
#   LATENCY_PODS=8     pods per plugin in the start latency comparison
#   K8S_E2E_IMAGE=F    use this image archive instead of running scripts/build-image.sh
#   K8S_E2E_KEEP=1     on a terminal: leave the cluster up until Enter is pressed
#   K8S_E2E_BACKEND=B  the backend in the ConfigMap's net-conf.json: vxlan (as
#                      shipped, the default), host-gw or udp
#   K8S_E2E_DUAL_STACK=1  dual-stack: nodes get IPv6 underlay addresses
#                      (2001:db8::/64), kube-controller-manager allocates
#                      podCIDRs of both families (IPv6DualStack, cluster CIDR
#                      10.244.0.0/16,2001:db8:10::/56), net-conf.json gets
#                      EnableIPv6, and every pod must have an address of each
#                      family inside its node's podCIDRs and answer HTTP over
#                      both from every other pod and node
# The Kubernetes binaries come from scripts/lib/kube-binaries.sh (built once,
# about 5 minutes each, then cached under /var/cache/flannel-rs/). With them
# cached, a run takes about 4 minutes on the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib/common.sh
need_root

nodes=${NODES:-3}
dual=${K8S_E2E_DUAL_STACK:-}
gates=()
if [ -n "$dual" ]; then
  # Kubernetes 1.20: dual-stack is behind a feature gate on every component.
  export K8S_E2E_FEATURE_GATES=IPv6DualStack=true
  gates=(--feature-gates=IPv6DualStack=true)
  cluster_cidr=10.244.0.0/16,2001:db8:10::/56
else
  cluster_cidr=10.244.0.0/16
fi
latency_pods=${LATENCY_PODS:-8}
tag=k8se2e
outside_ns=flt-$tag-outside
api=192.0.2.200
t_start=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
fail() { echo "k8s-e2e: FAIL: $*" >&2; exit 1; }
ms_now() { date +%s%3N; }

install_packages containerd runc etcd-server containernetworking-plugins nftables iptables openssl util-linux iproute2 procps gcc libc6-dev python3 nginx curl
[ -x /usr/bin/kubectl ] || install_packages kubernetes-client
kbin=$(scripts/lib/kube-binaries.sh cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet)
version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')
# The image under test: built from the working tree (cargo only rebuilds what
# changed), unless K8S_E2E_IMAGE names an archive from scripts/build-image.sh.
if [ -n "${K8S_E2E_IMAGE:-}" ]; then
  archive=$(readlink -f "$K8S_E2E_IMAGE")
  [ -f "$archive" ] || fail "K8S_E2E_IMAGE=$K8S_E2E_IMAGE: no such archive"
else
  archive=$repo/target/image/flannel-rs-$version.oci.tar
  scripts/build-image.sh "$archive" >/dev/null
fi
[ -x target/debug/netns-fixture ] || { ensure_rust; cargo build --quiet -p netns-fixtures; }
fixture=$repo/target/debug/netns-fixture

work=$(mktemp -d /tmp/flannel-rs-k8s-e2e.XXXXXX)
chmod 755 "$work"
pids=()            # control-plane processes
node_pids=()       # the unshare process of each node
made_dirs=()       # mount points created on the host
loop_pids=()       # HTTP clients running during the DaemonSet rollout
sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops vm.panic_on_oom)
declare -A saved_sysctl
for s in "${sysctls[@]}"; do saved_sysctl[$s]=$(sysctl -n "$s"); done

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "${K8S_E2E_KEEP:-0}" = 1 ] && [ -t 0 ]; then
    echo "cluster left up: KUBECONFIG=$work/admin.kubeconfig nsenter --net=/run/netns/$outside_ns kubectl ...; Enter to tear down"
    read -r _
  fi
  echo "== teardown"
  # PID 1 of each node's PID namespace: killing it kills kubelet, containerd,
  # the shims and every container of the node.
  # No "Killed" job notices for what is killed on purpose.
  {
    for p in "${loop_pids[@]}"; do kill "$p"; wait "$p"; done
    for p in "${node_pids[@]}"; do
      for c in $(ps -o pid= --ppid "$p"); do kill -9 "$c"; done
      kill -9 "$p"
    done
    for p in "${pids[@]}"; do kill "$p"; done
    for p in "${node_pids[@]}" "${pids[@]}"; do
      for _ in $(seq 50); do kill -0 "$p" || break; sleep 0.1; done
      kill -9 "$p"
      wait "$p"
    done
  } 2>/dev/null
  # Container cgroups (kubelet's --cgroup-root) and the ones runc leaves
  # behind when its containers were killed, deepest first.
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h/k8se2e" ] && find "$h/k8se2e" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  for s in "${sysctls[@]}"; do
    [ "$(sysctl -n "$s")" = "${saved_sysctl[$s]}" ] || sysctl -qw "$s=${saved_sysctl[$s]}"
  done
  "$fixture" down --name "$tag" >/dev/null 2>&1
  # Mount points this run created (the mounts themselves died with the nodes).
  for d in "${made_dirs[@]}"; do rmdir "$d" 2>/dev/null; done
  awk -v p="$work/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
  if [ $rc -ne 0 ]; then
    # Every log (control plane, containerd, kubelet, the pods' own under each
    # node's /var/log/pods), not the nodes' image stores.
    rm -rf /tmp/k8s-e2e-logs && mkdir -p /tmp/k8s-e2e-logs
    (cd "$work" && find . -name '*.log' -print0 | tar --null -cf - -T -) 2>/dev/null | tar -xf - -C /tmp/k8s-e2e-logs
    echo "k8s-e2e: failed (exit $rc); logs copied to /tmp/k8s-e2e-logs" >&2
  fi
  rm -rf "$work"
  echo "teardown done after $(( $(date +%s) - t_start )) s in total"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$fixture" down --name "$tag" >/dev/null 2>&1 || true
say "underlay: $nodes nodes and the outside host ($api)"
"$fixture" up --nodes "$nodes" --outside --name "$tag"
in_outside() { nsenter --net=/run/netns/$outside_ns "$@"; }
kc() { in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s "$@" 2>&1 | grep -v 'version difference\|^WARNING: version' || return "${PIPESTATUS[0]}"; }
kcq() { in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s "$@" 2>/dev/null; }

say "PKI, tokens and kubeconfigs"
pki=$work/pki
mkdir -p "$pki"
(
  cd "$pki"
  openssl genrsa -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -key ca.key -subj /CN=k8s-e2e-ca -days 2 -out ca.crt
  openssl genrsa -out server.key 2048 2>/dev/null
  openssl req -new -key server.key -subj /CN=kube-apiserver -out server.csr
  printf 'subjectAltName=IP:%s,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$api" >san.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)
tok() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
kubeconfig() { # FILE TOKEN
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://$api:6443
    certificate-authority: $pki/ca.crt
users:
- name: u
  user:
    token: $2
contexts:
- name: e2e
  context: {cluster: e2e, user: u}
current-context: e2e
KC
}
admin_tok=$(tok) cm_tok=$(tok) sched_tok=$(tok)
{
  echo "$admin_tok,admin,admin,\"system:masters\""
  echo "$cm_tok,system:kube-controller-manager,kcm,\"system:masters\""
  echo "$sched_tok,system:kube-scheduler,sched,\"system:masters\""
} >"$pki/tokens.csv"
kubeconfig "$work/admin.kubeconfig" "$admin_tok"
kubeconfig "$work/cm.kubeconfig" "$cm_tok"
kubeconfig "$work/sched.kubeconfig" "$sched_tok"
for i in $(seq 0 $((nodes - 1))); do
  t=$(tok)
  echo "$t,system:node:node$i,node$i,\"system:nodes\"" >>"$pki/tokens.csv"
  mkdir -p "$work/node$i"
  kubeconfig "$work/node$i/kubeconfig" "$t"
done

say "control plane in $outside_ns"
t_cp=$(ms_now)
in_outside etcd --name e2e --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:2379 \
  --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e2e=http://127.0.0.1:2380 \
  >"$work/etcd.log" 2>&1 &
pids+=($!)
in_outside "$kbin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=$api --advertise-address=$api --secure-port=6443 --insecure-port=0 \
  --cert-dir="$pki/certs" --tls-cert-file="$pki/server.crt" --tls-private-key-file="$pki/server.key" \
  --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.96.0.0/16 --allow-privileged=true --profiling=false \
  --kubelet-preferred-address-types=InternalIP "${gates[@]}" \
  >"$work/apiserver.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do kcq get --raw /readyz >/dev/null && break; sleep 0.2; done
kcq get --raw /readyz >/dev/null || { tail -20 "$work/apiserver.log"; fail "kube-apiserver not ready"; }
in_outside "$kbin/kube-controller-manager" --kubeconfig="$work/cm.kubeconfig" \
  --allocate-node-cidrs=true --cluster-cidr=$cluster_cidr "${gates[@]}" \
  $([ -n "$dual" ] && echo --node-cidr-mask-size-ipv4=24 --node-cidr-mask-size-ipv6=64 || echo --node-cidr-mask-size=24) \
  --service-cluster-ip-range=10.96.0.0/16 --controllers='*' \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --leader-elect=false --port=0 --secure-port=0 --profiling=false \
  >"$work/controller-manager.log" 2>&1 &
pids+=($!)
in_outside "$kbin/kube-scheduler" --kubeconfig="$work/sched.kubeconfig" \
  --leader-elect=false --port=0 --secure-port=0 \
  >"$work/scheduler.log" 2>&1 &
pids+=($!)
echo "apiserver ready after $(( $(ms_now) - t_cp )) ms"

say "images: pause and workload (static C), flannel-rs"
img=$work/img
mkdir -p "$img/pause" "$img/http"
gcc -static -O2 -o "$img/pause/pause" tests/k8s/pause.c
gcc -static -O2 -o "$img/http/http" tests/k8s/http.c
sandbox=$(python3 tests/k8s/oci-image.py "$img/pause" "$img/pause.oci.tar" e2e-pause:1 /pause)
python3 tests/k8s/oci-image.py "$img/http" "$img/http.oci.tar" e2e-http:1 /http serve 8080 >/dev/null

say "nodes: containerd and kubelet in their own namespaces"
# Mount points for the nodes' private directories: created when missing,
# each created level remembered (deepest first) and removed at the end.
for d in /var/lib/kubelet /var/lib/containerd /var/lib/cni /etc/cni/net.d /opt/cni/bin; do
  missing=() p=$d
  while [ ! -e "$p" ]; do missing=("$p" "${missing[@]}"); p=$(dirname "$p"); done
  for m in "${missing[@]}"; do mkdir "$m"; made_dirs=("$m" "${made_dirs[@]}"); done
done
for h in /sys/fs/cgroup/*/; do mkdir -p "$h/k8se2e" 2>/dev/null || true; done
for i in $(seq 0 $((nodes - 1))); do
  ns=flt-$tag-node$i
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  if [ -n "$dual" ]; then
    # The IPv6 underlay, inside the node's namespace only.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1
    ip netns exec "$ns" ip -6 addr add "2001:db8::$((10 + i))/64" dev eth0 nodad
  fi
  # The stand-in for kube-proxy, for the one Service the nodes need: the API
  # server's ClusterIP, which in-cluster clients (flanneld-rs) dial.
  ip netns exec "$ns" nft -f - <<NFT
table ip k8se2e-svc {
  chain out {
    type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.1 tcp dport 443 dnat to $api:6443
  }
}
NFT
  nsenter --net=/run/netns/$ns unshare --mount --pid --fork --propagation private --mount-proc \
    "$repo/scripts/lib/k8s-node.sh" "$work/node$i" "node$i" "192.0.2.$((10 + i))" "$kbin/kubelet" \
    "$sandbox" "$archive" "$img/pause.oci.tar" "$img/http.oci.tar" >"$work/node$i/runner.log" 2>&1 &
  node_pids+=($!)
done
for i in $(seq 0 $((nodes - 1))); do
  for _ in $(seq 300); do [ -e "$work/node$i/ready" ] && break; sleep 0.2; done
  [ -e "$work/node$i/ready" ] || { cat "$work/node$i/runner.log"; fail "node$i did not start"; }
done
for _ in $(seq 300); do
  [ "$(kcq get nodes -o name | wc -l)" -eq "$nodes" ] && break
  sleep 0.5
done
kc get nodes -o wide
[ "$(kcq get nodes -o name | wc -l)" -eq "$nodes" ] || fail "not every node registered"
for _ in $(seq 120); do
  [ "$(kcq get nodes -o jsonpath='{range .items[*]}{.spec.podCIDR}{"\n"}{end}' | grep -c .)" -eq "$nodes" ] && break
  sleep 0.5
done
kc get nodes -o custom-columns=NAME:.metadata.name,PODCIDR:.spec.podCIDR,READY:'.status.conditions[?(@.type=="Ready")].status'

backend=${K8S_E2E_BACKEND:-vxlan}
manifest=deploy/kube-flannel-rs.yml
case "$backend" in
  vxlan) ;;
  host-gw|udp)
    manifest=$work/kube-flannel-rs-$backend.yml
    sed 's/"Type": "vxlan"/"Type": "'"$backend"'"/' deploy/kube-flannel-rs.yml >"$manifest"
    grep -q '"Type": "'"$backend"'"' "$manifest" || fail "could not set the backend in the manifest's net-conf.json"
    ;;
  *) fail "K8S_E2E_BACKEND=$backend: not one of vxlan, host-gw, udp" ;;
esac
if [ -n "$dual" ]; then
  dual_manifest=$work/kube-flannel-rs-dual-stack.yml
  sed 's|"Network": "10.244.0.0/16",|"Network": "10.244.0.0/16",\n      "EnableIPv6": true,\n      "IPv6Network": "2001:db8:10::/56",|' \
    "$manifest" >"$dual_manifest"
  grep -q '"IPv6Network": "2001:db8:10::/56"' "$dual_manifest" || fail "could not add IPv6 to the manifest's net-conf.json"
  manifest=$dual_manifest
  for i in $(seq 0 $((nodes - 1))); do
    cidrs=$(kcq get node node$i -o jsonpath='{.spec.podCIDRs}')
    case $cidrs in *2001:db8:10:*) ;; *) fail "node$i has no IPv6 podCIDR: $cidrs" ;; esac
  done
fi
# The DaemonSet runs on nodes labelled flannel-rs.io/enabled=true only (see
# the manifest's header): a new cluster labels all of them.
kc label nodes --all flannel-rs.io/enabled=true
say "kubectl apply -f deploy/kube-flannel-rs.yml (backend $backend)"
t_apply=$(ms_now)
kc apply -f "$manifest"
all_ready() {
  local ready
  ready=$(kcq get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')
  [ "$ready" -eq "$nodes" ]
}
ds_ready() {
  [ "$(kcq -n kube-flannel-rs get ds kube-flannel-rs-ds -o jsonpath='{.status.numberReady}')" = "$nodes" ]
}
# What the init containers and the daemon leave on every node: the plugin,
# the conflist and subnet.env.
files_there() {
  local i
  for i in $(seq 0 $((nodes - 1))); do
    [ -x "$work/node$i/fs/opt/cni/bin/flannel" ] && [ -s "$work/node$i/fs/etc/cni/net.d/10-flannel.conflist" ] \
      && [ -s "$work/node$i/fs/run/flannel/subnet.env" ] || return 1
  done
}
t_nodes_ready= t_ds_ready= t_files=
for _ in $(seq 600); do
  if [ -z "$t_files" ] && files_there; then t_files=$(ms_now); fi
  if [ -z "$t_ds_ready" ] && ds_ready; then t_ds_ready=$(ms_now); fi
  if [ -z "$t_nodes_ready" ] && all_ready; then t_nodes_ready=$(ms_now); fi
  [ -n "$t_files" ] && [ -n "$t_ds_ready" ] && [ -n "$t_nodes_ready" ] && break
  sleep 0.2
done
kc -n kube-flannel-rs get pods -o wide
kc get nodes
[ -n "$t_nodes_ready" ] || fail "nodes not Ready within 120 s of kubectl apply"
[ -n "$t_ds_ready" ] || fail "DaemonSet pods not ready"
[ -n "$t_files" ] || fail "plugin, conflist or subnet.env missing on a node"
apply_to_ready=$((t_nodes_ready - t_apply))
apply_to_ds_ready=$((t_ds_ready - t_apply))
apply_to_files=$((t_files - t_apply))
echo "kubectl apply -> plugin, conflist and subnet.env on every node: $apply_to_files ms"
echo "kubectl apply -> every flanneld-rs pod ready: $apply_to_ds_ready ms"
echo "kubectl apply -> every node Ready: $apply_to_ready ms (kubelet reports node status every 10 s)"
# The backend's own device (or none) on every node.
for i in $(seq 0 $((nodes - 1))); do
  links=$(ip -n "flt-$tag-node$i" -o link show)
  case "$backend" in
    vxlan) want=flannel.1 ;;
    udp) want=flannel0 ;;
    host-gw) want= ;;
  esac
  if [ -n "$want" ]; then
    grep -q " $want[:@]" <<<"$links" || fail "node$i has no $want (backend $backend)"
  elif grep -qE " flannel(\.1|0)[:@]" <<<"$links"; then
    fail "node$i has a tunnel device with backend host-gw"
  fi
done
echo "backend $backend: ${want:-no tunnel device} on every node"

# A workload pod pinned to a node.
pod_yaml() { # NAME NODE [APP-LABEL]
  cat <<Y
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: ${3:-e2e-http}}}
spec:
  nodeName: $2
  terminationGracePeriodSeconds: 1
  containers:
  - name: http
    image: e2e-http:1
    imagePullPolicy: Never
    command: ["/http", "serve", "8080"]
    env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
Y
}
wait_running() { # NAME... (fails after 120 s)
  local p
  for p in "$@"; do
    for _ in $(seq 1200); do
      [ "$(kcq get pod "$p" -o jsonpath='{.status.phase}')" = Running ] && break
      sleep 0.1
    done
    [ "$(kcq get pod "$p" -o jsonpath='{.status.phase}')" = Running ] || { kc describe pod "$p" | tail -20; fail "pod $p not Running"; }
  done
}

say "workload: one pod per node"
for i in $(seq 0 $((nodes - 1))); do pod_yaml web$i node$i | kc apply -f - >/dev/null; done
wait_running $(for i in $(seq 0 $((nodes - 1))); do echo web$i; done)
kc get pods -o wide
declare -A pod_ip
for i in $(seq 0 $((nodes - 1))); do
  pod_ip[$i]=$(kcq get pod web$i -o jsonpath='{.status.podIP}')
  cidr=$(kcq get node node$i -o jsonpath='{.spec.podCIDR}')
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('${pod_ip[$i]}') not in ipaddress.ip_network('$cidr'))" \
    || fail "web$i has ${pod_ip[$i]}, outside node$i's podCIDR $cidr"
  echo "web$i on node$i: ${pod_ip[$i]} in $cidr"
done
declare -A pod_ip6
if [ -n "$dual" ]; then
  for i in $(seq 0 $((nodes - 1))); do
    pod_ip6[$i]=$(kcq get pod web$i -o jsonpath='{.status.podIPs[1].ip}')
    cidr6=$(kcq get node node$i -o jsonpath='{.spec.podCIDRs[1]}')
    python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('${pod_ip6[$i]:-x}'.replace('x','0.0.0.0')) not in ipaddress.ip_network('$cidr6'))" \
      || fail "web$i has IPv6 address '${pod_ip6[$i]}', not in node$i's IPv6 podCIDR $cidr6 (podIPs: $(kcq get pod web$i -o jsonpath='{.status.podIPs}'))"
    echo "web$i on node$i: ${pod_ip6[$i]} in $cidr6"
  done
fi

say "HTTP between every pair of pods (kubectl exec), and from every node"
pairs_ok=0 pairs=0
for i in $(seq 0 $((nodes - 1))); do
  for j in $(seq 0 $((nodes - 1))); do
    pairs=$((pairs + 1))
    out=$(in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s exec web$i -- /http get "${pod_ip[$j]}" 8080 2>&1 || true)
    case $out in
      "web$j "*) pairs_ok=$((pairs_ok + 1)); echo "web$i -> web$j (${pod_ip[$j]}): $out" ;;
      *) echo "web$i -> web$j (${pod_ip[$j]}): FAILED: $out" ;;
    esac
  done
done
node_ok=0 node_pairs=0
for i in $(seq 0 $((nodes - 1))); do
  for j in $(seq 0 $((nodes - 1))); do
    node_pairs=$((node_pairs + 1))
    out=$(ip netns exec flt-$tag-node$i "$img/http/http" get "${pod_ip[$j]}" 8080 || true)
    case $out in "web$j "*) node_ok=$((node_ok + 1)) ;; *) echo "node$i -> web$j: FAILED: $out" ;; esac
  done
done
echo "pod to pod: $pairs_ok/$pairs; node to pod: $node_ok/$node_pairs"
[ "$pairs_ok" -eq "$pairs" ] || fail "HTTP between pods"
[ "$node_ok" -eq "$node_pairs" ] || fail "HTTP from nodes to pods"
if [ -n "$dual" ]; then
  say "the same over IPv6"
  ok6=0 all6=0
  for i in $(seq 0 $((nodes - 1))); do
    for j in $(seq 0 $((nodes - 1))); do
      all6=$((all6 + 2))
      out=$(in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s exec web$i -- /http get "${pod_ip6[$j]}" 8080 2>&1 || true)
      case $out in "web$j "*) ok6=$((ok6 + 1)); echo "web$i -> web$j (${pod_ip6[$j]}): $out" ;; *) echo "web$i -> web$j (${pod_ip6[$j]}): FAILED: $out" ;; esac
      out=$(ip netns exec flt-$tag-node$i "$img/http/http" get "${pod_ip6[$j]}" 8080 || true)
      case $out in "web$j "*) ok6=$((ok6 + 1)) ;; *) echo "node$i -> web$j (${pod_ip6[$j]}): FAILED: $out" ;; esac
    done
  done
  echo "IPv6, pod to pod and node to pod: $ok6/$all6"
  [ "$ok6" -eq "$all6" ] || fail "HTTP over IPv6"
fi

say "deleting a pod frees its address"
store=$work/node0/fs/var/lib/cni/flannel/networks/cbr0
ip0=${pod_ip[0]}
[ -e "$store/$ip0" ] || { ls -la "$store" 2>&1; fail "no allocation $store/$ip0 for web0"; }
echo "allocated: $store/$ip0 ($(tr '\r\n' '  ' <"$store/$ip0"))"
ip0_6=${pod_ip6[0]:-}
if [ -n "$ip0_6" ]; then
  [ -e "$store/$ip0_6" ] || { ls -la "$store" 2>&1; fail "no allocation $store/$ip0_6 for web0"; }
  echo "allocated: $store/$ip0_6 ($(tr '\r\n' '  ' <"$store/$ip0_6"))"
fi
kc delete pod web0 --wait=true >/dev/null
released() { [ ! -e "$store/$ip0" ] && { [ -z "$ip0_6" ] || [ ! -e "$store/$ip0_6" ]; }; }
for _ in $(seq 100); do released && break; sleep 0.1; done
[ -e "$store/$ip0" ] && fail "$ip0 still allocated after the pod was deleted"
if [ -n "$ip0_6" ] && [ -e "$store/$ip0_6" ]; then fail "$ip0_6 still allocated after the pod was deleted"; fi
echo "released: $ip0 ${ip0_6} (left: $(ls "$store" | grep -c '^[0-9a-f]*[.:]') addresses on node0)"
ip_freed=yes
pod_yaml web0 node0 | kc apply -f - >/dev/null
wait_running web0
pod_ip[0]=$(kcq get pod web0 -o jsonpath='{.status.podIP}')
echo "web0 again: ${pod_ip[0]}"
if [ -n "$dual" ]; then
  # The dual-stack run stops here: the rest (ingress, rollout, latency) is
  # the IPv4 run's, and family-independent.
  say "summary (dual-stack)"
  cat <<S
cluster: $nodes nodes, dual-stack (IPv6DualStack), podCIDRs of both families
pods get an address of each family from their node's podCIDRs: yes
HTTP pod -> pod and node -> pod over IPv4: $pairs_ok/$pairs, $node_ok/$node_pairs
HTTP pod -> pod and node -> pod over IPv6: $ok6/$all6
deleted pod's addresses (both families) released: $ip_freed
run time: $(( $(date +%s) - t_start )) s
S
  exit 0
fi

say "ingress: nginx on node0's host network, by Host header to pods on the other nodes"
far=$((nodes - 1))
pod_yaml default-backend "node$far" | kc apply -f - >/dev/null
wait_running default-backend
def_ip=$(kcq get pod default-backend -o jsonpath='{.status.podIP}')
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<NGX
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events {}
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  proxy_set_header Host \$host;
  proxy_connect_timeout 3s;
  server { listen 192.0.2.10:80 default_server; location / { proxy_pass http://$def_ip:8080; } }
  server { listen 192.0.2.10:80; server_name a.example; location / { proxy_pass http://${pod_ip[1]}:8080; } }
  server { listen 192.0.2.10:80; server_name b.example; location / { proxy_pass http://${pod_ip[$far]}:8080; } }
}
NGX
ip netns exec flt-$tag-node0 nginx -c "$work/nginx/nginx.conf" >"$work/nginx/stdout.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do ip netns exec flt-$tag-node0 ss -ltn | grep -q '192.0.2.10:80 ' && break; sleep 0.1; done
ingress_ok=0 ingress_n=0
for pair in "a.example web1" "b.example web$far" "unknown.example default-backend"; do
  read -r host want <<<"$pair"
  ingress_n=$((ingress_n + 1))
  out=$(in_outside "$img/http/http" get 192.0.2.10 80 "$host" || true)
  case $out in
    "$want $host"*) ingress_ok=$((ingress_ok + 1)); echo "outside -> node0:80 Host $host: $out" ;;
    *) echo "outside -> node0:80 Host $host: FAILED (want $want): $out" ;;
  esac
done
[ "$ingress_ok" -eq "$ingress_n" ] || { cat "$work/nginx/error.log"; fail "ingress"; }

say "rolling the DaemonSet to a new image tag under continuous HTTP"
roll_tag=$version-roll
for i in $(seq 0 $((nodes - 1))); do
  pid1=$(ps -o pid= --ppid "${node_pids[$i]}" | head -1 | tr -d ' ')
  nsenter -t "$pid1" -m -n ctr --address /run/containerd/containerd.sock -n k8s.io images tag \
    "docker.io/library/flannel-rs:$version" "docker.io/library/flannel-rs:$roll_tag" </dev/null >/dev/null
done
# One client per node, requests to the pods of every other node (across the
# overlay) and through the ingress, back to back, each with a 3 s timeout.
for i in $(seq 0 $((nodes - 1))); do
  targets=()
  for j in $(seq 0 $((nodes - 1))); do [ "$j" -ne "$i" ] && targets+=("${pod_ip[$j]}"); done
  (
    ok=0 bad=0
    while [ -d "$work" ] && [ ! -e "$work/stop-traffic" ]; do
      for t in "${targets[@]}"; do
        if ip netns exec flt-$tag-node$i "$img/http/http" get "$t" 8080 >/dev/null 2>>"$work/traffic-errors.log"; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
      done
      if in_outside "$img/http/http" get 192.0.2.10 80 a.example >/dev/null 2>>"$work/traffic-errors.log"; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
      sleep 0.05
    done
    echo "$ok $bad" >"$work/traffic-$i"
  ) &
  loop_pids+=($!)
done
sleep 2
t_roll=$(ms_now)
kc -n kube-flannel-rs set image ds/kube-flannel-rs-ds "*=flannel-rs:$roll_tag"
kc -n kube-flannel-rs rollout status ds/kube-flannel-rs-ds --timeout=300s
roll_ms=$(( $(ms_now) - t_roll ))
sleep 2
touch "$work/stop-traffic"
for p in "${loop_pids[@]}"; do wait "$p"; done
loop_pids=()
req_ok=0 req_bad=0
idle=()
for i in $(seq 0 $((nodes - 1))); do
  read -r a b <"$work/traffic-$i"
  req_ok=$((req_ok + a)) req_bad=$((req_bad + b))
  [ "$a" -gt 0 ] || idle+=("node$i")
done
kc -n kube-flannel-rs get pods -o custom-columns=NAME:.metadata.name,NODE:.spec.nodeName,IMAGE:.spec.containers[0].image,READY:.status.containerStatuses[0].ready
echo "rollout took $roll_ms ms; requests during it: $req_ok ok, $req_bad failed"
[ -s "$work/traffic-errors.log" ] && sort "$work/traffic-errors.log" | uniq -c | head
# "No request failed" says nothing about a client that had no success at all.
[ ${#idle[@]} -eq 0 ] || fail "no request succeeded during the rollout from the client on ${idle[*]}"
[ "$(kcq -n kube-flannel-rs get pods -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}' | grep -c ":$roll_tag$")" -eq "$nodes" ] \
  || fail "not every flanneld-rs pod runs $roll_tag"
if [ "$backend" = udp ]; then
  # A user-space data path: each node's pods are cut off from the old pod's
  # exit until the new pod's daemon is up (a DaemonSet without maxSurge never
  # runs both), as with flannel's udp mode. Reported, not a failure.
  echo "backend udp: $req_bad requests failed while a node's data path was being replaced (expected)"
  [ "$req_ok" -gt 0 ] || fail "no request succeeded during the rollout"
else
  [ "$req_bad" -eq 0 ] || fail "$req_bad requests failed during the rollout"
fi

# Pod start latency on the last node, our plugin against Debian's reference
# bridge + host-local plugins, alternating pod by pod (ours, then the
# reference, LATENCY_PODS times) so that drift in the machine's load hits both
# alike. The reference configuration is what flannel's Go plugin hands to
# bridge, written out by hand: the node's subnet from subnet.env, the same
# bridge and gateway, addresses from the top half of the range so they never
# meet ours. It is named 00-*, before 10-flannel.conflist, so the runtime
# takes it while it is there (containerd watches the directory); each pod's
# address says which configuration it got. Per pod: from its first watch
# event (created) to the event that says Running, both stamped by the same
# watcher; and, from the node's containerd log, how long RunPodSandbox took
# (the CNI ADD happens inside it).
ln=$((nodes - 1))
lat_node=node$ln
say "pod start latency on $lat_node: flannel-rs plugin and the reference bridge plugin, alternating"
env_file=$work/node$ln/fs/run/flannel/subnet.env
subnet=$(sed -n 's/^FLANNEL_SUBNET=//p' "$env_file")
mtu=$(sed -n 's/^FLANNEL_MTU=//p' "$env_file")
read -r netcidr rstart rend <<<"$(python3 -c "import ipaddress; n = ipaddress.ip_interface('$subnet').network; print(n, n[129], n[254])")"
ref_conf=$work/node$ln/fs/etc/cni/net.d/00-bridge.conflist
ref_json='{"name":"cbr0","cniVersion":"0.3.1","plugins":[
 {"type":"bridge","bridge":"cni0","isGateway":true,"isDefaultGateway":true,"hairpinMode":true,"mtu":'$mtu',"ipMasq":false,
  "ipam":{"type":"host-local","dataDir":"/var/lib/cni/reference","ranges":[[{"subnet":"'$netcidr'","rangeStart":"'$rstart'","rangeEnd":"'$rend'"}]],
          "routes":[{"dst":"10.244.0.0/16"}]}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}'
ev=$work/latency.events
: >"$ev"
# nsenter execs kubectl: $! is kubectl's pid.
nsenter --net=/run/netns/$outside_ns kubectl --kubeconfig "$work/admin.kubeconfig" get pods -l app=e2e-lat -w \
  -o jsonpath='{.metadata.name} {.status.phase} {.status.podIP}{"\n"}' 2>/dev/null \
  > >(exec >>"$ev"; while read -r n ph ip; do echo "$(date +%s%3N) $n $ph $ip"; done) &
watcher=$!
# The watch is set up once it has listed: a pod it did not see created would
# show up first in whatever phase it reached meanwhile. A pod bound to a
# node that does not exist (nothing runs it) shows when that is.
pod_yaml lat-watch-marker no-such-node e2e-lat | kcq create -f - >/dev/null
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ] && ! grep -q ' lat-watch-marker ' "$ev"; do sleep 0.1; done
grep -q ' lat-watch-marker ' "$ev" || fail "kubectl get -w did not list the marker pod within 30 s"
kcq delete pod lat-watch-marker --grace-period=0 --force --wait=false >/dev/null
# Which CNI configuration the node's containerd gives a pod's eth0 now: the
# type of its first plugin, from the CRI's verbose Status (what `crictl
# info` shows; Debian has no crictl), over gRPC with curl.
cni_in_use() {
  local pid1
  pid1=$(ps -o pid= --ppid "${node_pids[$ln]}" | head -1 | tr -d ' ')
  printf '\x00\x00\x00\x00\x02\x08\x01' |
    nsenter -t "$pid1" -m -n curl -sS --max-time 5 --http2-prior-knowledge --unix-socket /run/containerd/containerd.sock \
      -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- --output - \
      http://localhost/runtime.v1.RuntimeService/Status | python3 tests/k8s/cri-cni.py
}
# containerd reloads the directory when it changes, asynchronously.
wait_cni() { # TYPE (fails after 60 s)
  local now deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    now=$(cni_in_use) && [ "$now" = "$1" ] && return 0
    sleep 0.1
  done
  fail "containerd on $lat_node still uses the ${now:-unknown} CNI configuration, not $1, 60 s after the change"
}
lat_one() { # LABEL K: creates lat-LABEL-K, waits for Running, prints ms and the pod's address
  local name=lat-$1-$2 t0 t1 ip
  pod_yaml "$name" "$lat_node" e2e-lat | kcq create -f - >/dev/null
  for _ in $(seq 1200); do
    grep -q " $name Running" "$ev" && break
    sleep 0.05
  done
  t0=$(awk -v n="$name" '$2 == n { print $1; exit }' "$ev")
  t1=$(awk -v n="$name" '$2 == n && $3 == "Running" { print $1; exit }' "$ev")
  [ -n "$t1" ] || { kc describe pod "$name" | tail -15 >&2; fail "$name not Running"; }
  ip=$(kcq get pod "$name" -o jsonpath='{.status.podIP}')
  echo "$((t1 - t0)) $ip"
}
ours_ms=() ref_ms=()
for k in $(seq 1 "$latency_pods"); do
  rm -f "$ref_conf"
  wait_cni flannel
  read -r ms ip <<<"$(lat_one flannel-rs "$k")"
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') >= ipaddress.ip_address('$rstart'))" \
    || fail "lat-flannel-rs-$k got $ip: the reference configuration was still in use"
  ours_ms+=("$ms")
  printf '%s\n' "$ref_json" >"$ref_conf"
  wait_cni bridge
  read -r ms ip <<<"$(lat_one bridge "$k")"
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') < ipaddress.ip_address('$rstart'))" \
    || fail "lat-bridge-$k got $ip: the reference configuration was not used"
  ref_ms+=("$ms")
  echo "pair $k: flannel-rs ${ours_ms[-1]} ms, bridge $ms ms"
done
rm -f "$ref_conf"
kill "$watcher" 2>/dev/null
{ wait "$watcher"; } 2>/dev/null || true
kcq delete pod -l app=e2e-lat --wait=true >/dev/null
stats() { # LABEL MS...
  local l=$1; shift
  printf '%s\n' "$@" | sort -n | awk -v l="$l" '{ v[NR] = $1; s += $1 } END {
    printf "%s pod (created -> Running): n=%d median=%d ms mean=%d ms min=%d ms max=%d ms\n", l, NR, v[int((NR + 1) / 2)], s / NR, v[1], v[NR] }'
}
lat_ours=$(stats flannel-rs "${ours_ms[@]}"; python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-flannel-rs- flannel-rs)
lat_ref=$(stats bridge "${ref_ms[@]}"; python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-bridge- bridge)
printf '%s\n' "$lat_ours" "$lat_ref"

t_end=$(date +%s)
say "summary"
cat <<S
cluster: $nodes nodes (kubelet $("$kbin/kubelet" --version | awk '{print $2}'), containerd $(containerd --version | awk '{print $3}')), control plane at $api
kubectl apply -> plugin, conflist, subnet.env on every node: $apply_to_files ms
kubectl apply -> every flanneld-rs pod ready:                $apply_to_ds_ready ms
kubectl apply -> every node Ready:                           $apply_to_ready ms
pods get addresses from their node's podCIDR: yes
HTTP pod -> pod (kubectl exec):  $pairs_ok/$pairs
HTTP node -> pod:                $node_ok/$node_pairs
deleted pod's address released:  $ip_freed
ingress (nginx on node0, by Host): $ingress_ok/$ingress_n
DaemonSet rollout to :$roll_tag:  $roll_ms ms, $req_ok requests ok, $req_bad failed
pod start latency ($latency_pods + $latency_pods pods, one at a time, alternating, on $lat_node):
$(printf '%s\n' "$lat_ours" "$lat_ref" | sed 's/^/  /')
run time so far: $((t_end - t_start)) s
S
