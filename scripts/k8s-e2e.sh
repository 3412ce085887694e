#!/usr/bin/env bash
# The whole path on a real cluster: a control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) in the underlay's outside host and
# NODES nodes (containerd, kubelet and kube-proxy, each node in its own
# network, mount and PID namespace), then `kubectl apply -f
# deploy/kube-flannel-rs.yml` (its pods reach the API server through the
# `kubernetes` Service's ClusterIP, that is through kube-proxy), workload pods
# on every node talking HTTP across nodes, pod IP release, Services with
# selectors (Endpoints from kube-controller-manager) reached by ClusterIP from
# a pod, an nginx ingress on node0's host network whose upstreams are
# ClusterIPs (by Host header, by path with a rewrite, a TLS virtual host, a
# default backend), a NodePort from the outside host, a DaemonSet rollout
# under continuous requests (pod to ClusterIP, outside host to NodePort, the
# ingress, pod IPs) with none failed, and pod start latency (one at a time,
# then a 30-pod burst) with our plugin against Debian's reference bridge
# plugin. Every Service answer must come from a pod on another node than
# the client's.
# kube-proxy (v1.20.2, iptables mode through iptables-nft) runs as a process
# of each node (scripts/lib/k8s-node.sh), beside kubelet, with kubeadm's
# identity (ServiceAccount kube-system/kube-proxy bound to
# system:node-proxier, its token in a kubeconfig), --cluster-cidr and
# --hostname-override; kubeadm runs the same binary as a host-network
# DaemonSet, which would need a kube-proxy image (no registry here). It
# starts with the node, before the DaemonSet is applied, and dies with it.
# Everything is removed at the end, also on failure: processes, mounts,
# namespaces (and with them kube-proxy's rules), cgroups, and the sysctls
# kubelet changes. Needs root.
#
# Usage: scripts/k8s-e2e.sh
# Environment:
#   NODES=3            number of nodes (2 or more)
#   LATENCY_PODS=8     pods per plugin in the start latency comparison
#   BURST_PODS=30      pods per plugin created at once in the start burst comparison
#   K8S_E2E_IMAGE=F    use this image archive instead of running scripts/build-image.sh
#   K8S_E2E_KEEP=1     on a terminal: leave the cluster up until Enter is pressed
#   K8S_E2E_BACKEND=B  the backend in the ConfigMap's net-conf.json: vxlan (as
#                      shipped, the default), host-gw or udp
#   K8S_E2E_DUAL_STACK=1  dual-stack: nodes get IPv6 underlay addresses and
#                      an IPv6 default route (netns-fixture up --ipv6:
#                      2001:db8::/64), kube-controller-manager allocates
#                      podCIDRs of both families (IPv6DualStack, cluster CIDR
#                      10.244.0.0/16,2001:db8:10::/56), net-conf.json gets
#                      EnableIPv6, and every pod must have an address of each
#                      family inside its node's podCIDRs and answer HTTP over
#                      both from every other pod and node; kube-proxy runs its
#                      dual-stack proxier (the Service range is IPv4)
#   K8S_E2E_IPV6_ONLY=1  IPv6-only: the same IPv6 underlay with the nodes' and
#                      the outside host's IPv4 addresses removed, the API
#                      server on 2001:db8::200 with Service range
#                      2001:db8:96::/112 (kube-proxy in ip6tables), kubelets
#                      with IPv6 node IPs, IPv6 podCIDRs only (cluster CIDR
#                      2001:db8:10::/56), net-conf.json with EnableIPv4
#                      false, the DaemonSet's health listener on `::`; every
#                      pod must have one IPv6 address and no IPv4 one, and
#                      the HTTP, release, Service, ingress, NodePort and
#                      rollout checks run over IPv6 (the latency comparison
#                      is the IPv4 run's); scripts/test.sh runs it with
#                      K8S_E2E_BACKEND=host-gw
# The Kubernetes binaries come from scripts/lib/kube-binaries.sh (built once,
# about 5 minutes each, then cached under /var/cache/flannel-rs/). With them
# cached, a run takes about 4.5 minutes on the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib/common.sh
need_root

say() { printf '\n== %s\n' "$*"; }
fail() { echo "k8s-e2e: FAIL: $*" >&2; exit 1; }
ms_now() { date +%s%3N; }

nodes=${NODES:-3}
# The address families of the cluster: ipv4, dual or ipv6. Everything that
# differs between them is set here; the rest of the run reads these.
stack=ipv4
[ -n "${K8S_E2E_DUAL_STACK:-}" ] && stack=dual
if [ -n "${K8S_E2E_IPV6_ONLY:-}" ]; then
  [ "$stack" = dual ] && fail "K8S_E2E_DUAL_STACK and K8S_E2E_IPV6_ONLY: give one of them"
  stack=ipv6
  # Refused before anything is built.
  [ "${K8S_E2E_BACKEND:-vxlan}" = udp ] \
    && fail "K8S_E2E_BACKEND=udp with K8S_E2E_IPV6_ONLY: the udp backend has no IPv6 (flanneld-rs refuses udp with EnableIPv4 false)"
fi
gates=()
api=192.0.2.200             # the API server, on the outside host
svc_range=10.96.0.0/16      # --service-cluster-ip-range
svc_ip=10.96.0.1            # the `kubernetes` Service's ClusterIP in it
cluster_cidr=10.244.0.0/16
mask_flags=(--node-cidr-mask-size=24)
families=4                  # podCIDR families, in order (tests/k8s/*.py)
node_ip() { echo "192.0.2.$((10 + $1))"; }  # node i's underlay address, its kubelet's node IP
case $stack in
  dual)
    # Kubernetes 1.20: dual-stack is behind a feature gate on every component.
    export K8S_E2E_FEATURE_GATES=IPv6DualStack=true
    gates=(--feature-gates=IPv6DualStack=true)
    cluster_cidr=10.244.0.0/16,2001:db8:10::/56
    # A dual-stack cluster takes only the per-family mask flags.
    mask_flags=(--node-cidr-mask-size-ipv4=24 --node-cidr-mask-size-ipv6=64)
    families=4,6
    ;;
  ipv6)
    # Single-stack IPv6 needs no feature gate; kube-controller-manager 1.20
    # takes only --node-cidr-mask-size for a single-stack cluster of either
    # family (the per-family flags are refused there). Kubernetes 1.20 wants
    # an IPv6 Service range of /108 or longer.
    api=2001:db8::200
    svc_range=2001:db8:96::/112
    svc_ip=2001:db8:96::1
    cluster_cidr=2001:db8:10::/56
    mask_flags=(--node-cidr-mask-size=64)
    families=6
    node_ip() { echo "2001:db8::$((10 + $1))"; }  # netns_fixtures::ipv6_of_node
    ;;
