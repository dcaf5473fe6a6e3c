#!/usr/bin/env bash
# Gather the wheels scripts/gpu_check.sh installs on a lent GPU machine into .whl/, and pack them
# as .gpu_bundle/1, .gpu_bundle/2, ...: parts of one tar, each under 60 MiB, because the device
# tool carries at most 64 MiB per command and Ray's cp312 wheel alone is ~79 MB. Both git-ignored.
#
# That image has torch, triton, transformers, matplotlib, psutil, pyyaml, rich, nvidia-ml-py and
# pytest, but no network and none of: deepspeed (no wheel on PyPI: built here, pure Python, its
# ops JIT-build there with nvcc), its hjson and pydantic (+ pydantic-core, compiled for the
# image's CPython 3.12, annotated-types, typing-inspection, a new enough typing-extensions), our
# omegaconf, and ray with what it needs beyond the image (click, jsonschema and its parts,
# protobuf, requests and its parts). Versions are the ones this venv runs.
#
#   scripts/make_gpu_bundle.sh            # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
PARTS=.gpu_bundle
PART_BYTES=$((55 << 20))  # + the part's checksum file: under the 60 MiB a part may take
GPU_PYTHON=3.12  # /opt/torch/.venv on the GPU image (KINDS.md)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

work=$(mktemp -d "${DEST}.tmp.XXXX")
trap 'rm -rf "$work"' EXIT
pure=(deepspeed omegaconf hjson pydantic annotated-types typing-inspection typing-extensions)
binary=(pydantic-core ray click jsonschema jsonschema-specifications referencing attrs rpds-py protobuf
        requests urllib3 idna certifi charset-normalizer)
specs=()
for name in "${pure[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work/whl" "${specs[@]}"
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$GPU_PYTHON" \
    --platform manylinux2014_x86_64 --dest "$work/whl" "${specs[@]}"

# One tar of every wheel, cut into parts; each part dir holds its piece and the checksums of all.
tar -C "$work/whl" -cf "$work/bundle.tar" .
mkdir "$work/parts"
split --bytes="$PART_BYTES" --numeric-suffixes=1 --suffix-length=1 "$work/bundle.tar" "$work/parts/bundle.tar.part"
count=$(ls "$work/parts" | wc -l)
(cd "$work" && sha256sum bundle.tar > SHA256SUMS && cd parts && sha256sum bundle.tar.part* >> ../SHA256SUMS)
echo "$count" > "$work/PARTS"
for k in $(seq 1 "$count"); do
    mkdir -p "$work/out/$k"
    mv "$work/parts/bundle.tar.part$k" "$work/out/$k/"
    cp "$work/SHA256SUMS" "$work/PARTS" "$work/out/$k/"
done
rm -rf "$DEST" "$PARTS" && mv "$work/whl" "$DEST" && mv "$work/out" "$PARTS"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "bundle: $(ls "$DEST"/*.whl | wc -l) wheels, $((total >> 20)) MiB in $DEST/, in $count part(s):"
for k in $(seq 1 "$count"); do echo "  $PARTS/$k: $(( $(du -sb "$PARTS/$k" | cut -f1) >> 20 )) MiB"; done
