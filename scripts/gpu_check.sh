#!/usr/bin/env bash
# Everything a lent GPU should run, in three device-tool commands of under 10 minutes each and about
# 12 minutes in all. The GPU image has no Ray, DeepSpeed or omegaconf and no network, and a command
# carries at most 64 MiB, so the wheels travel as parts of one tar (.gpu_bundle/<k>, each < 60 MiB;
# Ray's cp312 wheel alone is ~79 MB). Files an earlier command brought stay on the machine while
# it is held, so the last part's command finds the others.
#
#   here:  scripts/make_gpu_bundle.sh                       # .whl/ and .gpu_bundle/1, .gpu_bundle/2
#   run 1: carry [".gpu_bundle/1"]  scripts/gpu_check.sh --part 1
#          (brings part 1: the small wheels and the first 55 MiB of the tar; checks its checksum)
#   run 2: carry [".gpu_bundle/2"]  scripts/gpu_check.sh --part 2 --steps install,versions,pytest_gpu,bench_kernels
#          (brings the last part, joins the tar, checks it, installs every wheel into /tmp/site;
#          then pytest -m gpu, which includes 50 syncs under the local executor with reserved memory
#          flat, and the kernel benchmark)
#   run 3: scripts/gpu_check.sh --steps random_model,plan,profile
#          (`hybrid-ppo profile` under Ray on 1 GPU: actor, critic, reference and the HF engine at 0.2
#          GPU each, CUDA IPC across processes, DeepSpeed offload_states on CUDA, the per-phase torch
#          peaks beside the planner's estimate, with the error per phase, in memory_report.txt)
#   anywhere: scripts/gpu_check.sh --dry-run                # checks the parts and every command, runs none
#
# Without --steps every step runs (over 10 minutes). Every result (logs, JSON, PNG, summary.json)
# goes under $OUT (default: gpu_check_out/). A failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
SITE=/tmp/site
MODEL=/tmp/hybrid_ppo_qwen2.5-0.5b-random
WHEELS=/tmp/hppo_wheels
PARTS=.gpu_bundle
DRY=0 PART="" STEPS=all
usage() { echo "usage: $0 [--dry-run] [--part K] [--steps a,b,...]" >&2; exit 2; }
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --part) PART=${2:-}; [[ $PART =~ ^[0-9]+$ ]] || usage; shift ;;
        --steps) STEPS=${2:-}; [[ -n $STEPS ]] || usage; shift ;;
        *) usage ;;
    esac
    shift
done
wanted() { [[ $STEPS == all || ",$STEPS," == *",$1,"* ]]; }

# Seconds per step; each command's steps (the header) together under the device tool's 600 s.
T_PYTEST=180 T_BENCH=150 T_MODEL=45 T_PROFILE=300

# Under Ray on the one GPU: every role rank and the engine at placement.gpu_per_role (0.2).
PROFILE_ARGS=(configs/tiny-cpu.yaml "model.actor=$MODEL" model.dtype=bf16 train.zero_stage=2
    placement.executor=ray placement.num_gpus=1 rollout.engine=hf warmup.steps=0
    data.max_prompt_tokens=32 rollout.max_new_tokens=64 data.eval_size=64
    train.rollout_batch_size=64 train.mini_batch_size=32 train.micro_batch_size=8
    "logging.output_dir=$OUT/runs" logging.run_name=profile logging.tensorboard=false
    "logging.cache_dir=$OUT/cache")

(( DRY )) || mkdir -p "$OUT"
export PYTHONPATH="$SITE:$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
SUMMARY=()

# part_ok K: part K of the tar is here and matches its checksum.
part_ok() {
    local dir=$PARTS/$1
    [[ -f $dir/SHA256SUMS && -f $dir/bundle.tar.part$1 ]] || { echo "part $1: not in $dir/"; return 1; }
    (cd "$dir" && grep " bundle.tar.part$1\$" SHA256SUMS | sha256sum --check --quiet) \
        && echo "part $1 of $(cat "$dir/PARTS") ok" || { echo "part $1: checksum differs"; return 1; }
}

