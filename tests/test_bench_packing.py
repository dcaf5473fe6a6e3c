"""The packing benchmark stays runnable: a tiny long-tailed batch, both paths, the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_packing.py"
KEYS = {"padding_fraction_padded", "padding_fraction_packed", "train_tokens_per_s_padded", "train_tokens_per_s_packed",
        "logprob_max_abs_diff", "loss_abs_diff", "peak_memory_max_over_median_packed"}


@pytest.mark.slow
def test_bench_packing_writes_its_json(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--rows", "4", "--median", "6", "--max-len", "24",
                          "--micro-batch", "2", "--hidden", "64", "--layers", "1", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "p.json").read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["padding_fraction_packed"] == 0.0 < result["padding_fraction_padded"]
    assert result["tokens_processed_packed"] == result["real_tokens"] < result["tokens_processed_padded"]
    assert result["logprob_max_abs_diff"] < 1e-5 and result["grad_max_abs_diff_over_max"] < 1e-4
    assert "train speed-up" in out.stdout


def test_bench_prefix_sharing_runs_and_agrees(tmp_path):
    """In process and tiny (not timed): the three layouts give the same log-probs and gradient, and
    the shared one runs fewer tokens."""
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_prefix_sharing import main

    report = main(["--samples", "2", "4", "--prompts", "2", "--response", "4", "--vocab", "300", "--hidden", "64",
                   "--intermediate", "128", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                   "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["runs"] == report["runs"]
    for run in report["runs"]:
        assert run["tokens_processed_shared"] == run["distinct_tokens"] < run["tokens_processed_packed"] == run["real_tokens"]
        assert run["logprob_max_abs_diff"] < 1e-5 and run["grad_max_abs_diff_over_max"] < 1e-4