esac
# An address as a URL or nginx takes it: IPv6 in brackets.
bracket() { case $1 in *:*) echo "[$1]" ;; *) echo "$1" ;; esac; }
latency_pods=${LATENCY_PODS:-8}
burst_pods=${BURST_PODS:-30}
tag=k8se2e
outside_ns=flt-$tag-outside
t_start=$(date +%s)

install_packages containerd runc etcd-server containernetworking-plugins nftables iptables conntrack openssl util-linux iproute2 procps gcc libc6-dev python3 nginx curl
[ -x /usr/bin/kubectl ] || install_packages kubernetes-client
kbin=$(scripts/lib/kube-binaries.sh cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy)
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
say "underlay: $nodes nodes and the outside host ($api), $stack"
underlay_ipv6=
[ "$stack" = ipv4 ] || underlay_ipv6=--ipv6
"$fixture" up --nodes "$nodes" --outside --name "$tag" $underlay_ipv6
if [ "$stack" = ipv6 ]; then
  # The fixture's underlay always carries IPv4: without its addresses (and so
  # its IPv4 default route) nothing on a node or the outside host can use
  # IPv4 beyond loopback, and flanneld-rs has to find its interface by IPv6.
  for ns in $(for i in $(seq 0 $((nodes - 1))); do echo "flt-$tag-node$i"; done) "$outside_ns"; do
    ip -n "$ns" -4 addr flush dev eth0
    ip -n "$ns" -4 route flush dev eth0
    [ -z "$(ip -n "$ns" -4 addr show dev eth0)$(ip -n "$ns" -4 route show)" ] || fail "$ns still has IPv4 on its underlay"
  done
  echo "IPv4 addresses removed from every node's and the outside host's eth0"
fi
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
  printf 'subjectAltName=IP:%s,IP:%s,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$api" "$svc_ip" >san.ext
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
    server: https://$(bracket "$api"):6443
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
  --service-cluster-ip-range=$svc_range --allow-privileged=true --profiling=false \
  --kubelet-preferred-address-types=InternalIP "${gates[@]}" \
  >"$work/apiserver.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do kcq get --raw /readyz >/dev/null && break; sleep 0.2; done
kcq get --raw /readyz >/dev/null || { tail -20 "$work/apiserver.log"; fail "kube-apiserver not ready"; }
in_outside "$kbin/kube-controller-manager" --kubeconfig="$work/cm.kubeconfig" \
  --allocate-node-cidrs=true --cluster-cidr=$cluster_cidr "${gates[@]}" "${mask_flags[@]}" \
  --service-cluster-ip-range=$svc_range --controllers='*' \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --leader-elect=false --port=0 --secure-port=0 --profiling=false \
  >"$work/controller-manager.log" 2>&1 &
pids+=($!)
in_outside "$kbin/kube-scheduler" --kubeconfig="$work/sched.kubeconfig" \
  --leader-elect=false --port=0 --secure-port=0 \
  >"$work/scheduler.log" 2>&1 &
