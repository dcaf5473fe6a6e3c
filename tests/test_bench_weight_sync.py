"""The weight-sync benchmark stays runnable: a small model, one measured sync, the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_weight_sync.py"
KEYS = {"model_bytes", "bucket_bytes", "seconds_median", "gbps", "memcpy_gbps", "driver_bytes",
        "engine_peak_extra_bytes", "staging_bytes_per_rank"}


@pytest.mark.slow
def test_bench_weight_sync_writes_its_json(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--params", "3M", "--syncs", "1", "--bucket-mb", "2",
                          "--json", str(tmp_path / "sync.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "sync.json").read_text())
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert result["seconds_median"] > 0 and result["gbps"] > 0 and result["memcpy_gbps"] > 0
    assert result["bucket_bytes"] <= result["staging_bytes_per_rank"] < result["model_bytes"]
    # Only handles and names cross the driver: far less than the weights themselves.
    assert 0 < result["driver_bytes"] < result["model_bytes"] / 10
    assert "delivered / memcpy" in out.stdout
