"""Benchmark SYNC (actor -> rollout engines) under real Ray with 2 fake GPUs, on this machine.

    python scripts/bench_weight_sync.py [--params 100M] [--dtype fp32|bf16] [--engine hf|vllm]
                                        [--syncs 5] [--slots 1] [--bucket-mb 512] [--zero 2] [--json PATH]

A Llama of about `--params` parameters is built in code (random weights), the actor (DeepSpeed,
2 ranks) and the engines (2, TP=1) are spawned as in training, and the SYNC
(`rollout/sync_driver.sync_weights`) runs `--syncs` times after one warm-up sync, then
`--syncs` times more while traffic and memory are measured. Printed as a table and written as
JSON:

* `seconds_median`: wall seconds per sync, from the first, unmeasured round; `gbps`: model bytes
  x engines / seconds (GB/s of weights delivered to all engines).
  `seconds_while_measuring_median` is the second round, slowed by the measuring.
* `memcpy_gbps`: single-threaded `torch` copy bandwidth of this machine, measured in this run
  (the best of 9): the scale for `gbps` (`gbps_vs_memcpy`).
* `driver_bytes`: measured, per sync. Every role call the sync makes goes through a counting
  wrapper that adds the pickled size of the arguments the driver sends and of the results it
  receives. Only control messages should be left.
* `engine_peak_extra_bytes`: the highest resident memory of an engine's process tree (its
  vLLM engine-core and worker processes included) during the measured syncs, minus its level
  just before them; sampled every 2 ms by a thread inside the engine process.
  It counts what the engine maps of the actor's staging buffers (shared pages: the same memory
  as `staging_bytes_per_rank`), so one staging slot shows as one largest bucket.
* `staging_bytes_per_rank`: an actor rank's staging buffers (slots x `largest_bucket_bytes`, the
  largest bucket of the plan: a unit bigger than the bucket size, often the embedding, makes
  its own bucket). On CPU they stay between syncs (rollout/weight_sync.py: `BucketStager`).

It calls only the sync and the executor (an older checkout's `PPOTrainer.sync_weights`), so the
same script measures an older checkout (PYTHONPATH=that checkout) for a before/after comparison.

Goals on CPU at 100M parameters: gbps >= 25 % of memcpy_gbps, engine peak extra <= 2 buckets,
driver bytes = control only. The arithmetic for 7B bf16 on 8xH100 is in
hybrid_ppo/rollout/weight_sync.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 32000


def parse_count(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"--params: got {text!r}; allowed: a count like 100M, 1.5B, 500K")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[match.group(2)])


def llama_config(params: int, dtype: str):
    """A Llama shape of about `params` parameters: head_dim 64 (vLLM's CPU attention accepts it)."""
    from transformers import LlamaConfig

    hidden = 768 if params >= 80_000_000 else 256
    inter = hidden * 8 // 3 // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden) / per_layer))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                       max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])


def _timed(sync) -> float:
    start = time.perf_counter()
    sync()
    return time.perf_counter() - start


def memcpy_gbps(nbytes: int, repeats: int = 9) -> float:
    """Single-threaded torch copy bandwidth (bytes copied / second), this process: the best of
    `repeats`, since the scale should be what the machine can do (a lower one would flatter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9
    finally:
        torch.set_num_threads(threads)


def staging_bytes(model, bucket_bytes: int, slots: int) -> int:
    """What an actor rank's staging buffers hold: `slots` x the largest bucket of the plan."""
    try:
        from hybrid_ppo.rollout.weight_sync import BucketStager, bucket_plan  # noqa: F401
    except ImportError:  # an older checkout: no staging buffers
        return 0
    named = list(model.named_parameters())
    sizes = [p.numel() * p.element_size() for _, p in named]
    return slots * max(sum(sizes[i] for i in b) for b in bucket_plan([n for n, _ in named], sizes, bucket_bytes))


# -- measuring the driver's traffic -----------------------------------------------------------------
def _counting_group(inner, counter: dict):
    """A RoleGroup that forwards to `inner` and adds the pickled size of every argument tuple sent
    and every result received to counter["bytes"]."""
    import ray

    from hybrid_ppo.executor import Pending, RoleGroup

    def size(obj) -> int:
        return len(ray.cloudpickle.dumps(obj))

    class Counting(RoleGroup):
        def __init__(self):
            self.name, self.world_size = inner.name, inner.world_size

        @property
        def members(self):
            return inner.members

        def submit_each(self, method, per_rank_args, **kwargs):
            counter["bytes"] += sum(size((method, args, kwargs)) for args in per_rank_args)
            return self._counted(inner.submit_each(method, per_rank_args, **kwargs))

        def submit_rank(self, rank, method, *args, **kwargs):
            counter["bytes"] += size((method, args, kwargs))
            return self._counted(inner.submit_rank(rank, method, *args, **kwargs))

        @staticmethod
        def _counted(pending):
            def resolve(*timeout):
                value = pending.result(*timeout)
                counter["bytes"] += size(value)
                return value

            return Pending(resolve)

    return Counting()


# -- measuring an engine's memory, from inside its process ------------------------------------------
def _start_sampler(instance) -> int:
    import psutil

    me = psutil.Process()

    def rss() -> int:
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    state = {"baseline": rss(), "peak": 0, "run": True}
    state["peak"] = state["baseline"]

    def loop():
        while state["run"]:
            state["peak"] = max(state["peak"], rss())
            time.sleep(0.002)

    state["thread"] = threading.Thread(target=loop, daemon=True)
    state["thread"].start()
    instance._bench_sampler = state  # functions travel by value: module globals do not persist
    return state["baseline"]


def _stop_sampler(instance) -> int:
    state = instance._bench_sampler
    state["run"] = False
    state["thread"].join()
    return state["peak"] - state["baseline"]


def run(args) -> dict:
    import ray
    from transformers import LlamaForCausalLM

    from hybrid_ppo.config import RolloutConfig, load_config
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor
    from hybrid_ppo.rollout.worker import RolloutWorker

    workdir = Path(tempfile.mkdtemp(prefix="hppo_bench", dir="/tmp"))  # short: Ray socket paths live under it
    try:
        config = llama_config(args.params, args.dtype)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config)
        model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).save_pretrained(workdir / "model")
        params = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        staging = staging_bytes(model, args.bucket_mb << 20, args.slots)
        del model

        overrides = ["placement.num_gpus=2", f"model.dtype={args.dtype}", f"rollout.engine={args.engine}",
                     f"rollout.weight_sync_bucket_mb={args.bucket_mb}", f"train.zero_stage={args.zero}",
                     f"logging.cache_dir={workdir / 'cache'}", "train.rollout_batch_size=8",
                     "train.mini_batch_size=8", "train.micro_batch_size=4"]
        fields = RolloutConfig.__dataclass_fields__  # older checkouts lack these keys
        if "enforce_eager" in fields:
            overrides.append("rollout.enforce_eager=true")
        if "weight_sync_slots" in fields:
            overrides.append(f"rollout.weight_sync_slots={args.slots}")
        cfg = load_config(None, overrides)
        executor = RayExecutor(cfg).start()
        try:
            rollout = executor.spawn("rollout", RolloutWorker, str(workdir / "model"))
            actor = executor.spawn("actor", Actor, str(workdir / "model"))
            sync = sync_function(cfg, actor, rollout)
            sync()  # warm-up: first-touch of every buffer and parameter
            seconds = [_timed(sync) for _ in range(args.syncs)]
            # Traffic and memory on as many syncs again: the 2 ms sampler and the pickling that
            # counts bytes take CPU from the sync itself, which on 2 cores would skew its time.
            counter = {"bytes": 0}
            counted = sync_function(cfg, _counting_group(actor, counter), _counting_group(rollout, counter))
            ray.get([h.__ray_call__.remote(_start_sampler) for h in rollout.members])
            seconds_measured = [_timed(counted) for _ in range(args.syncs)]
            extra = ray.get([h.__ray_call__.remote(_stop_sampler) for h in rollout.members])
        finally:
            executor.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    median = statistics.median(seconds)
    memcpy = memcpy_gbps(min(model_bytes, 256 << 20))
    gbps = model_bytes * rollout.world_size / median / 1e9
    return {"params": params, "dtype": args.dtype, "engine": args.engine, "engines": rollout.world_size,
            "zero_stage": args.zero, "slots": args.slots, "syncs": args.syncs, "model_bytes": model_bytes,
            "bucket_bytes": args.bucket_mb << 20, "staging_bytes_per_rank": staging, "seconds_median": median,
            "seconds": seconds, "seconds_while_measuring_median": statistics.median(seconds_measured), "gbps": gbps,
            "memcpy_gbps": memcpy, "gbps_vs_memcpy": gbps / memcpy,
            "driver_bytes": counter["bytes"] // args.syncs, "engine_peak_extra_bytes": max(extra),
            "engine_peak_extra_buckets": max(extra) / (args.bucket_mb << 20),
            "largest_bucket_bytes": staging // args.slots}


def sync_function(cfg, actor, rollout):
    """The SYNC under test: `sync_driver.sync_weights`, or, in a checkout from before it existed
    (a before/after comparison), that checkout's `PPOTrainer.sync_weights`."""
    try:
        from hybrid_ppo.rollout.sync_driver import sync_weights
    except ImportError:
        from hybrid_ppo.trainer import PPOTrainer, RoleGroups

        roles = RoleGroups(actor=actor, critic=None, reference=None, rollout=rollout, reward=None)
        trainer = PPOTrainer(cfg, roles, None, None, None, None, None)
        trainer._metrics = {}
        return trainer.sync_weights
    r = cfg.rollout
    return lambda: sync_weights(actor, rollout, r.tensor_parallel_size, slots=r.weight_sync_slots)


def print_table(result: dict) -> None:
    rows = [("model", f"{result['params'] / 1e6:.1f}M params, {result['dtype']}, {result['model_bytes'] / 2**20:.0f} MiB"),
            ("engines", f"{result['engines']} x {result['engine']}, actor ZeRO-{result['zero_stage']}, "
                        f"{result['slots']} slot(s)"),
            ("bucket", f"{result['bucket_bytes'] / 2**20:.0f} MiB"),
            ("seconds per sync (median)", f"{result['seconds_median']:.3f}"),
            ("delivered GB/s (all engines)", f"{result['gbps']:.2f}"),
            ("memcpy GB/s (1 thread)", f"{result['memcpy_gbps']:.2f}"),
            ("delivered / memcpy", f"{100 * result['gbps_vs_memcpy']:.0f} %"),
            ("driver bytes per sync", f"{result['driver_bytes']:,}"),
            ("engine peak extra", f"{result['engine_peak_extra_bytes'] / 2**20:.1f} MiB "
                                  f"({result['engine_peak_extra_buckets']:.2f} x the bucket size"
                                  + (f", {result['engine_peak_extra_bytes'] / result['largest_bucket_bytes']:.2f} x "
                                     f"the largest bucket)" if result["largest_bucket_bytes"] else ")")),
            ("actor staging buffers per rank", f"{result['staging_bytes_per_rank'] / 2**20:.1f} MiB"),
            ("s/sync while measuring memory", f"{result['seconds_while_measuring_median']:.3f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("100M"))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--slots", type=int, choices=[1, 2], default=1, help="staging buffers per actor rank")
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--zero", type=int, choices=[2, 3], default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
