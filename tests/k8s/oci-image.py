#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (a tar of an OCI image layout) from a
directory, for the k8s end-to-end script's pause and workload images.

Usage: oci-image.py ROOTFS_DIR OUT.tar NAME:TAG ENTRYPOINT [ARG...]

NAME:TAG is qualified the way containerd does (e2e-pause:1 becomes
docker.io/library/e2e-pause:1) and stored in the index's
io.containerd.image.name annotation, so `ctr images import` names the image
without --base-name.
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def qualify(ref):
    name, tag = ref.rsplit(":", 1)
    if "/" not in name:
        name = "docker.io/library/" + name
    return f"{name}:{tag}", tag


def layer_bytes(root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, n)
                info = t.gettarinfo(full, arcname=os.path.relpath(full, root))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(full, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)
    return buf.getvalue()


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    root, out, ref, entry = argv[1], argv[2], argv[3], argv[4:]
    full, tag = qualify(ref)
    blobs = {}

    def blob(data, media):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return {"mediaType": media, "digest": d, "size": len(data)}

    raw = layer_bytes(root)
    gz = gzip.compress(raw, mtime=0)
    layer = blob(gz, "application/vnd.oci.image.layer.v1.tar+gzip")
    config = {
        "architecture": "amd64" if os.uname().machine == "x86_64" else os.uname().machine,
        "os": "linux",
        "config": {"Entrypoint": entry, "Env": ["PATH=/"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    cfg = blob(json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": [layer]}
    man = blob(json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    man["annotations"] = {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": full}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man]}

    with tarfile.open(out, "w") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for d, data in blobs.items():
            add("blobs/sha256/" + d.split(":", 1)[1], data)
    print(full)


if __name__ == "__main__":
    main(sys.argv)
