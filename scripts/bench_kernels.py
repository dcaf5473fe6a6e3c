#!/usr/bin/env python
"""Benchmark the Triton log-prob and GAE kernels against their PyTorch fallbacks.

On a CUDA machine (``python scripts/bench_kernels.py [--out bench_kernels.json]``):

* log-probs, bf16, N in {4k, 16k} rows, V in {32k, 152k}: forward and forward+backward of the Triton
  kernel, of the fp32 fallback ``torch.log_softmax(logits.float(), -1).gather(...)``, and of that
  fallback under ``torch.compile``. Reports time, achieved GB/s, the fraction of the device's peak
  memory bandwidth, and the peak extra memory (``torch.cuda.max_memory_allocated`` delta).
* the fused LM head (``ops.linear_logprobs``) vs materialized logits (``hidden @ W.T`` then
  ``ops.logprobs``), bf16, N in {1k, 4k, 16k} response rows, H=896, V=151,936 (Qwen2.5-0.5B's head):
  forward and forward+backward time, peak extra memory, and achieved matmul TFLOP/s (model FLOPs: 2NVH
  forward, 6NVH forward+backward, the same for both, so the rate compares the work) with its fraction
  of the device's dense bf16 matmul peak.
* GAE, B in {64, 256}, T in {1k, 4k}: the serial-loop kernel, the opt-in scan kernel, the Python-loop
  reference and the chunked torch version, with speed-up ratios and a correctness check.
* Prints a table with the goals beside it and writes everything to JSON.

Bytes model for GB/s (the same for every implementation, so fractions compare the work, not the
traffic an implementation chose to add): forward reads the ``[N, V]`` logits once; forward+backward
reads them twice and writes the ``[N, V]`` gradient once. Per-row vectors are ignored.

Without CUDA (or with ``--smoke``) it runs a small correctness-only check of every kernel (under
``TRITON_INTERPRET=1`` on CPU) and exits 0 on success, 1 on a mismatch. Timings need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch

GOALS = {
    "fwd_peak_bw_fraction": 0.80,  # Triton forward at N=16k, V=152k, bf16
    "fwdbwd_speedup_vs_fp32": 1.5,  # Triton fwd+bwd vs the fp32 fallback, every shape
    "gae_speedup_vs_loop": 50.0,  # Triton GAE vs the Python loop at B=256, T=4k
    "fused_vs_materialized_speed": 1 / 1.2,  # materialized ms / fused ms, fwd+bwd, N=16k: fused within 1.2x
    "fused_fwd_matmul_fraction": 0.60,  # fused forward at N=16k, of the dense bf16 matmul peak
}
FUSED_NS, FUSED_H, FUSED_V = [1024, 4096, 16_384], 896, 151_936
# Dense (no sparsity) bf16 tensor-core peak by device name (FLOP/s), vendor datasheets.
BF16_MATMUL_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
                    "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}
LOGPROB_SHAPES = [(4096, 32_000), (4096, 151_936), (16_384, 32_000), (16_384, 151_936)]
GAE_SHAPES = [(64, 1024), (64, 4096), (256, 1024), (256, 4096)]
GAMMA, LAM = 1.0, 0.95

# Peak memory bandwidth by device name (bytes/s), used only when neither torch nor NVML reports the
# memory clock and bus width. Vendor datasheet numbers.
PEAK_BW_TABLE = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "RTX 4090": 1.008e12,
}


# ---------------------------------------------------------------------------------------------------
# Device facts
# ---------------------------------------------------------------------------------------------------
def peak_bandwidth() -> tuple[float | None, str]:
    """Peak DRAM bandwidth (bytes/s) of the current CUDA device and where the number came from."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # DDR: two transfers per clock
        return clock_khz * 1e3 * 2 * bus_bits / 8, "torch.cuda device properties"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:  # older torch without pci ids: assume no CUDA_VISIBLE_DEVICES remapping
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        return clock_mhz * 1e6 * 2 * bus_bits / 8, "NVML max memory clock x bus width"
    except Exception:
        pass
    for key, bw in PEAK_BW_TABLE.items():
        if key.lower() in props.name.lower():
            return bw, f"datasheet table ({key})"
    return None, "unknown device"


