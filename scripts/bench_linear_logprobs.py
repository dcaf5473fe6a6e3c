#!/usr/bin/env python
"""Peak memory and time of one LM-head forward+backward, materialized logits vs the fused op.

``python scripts/bench_linear_logprobs.py [--n 1024 4096 16384] [--dtype fp32|bf16] [--out bench_linear_logprobs.json]``

Each case: hidden ``[N, H]`` and head ``W [V, H]`` (H=896, V=151,936: Qwen2.5-0.5B's head), a loss on
the log-probs and the entropy, and its backward to ``hidden`` and ``W``. This is the CPU counterpart of
the fused rows of ``scripts/bench_kernels.py`` (GPU): on CPU the point is memory, not speed.

* ``materialized``: ``hidden @ W.T`` then ``ops.logprobs`` (the path before the fused op; its
  ``[N, V]`` fp32 logits, log-softmax and gradient all exist at once).
* ``fused``: ``ops.linear_logprobs`` (chunks of rows; no ``[N, V]`` tensor).

"Peak extra" is the process's peak RSS during the pass above its RSS before it (CPU: VmHWM, reset
through /proc/self/clear_refs before each case; large blocks are mmapped and returned on free, so
temporaries show), or the rise of ``torch.cuda.max_memory_allocated`` (CUDA). A materialized case
whose estimated peak (``MATERIALIZED_COPIES`` x N x V x 4 bytes) exceeds ``--budget-gib`` is not run; its row shows the
estimate, marked as computed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybrid_ppo import ops

H, V = 896, 151_936
MATERIALIZED_COPIES = 6
"""[N, V] fp32 buffers at the materialized pass's peak on CPU, measured (2026-12-03: 3571 MiB at N=1024,
14161 MiB at N=4096, both 6.0x the logits): the estimate for the cases too big to run."""


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one call. CUDA: a warm-up call first. CPU: one call; the peak RSS
    (VmHWM, reset to the current RSS just before) above the RSS before it, so cases can share a process."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (_status_kib("VmHWM") - before) * 1024


def _pass(kind: str, hidden, weight, labels):
    def run():
        if kind == "fused":
            out = ops.linear_logprobs(hidden, weight, labels, temperature=0.7, with_entropy=True)
        else:
            out = ops.logprobs(hidden @ weight.T, labels, temperature=0.7, with_entropy=True)
        torch.autograd.grad(out.logprobs.sum() + 0.01 * out.entropy.sum(), [hidden, weight])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16_384])
    parser.add_argument("--path", nargs="+", default=["fused", "materialized"], choices=["fused", "materialized"])
    parser.add_argument("--hidden", type=int, default=H, help="H (default: Qwen2.5-0.5B's)")
    parser.add_argument("--vocab", type=int, default=V, help="V (default: Qwen2.5-0.5B's)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="hidden and head dtype")
    parser.add_argument("--budget-gib", type=float, default=6.0,
                        help="materialized cases whose estimated peak exceeds this are computed, not run")
    parser.add_argument("--out", default="bench_linear_logprobs.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    h, v = args.hidden, args.vocab
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype).requires_grad_()
    rows = []
    for n in args.n:
        hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=gen).to(device)
        for kind in args.path:
            row = {"n": n, "h": h, "v": v, "path": kind, "dtype": args.dtype, "device": device.type,
                   "logits_bytes": n * v * 4,
                   # what both paths return (grad_W, grad_h): the part of the peak that is not overhead
                   "grads_bytes": (v + n) * h * weight.element_size()}
            estimate = MATERIALIZED_COPIES * n * v * 4
            if kind == "materialized" and estimate > args.budget_gib * 2**30:
                row.update(peak_extra_bytes=estimate, seconds=None, run=False)  # computed, not run
            else:
                seconds, peak = _measure(_pass(kind, hidden, weight, labels), device)
                row.update(seconds=seconds, peak_extra_bytes=peak, run=True)
            rows.append(row)
            print(f"N={n:>6} {kind:>12}: peak extra {row['peak_extra_bytes'] / 2**20:>9.0f} MiB"
                  f"{'' if row['run'] else ' (computed, not run)'}"
                  f"  {'-' if row['seconds'] is None else format(row['seconds'], '.2f') + ' s'}", flush=True)
    print("\n| N | path | peak extra MiB | of which the returned grads | seconds | [N, V] fp32 logits MiB |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_extra_bytes'] / 2**20:.0f}" + ("" if r["run"] else " (computed)")
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"| {r['n']} | {r['path']} | {peak} | {r['grads_bytes'] / 2**20:.0f} | {secs} | "
              f"{r['logits_bytes'] / 2**20:.0f} |")
    with open(args.out, "w") as f:
        json.dump({"device": device.type, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
