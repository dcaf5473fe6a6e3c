#!/usr/bin/env bash
# Everything a lent GPU should run, in one command, in under 10 minutes (issue 9, section 5).
#
#   scripts/make_gpu_bundle.sh         # first, on the CPU machine: the wheels the GPU image lacks -> .whl/
#   scripts/gpu_check.sh               # on the GPU machine (device tool `run`, with carry [".whl"])
#   scripts/gpu_check.sh --dry-run     # anywhere: checks the bundle and every command, runs none of them
#
# On the GPU it installs .whl/ into /tmp/site, then: (1) nvidia-smi and versions, (2) pytest -m gpu,
# (3) scripts/bench_kernels.py, (4) `hybrid-ppo profile` of a random-weight bf16 Qwen2.5-0.5B-shaped
# model, local executor on 1 GPU, ZeRO-2, HF engine, 3 iterations, with the planner's estimate
# beside the measurement. Every result (logs, JSON, PNG, summary.json) goes under $OUT
# (default: gpu_check_out/). A failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
SITE=/tmp/site
MODEL=/tmp/hybrid_ppo_qwen2.5-0.5b-random
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# Seconds per step; together (with the install) under the device tool's 600 s per command.
T_PYTEST=120 T_BENCH=150 T_MODEL=45 T_PROFILE=210

PROFILE_ARGS=(configs/tiny-cpu.yaml "model.actor=$MODEL" model.dtype=bf16 train.zero_stage=2
    placement.executor=local placement.num_gpus=1 rollout.engine=hf warmup.steps=0
    data.max_prompt_tokens=32 rollout.max_new_tokens=64 data.eval_size=64
    train.rollout_batch_size=64 train.mini_batch_size=32 train.micro_batch_size=8
    "logging.output_dir=$OUT/runs" logging.run_name=profile logging.tensorboard=false
    "logging.cache_dir=$OUT/cache")

(( DRY )) || mkdir -p "$OUT"
export PYTHONPATH="$SITE:$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
SUMMARY=()

# step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, record status and seconds.
step() {
    local name=$1 limit=$2; shift 2
    if (( DRY )); then
        printf 'would run [%s, %ss]:' "$name" "$limit"; printf ' %q' "$@"; echo
        return 0
    fi
    echo "== $name"
    local start=$SECONDS rc
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    SUMMARY+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start))}")
    return $rc
}

versions() {
    nvidia-smi || true
    "$PY" - <<'PYEOF'
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "deepspeed", "pydantic", "omegaconf", "matplotlib"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF
}

dry_checks() {
    local ok=1 tmp
    "$PY" scripts/check_gpu_bundle.py .whl || ok=0
    tmp=$(mktemp -d)
    # The install command itself, for the image's interpreter (files only; nothing is imported).
    "$PY" -m pip install --quiet --no-index --no-deps --target "$tmp/site" --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --only-binary=:all: .whl/*.whl \
        && echo "the wheels install for CPython 3.12" || { echo "the wheels do not install"; ok=0; }
    rm -rf "$tmp"
    for f in scripts/bench_kernels.py scripts/make_random_model.py configs/models/qwen2.5-0.5b/config.json \
             configs/tiny-cpu.yaml; do
        [[ -f $f ]] || { echo "missing $f"; ok=0; }
    done
    local collected
    collected=$("$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider 2>/dev/null | grep -c '::')
    echo "pytest -m gpu collects $collected test(s)"
    (( collected > 0 )) || ok=0
    "$PY" scripts/bench_kernels.py --help > /dev/null || { echo "bench_kernels.py --help failed"; ok=0; }
    # The profile's exact config, validated and planned on a config-only copy of the model.
    tmp=$(mktemp -d)
    local args=("${PROFILE_ARGS[@]/model.actor=$MODEL/model.actor=$tmp/model}")
    if "$PY" scripts/make_random_model.py configs/models/qwen2.5-0.5b "$tmp/model" --config-only > /dev/null \
        && "$PY" -m hybrid_ppo.cli plan --json "${args[@]}" > "$tmp/plan.json"; then
        "$PY" -c "import json,sys; print('profile config plans:', json.load(open(sys.argv[1]))['verdict'])" "$tmp/plan.json"
    else
        echo "the profile config does not validate or plan"; ok=0
    fi
    rm -rf "$tmp"
    (( ok )) && echo "dry run ok" || echo "dry run FAILED"
    (( ok ))
}

if (( DRY )); then
    dry_checks; rc=$?
    step install 60 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
    step versions 30 versions
    step pytest_gpu "$T_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider
    step bench_kernels "$T_BENCH" "$PY" scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
    step random_model "$T_MODEL" "$PY" scripts/make_random_model.py configs/models/qwen2.5-0.5b "$MODEL" --device cuda
    step plan 60 "$PY" -m hybrid_ppo.cli plan --json "${PROFILE_ARGS[@]}"
    step profile "$T_PROFILE" "$PY" -m hybrid_ppo.cli profile "${PROFILE_ARGS[@]}"
    exit $rc
fi

start=$SECONDS
rm -rf "$SITE" "$MODEL"
step install 60 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
step versions 30 versions
step pytest_gpu "$T_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider
step bench_kernels "$T_BENCH" "$PY" scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
step random_model "$T_MODEL" "$PY" scripts/make_random_model.py configs/models/qwen2.5-0.5b "$MODEL" --device cuda
step plan 60 "$PY" -m hybrid_ppo.cli plan --json "${PROFILE_ARGS[@]}" && cp "$OUT/plan.log" "$OUT/plan.json"
step profile "$T_PROFILE" "$PY" -m hybrid_ppo.cli profile "${PROFILE_ARGS[@]}"
for f in memory_report.json memory_report.txt memory_timeline.png metrics.jsonl memory_timeline.jsonl; do
    cp "$OUT/runs/profile/$f" "$OUT/" 2>/dev/null || true
done
rm -rf "$OUT/runs/profile/checkpoint"  # 1 GB of random weights: not a result
joined=$(IFS=,; echo "${SUMMARY[*]}")
echo "{\"seconds\": $((SECONDS - start)), \"steps\": {$joined}}" > "$OUT/summary.json"
cat "$OUT/summary.json"
