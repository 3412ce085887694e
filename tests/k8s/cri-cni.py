#!/usr/bin/env python3
"""Prints which CNI configuration containerd's CRI gives a pod's eth0 right
now: the type of the first plugin of that network (`flannel`, `bridge`), or
`none` when it has loaded none. This is the runtime's own state, what
`crictl info` shows as `cniconfig` (Debian has no crictl).

Reads, on stdin, the body of a gRPC reply to
`runtime.v1.RuntimeService/Status` with `verbose: true`; scripts/k8s-e2e.sh
sends the request with curl over the node's containerd socket. The reply is
one gRPC frame (a flag byte, a 4-byte big-endian length, the message) of a
`StatusResponse`: field 2 is `map<string, string> info`, whose `cniconfig`
entry is go-cni's configuration as JSON.

Usage: ... | cri-cni.py
"""

import json
import sys


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def fields(buf):
    """(field number, wire type, value) of each field of a message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} of field {number}")
        yield number, wire, value


def main():
    data = sys.stdin.buffer.read()
    if len(data) < 5:
        sys.exit(f"cri-cni.py: no gRPC reply ({len(data)} bytes)")
    if data[0] != 0:
        sys.exit("cri-cni.py: compressed gRPC reply")
    message = data[5 : 5 + int.from_bytes(data[1:5], "big")]
    info = {}
    for number, wire, value in fields(message):
        if number == 2 and wire == 2:
            entry = {n: v for n, w, v in fields(value) if w == 2}
            info[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    if "cniconfig" not in info:
        sys.exit(f"cri-cni.py: no cniconfig in the Status info (keys: {sorted(info)})")
    for network in json.loads(info["cniconfig"]).get("Networks") or []:
        if network.get("IFName") == "eth0":
            plugins = (network.get("Config") or {}).get("Plugins") or []
            print(plugins[0]["Network"]["type"] if plugins else "none")
            return
    print("none")


if __name__ == "__main__":
    main()