pids+=($!)
echo "apiserver ready after $(( $(ms_now) - t_cp )) ms"
# kube-proxy's identity, as kubeadm makes it: the ServiceAccount
# kube-system/kube-proxy bound to the ClusterRole system:node-proxier, and a
# kubeconfig with that account's token and the API server's address (the
# ConfigMap kube-proxy that kubeadm mounts into its pods).
kc apply -f - >/dev/null <<Y
apiVersion: v1
kind: ServiceAccount
metadata: {name: kube-proxy, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "kubeadm:node-proxier"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node-proxier"}
subjects: [{kind: ServiceAccount, name: kube-proxy, namespace: kube-system}]
Y

say "images: pause and workload (static C), flannel-rs"
img=$work/img
mkdir -p "$img/pause" "$img/http"
gcc -static -O2 -o "$img/pause/pause" tests/k8s/pause.c
gcc -static -O2 -o "$img/http/http" tests/k8s/http.c
sandbox=$(python3 tests/k8s/oci-image.py "$img/pause" "$img/pause.oci.tar" e2e-pause:1 /pause)
python3 tests/k8s/oci-image.py "$img/http" "$img/http.oci.tar" e2e-http:1 /http serve 8080 >/dev/null

say "nodes: containerd, kubelet and kube-proxy in their own namespaces"
# The token of kube-proxy's ServiceAccount, which kube-controller-manager's
# token controller puts in a Secret.
proxy_secret=
for _ in $(seq 300); do
  proxy_secret=$(kcq -n kube-system get serviceaccount kube-proxy -o jsonpath='{.secrets[0].name}') && [ -n "$proxy_secret" ] && break
  sleep 0.2
done
[ -n "$proxy_secret" ] || fail "no token Secret for the ServiceAccount kube-system/kube-proxy within 60 s"
proxy_tok=$(kcq -n kube-system get secret "$proxy_secret" -o jsonpath='{.data.token}' | base64 -d)
[ -n "$proxy_tok" ] || fail "the Secret $proxy_secret has no token"
for i in $(seq 0 $((nodes - 1))); do kubeconfig "$work/node$i/kube-proxy.kubeconfig" "$proxy_tok"; done
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
  K8S_E2E_KUBE_PROXY=$kbin/kube-proxy K8S_E2E_CLUSTER_CIDR=$cluster_cidr \
    nsenter --net=/run/netns/$ns unshare --mount --pid --fork --propagation private --mount-proc \
    "$repo/scripts/lib/k8s-node.sh" "$work/node$i" "node$i" "$(node_ip "$i")" "$kbin/kubelet" \
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
kc get nodes -o custom-columns=NAME:.metadata.name,INTERNAL-IP:'.status.addresses[?(@.type=="InternalIP")].address',PODCIDRS:.spec.podCIDRs,READY:'.status.conditions[?(@.type=="Ready")].status'
# Each node: kubelet's node IP, and one podCIDR of each family of the
# cluster, inside the cluster CIDR of that family.
for i in $(seq 0 $((nodes - 1))); do
  got=$(kcq get node node$i -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  [ "$got" = "$(node_ip "$i")" ] || fail "node$i's InternalIP is '$got', not its --node-ip $(node_ip "$i")"
  cidrs=$(kcq get node node$i -o jsonpath='{.spec.podCIDRs[*]}')
  python3 -c 'import ipaddress as a, sys
n = [a.ip_network(c) for c in sys.argv[1].split()]
c = [a.ip_network(c) for c in sys.argv[2].split(",")]
sys.exit(len(n) != len(c) or not all(x.version == y.version and x.subnet_of(y) for x, y in zip(n, c)))' "$cidrs" "$cluster_cidr" \
    || fail "node$i's podCIDRs are '$cidrs', not one inside each of $cluster_cidr"
done

# kube-proxy's NAT rules on node I, in the Services' family (ip6tables in the
# IPv6-only cluster, whose Service range is IPv6), as iptables-save prints them.
nat_rules() { # I
  local save=iptables-save
  [ "$stack" = ipv6 ] && save=ip6tables-save
  ip netns exec "flt-$tag-node$1" $save -t nat
}
# Whether every node's kube-proxy sends port PORT of Service NAME (namespace
# default unless NS/NAME) to each of the addresses given: one DNAT rule per
# endpoint, under the Service's comment.
programmed() { # NAME PORT-NAME ADDR...
  local name=$1 port=$2 i a rules
  [[ $name == */* ]] || name=default/$name
  shift 2
  for i in $(seq 0 $((nodes - 1))); do
    rules=$(nat_rules "$i" | grep -F -- "--comment \"$name:$port\"") || return 1
    for a in "$@"; do grep -qF -- "--to-destination $(bracket "$a"):" <<<"$rules" || return 1; done
  done
}
wait_programmed() { # NAME PORT-NAME ADDR... (fails after 60 s)
  local deadline=$((SECONDS + 60))
  until programmed "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || {
      for i in $(seq 0 $((nodes - 1))); do echo "node$i's kube-proxy log ends:"; tail -5 "$work/node$i/kube-proxy.log"; done
      fail "kube-proxy did not send Service $1 port $2 to $* on every node within 60 s"
    }
    sleep 0.2
  done
}
say "kube-proxy on every node: the kubernetes Service $(bracket "$svc_ip"):443 -> $(bracket "$api"):6443"
t_proxy=$(ms_now)
wait_programmed kubernetes https "$api"
echo "every node's kube-proxy programmed the kubernetes Service $(( $(ms_now) - t_proxy )) ms after the nodes registered"
nat_rules 0 | grep -F -- '"default/kubernetes:https' | sed 's/^/node0: /'
if [ "$stack" = dual ]; then
  # The dual-stack proxier: kube-proxy's chains in both families' tables.
  for i in $(seq 0 $((nodes - 1))); do
    for save in iptables-save ip6tables-save; do
      ip netns exec "flt-$tag-node$i" $save -t nat | grep '^:KUBE-SERVICES ' >/dev/null || fail "node$i: no KUBE-SERVICES chain in $save -t nat"
    done
  done
  echo "kube-proxy dual-stack: KUBE-SERVICES in the IPv4 and the IPv6 nat table on every node"
fi

backend=${K8S_E2E_BACKEND:-vxlan}
manifest=deploy/kube-flannel-rs.yml
# The shipped manifest with one sed edit, as $work/kube-flannel-rs-NAME.yml;
# WANT is a line the edit must have produced.
edit_manifest() { # NAME SED-SCRIPT WANT
  local out=$work/kube-flannel-rs-$1.yml
  sed "$2" "$manifest" >"$out"
  grep -qF -- "$3" "$out" || fail "could not edit the manifest ($1): no line with $3"
  manifest=$out
}
case "$backend" in
  vxlan) ;;
  udp) edit_manifest udp 's/"Type": "vxlan"/"Type": "udp"/' '"Type": "udp"' ;;
  host-gw) edit_manifest host-gw 's/"Type": "vxlan"/"Type": "host-gw"/' '"Type": "host-gw"' ;;
  *) fail "K8S_E2E_BACKEND=$backend: not one of vxlan, host-gw, udp" ;;
esac
case $stack in
  dual)
    edit_manifest dual-stack 's|"Network": "10.244.0.0/16",|&\n      "EnableIPv6": true,\n      "IPv6Network": "2001:db8:10::/56",|' \
      '"IPv6Network": "2001:db8:10::/56"'
    ;;
  ipv6)
    # No "Network" at all (flanneld-rs warns that it has no effect then), and
    # the health listener on every address of both families: kubelet probes
    # a host-network pod at the node's IP, IPv6 here, and the default
    # 0.0.0.0 listens on IPv4 only.
    edit_manifest ipv6-only 's|"Network": "10.244.0.0/16",|"EnableIPv4": false,\n      "EnableIPv6": true,\n      "IPv6Network": "2001:db8:10::/56",|' \
      '"EnableIPv4": false'
    # (Quoted: a plain YAML scalar ending in ':' would be a map.)
    edit_manifest ipv6-only-healthz 's|^\( *\)- --healthz-port=8471$|&\n\1- "--healthz-ip=::"|' '- "--healthz-ip=::"'
    if grep -q '^ *"Network":' "$manifest"; then fail "the IPv6-only manifest still has a \"Network\" in net-conf.json"; fi
    ;;
esac
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
# flanneld-rs (in-cluster configuration: KUBERNETES_SERVICE_HOST, the
# kubernetes Service's ClusterIP) reached the API server through kube-proxy:
# on every node a TCP flow to the ClusterIP whose reply comes from the API
# server. Nothing else on a node dials the ClusterIP (kubelet and kube-proxy
# use their kubeconfigs' address).
ct_family=ipv4
[ "$stack" = ipv6 ] && ct_family=ipv6
for i in $(seq 0 $((nodes - 1))); do
  flows=$(ip netns exec "flt-$tag-node$i" conntrack -L -f "$ct_family" -p tcp --orig-dst "$svc_ip" --dport 443 2>/dev/null \
    | grep ESTABLISHED | grep -F " src=$api dst=$(node_ip "$i") sport=6443 " || true)
  [ -n "$flows" ] || fail "node$i: no established flow to the kubernetes Service $svc_ip:443 answered by the API server: $(ip netns exec "flt-$tag-node$i" conntrack -L -f "$ct_family" -p tcp --dport 443 2>&1)"
  echo "node$i: $(grep -c . <<<"$flows") flow(s) to $(bracket "$svc_ip"):443 answered by $(bracket "$api"):6443, e.g. $(head -1 <<<"$flows" | xargs)"
done
api_via_service=yes
# The backend's own devices on every node, exactly: one VXLAN device per
# family (flannel.1, flannel-v6.1), udp's TUN, none with host-gw.
case "$backend/$stack" in
  vxlan/ipv4) devices="flannel.1" ;;
  vxlan/dual) devices="flannel.1 flannel-v6.1" ;;
  vxlan/ipv6) devices="flannel-v6.1" ;;
  udp/*) devices="flannel0" ;;
  host-gw/*) devices="" ;;
esac
for i in $(seq 0 $((nodes - 1))); do
  have=$(ip -n "flt-$tag-node$i" -o link show | awk '{ sub(/@.*/, "", $2); sub(/:$/, "", $2) } $2 ~ /^flannel(\.1|0|-v6\.1)$/ { print $2 }' | sort | xargs)
  [ "$have" = "$(xargs -n1 <<<"$devices" | sort | xargs)" ] || fail "node$i has tunnel devices '$have', want '$devices' (backend $backend, $stack)"
done
echo "backend $backend ($stack): ${devices:-no tunnel device} on every node, no other"
# subnet.env on every node: the lines of the cluster's families only, each
# subnet the node's podCIDR.
for i in $(seq 0 $((nodes - 1))); do
  env_line=$(python3 tests/k8s/subnet-env.py node$i "$families" "$(kcq get node node$i -o jsonpath='{.spec.podCIDRs[*]}')" \
    <"$work/node$i/fs/run/flannel/subnet.env") || fail "node$i's subnet.env"
  echo "node$i subnet.env: $env_line"
done
# The public address annotations flanneld-rs writes on its Node: one per
# family of the cluster, the node's underlay address of that family; none
# for a family the cluster does not have.
for i in $(seq 0 $((nodes - 1))); do
  ann=$(kcq get node node$i -o go-template='{{range $k, $v := .metadata.annotations}}{{$k}}={{$v}}{{"\n"}}{{end}}')
  for f in 4 6; do
    key=flannel.alpha.coreos.com/public-ip
    [ $f = 6 ] && key=$key"v6"
    got=$(sed -n "s|^$key=||p" <<<"$ann")
    want_ip=
    case ",$families,/$f" in
      *,4,*/4) want_ip=192.0.2.$((10 + i)) ;;
      *,6,*/6) want_ip=2001:db8::$((10 + i)) ;;
    esac
    [ "$got" = "$want_ip" ] || fail "node$i's annotation $key is '$got', want '${want_ip:-none}'"
  done
done
echo "public-ip / public-ipv6 annotations: the nodes' underlay addresses of the cluster's families only"
if [ "$stack" = ipv6 ]; then
  # No IPv4 state at all from flanneld-rs: no IPv4 route (the underlay has
  # none either), no FLANNEL chain in the IPv4 tables; its masquerading and
  # forwarding chains in the IPv6 ones (--ip-masq).
  for i in $(seq 0 $((nodes - 1))); do
    ns=flt-$tag-node$i
    v4routes=$(ip -n "$ns" -4 route show table all | grep -v '^\(local\|broadcast\) .* dev lo ' || true)
    [ -z "$v4routes" ] || fail "node$i has IPv4 routes in the IPv6-only run: $v4routes"
    # (grep reads all: with -q, iptables-save could die of SIGPIPE, which
    # pipefail would make the pipeline's status.)
    if ip netns exec "$ns" iptables-save | grep FLANNEL >/dev/null; then
      fail "node$i has FLANNEL chains in its IPv4 tables: $(ip netns exec "$ns" iptables-save | grep FLANNEL)"
    fi
    for chain in FLANNEL-POSTRTG FLANNEL-FWD; do
      ip netns exec "$ns" ip6tables-save | grep "^:$chain " >/dev/null || fail "node$i has no $chain chain in its IPv6 tables"
    done
    # Every peer's podCIDR: through flannel-v6.1 (vxlan) or straight to the
    # peer's IPv6 address on the underlay (host-gw).
    for j in $(seq 0 $((nodes - 1))); do
      [ "$j" -eq "$i" ] && continue
      peer=$(kcq get node node$j -o jsonpath='{.spec.podCIDR}')
      route=$(ip -n "$ns" -6 route show "$peer")
      case "$backend" in
        vxlan) want_route="$peer via ${peer%/*} dev flannel-v6.1 *onlink*" ;;
        host-gw) want_route="$peer via $(node_ip "$j") dev eth0 *" ;;
      esac
      case "$route " in $want_route) ;; *) fail "node$i's route to node$j's $peer is '$route', want '$want_route'" ;; esac
    done
  done
  echo "no IPv4 routes and no IPv4 FLANNEL chains on any node; FLANNEL-POSTRTG and FLANNEL-FWD in ip6tables; one IPv6 route per peer"
