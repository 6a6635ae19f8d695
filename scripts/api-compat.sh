#!/usr/bin/env bash
# Zygote's API against the outside world (run by scripts/test.sh --slow):
#  - a published Firecracker client library (PyPI hysn-firecracker-python), unchanged, boots,
#    pauses, snapshots, loads and resumes a Linux VM (tests/api-compat/firecracker_client.py);
#  - schemathesis generates requests from docs/openapi.yaml: no 5xx, no answer outside the spec
#    (tests/api-compat/schemathesis_run.py).
# Both are installed, pinned, in a virtualenv under ${ZYGOTE_CACHE:-~/.cache/zygote}.
#   scripts/api-compat.sh ZYGOTE_BIN VMLINUX INITRD
set -euo pipefail
cd "$(dirname "$0")/.."
zygote=$(realpath "$1") vmlinux=$2 initrd=$3
cache=${ZYGOTE_CACHE:-$HOME/.cache/zygote}
venv=$cache/venv-api
pins="hysn-firecracker-python==1.0.7 schemathesis==4.32.5"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv" 2>/dev/null || { apt-get install -y -q python3-venv >/dev/null && python3 -m venv "$venv"; }
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q $pins
    echo "$pins" >"$venv/.pins"
fi
# Digits only: requests-unixsocket carries the socket path as the URL's host, which is
# lower-cased on the way.
work=/tmp/zygote-api-compat-$$
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" tests/api-compat/firecracker_client.py "$zygote" "$vmlinux" "$initrd" "$work/client"
"$venv/bin/python" tests/api-compat/schemathesis_run.py "$zygote" "$PWD/docs/openapi.yaml" "$work/schemathesis"
