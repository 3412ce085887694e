#!/usr/bin/env python3
"""Checks and summarises a burst of pods created at once (scripts/k8s-e2e.sh).

Usage: burst-stats.py LABEL PREFIX N T0_MS EVENTS PODS_JSON EVENTS_JSON CONTAINERD_LOG SIDE BOUNDARY

- EVENTS: the watcher's lines `<ms> <pod> <phase> <ip>` (ms since the epoch,
  stamped when the watch event arrived);
- PODS_JSON, EVENTS_JSON: `kubectl get pods -o json`, `kubectl get events -o json`;
- CONTAINERD_LOG: the node's containerd log at level info;
- SIDE BOUNDARY: `below ADDR` or `atleast ADDR`: every pod's address must be
  below ADDR (our plugin's half of the node's range) or at least ADDR (the
  reference configuration's half).

Fails (exit 1, naming what) unless every one of the N pods PREFIX1..PREFIXN
is Running with its container started and never restarted, got an address
on the right side, and nothing went wrong on the way: no Warning event for
any of them (FailedCreatePodSandBox and the like; MissingClusterDNS, which
every pod gets in a cluster without DNS, excepted) and no failed
RunPodSandbox in containerd's log. Prints one line: the wall time from T0_MS
(just before `kubectl create`) to the last pod's Running watch event, and
created -> Running per pod as p50/p99 (nearest rank; with 30 pods p99 is the
slowest) twice: from the watcher's millisecond stamps (first event -> first
Running event) and from the pods' own status timestamps (creationTimestamp
-> Ready condition's lastTransitionTime, whole seconds as the API gives
them).
"""

import datetime
import ipaddress
import json
import math
import re
import sys


# The cluster runs no DNS, so kubelet (no --cluster-dns) warns about every
# pod with dnsPolicy ClusterFirst and falls back to the node's resolv.conf:
# it says nothing about pod start and comes for the one-at-a-time pods too.
EXPECTED_WARNINGS = {"MissingClusterDNS"}


def fail(msg):
    print(f"burst-stats: {msg}", file=sys.stderr)
    sys.exit(1)


def rank(values, q):
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def stamp(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def main(label, prefix, n, t0, events, pods_json, events_json, containerd_log, side, boundary):
    n, t0 = int(n), int(t0)
    names = [f"{prefix}{k}" for k in range(1, n + 1)]
    want = set(names)
    boundary = ipaddress.ip_address(boundary)

    first, running = {}, {}
    with open(events) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in want:
                continue
            ms, name, phase = int(parts[0]), parts[1], parts[2]
            first.setdefault(name, ms)
            if phase == "Running":
                running.setdefault(name, ms)
    missing = sorted(want - running.keys(), key=names.index)
    if missing:
        fail(f"{label}: {len(missing)} of {n} pods never seen Running: {' '.join(missing)}")

    with open(pods_json) as f:
        pods = {p["metadata"]["name"]: p for p in json.load(f)["items"] if p["metadata"]["name"] in want}
    status_s = []
    for name in names:
        p = pods.get(name)
        if p is None:
            fail(f"{label}: pod {name} is gone")
        st = p["status"]
        if st.get("phase") != "Running":
            fail(f"{label}: pod {name} is {st.get('phase')}")
        for cs in st.get("containerStatuses", []):
            if cs.get("restartCount", 0) != 0 or "running" not in cs.get("state", {}):
                fail(f"{label}: pod {name}'s container {cs.get('name')}: {json.dumps(cs)}")
        if not st.get("podIP"):
            fail(f"{label}: pod {name} has no podIP")
        ip = ipaddress.ip_address(st["podIP"])
        ok = ip < boundary if side == "below" else ip >= boundary
        if not ok:
            fail(f"{label}: pod {name} got {ip}, not {side} {boundary}: the wrong CNI configuration was used")
        ready = [c for c in st.get("conditions", []) if c["type"] == "Ready" and c["status"] == "True"]
        if not ready:
            fail(f"{label}: pod {name} is not Ready")
        created = stamp(p["metadata"]["creationTimestamp"])
        status_s.append((stamp(ready[0]["lastTransitionTime"]) - created).total_seconds())

    with open(events_json) as f:
        warnings = [
            e
            for e in json.load(f)["items"]
            if e.get("involvedObject", {}).get("name") in want
            and e.get("type") != "Normal"
            and e.get("reason") not in EXPECTED_WARNINGS
        ]
    if warnings:
        lines = [f"{e['involvedObject']['name']}: {e.get('reason')}: {e.get('message')}" for e in warnings]
        fail(f"{label}: {len(warnings)} warning events:\n" + "\n".join(lines))

    failed = re.compile(r'msg="RunPodSandbox for &PodSandboxMetadata\{Name:([^,]+),.*failed')
    with open(containerd_log, errors="replace") as f:
        bad = sorted({m.group(1) for m in map(failed.search, f) if m and m.group(1) in want})
    if bad:
        fail(f"{label}: RunPodSandbox failed (containerd's log) for {' '.join(bad)}")

    watch_ms = [running[x] - first[x] for x in names]
    wall = max(running.values()) - t0
    print(
        f"{label} burst of {n} pods: all Running {wall} ms after kubectl create; created -> Running "
        f"p50={rank(watch_ms, 0.5)} ms p99={rank(watch_ms, 0.99)} ms (watch events), "
        f"p50={rank(status_s, 0.5):.0f} s p99={rank(status_s, 0.99):.0f} s (pod status timestamps); "
        f"no failed sandbox, no warning event (MissingClusterDNS aside)"
    )


if __name__ == "__main__":
    if len(sys.argv) != 11:
        sys.exit(__doc__)
    main(*sys.argv[1:])