fi

# A workload pod pinned to a node.
# Its server answers "<pod> <Host> <path> on <node> from <client address>".
pod_yaml() { # NAME NODE [APP-LABEL [TIER-LABEL]]
  cat <<Y
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: ${3:-e2e-http}${4:+, tier: $4}}}
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
    - name: NODE_NAME
      valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
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
# Each pod's addresses, from the API and from inside the pod (tests/k8s/
# pod-addrs.py): exactly one of each family of the cluster, in its node's
# podCIDR of that family, and nothing else on the pod's interfaces.
# pod_ip: the pod's primary address (of the first family); pod_ip6: its
# IPv6 one in the dual-stack run.
declare -A pod_ip pod_ip6
for i in $(seq 0 $((nodes - 1))); do
  inside=$(in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s exec web$i -- /http addrs 2>&1) \
    || fail "kubectl exec web$i -- /http addrs: $inside"
  cidrs=$(kcq get node node$i -o jsonpath='{.spec.podCIDRs[*]}')
  addrs=$(python3 tests/k8s/pod-addrs.py web$i "$families" "$(kcq get pod web$i -o jsonpath='{.status.podIPs[*].ip}')" "$cidrs" <<<"$inside") \
    || fail "web$i's addresses (inside: $(xargs <<<"$inside"))"
  read -r pod_ip[$i] second <<<"$addrs"
  [ "$stack" = dual ] && pod_ip6[$i]=$second
  echo "web$i on node$i: $addrs in $cidrs, and no other address inside"
done

# HTTP from every pod (kubectl exec) and from every node to every pod, at
# the pods' addresses in the array named ARRAY; fails unless all answer, and
# leaves "pods ok/n, nodes ok/n" in http_ARRAY for the summary.
http_matrix() { # ARRAY LABEL
  local -n addr=$1
  local i j out pod_ok=0 node_ok=0
  for i in $(seq 0 $((nodes - 1))); do
    for j in $(seq 0 $((nodes - 1))); do
      out=$(in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s exec web$i -- /http get "${addr[$j]}" 8080 2>&1 || true)
      case $out in
        "web$j "*) pod_ok=$((pod_ok + 1)); echo "web$i -> web$j (${addr[$j]}): $out" ;;
        *) echo "web$i -> web$j (${addr[$j]}): FAILED: $out" ;;
      esac
      out=$(ip netns exec flt-$tag-node$i "$img/http/http" get "${addr[$j]}" 8080 || true)
      case $out in "web$j "*) node_ok=$((node_ok + 1)) ;; *) echo "node$i -> web$j (${addr[$j]}): FAILED: $out" ;; esac
    done
  done
  echo "$2, pod to pod: $pod_ok/$((nodes * nodes)); node to pod: $node_ok/$((nodes * nodes))"
  printf -v "http_$1" '%s/%s, %s/%s' "$pod_ok" $((nodes * nodes)) "$node_ok" $((nodes * nodes))
  [ "$pod_ok" -eq $((nodes * nodes)) ] || fail "HTTP between pods ($2)"
  [ "$node_ok" -eq $((nodes * nodes)) ] || fail "HTTP from nodes to pods ($2)"
}
primary=IPv4
[ "$stack" = ipv6 ] && primary=IPv6
say "HTTP between every pair of pods (kubectl exec), and from every node, over $primary"
http_matrix pod_ip "$primary"
if [ "$stack" = dual ]; then
  say "the same over IPv6"
  http_matrix pod_ip6 IPv6
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
if [ "$stack" = dual ]; then
  # The dual-stack run stops here: the rest (ingress, rollout, latency) is
  # the IPv4 run's, and family-independent.
  say "summary (dual-stack)"
  cat <<S