# ---------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------
def _do_bench(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))


def _time_slow(fn: Callable[[], Any], reps: int = 3) -> float:
    """Milliseconds per call for slow host-driven code (the Python loop): CUDA events, 1 warm-up."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak memory allocated during one call of ``fn`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


# ---------------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------------
def fallback_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fp32 fallback the kernel replaces (what OpenRLHF does)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _logprob_impls() -> dict[str, Callable[..., torch.Tensor]]:
    from hybrid_ppo import ops

    compiled = torch.compile(fallback_logprobs, dynamic=False)
    return {
        "triton": lambda x, y: ops.logprobs(x, y, backend="triton", inplace_backward=True),
        "torch fp32": fallback_logprobs,
        "torch.compile fp32": compiled,
    }


def bench_logprobs_shape(n: int, v: int, peak_bw: float | None) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda")
    logits = torch.empty(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen.manual_seed(1))

    def refill() -> None:  # the in-place backward leaves gradients in the buffer: restore the logits
        with torch.no_grad():
            logits.normal_(generator=gen.manual_seed(0)).mul_(4.0)

    refill()
    reference = fallback_logprobs(logits.detach(), labels)
    elt = logits.element_size()
    rows = []
    for impl, fn in _logprob_impls().items():
        for mode in ("fwd", "fwd+bwd"):
            row: dict[str, Any] = {"op": "logprobs", "impl": impl, "mode": mode, "N": n, "V": v, "dtype": "bf16"}
            refill()
            try:
                if mode == "fwd":

                    def call() -> torch.Tensor:
                        with torch.no_grad():
                            return fn(logits, labels)

                    row["max_abs_err_vs_fp32"] = float((call() - reference).abs().max())
                    bytes_moved = n * v * elt
                else:

                    def call() -> torch.Tensor:
                        lp = fn(logits, labels)
                        lp.sum().backward()
                        return lp

                    bytes_moved = 3 * n * v * elt
                call()  # warm-up (and compile)
                logits.grad = None
                row["peak_extra_MiB"] = _peak_extra_bytes(call) / 2**20
                logits.grad = None
                ms = _do_bench(call, grad_to_none=[logits])
                row["ms"] = ms
                row["GB/s"] = bytes_moved / (ms * 1e-3) / 1e9
                row["peak_bw_fraction"] = (bytes_moved / (ms * 1e-3)) / peak_bw if peak_bw else None
            except Exception as e:  # OOM or a compile failure: record it, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            logits.grad = None
            torch.cuda.empty_cache()
            rows.append(row)
    del logits, reference
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# Fused LM head
# ---------------------------------------------------------------------------------------------------
def bf16_matmul_peak(device_name: str) -> float | None:
    return next((v for k, v in BF16_MATMUL_PEAK.items() if k in device_name), None)


def bench_fused_head(n: int, matmul_peak: float | None) -> list[dict[str, Any]]:
    """Fused vs materialized LM head + log-probs + entropy over ``n`` bf16 rows."""
    from hybrid_ppo import ops

    h, v = FUSED_H, FUSED_V
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(v, h, device="cuda", generator=gen) * h**-0.5).bfloat16().requires_grad_(True)
    hidden = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    impls = {  # in-place backward is safe: the matmul's backward needs hidden and W, not its output
        "materialized": lambda: ops.logprobs(hidden @ weight.T, labels, temperature=0.7, with_entropy=True,
                                             inplace_backward=True),
        "fused": lambda: ops.linear_logprobs(hidden, weight, labels, temperature=0.7, with_entropy=True),
    }
    rows = []
    for impl, fwd in impls.items():
        for mode, flops in (("fwd", 2 * n * v * h), ("fwd+bwd", 6 * n * v * h)):
            row: dict[str, Any] = {"op": "linear_logprobs", "impl": impl, "mode": mode, "N": n, "H": h, "V": v,
                                   "dtype": "bf16"}

            def call(fwd=fwd, mode=mode) -> Any:
                if mode == "fwd":
                    with torch.no_grad():
                        return fwd()
                out = fwd()
                return torch.autograd.grad(out.logprobs.sum() + 0.01 * out.entropy.sum(), [hidden, weight])

            try:
                call()  # warm-up (and the kernels' compile)
                row["peak_extra_MiB"] = _peak_extra_bytes(call) / 2**20
                ms = _do_bench(call)
                row["ms"] = ms
                row["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
                row["matmul_peak_fraction"] = flops / (ms * 1e-3) / matmul_peak if matmul_peak else None
            except Exception as e:  # OOM: record it, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------
def bench_gae_shape(b: int, t: int) -> list[dict[str, Any]]:
    from hybrid_ppo_kernels.experimental.gae_scan import gae_torch_chunked, gae_triton_scan
    from hybrid_ppo_kernels.gae import gae_torch, gae_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    rewards = torch.randn(b, t, device="cuda", generator=gen)
    values = torch.randn(b, t, device="cuda", generator=gen)
    lengths = torch.randint(1, t + 1, (b,), device="cuda", generator=gen)
    mask = torch.arange(t, device="cuda")[None, :] >= (t - lengths)[:, None]  # left padding
    ref = gae_torch(rewards, values, mask, GAMMA, LAM)
    impls: dict[str, Callable[[], Any]] = {
        "triton loop": lambda: gae_triton(rewards, values, mask, GAMMA, LAM),
        "triton scan": lambda: gae_triton_scan(rewards, values, mask, GAMMA, LAM),
        "torch chunked": lambda: gae_torch_chunked(rewards, values, mask, GAMMA, LAM),
        "python loop": lambda: gae_torch(rewards, values, mask, GAMMA, LAM),
    }
    rows = []
    for impl, fn in impls.items():
        row: dict[str, Any] = {"op": "gae", "impl": impl, "B": b, "T": t}
        try:
            adv, ret = fn()
            row["max_abs_err_vs_loop"] = float(max((adv - ref[0]).abs().max(), (ret - ref[1]).abs().max()))
            row["ms"] = _time_slow(fn) if impl == "python loop" else _do_bench(fn)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    loop_ms = next((r.get("ms") for r in rows if r["impl"] == "python loop"), None)
    for r in rows:
        if loop_ms and r.get("ms"):
            r["speedup_vs_python_loop"] = loop_ms / r["ms"]
    return rows


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def goals_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal with the measured value and whether it is met."""

    def find(**kw: Any) -> dict[str, Any]:
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), {})

    out = []
    fwd = find(op="logprobs", impl="triton", mode="fwd", N=16_384, V=151_936)
    out.append({"goal": "fwd >= 80% peak BW (N=16k, V=152k)", "value": fwd.get("peak_bw_fraction"),
                "target": GOALS["fwd_peak_bw_fraction"]})
    for n, v in LOGPROB_SHAPES:
        tri, ref = find(impl="triton", mode="fwd+bwd", N=n, V=v), find(impl="torch fp32", mode="fwd+bwd", N=n, V=v)
        speed = ref["ms"] / tri["ms"] if tri.get("ms") and ref.get("ms") else None
        out.append({"goal": f"fwd+bwd >= 1.5x fp32 fallback (N={n}, V={v})", "value": speed,
                    "target": GOALS["fwdbwd_speedup_vs_fp32"]})
    for mode in ("fwd", "fwd+bwd"):  # O(N): extra bytes per row must not grow with V
        per_row = {v: find(impl="triton", mode=mode, N=16_384, V=v).get("peak_extra_MiB") for _, v in LOGPROB_SHAPES}
        vals = [x * 2**20 / 16_384 for x in per_row.values() if x is not None]
        out.append({"goal": f"peak extra memory O(N), {mode}: bytes/row at V=32k vs 152k", "value": vals,
                    "target": "flat in V"})
    fused = find(op="linear_logprobs", impl="fused", mode="fwd+bwd", N=16_384)
    mat = find(op="linear_logprobs", impl="materialized", mode="fwd+bwd", N=16_384)
    out.append({"goal": "fused fwd+bwd within 1.2x materialized (N=16k): materialized ms / fused ms",
                "value": mat["ms"] / fused["ms"] if fused.get("ms") and mat.get("ms") else None,
                "target": GOALS["fused_vs_materialized_speed"]})
    out.append({"goal": "fused fwd >= 60% of bf16 matmul peak (N=16k)",
                "value": find(op="linear_logprobs", impl="fused", mode="fwd", N=16_384).get("matmul_peak_fraction"),
                "target": GOALS["fused_fwd_matmul_fraction"]})
    gae = find(op="gae", impl="triton loop", B=256, T=4096)
    out.append({"goal": "GAE >= 50x Python loop (B=256, T=4k)", "value": gae.get("speedup_vs_python_loop"),
                "target": GOALS["gae_speedup_vs_loop"]})
    for g in out:
        if isinstance(g["target"], float) and isinstance(g["value"], float):
            g["met"] = g["value"] >= g["target"]
        elif isinstance(g["value"], list) and len(g["value"]) == 2:
            g["met"] = g["value"][1] <= 1.5 * g["value"][0] + 64
        else:
            g["met"] = None
    return out


