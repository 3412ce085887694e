#!/usr/bin/env bash
# One Kubernetes node for scripts/k8s-e2e.sh: containerd, kubelet and
# kube-proxy, run as PID 1 of the node's own PID namespace, in its own mount
# namespace, inside the node's network namespace:
#
#   nsenter --net=/run/netns/NS unshare --mount --pid --fork --propagation private \
#     --mount-proc scripts/lib/k8s-node.sh DIR NAME IP KUBELET SANDBOX_IMAGE ARCHIVE...
#
# DIR is the node's private state: it is bind-mounted over /run, /var/lib/kubelet,
# /var/lib/containerd, /var/lib/cni, /etc/cni/net.d, /opt/cni/bin and /var/log,
# so two nodes never share a socket, a CNI configuration or a pod directory, and
# nothing reaches the host's file system outside DIR. Mounts made here are
# private (the host never sees them) and vanish with the namespace; killing
# this process (PID 1) kills every process of the node, shims and containers
# included. Writes DIR/ready once kubelet has been started.
#
# kube-proxy runs when K8S_E2E_KUBE_PROXY names its binary: iptables mode
# (the node's iptables is iptables-nft), with DIR/kube-proxy.kubeconfig,
# --cluster-cidr=$K8S_E2E_CLUSTER_CIDR, the Node's name and IP; its rules live
# in the node's network namespace and go with it.
set -euo pipefail
dir=$1 name=$2 ip=$3 kubelet=$4 sandbox=$5
shift 5
archives=("$@")

for p in run var/lib/kubelet var/lib/containerd var/lib/cni etc/cni/net.d opt/cni/bin var/log; do
  mkdir -p "$dir/fs/$p"
  mount --bind "$dir/fs/$p" "/$p"
done
mkdir -p /run/netns /var/log/pods /var/log/containers
# What containerd's CRI needs besides our plugin (loopback for the pod's lo),
# what the conflist chains (portmap), and the reference plugins the latency
# comparison uses; all from Debian's containernetworking-plugins.
for p in loopback portmap bridge host-local; do cp /usr/lib/cni/$p /opt/cni/bin/; done

cat >"$dir/containerd.toml" <<TOML
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$sandbox"
  # This sandbox cannot lower a process's OOM score adjustment.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
TOML
containerd --config "$dir/containerd.toml" --log-level info >"$dir/containerd.log" 2>&1 &
for _ in $(seq 100); do
  ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1 && break
  sleep 0.1
done
# No stdin for ctr: it would wait for its end.
for a in "${archives[@]}"; do
  ctr --address /run/containerd/containerd.sock -n k8s.io images import "$a" </dev/null >>"$dir/import.log" 2>&1
done

"$kubelet" \
  --kubeconfig="$dir/kubeconfig" \
  --container-runtime=remote \
  --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
  --pod-infra-container-image="$sandbox" \
  --hostname-override="$name" \
  --node-ip="$ip" \
  --address="$ip" \
  --read-only-port=0 \
  --anonymous-auth=true \
  --authorization-mode=AlwaysAllow \
  --cgroup-driver=cgroupfs \
  --cgroups-per-qos=false \
  --enforce-node-allocatable= \
  --cgroup-root=/k8se2e \
  --fail-swap-on=false \
  --oom-score-adj=0 \
  --volume-plugin-dir=/var/lib/kubelet/volume-plugins \
  --image-gc-high-threshold=100 \
  --image-gc-low-threshold=99 \
  --eviction-hard='memory.available<10Mi,nodefs.available<1%,imagefs.available<1%' \
  --resolv-conf=/etc/resolv.conf \
  ${K8S_E2E_FEATURE_GATES:+--feature-gates=$K8S_E2E_FEATURE_GATES} \
  --v=1 >"$dir/kubelet.log" 2>&1 &
if [ -n "${K8S_E2E_KUBE_PROXY:-}" ]; then
  # --conntrack-max-per-core=0: the global nf_conntrack_max and the
  # nf_conntrack module's hashsize are the host's, not this namespace's;
  # kube-proxy leaves them alone then (it still sets the per-namespace TCP
  # timeouts). --oom-score-adj=0: this sandbox cannot lower it (as kubelet's).
  "$K8S_E2E_KUBE_PROXY" \
    --kubeconfig="$dir/kube-proxy.kubeconfig" \
    --hostname-override="$name" \
    --bind-address="$ip" \
    --cluster-cidr="$K8S_E2E_CLUSTER_CIDR" \
    --proxy-mode=iptables \
    --conntrack-max-per-core=0 \
    --oom-score-adj=0 \
    --profiling=false \
    ${K8S_E2E_FEATURE_GATES:+--feature-gates=$K8S_E2E_FEATURE_GATES} \
    --v=1 >"$dir/kube-proxy.log" 2>&1 &
fi
touch "$dir/ready"
wait