cluster: $nodes nodes, dual-stack (IPv6DualStack), podCIDRs of both families
kube-proxy (iptables-nft, dual-stack proxier) on every node; flanneld-rs reaches the API server through the kubernetes Service $svc_ip: $api_via_service
pods get an address of each family from their node's podCIDRs, and no other: yes
HTTP pod -> pod and node -> pod over IPv4: $http_pod_ip
HTTP pod -> pod and node -> pod over IPv6: $http_pod_ip6
deleted pod's addresses (both families) released: $ip_freed
not run here (the IPv4 and IPv6-only runs'): Services of our own, ingress, NodePort, DaemonSet rollout; pod start latency (the IPv4 run's)
run time: $(( $(date +%s) - t_start )) s
S
  exit 0
fi

# A Service NAME selecting SELECTOR ("key: value"), port 80 to the pods'
# 8080, of TYPE (ClusterIP; NodePort with externalTrafficPolicy Cluster).
svc_yaml() { # NAME SELECTOR [TYPE]
  cat <<Y
apiVersion: v1
kind: Service
metadata: {name: $1}
spec:
  type: ${3:-ClusterIP}
  selector: {$2}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
Y
  if [ "${3:-}" = NodePort ]; then echo "  externalTrafficPolicy: Cluster"; fi
}
# Waits until the endpoints controller lists exactly ADDR... as Service
# NAME's ready endpoints, then until every node's kube-proxy sends the
# Service to them (fails after 60 s each).
wait_service() { # NAME ADDR...
  local name=$1 got want deadline=$((SECONDS + 60))
  shift
  want=$(printf '%s\n' "$@" | sort | xargs)
  until got=$(kcq get endpoints "$name" -o jsonpath='{.subsets[*].addresses[*].ip}' | xargs -n1 | sort | xargs) && [ "$got" = "$want" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "Service $name's endpoints are '$got' after 60 s, want '$want'"
    sleep 0.2
  done
  wait_programmed "$name" http "$@"
}
# An answer of the pods' server: "<pod> <Host> <path> on <node> from <client>";
# checks it came from pod WANT on another node than node0, for Host HOST and
# path PATH; leaves the client address it saw in $seen.
check_answer() { # LABEL ANSWER WANT HOST PATH
  local who host path on node from
  read -r who host path on node from seen <<<"$2"
  if [ "$who" = "$3" ] && [ "$host" = "$4" ] && [ "$path" = "$5" ] && [ "$on $from" = "on from" ] \
    && [ "$node" = "${pod_node[$3]}" ] && [ "$node" != node0 ] && [ -n "$seen" ]; then
    echo "$1: $2"
    return 0
  fi
  echo "$1: FAILED: want $3 (on ${pod_node[$3]}) to answer Host $4 path $5, got: '$2'"
  return 1
}

say "Services with selectors, one pod each on another node than node0, and their ClusterIPs through kube-proxy"
far=$((nodes - 1))
ingress_ip=$(node_ip 0)
# The ingress's Services (by Host: host-a, host-b; by path: foo, bar; the
# TLS virtual host's: tls; the default backend), their pods on node1 and on
# the last node in turn; every pod also carries tier=ing, which the
# rollout's ClusterIP Service selects.
ing_svcs=(host-a host-b foo bar tls default)
declare -A pod_node svc_ip_of
k=0
for n in "${ing_svcs[@]}"; do
  node=node1
  [ $((k % 2)) -eq 1 ] && node=node$far
  pod_node[ing-$n]=$node
  pod_yaml "ing-$n" "$node" "ing-$n" ing | kc apply -f - >/dev/null
  svc_yaml "ing-$n" "app: ing-$n" | kc apply -f - >/dev/null
  k=$((k + 1))
done
svc_yaml ing-all "tier: ing" | kc apply -f - >/dev/null
svc_yaml nodeport "app: ing-host-b" NodePort | kc apply -f - >/dev/null
wait_running $(printf 'ing-%s ' "${ing_svcs[@]}")
declare -A ing_pod_ip
for n in "${ing_svcs[@]}"; do
  ing_pod_ip[$n]=$(kcq get pod "ing-$n" -o jsonpath='{.status.podIP}')
  [ "$(kcq get pod "ing-$n" -o jsonpath='{.metadata.labels.tier}')" = ing ] || fail "ing-$n has no label tier=ing"
done
t_svc=$(ms_now)
for n in "${ing_svcs[@]}"; do
  wait_service "ing-$n" "${ing_pod_ip[$n]}"
  svc_ip_of[ing-$n]=$(kcq get service "ing-$n" -o jsonpath='{.spec.clusterIP}')
  echo "Service ing-$n: ClusterIP ${svc_ip_of[ing-$n]} -> ing-$n ${ing_pod_ip[$n]} on ${pod_node[ing-$n]}"
done
wait_service ing-all "${ing_pod_ip[@]}"
svc_ip_of[ing-all]=$(kcq get service ing-all -o jsonpath='{.spec.clusterIP}')
wait_service nodeport "${ing_pod_ip[host-b]}"
np_port=$(kcq get service nodeport -o jsonpath='{.spec.ports[0].nodePort}')
echo "endpoints of every Service listed and programmed by every node's kube-proxy $(( $(ms_now) - t_svc )) ms after the pods ran"
# From web0 on node0 to every Service's ClusterIP, each answered by its pod
# on another node.
svc_from_pod_ok=0 svc_from_pod_n=0
for n in "${ing_svcs[@]}"; do
  svc_from_pod_n=$((svc_from_pod_n + 1))
  out=$(in_outside kubectl --kubeconfig "$work/admin.kubeconfig" --request-timeout 20s exec web0 -- /http get "${svc_ip_of[ing-$n]}" 80 svc-check /clusterip 2>&1 || true)
  if check_answer "web0 (node0) -> Service ing-$n $(bracket "${svc_ip_of[ing-$n]}"):80" "$out" "ing-$n" svc-check /clusterip; then
    [ "$seen" = "${pod_ip[0]}" ] || fail "ing-$n saw the client as $seen, not web0's ${pod_ip[0]}: a pod's traffic to a ClusterIP must keep its source address"
    svc_from_pod_ok=$((svc_from_pod_ok + 1))
  fi
done
[ "$svc_from_pod_ok" -eq "$svc_from_pod_n" ] || fail "ClusterIP from a pod"

say "ingress: nginx on node0's host network, upstreams the Services' ClusterIPs, over $primary"
mkdir -p "$work/nginx"
# The TLS virtual host's certificate: self-signed, made now.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=tls.example -addext subjectAltName=DNS:tls.example \
  -keyout "$work/nginx/tls.key" -out "$work/nginx/tls.crt" 2>/dev/null
up() { echo "http://$(bracket "${svc_ip_of[ing-$1]}"):80"; }
listen=$(bracket "$ingress_ip")
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
  # The default backend: any other Host.
  server { listen $listen:80 default_server; location / { proxy_pass $(up default); } }
  # By Host header.
  server { listen $listen:80; server_name a.example; location / { proxy_pass $(up host-a); } }
  server { listen $listen:80; server_name b.example; location / { proxy_pass $(up host-b); } }
  # By path, fan-out, the prefix rewritten away (ingress-nginx's rewrite-target /\$2).
  server {
    listen $listen:80; server_name fan.example;
    location /foo/ { rewrite ^/foo(/.*)\$ \$1 break; proxy_pass $(up foo); }
    location /bar/ { rewrite ^/bar(/.*)\$ \$1 break; proxy_pass $(up bar); }
  }
  # TLS, terminated here.
  server {
    listen $listen:443 ssl; server_name tls.example;
    ssl_certificate $work/nginx/tls.crt; ssl_certificate_key $work/nginx/tls.key;
    location / { proxy_pass $(up tls); }
  }
}
NGX
ip netns exec flt-$tag-node0 nginx -c "$work/nginx/nginx.conf" >"$work/nginx/stdout.log" 2>&1 &
pids+=($!)
listening() {
  local l
  l=$(ip netns exec flt-$tag-node0 ss -ltn) && grep -qF "$listen:80 " <<<"$l" && grep -qF "$listen:443 " <<<"$l"
}
for _ in $(seq 100); do listening && break; sleep 0.1; done
listening || { cat "$work/nginx/error.log"; fail "nginx does not listen on $listen:80 and :443 after 10 s"; }
ingress_ok=0 ingress_n=0
# HOST PATH -> the pod that must answer and the path it must see.
for req in "a.example / ing-host-a /" "b.example / ing-host-b /" \
           "fan.example /foo/hello ing-foo /hello" "fan.example /bar/x/y ing-bar /x/y" \
           "unknown.example /anything ing-default /anything"; do
  read -r host path want want_path <<<"$req"
  ingress_n=$((ingress_n + 1))
  out=$(in_outside "$img/http/http" get "$ingress_ip" 80 "$host" "$path" || true)
  check_answer "outside -> node0:80 Host $host $path" "$out" "$want" "$host" "$want_path" && ingress_ok=$((ingress_ok + 1))
