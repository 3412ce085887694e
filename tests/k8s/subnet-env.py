#!/usr/bin/env python3
"""A node's subnet.env for scripts/k8s-e2e.sh.

    subnet-env.py NODE FAMILIES NODE_CIDRS < subnet.env

FAMILIES is the cluster's address families ("4", "6" or "4,6"), NODE_CIDRS
the node's spec.podCIDRs, space-separated. Checks that the file has exactly
the lines flanneld writes for those families (FLANNEL_NETWORK and
FLANNEL_SUBNET with IPv4, FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET with
IPv6; FLANNEL_MTU and FLANNEL_IPMASQ always), and that each subnet is the
first address of the node's podCIDR of its family with that prefix length.
Prints the file on one line; exits 1 with the reason otherwise.
"""
import ipaddress
import sys


def main():
    node, families, node_cidrs = sys.argv[1:4]
    fams = {int(f) for f in families.split(",")}
    text = sys.stdin.read()
    env = dict(line.split("=", 1) for line in text.split("\n") if line.strip())
    keys = {"FLANNEL_MTU", "FLANNEL_IPMASQ"}
    subnet_key = {4: "FLANNEL_SUBNET", 6: "FLANNEL_IPV6_SUBNET"}
    for f in fams:
        keys |= {subnet_key[f], {4: "FLANNEL_NETWORK", 6: "FLANNEL_IPV6_NETWORK"}[f]}
    if set(env) != keys:
        sys.exit(f"{node}: subnet.env has {sorted(env)}, want exactly {sorted(keys)}:\n{text}")
    for c in (ipaddress.ip_network(c) for c in node_cidrs.split()):
        got = ipaddress.ip_interface(env[subnet_key[c.version]])
        if got.network != c or got.ip != c[1]:
            sys.exit(f"{node}: {subnet_key[c.version]}={got}, want {c[1]}/{c.prefixlen} (podCIDR {c})")
    print(" ".join(f"{k}={v}" for k, v in env.items()))


main()