# join_parts DEST: every part here, joined, checked and unpacked into DEST (the wheels).
join_parts() {
    local dest=$1 count k tar
    count=$(cat "$PARTS"/*/PARTS 2>/dev/null | head -1)
    [[ -n $count ]] || { echo "no parts in $PARTS/: bring them first (see the top of $0)"; return 1; }
    for k in $(seq 1 "$count"); do part_ok "$k" || return 1; done
    tar=$(mktemp)
    for k in $(seq 1 "$count"); do cat "$PARTS/$k/bundle.tar.part$k"; done > "$tar"
    if [[ $(sha256sum < "$tar" | cut -d' ' -f1) != $(grep ' bundle.tar$' "$PARTS/1/SHA256SUMS" | cut -d' ' -f1) ]]; then
        echo "the joined bundle's checksum differs"; rm -f "$tar"; return 1
    fi
    rm -rf "$dest" && mkdir -p "$dest" && tar -C "$dest" -xf "$tar" && rm -f "$tar"
    echo "joined $count part(s): $(ls "$dest"/*.whl | wc -l) wheels in $dest"
}

install_bundle() {
    join_parts "$WHEELS" && rm -rf "$SITE" \
        && "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
}

# step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, record status and seconds.
step() {
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
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
for name in ("torch", "triton", "transformers", "deepspeed", "ray", "pydantic", "omegaconf", "matplotlib"):
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
    # The parts as the GPU machine joins them, then the install command itself, for the image's
    # interpreter (files only; nothing is imported).
    join_parts "$tmp/wheels" || ok=0
    "$PY" -m pip install --quiet --no-index --no-deps --target "$tmp/site" --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --only-binary=:all: "$tmp"/wheels/*.whl \
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

if [[ -n $PART ]] && (( ! DRY )); then
    part_ok "$PART" || exit 1
    [[ $STEPS == all && $PART != "$(cat "$PARTS/$PART/PARTS")" ]] && exit 0  # an early part: brought, checked
fi
if (( DRY )); then
    dry_checks; rc=$?
    step install 90 install_bundle
    step versions 30 versions
    step pytest_gpu "$T_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider
    step bench_kernels "$T_BENCH" "$PY" scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
    step random_model "$T_MODEL" "$PY" scripts/make_random_model.py configs/models/qwen2.5-0.5b "$MODEL" --device cuda
    step plan 60 "$PY" -m hybrid_ppo.cli plan --json "${PROFILE_ARGS[@]}"
    step profile "$T_PROFILE" "$PY" -m hybrid_ppo.cli profile "${PROFILE_ARGS[@]}"
    exit $rc
fi

start=$SECONDS
wanted random_model && rm -rf "$MODEL"
step install 90 install_bundle
step versions 30 versions
step pytest_gpu "$T_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider
step bench_kernels "$T_BENCH" "$PY" scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
step random_model "$T_MODEL" "$PY" scripts/make_random_model.py configs/models/qwen2.5-0.5b "$MODEL" --device cuda
step plan 60 "$PY" -m hybrid_ppo.cli plan --json "${PROFILE_ARGS[@]}" && wanted plan && cp "$OUT/plan.log" "$OUT/plan.json"
step profile "$T_PROFILE" "$PY" -m hybrid_ppo.cli profile "${PROFILE_ARGS[@]}"
for f in memory_report.json memory_report.txt memory_timeline.png metrics.jsonl memory_timeline.jsonl; do
    cp "$OUT/runs/profile/$f" "$OUT/" 2>/dev/null || true
done
rm -rf "$OUT/runs/profile/hf"  # 1 GB of random weights: not a result
joined=$(IFS=,; echo "${SUMMARY[*]}")
echo "{\"seconds\": $((SECONDS - start)), \"steps\": {$joined}}" > "$OUT/summary.json"
cat "$OUT/summary.json"