done
# TLS: curl checks the certificate against the one made above, for the name.
ingress_n=$((ingress_n + 1))
out=$(in_outside curl -sS --max-time 10 --cacert "$work/nginx/tls.crt" --resolve "tls.example:443:$listen" https://tls.example/secure 2>&1 || true)
check_answer "outside -> node0:443 https://tls.example/secure (certificate verified)" "$out" ing-tls tls.example /secure && ingress_ok=$((ingress_ok + 1))
[ "$ingress_ok" -eq "$ingress_n" ] || { cat "$work/nginx/error.log"; fail "ingress"; }

say "NodePort (externalTrafficPolicy Cluster) from the outside host: node0 to ing-host-b on node$far, TCP"
for i in $(seq 0 $((nodes - 1))); do
  nat_rules "$i" | grep -F -- '"default/nodeport:http"' | grep -- "KUBE-NODEPORTS .*--dport $np_port " >/dev/null \
    || fail "node$i's kube-proxy has no KUBE-NODEPORTS rule for port $np_port"
done
node0_addrs=$(ip -n "flt-$tag-node0" -o addr show | awk '{ sub(/\/.*/, "", $4); print $4 }')
out=$(in_outside "$img/http/http" get "$ingress_ip" "$np_port" np-check /nodeport || true)
check_answer "outside -> node0 $(bracket "$ingress_ip"):$np_port" "$out" ing-host-b np-check /nodeport || fail "NodePort"
# Cluster policy: the entry node masquerades, so the reply comes back through it.
grep -qxF -- "$seen" <<<"$node0_addrs" || fail "through the NodePort ing-host-b saw the client as $seen, not an address of node0 ($(xargs <<<"$node0_addrs"))"
nodeport_result="outside -> node0:$np_port -> ing-host-b on node$far, seen from node0's $seen"
echo "NodePort: $nodeport_result"

say "rolling the DaemonSet to a new image tag under continuous HTTP"
roll_tag=$version-roll
for i in $(seq 0 $((nodes - 1))); do
  pid1=$(ps -o pid= --ppid "${node_pids[$i]}" | awk 'NR == 1 { print $1 }')
  nsenter -t "$pid1" -m -n ctr --address /run/containerd/containerd.sock -n k8s.io images tag \
    "docker.io/library/flannel-rs:$version" "docker.io/library/flannel-rs:$roll_tag" </dev/null >/dev/null
done
# Clients, each request with a 3 s timeout, back to back:
#  - in pod web0 on node0, to the ClusterIP of Service ing-all (its pods are
#    on the other nodes): `http loop` under kubectl exec, until its standard
#    input (a FIFO held open here) ends;
#  - on the outside host, to node0's NodePort (to ing-host-b on node$far);
#  - on the outside host, through the ingress (Host a.example: nginx on
#    node0, ClusterIP, ing-host-a on node1);
#  - on every node, to the pods of every other node by pod IP.
# Each client says when it had its first answer, and counts at its end.
mkfifo "$work/pod-client.in"
timeout 900 nsenter --net=/run/netns/$outside_ns kubectl --kubeconfig "$work/admin.kubeconfig" exec -i web0 -- \
  /http loop "${svc_ip_of[ing-all]}" 80 roll /rollout <"$work/pod-client.in" >"$work/traffic-pod" 2>>"$work/traffic-errors.log" &
loop_pids+=($!)
exec 8>"$work/pod-client.in"
traffic_loop() { # LABEL NS TARGET... (TARGET: IP,PORT[,HOST])
  local label=$1 ns=$2 ok=0 bad=0 t ip port host
  shift 2
  while [ -d "$work" ] && [ ! -e "$work/stop-traffic" ]; do
    for t in "$@"; do
      IFS=, read -r ip port host <<<"$t"
      if ip netns exec "$ns" "$img/http/http" get "$ip" "$port" "${host:-$ip}" >/dev/null 2>>"$work/traffic-errors.log"; then
        ok=$((ok + 1))
      else
        bad=$((bad + 1))
      fi
    done
    [ "$ok" -gt 0 ] && [ ! -e "$work/traffic-up-$label" ] && touch "$work/traffic-up-$label"
    sleep 0.05
  done
  echo "$ok $bad" >"$work/traffic-$label"
}
# The other clients do not hold the pod client's FIFO (8>&-): its input
# ends when this script closes it.
clients=(pod nodeport ingress)
traffic_loop nodeport "$outside_ns" "$ingress_ip,$np_port" 8>&- &
loop_pids+=($!)
traffic_loop ingress "$outside_ns" "$ingress_ip,80,a.example" 8>&- &
loop_pids+=($!)
for i in $(seq 0 $((nodes - 1))); do
  targets=()
  for j in $(seq 0 $((nodes - 1))); do [ "$j" -ne "$i" ] && targets+=("${pod_ip[$j]},8080"); done
  traffic_loop "node$i" "flt-$tag-node$i" "${targets[@]}" 8>&- &
  loop_pids+=($!)
  clients+=("node$i")
done
client_up() { # LABEL
  if [ "$1" = pod ]; then [ -s "$work/traffic-pod" ]; else [ -e "$work/traffic-up-$1" ]; fi
}
deadline=$((SECONDS + 60))
for c in "${clients[@]}"; do
  until client_up "$c"; do
    [ "$SECONDS" -lt "$deadline" ] || { sort "$work/traffic-errors.log" | uniq -c | sed -n 1,10p; fail "the $c client had no answer within 60 s"; }
    sleep 0.1
  done
done
echo "every client had an answer; the pod's first: $(head -1 "$work/traffic-pod")"
check_answer "web0 -> ing-all (first answer)" "$(head -1 "$work/traffic-pod")" "$(awk '{ print $1; exit }' "$work/traffic-pod")" roll /rollout >/dev/null \
  || fail "the pod client's first answer: $(head -1 "$work/traffic-pod")"
t_roll=$(ms_now)
kc -n kube-flannel-rs set image ds/kube-flannel-rs-ds "*=flannel-rs:$roll_tag"
kc -n kube-flannel-rs rollout status ds/kube-flannel-rs-ds --timeout=300s
roll_ms=$(( $(ms_now) - t_roll ))
sleep 2
touch "$work/stop-traffic"
exec 8>&-
for p in "${loop_pids[@]}"; do wait "$p" || fail "a traffic client ended with status $?"; done
loop_pids=()
# The pod client's last line: its counts.
tail -1 "$work/traffic-pod" >"$work/traffic-pod.counts"
grep -qE '^[0-9]+ [0-9]+$' "$work/traffic-pod.counts" || fail "the pod client left no counts: $(cat "$work/traffic-pod")"
req_ok=0 req_bad=0
idle=() per_client=()
for c in "${clients[@]}"; do
  f=$work/traffic-$c
  [ "$c" = pod ] && f=$work/traffic-pod.counts
  read -r a b <"$f"
  req_ok=$((req_ok + a)) req_bad=$((req_bad + b))
  [ "$a" -gt 0 ] || idle+=("$c")
  per_client+=("$c $a/$b")
done
kc -n kube-flannel-rs get pods -o custom-columns=NAME:.metadata.name,NODE:.spec.nodeName,IMAGE:.spec.containers[0].image,READY:.status.containerStatuses[0].ready
roll_clients="pod web0 -> ClusterIP ing-all $(awk '{ print $1 "/" $2 }' "$work/traffic-pod.counts"), outside -> NodePort node0:$np_port $(tr ' ' / <"$work/traffic-nodeport"), outside -> ingress $(tr ' ' / <"$work/traffic-ingress") (ok/failed)"
echo "rollout took $roll_ms ms; requests during it: $req_ok ok, $req_bad failed; per client (ok/failed): ${per_client[*]}"
# The first ten kinds of error (sed reads all: head would quit early, and
# uniq, killed by SIGPIPE, would fail the pipeline and with it the run).
[ -s "$work/traffic-errors.log" ] && sort "$work/traffic-errors.log" | uniq -c | sed -n 1,10p
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
if [ "$stack" = ipv6 ]; then
  # The IPv6-only run stops here, saying what it leaves out and why.
  say "summary (IPv6-only)"
  cat <<S
cluster: $nodes nodes, IPv6 only: node IPs, API server $api, Service range $svc_range, podCIDRs from $cluster_cidr; no IPv4 on the underlay
kube-proxy (ip6tables-nft) on every node; flanneld-rs reaches the API server through the kubernetes Service $svc_ip: $api_via_service
kubectl apply -> every flanneld-rs pod ready: $apply_to_ds_ready ms; every node Ready: $apply_to_ready ms
backend $backend: ${devices:-no tunnel device} on every node, no other; subnet.env with the IPv6 lines only; no IPv4 route or FLANNEL chain
pods get one IPv6 address from their node's podCIDR, and no IPv4 one: yes
HTTP pod -> pod and node -> pod over IPv6: $http_pod_ip
deleted pod's address released: $ip_freed
ClusterIP from pod web0 on node0 to each Service's pod on another node: $svc_from_pod_ok/$svc_from_pod_n
ingress over IPv6 (nginx on node0 to ClusterIPs: Host x2, path fan-out with rewrite x2, default backend, TLS): $ingress_ok/$ingress_n
NodePort (Cluster) over IPv6: $nodeport_result
DaemonSet rollout to :$roll_tag over IPv6 (backend $backend): $roll_ms ms, $req_ok requests ok, $req_bad failed; $roll_clients
skipped: pod start latency and burst against the reference bridge plugin (the IPv4 run measures them; its hand-written reference configuration is IPv4)
run time: $(( $(date +%s) - t_start )) s
S
  exit 0
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
# (Assigned first: read would hide python's failure.)
range_out=$(python3 -c "import ipaddress; n = ipaddress.ip_interface('$subnet').network; print(n, n[129], n[254])") \
  || fail "no reference range from $env_file's FLANNEL_SUBNET '$subnet'"
read -r netcidr rstart rend <<<"$range_out"
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
pids+=("$watcher")  # stopped by the teardown if the run fails before the end of this part
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
  pid1=$(ps -o pid= --ppid "${node_pids[$ln]}" | awk 'NR == 1 { print $1 }')
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
  # (Each step fails the run by itself: this runs in a command substitution,
  # where set -e does not reach.)
  pod_yaml "$name" "$lat_node" e2e-lat | kcq create -f - >/dev/null || fail "kubectl create of $name"
  for _ in $(seq 1200); do
    grep -q " $name Running" "$ev" && break
    sleep 0.05
  done
  t0=$(awk -v n="$name" '$2 == n { print $1; exit }' "$ev")
  t1=$(awk -v n="$name" '$2 == n && $3 == "Running" { print $1; exit }' "$ev")
  [ -n "$t1" ] || { kc describe pod "$name" | tail -15 >&2; fail "$name not Running"; }
  ip=$(kcq get pod "$name" -o jsonpath='{.status.podIP}') || fail "kubectl get pod $name"
  [ -n "$ip" ] || fail "$name is Running without a podIP"
  echo "$((t1 - t0)) $ip"
}
ours_ms=() ref_ms=()
for k in $(seq 1 "$latency_pods"); do
  rm -f "$ref_conf"
  wait_cni flannel
  # (lat_one's output assigned first: read would hide its failure.)
  out=$(lat_one flannel-rs "$k")
  read -r ms ip <<<"$out"
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') >= ipaddress.ip_address('$rstart'))" \
    || fail "lat-flannel-rs-$k got $ip: the reference configuration was still in use"
  ours_ms+=("$ms")
  printf '%s\n' "$ref_json" >"$ref_conf"
  wait_cni bridge
  out=$(lat_one bridge "$k")
  read -r ms ip <<<"$out"
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') < ipaddress.ip_address('$rstart'))" \
    || fail "lat-bridge-$k got $ip: the reference configuration was not used"
  ref_ms+=("$ms")
  echo "pair $k: flannel-rs ${ours_ms[-1]} ms, bridge $ms ms"