def print_table(title: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*[_fmt(r.get(c)) for c in columns])
        Console().print(table)
    except ImportError:
        print(f"\n{title}")
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(_fmt(r.get(c)) for c in columns))


def run_gpu(out_path: str) -> int:
    peak_bw, bw_source = peak_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"device: {device}; peak memory bandwidth: {_fmt(peak_bw and peak_bw / 1e9)} GB/s ({bw_source})")
    rows: list[dict[str, Any]] = []
    for n, v in LOGPROB_SHAPES:
        print(f"log-probs N={n} V={v} ...", flush=True)
        rows += bench_logprobs_shape(n, v, peak_bw)
    matmul_peak = bf16_matmul_peak(device)
    for n in FUSED_NS:
        print(f"fused LM head N={n} H={FUSED_H} V={FUSED_V} ...", flush=True)
        rows += bench_fused_head(n, matmul_peak)
    for b, t in GAE_SHAPES:
        print(f"GAE B={b} T={t} ...", flush=True)
        rows += bench_gae_shape(b, t)
    goals = goals_summary(rows)

    lp_cols = ["impl", "mode", "N", "V", "ms", "GB/s", "peak_bw_fraction", "peak_extra_MiB", "max_abs_err_vs_fp32", "error"]
    print_table("log-probs (bf16 logits)", lp_cols, [r for r in rows if r["op"] == "logprobs"])
    head_cols = ["impl", "mode", "N", "ms", "TFLOP/s", "matmul_peak_fraction", "peak_extra_MiB", "error"]
    print_table(f"LM head + log-probs (bf16, H={FUSED_H}, V={FUSED_V})", head_cols,
                [r for r in rows if r["op"] == "linear_logprobs"])
    gae_cols = ["impl", "B", "T", "ms", "speedup_vs_python_loop", "max_abs_err_vs_loop", "error"]
    print_table("GAE (fp32)", gae_cols, [r for r in rows if r["op"] == "gae"])
    print_table("goals", ["goal", "value", "target", "met"], goals)

    report = {
        "device": device,
        "peak_bw_bytes_per_s": peak_bw,
        "peak_bw_source": bw_source,
        "bf16_matmul_peak_flops": matmul_peak,
        "flops_model": "linear_logprobs: fwd 2*N*V*H, fwd+bwd 6*N*V*H (model FLOPs, not the recompute)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "bytes_model": "fwd: N*V*elt read; fwd+bwd: 3*N*V*elt (read, read, write)",
        "results": rows,
        "goals": goals,
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out_path}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Smoke check (any device; CPU runs the kernels under the interpreter)
# ---------------------------------------------------------------------------------------------------
def run_smoke() -> int:
    from hybrid_ppo import ops
    from hybrid_ppo_kernels.experimental.gae_scan import gae_triton_scan
    from hybrid_ppo_kernels.gae import gae_torch, gae_triton
    from hybrid_ppo_kernels.logprobs import logprobs_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = "natively on CUDA" if device == "cuda" else "under TRITON_INTERPRET=1 on CPU"
    print(f"smoke check {where}: correctness only. Timings need a GPU (run this script on a CUDA machine).")
    failures = 0

    def check(name: str, got: Any, want: Any, **tol: float) -> None:
        nonlocal failures
        try:
            torch.testing.assert_close(got, want, **tol)
            print(f"  ok    {name}")
        except AssertionError as e:
            failures += 1
            print(f"  FAIL  {name}: {str(e).splitlines()[0]}")

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 6, 5003, generator=gen) * 4).to(dtype).to(device)  # V over a block boundary
        y = torch.randint(0, 5003, (3, 6), generator=gen).to(device)
        grads = []
        outs = []
        for backend in ("triton", "torch"):
            leaf = x.clone().requires_grad_(True)
            logits = (leaf + 0)[:, 1:-1]  # a slice, as in logits[:, P-1:-1]
            out = ops.logprobs(logits, y[:, 1:-1], temperature=0.8, with_entropy=True, backend=backend,
                               inplace_backward=True)
            (out.logprobs.sum() + out.entropy.sum()).backward()
            outs.append(tuple(t.detach() for t in out))
            grads.append(leaf.grad)
        check(f"logprobs + entropy forward, {dtype}", outs[0], outs[1], atol=1e-5, rtol=1e-5)
        grad_tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=1.6e-2)
        check(f"logprobs + entropy backward (in place), {dtype}", grads[0], grads[1], **grad_tol)
    for dtype in (torch.float32, torch.bfloat16):  # the fused LM head: the launchers' own tiles, ragged
        hidden = torch.randn(70, 80, generator=gen).to(device, dtype)
        weight = (torch.randn(1003, 80, generator=gen) * 0.1).to(device, dtype)
        labels = torch.randint(0, 1003, (70,), generator=gen).to(device)
        results = []
        for backend in ("triton", "torch"):
            h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            out = ops.linear_logprobs(h, w, labels, temperature=0.8, with_entropy=True, backend=backend)
            results.append((out.logprobs.detach(), out.entropy.detach(),
                            *torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), [h, w])))
        check(f"fused LM-head forward, {dtype}", results[0][:2], results[1][:2], atol=1e-5, rtol=1e-5)
        grad_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=1.6e-2)
        if device == "cuda" and dtype == torch.bfloat16:  # the bf16 [chunk, V] gradient buffer: one more rounding
            grad_tol = dict(atol=1e-2, rtol=1.6e-2)
        check(f"fused LM-head backward, {dtype}", results[0][2:], results[1][2:], **grad_tol)
    ref = logprobs_torch(x.float(), y)[0]
    check("fp32 fallback formula", ref, fallback_logprobs(x.float(), y), atol=1e-5, rtol=1e-5)

    r, v = torch.randn(5, 77, generator=gen).to(device), torch.randn(5, 77, generator=gen).to(device)
    lengths = torch.tensor([77, 40, 1, 0, 60])
    mask = (torch.arange(77)[None, :] >= (77 - lengths)[:, None]).to(device)
    want = gae_torch(r, v, mask, 0.99, 0.95)
    for variant, kernel in (("loop", gae_triton), ("scan", gae_triton_scan)):
        check(f"GAE {variant} kernel", kernel(r, v, mask, 0.99, 0.95), want, atol=1e-5, rtol=1e-5)
    print("smoke check passed" if failures == 0 else f"smoke check FAILED: {failures} mismatch(es)")
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_kernels.json", help="where to write the JSON results (GPU only)")
    parser.add_argument("--smoke", action="store_true", help="correctness-only check, also on a GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # kernels jit at first launch, so this is early enough
        return run_smoke()
    if args.smoke:
        return run_smoke()
    return run_gpu(args.out)


if __name__ == "__main__":
    sys.exit(main())
