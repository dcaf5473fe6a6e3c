#!/usr/bin/env bash
# Gather into .whl/ (git-ignored) the wheels scripts/gpu_check.sh installs on a lent GPU machine.
#
# That image has torch, triton, transformers, matplotlib, psutil, pyyaml, rich, nvidia-ml-py and
# pytest, but no network and none of: deepspeed (no wheel on PyPI: built here, pure Python, its
# ops JIT-build there with nvcc), its hjson and pydantic (+ pydantic-core, compiled for the
# image's CPython 3.12, annotated-types, typing-inspection, a new enough typing-extensions), and
# our omegaconf. Versions are the ones this venv runs. The device tool carries 64 MiB at most.
#
#   scripts/make_gpu_bundle.sh            # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
LIMIT_BYTES=$((64 << 20))
GPU_PYTHON=3.12  # /opt/torch/.venv on the GPU image (KINDS.md)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

work=$(mktemp -d "${DEST}.tmp.XXXX")
trap 'rm -rf "$work"' EXIT
pure=(deepspeed omegaconf hjson pydantic annotated-types typing-inspection typing-extensions)
specs=()
for name in "${pure[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work" "${specs[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$GPU_PYTHON" \
    --platform manylinux2014_x86_64 --dest "$work" "pydantic-core==$(version pydantic-core)"

total=$(du -cb "$work"/*.whl | tail -1 | cut -f1)
if (( total > LIMIT_BYTES )); then
    echo "make_gpu_bundle: $((total >> 20)) MiB of wheels, over the device tool's 64 MiB" >&2
    exit 1
fi
rm -rf "$DEST" && mv "$work" "$DEST" && trap - EXIT
ls -la "$DEST"
echo "bundle: $(ls "$DEST"/*.whl | wc -l) wheels, $((total >> 10)) KiB in $DEST/"
