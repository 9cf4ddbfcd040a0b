#!/usr/bin/env bash
# On a machine with a package index: the wheels the GPU lane carries to the device.
#
#   test/gpu_lane/prepare.sh WHEEL_DIR
#
# Downloads test/gpu_lane/wheels.txt for CPython 3.12 manylinux x86_64 (no dependencies
# resolved: the list is complete against the device image's own packages) and builds the
# product's wheel from this checkout. About 35 MiB.
set -euo pipefail
LANE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LANE/../.." && pwd)"
DEST="${1:?wheel folder}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
rm -f "$DEST"/sglang_enhanced-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" -r "$LANE/wheels.txt"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$ROOT"
ls "$DEST" | wc -l
du -sh "$DEST"
