"""The benchmark script stays runnable: on CPU it is a correctness smoke check under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


def test_bench_smoke_check_passes(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke check passed" in out.stdout
    assert "  ok    GAE loop kernel" in out.stdout
    assert "  ok    fused LM-head backward, torch.bfloat16" in out.stdout


def test_linear_logprobs_bench_runs_and_marks_computed_rows(tmp_path):
    """The CPU LM-head benchmark at a tiny N: the fused case runs and is measured; a materialized case
    over --budget-gib is not run and its row says so (the estimate, marked as computed)."""
    import json

    script = SCRIPT.parent / "bench_linear_logprobs.py"
    out_json = tmp_path / "ll.json"
    out = subprocess.run([sys.executable, str(script), "--n", "8", "--hidden", "64", "--vocab", "4000",
                          "--budget-gib", "0.0001", "--out", str(out_json)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["path"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["fused"]["run"] and rows["fused"]["seconds"] > 0 and rows["fused"]["peak_extra_bytes"] > 0
    assert not rows["materialized"]["run"] and rows["materialized"]["peak_extra_bytes"] == 6 * 8 * 4000 * 4
    assert "(computed)" in out.stdout
