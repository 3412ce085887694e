#!/usr/bin/env python3
"""A pod's addresses for scripts/k8s-e2e.sh, seen from the API and from inside.

    pod-addrs.py POD FAMILIES POD_IPS NODE_CIDRS < "http addrs" output

FAMILIES is the cluster's address families in podCIDR order ("4", "6" or
"4,6"); POD_IPS the pod's status.podIPs and NODE_CIDRS its node's
spec.podCIDRs, space-separated. Checks that the node has one podCIDR of
each family and no other, that the pod has exactly one address of each
family, inside its node's podCIDR of that family, and that inside the pod
(the interface addresses `http addrs` lists, loopback and link-local ones
aside) there are exactly these addresses, none else of any family. Prints
the pod's addresses (the primary first), space-separated; exits 1 with the
reason otherwise.
"""
import ipaddress
import sys


def main():
    pod, families, pod_ips, node_cidrs = sys.argv[1:5]
    want = [int(f) for f in families.split(",")]
    ips = [ipaddress.ip_address(a) for a in pod_ips.split()]
    cidrs = [ipaddress.ip_network(c) for c in node_cidrs.split()]
    if [c.version for c in cidrs] != want:
        sys.exit(f"{pod}: its node's podCIDRs are {node_cidrs!r}, want one of each of IPv{families} in that order")
    if [a.version for a in ips] != want:
        sys.exit(f"{pod}: status.podIPs is {pod_ips!r}, want exactly one address of each of IPv{families}")
    for a, c in zip(ips, cidrs):
        if a not in c:
            sys.exit(f"{pod}: {a} is outside its node's podCIDR {c}")
    inside = set()
    for line in sys.stdin.read().split("\n"):
        if not line.strip():
            continue
        ifname, addr = line.split()
        a = ipaddress.ip_interface(addr).ip
        if ifname == "lo" or a.is_loopback or a.is_link_local:
            continue
        inside.add(a)
    if inside != set(ips):
        listed = " ".join(str(a) for a in sorted(inside, key=lambda a: (a.version, a))) or "none"
        sys.exit(f"{pod}: inside, its interfaces hold {listed}; the API says {pod_ips}")
    print(" ".join(str(a) for a in ips))


main()