done
# Then a burst: BURST_PODS pods created at once (one kubectl create) on the
# same node, ours and then the reference's, each checked and summarised by
# tests/k8s/burst-stats.py: every pod Running, on the right configuration's
# addresses, no warning event (FailedCreatePodSandBox...) and no failed
# RunPodSandbox, else the run fails. The pods of both bursts stay until the
# end (deleted with the others), so the second burst does not race the
# first one's teardown.
lat_burst() { # LABEL SIDE(below|atleast): prints the summary line
  local label=$1 prefix=lat-burst-$1- t0 n k deadline
  t0=$(ms_now)
  # (Each step fails the run by itself: this runs in a command substitution,
  # where set -e does not reach.)
  for k in $(seq 1 "$burst_pods"); do pod_yaml "$prefix$k" "$lat_node" e2e-lat; echo ---; done | kcq create -f - >/dev/null \
    || fail "kubectl create of the $label burst's $burst_pods pods"
  deadline=$((SECONDS + 180))
  while [ "$SECONDS" -lt "$deadline" ]; do
    n=$(awk -v p="$prefix" 'index($2, p) == 1 && $3 == "Running" && !seen[$2]++ { c++ } END { print c + 0 }' "$ev")
    [ "$n" -ge "$burst_pods" ] && break
    sleep 0.1
  done
  kcq get pods -l app=e2e-lat -o json >"$work/burst-$label.pods.json" || fail "kubectl get pods after the $label burst"
  kcq get events -o json >"$work/burst-$label.events.json" || fail "kubectl get events after the $label burst"
  python3 tests/k8s/burst-stats.py "$label" "$prefix" "$burst_pods" "$t0" "$ev" "$work/burst-$label.pods.json" \
    "$work/burst-$label.events.json" "$work/$lat_node/containerd.log" "$2" "$rstart" \
    || { kc describe pods -l app=e2e-lat | grep -A3 -E '^Name: +lat-burst|Warning' | tail -40 >&2; fail "$label burst of $burst_pods pods"; }
}
t_burst=$(date +%s)
rm -f "$ref_conf"
wait_cni flannel
burst_ours=$(lat_burst flannel-rs below)
echo "$burst_ours"
printf '%s\n' "$ref_json" >"$ref_conf"
wait_cni bridge
burst_ref=$(lat_burst bridge atleast)
echo "$burst_ref"
burst_s=$(( $(date +%s) - t_burst ))
burst_sandbox=$(python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-burst-flannel-rs- flannel-rs &&
  python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-burst-bridge- bridge)
