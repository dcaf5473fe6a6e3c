"""scripts/gpu_check.sh --dry-run: the GPU bundle and every command it would run, checked on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / ".whl"
STEPS = ("install", "versions", "pytest_gpu", "bench_kernels", "random_model", "plan", "profile")


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The real bundle; built here (pip, ~10 s) when this checkout has none yet."""
    env = {**os.environ, "PYTHON": sys.executable}
    if not any(BUNDLE.glob("*.whl")):
        subprocess.run([str(REPO / "scripts" / "make_gpu_bundle.sh")], check=True, env=env, capture_output=True)
    return BUNDLE


@pytest.mark.slow
def test_dry_run(bundle):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/tmp/gpu_check_dry_run_out"}
    out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "dry run ok" in lines and "the wheels install for CPython 3.12" in lines
    assert any(line.startswith("profile config plans: fits:") for line in lines)
    for step in STEPS:
        assert any(line.startswith(f"would run [{step},") for line in lines), step
    assert not Path("/tmp/gpu_check_dry_run_out").exists()  # a dry run writes nothing


def test_bundle_check_names_what_is_missing(bundle, tmp_path):
    for wheel in bundle.glob("*.whl"):
        if not wheel.name.startswith("hjson"):
            shutil.copy(wheel, tmp_path)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_gpu_bundle.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "bundle: missing a wheel of hjson" in out.stdout
    assert "needs hjson: neither in the bundle nor in the GPU image" in out.stdout
