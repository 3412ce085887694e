#!/usr/bin/env python3
"""Writes an OCI image layout (oci-layout, index.json, blobs/sha256/...) for a
single-layer image, for scripts/build-image.sh.

Usage: oci-layout.py OUT_DIR LAYER.tar LAYER.tar.gz NAME:TAG VERSION EPOCH ARCH

LAYER.tar is the uncompressed layer (its digest is the config's diff_id),
LAYER.tar.gz the same bytes gzipped (the blob the manifest points to). Every
JSON document is serialised with sorted keys and no whitespace, and every time
is EPOCH, so the same inputs give the same digests. Prints the manifest's
digest, which is the image's digest.
"""

import datetime
import hashlib
import json
import os
import shutil
import sys

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def normalize(ref):
    """Splits NAME:TAG and returns (fully qualified name:tag, tag), the way
    containerd and the kubelet qualify `flannel-rs:0.1.0` to
    `docker.io/library/flannel-rs:0.1.0`."""
    if "@" in ref:
        sys.exit(f"oci-layout.py: {ref}: a digest reference cannot be a tag")
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    else:
        name, tag = ref, "latest"
    if not name or not tag:
        sys.exit(f"oci-layout.py: {ref}: want NAME:TAG")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = "docker.io/library/" + name
    elif not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + name
    return f"{name}:{tag}", tag


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Blobs:
    def __init__(self, root):
        self.dir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.dir, exist_ok=True)

    def add_bytes(self, data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.dir, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_file(self, path, media_type):
        digest = sha256_file(path)
        shutil.copyfile(path, os.path.join(self.dir, digest.split(":", 1)[1]))
        return {"mediaType": media_type, "digest": digest, "size": os.path.getsize(path)}


def main(argv):
    if len(argv) != 8:
        sys.exit(__doc__)
    out, layer_tar, layer_gz, ref, version, epoch, arch = argv[1:]
    full_name, tag = normalize(ref)
    created = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    os.makedirs(out, exist_ok=True)
    blobs = Blobs(out)
    layer = blobs.add_file(layer_gz, OCI_LAYER_GZIP)
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/flanneld-rs"],
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "flannel-rs",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description": "flanneld-rs, the flannel-rs CNI plugin and nft",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256_file(layer_tar)]},
        "history": [{"created": created, "created_by": "scripts/build-image.sh"}],
    }
    config_desc = blobs.add_bytes(canonical(config), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": [layer],
        "annotations": {"org.opencontainers.image.created": created},
    }
    manifest_desc = blobs.add_bytes(canonical(manifest), OCI_MANIFEST)
    manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
    manifest_desc["annotations"] = {
        # The OCI name of this image inside the layout: its tag.
        "org.opencontainers.image.ref.name": tag,
        # The name `ctr images import` gives it (no --base-name needed), the
        # one the kubelet asks for when a pod says `image: flannel-rs:<tag>`.
        "io.containerd.image.name": full_name,
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest_desc]}
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical(index))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    print(manifest_desc["digest"])


if __name__ == "__main__":
    main(sys.argv)