echo "$burst_sandbox"
rm -f "$ref_conf"
kill "$watcher" 2>/dev/null
{ wait "$watcher"; } 2>/dev/null || true
unset 'pids[-1]'  # the watcher, waited for
kcq delete pod -l app=e2e-lat --wait=true >/dev/null
stats() { # LABEL MS...
  local l=$1; shift
  printf '%s\n' "$@" | sort -n | awk -v l="$l" '{ v[NR] = $1; s += $1 } END {
    printf "%s pod (created -> Running): n=%d median=%d ms mean=%d ms min=%d ms max=%d ms\n", l, NR, v[int((NR + 1) / 2)], s / NR, v[1], v[NR] }'
}
lat_ours=$(stats flannel-rs "${ours_ms[@]}" && python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-flannel-rs- flannel-rs)
lat_ref=$(stats bridge "${ref_ms[@]}" && python3 tests/k8s/sandbox-times.py "$work/$lat_node/containerd.log" lat-bridge- bridge)
printf '%s\n' "$lat_ours" "$lat_ref"

t_end=$(date +%s)
say "summary"
cat <<S
cluster: $nodes nodes (kubelet $("$kbin/kubelet" --version | awk '{print $2}'), containerd $(containerd --version | awk '{print $3}')), control plane at $api
kubectl apply -> plugin, conflist, subnet.env on every node: $apply_to_files ms
kubectl apply -> every flanneld-rs pod ready:                $apply_to_ds_ready ms
kubectl apply -> every node Ready:                           $apply_to_ready ms
kube-proxy (iptables-nft) on every node; flanneld-rs reaches the API server through the kubernetes Service $svc_ip: $api_via_service
pods get addresses from their node's podCIDR, and no other: yes
HTTP pod -> pod (kubectl exec), node -> pod: $http_pod_ip
deleted pod's address released:  $ip_freed
ClusterIP from pod web0 on node0 to each Service's pod on another node: $svc_from_pod_ok/$svc_from_pod_n
ingress (nginx on node0 to ClusterIPs: Host x2, path fan-out with rewrite x2, default backend, TLS): $ingress_ok/$ingress_n
NodePort (Cluster): $nodeport_result
DaemonSet rollout to :$roll_tag (backend $backend):  $roll_ms ms, $req_ok requests ok, $req_bad failed; $roll_clients
pod start latency ($latency_pods + $latency_pods pods, one at a time, alternating, on $lat_node):
$(printf '%s\n' "$lat_ours" "$lat_ref" | sed 's/^/  /')
pod start burst ($burst_pods pods at once with each plugin, ours first, on $lat_node; ${burst_s} s of this run):
$(printf '%s\n' "$burst_ours" "$burst_ref" "$burst_sandbox" | sed 's/^/  /')
run time so far: $((t_end - t_start)) s
S
