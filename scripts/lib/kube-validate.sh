#!/usr/bin/env bash
# Validates Kubernetes manifests offline, strictly (unknown fields are errors),
# against the API schemas of one Kubernetes version, with PyPI's
# kubernetes-validate installed once into a virtualenv cached outside the
# repository. No cluster and no network besides PyPI on the first run.
#
# Usage: scripts/lib/kube-validate.sh K8S_VERSION FILE...   (e.g. 1.20.0)
#        scripts/lib/kube-validate.sh --python                prints a python3 that has PyYAML
# Exit status: 0 valid, 1 invalid, 3 the validator could not be installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

# Each release of kubernetes-validate carries the schemas of a window of
# Kubernetes versions: 1.28.3 has 1.20 to 1.28 (the API server the tests run
# is 1.20), 1.37.0 has 1.25 to 1.37.
old_pin=1.28.3
new_pin=1.37.0

cache=/var/cache/flannel-rs
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/flannel-rs
  mkdir -p "$cache"
fi

# Prints the virtualenv holding kubernetes-validate==$1, creating it once;
# concurrent callers wait on a lock rather than build it twice.
venv() {
  local pin=$1 dir=$cache/kubernetes-validate-$1
  if [ ! -f "$dir/.complete" ]; then
    exec 9>"$dir.lock"
    flock 9
    if [ ! -f "$dir/.complete" ]; then
      rm -rf "$dir"
      if ! python3 -m venv "$dir" >/dev/null 2>&1; then
        # Debian's python3 needs python3-venv for ensurepip.
        if [ "$(id -u)" -eq 0 ]; then install_packages python3-venv >&2; fi
        rm -rf "$dir"
        python3 -m venv "$dir" >&2 || { echo "kube-validate: python3 -m venv failed" >&2; exit 3; }
      fi
      "$dir/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$pin" >&2 ||
        { echo "kube-validate: pip install kubernetes-validate==$pin failed" >&2; rm -rf "$dir"; exit 3; }
      touch "$dir/.complete"
    fi
    exec 9>&-
  fi
  echo "$dir"
}

if [ "${1:-}" = --python ]; then
  dir=$(venv "$new_pin")
  echo "$dir/bin/python3"
  exit 0
fi
[ $# -ge 2 ] || { echo "usage: $0 K8S_VERSION FILE... | --python" >&2; exit 2; }
k8s=$1
shift
minor=$(echo "$k8s" | cut -d. -f2)
if [ "$minor" -lt 25 ]; then pin=$old_pin; else pin=$new_pin; fi
dir=$(venv "$pin")
"$dir/bin/kubernetes-validate" --strict --kubernetes-version "$k8s" "$@"
