#!/usr/bin/env python
"""Peak memory and time of one LM-head forward+backward, materialized logits vs the fused op.

``python scripts/bench_linear_logprobs.py [--n 1024 4096 16384] [--out bench_linear_logprobs.json]``

Each case: hidden ``[N, H]`` and head ``W [V, H]`` (fp32, H=896, V=151,936: Qwen2.5-0.5B's head), a
loss on the log-probs and the entropy, and its backward to ``hidden`` and ``W``.

* ``materialized``: ``hidden @ W.T`` then ``ops.logprobs`` (the path before the fused op; its
  ``[N, V]`` fp32 logits, log-softmax and gradient all exist at once).
* ``fused``: ``ops.linear_logprobs`` (chunks of rows; no ``[N, V]`` tensor).

"Peak extra" is the rise of the process's peak RSS over the pass (CPU: large blocks are mmapped and
returned on free, so temporaries show) or of ``torch.cuda.max_memory_allocated`` (CUDA). A materialized case
whose estimated peak (3 x N x V x 4 bytes) exceeds ``--budget-gib`` is not run; its row shows the
estimate, marked as computed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybrid_ppo import ops

H, V = 896, 151_936


def _measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one call. CUDA: a warm-up call first. CPU: one call; the rise of
    the process's peak RSS (ru_maxrss), so run one case per process (``--n N --path P``), fused first
    (its peak is below anything a materialized pass leaves behind)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


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
    parser.add_argument("--budget-gib", type=float, default=6.0)
    parser.add_argument("--out", default="bench_linear_logprobs.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(device).requires_grad_()
    rows = []
    for n in args.n:
        hidden = torch.randn(n, H, generator=gen).to(device).requires_grad_()
        labels = torch.randint(0, V, (n,), generator=gen).to(device)
        for kind in args.path:
            row = {"n": n, "h": H, "v": V, "path": kind, "device": device.type, "logits_bytes": n * V * 4}
            estimate = 3 * n * V * 4
            if kind == "materialized" and estimate > args.budget_gib * 2**30:
                row.update(peak_extra_bytes=estimate, seconds=None, run=False)  # computed, not run
            else:
                seconds, peak = _measure(_pass(kind, hidden, weight, labels), device)
                row.update(seconds=seconds, peak_extra_bytes=peak, run=True)
            rows.append(row)
            print(f"N={n:>6} {kind:>12}: peak extra {row['peak_extra_bytes'] / 2**20:>9.0f} MiB"
                  f"{'' if row['run'] else ' (computed, not run)'}"
                  f"  {'-' if row['seconds'] is None else format(row['seconds'], '.2f') + ' s'}", flush=True)
    print(f"\n| N | path | peak extra MiB | seconds | [N, V] fp32 logits MiB |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_extra_bytes'] / 2**20:.0f}" + ("" if r["run"] else " (computed)")
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"| {r['n']} | {r['path']} | {peak} | {secs} | {r['logits_bytes'] / 2**20:.0f} |")
    with open(args.out, "w") as f:
        json.dump({"device": device.type, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
