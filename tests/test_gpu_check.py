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
    """The real bundle; built here (pip, ~20 s; needs PyPI, as CI has) when this checkout has none yet."""
    env = {**os.environ, "PYTHON": sys.executable}
    if not any(BUNDLE.glob("*.whl")) or not (REPO / ".gpu_bundle" / "1" / "PARTS").exists():
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
    parts = int((REPO / ".gpu_bundle" / "1" / "PARTS").read_text())
    assert parts >= 2  # Ray's wheel alone is over one part: the bundle must travel in several
    assert all(f"part {k} of {parts} ok" in lines for k in range(1, parts + 1))
    assert any(line.startswith(f"joined {parts} part(s):") for line in lines)
    assert any(line.startswith("profile config plans: fits:") for line in lines)
    for step in STEPS:
        assert any(line.startswith(f"would run [{step},") for line in lines), step
    assert not Path("/tmp/gpu_check_dry_run_out").exists()  # a dry run writes nothing


def test_a_part_command_checks_what_it_brought(bundle):
    """Run 1 of the header: bring a part, check it, run nothing else."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/tmp/gpu_check_part_out"}
    for part, code, said in ((1, 0, "part 1 of "), (99, 1, "part 99: not in .gpu_bundle/99/")):
        out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--part", str(part)], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == code and out.stdout.startswith(said), out.stdout + out.stderr
    shutil.rmtree("/tmp/gpu_check_part_out", ignore_errors=True)


def test_every_part_fits_one_device_command(bundle):
    parts = sorted((REPO / ".gpu_bundle").iterdir())
    assert parts and all(sum(f.stat().st_size for f in p.iterdir()) < 60 << 20 for p in parts)


def test_bundle_check_names_what_is_missing(bundle, tmp_path):
    for wheel in bundle.glob("*.whl"):
        if not wheel.name.startswith("hjson"):
            shutil.copy(wheel, tmp_path)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_gpu_bundle.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "bundle: missing a wheel of hjson" in out.stdout
    assert "needs hjson: neither in the bundle nor in the GPU image" in out.stdout
