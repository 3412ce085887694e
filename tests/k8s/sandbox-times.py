#!/usr/bin/env python3
"""Prints how long containerd's CRI took to set up each pod sandbox whose name
starts with PREFIX (RunPodSandbox request to its reply, which includes the
CNI ADD of the whole conflist), from a containerd log at level info, and a
summary line: `LABEL sandbox: n=.. median=.. ms mean=.. ms min=.. max=..`.

Usage: sandbox-times.py CONTAINERD_LOG PREFIX LABEL
"""

import datetime
import re
import statistics
import sys

LINE = re.compile(r'time="([^"]+)".*msg="RunPodSandbox for &PodSandboxMetadata\{Name:([^,]+),(.*)')


def when(stamp):
    # 2026-11-26T23:08:26.221523123Z: keep microseconds, which fromisoformat takes.
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}")


def main(log, prefix, label):
    start, took = {}, {}
    with open(log, errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if not m or not m.group(2).startswith(prefix):
                continue
            t = when(m.group(1))
            name = m.group(2)
            if "returns sandbox id" in m.group(3):
                if name in start and name not in took:
                    took[name] = (t - start[name]).total_seconds() * 1000
            elif name not in start:
                start[name] = t
    if not took:
        print(f"{label} sandbox: no RunPodSandbox pairs for {prefix}* in {log}")
        return
    v = sorted(took.values())
    print(
        f"{label} sandbox (RunPodSandbox incl. CNI ADD): n={len(v)} median={statistics.median(v):.0f} ms "
        f"mean={statistics.mean(v):.0f} ms min={v[0]:.0f} ms max={v[-1]:.0f} ms"
    )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
