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
