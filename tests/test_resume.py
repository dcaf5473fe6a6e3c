"""A long run survives a crash: kill it (SIGKILL mid-save; a dead role; SIGTERM), resume it, and
iterations k+1..N match a straight run exactly. Real DeepSpeed checkpoints, the CLI as a user
runs it (subprocesses), the local executor and real Ray with 2 fake GPUs.

Tolerance: zero. A repeat of the straight run reproduces every metric bit for bit, with either
executor (measured: local and Ray, 4 iterations), and so does a resumed run; timings and memory
readings are left out of the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hybrid_ppo.checkpoint import CHECKPOINTS, latest_checkpoint, read_state
from hybrid_ppo.config import load_config
from helpers import IN_PROCESS

REPO = Path(__file__).resolve().parents[1]
NOT_COMPARED = ("time/", "memory/", "rollout/tokens_per_s", "rollout/sync_seconds",  # wall-clock timings
                "estimator")  # a tag on every line, not a metric
SMALL = ["warmup.steps=20", "data.eval_size=16", "logging.tensorboard=false"]
LOCAL = list(IN_PROCESS)


def metrics_by_iteration(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every compared metric per iteration; a key logged twice for one iteration is an error."""
    merged: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        it = record.pop("iteration")
        for key, value in record.items():
            if key.startswith(NOT_COMPARED):
                continue
            assert key not in merged.setdefault(it, {}), f"{key} logged twice for iteration {it}"
            merged[it][key] = value
    return merged


def assert_same_metrics(run_dir: Path, straight: Path) -> None:
    """Equal per iteration and key; the message names every key that differs."""
    got, want = metrics_by_iteration(run_dir), metrics_by_iteration(straight)
    assert sorted(got) == sorted(want), f"iterations {sorted(got)} vs {sorted(want)}"
    differing = {(it, key): (got[it].get(key), want[it].get(key)) for it in want
                 for key in set(got[it]) | set(want[it]) if got[it].get(key) != want[it].get(key)}
    assert not differing, f"(iteration, key): (resumed, straight): {differing}"


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "hybrid_ppo.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before the moment to kill it: {proc.stderr.read()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail("timed out waiting for the run")


def saved_iteration(run_dir: Path) -> int | None:
    try:
        checkpoint = latest_checkpoint(run_dir)
    except Exception:
        return None
    return None if checkpoint is None else read_state(checkpoint)["iteration"]


@pytest.fixture(scope="module")
def cache():
    path = tempfile.mkdtemp(prefix="hppo", dir="/tmp")  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_matches_the_straight_run(tmp_path, cache):
    from hybrid_ppo.launch import resume, train

    common = [*SMALL, *LOCAL, "train.iterations=6", "train.save_every=1", f"logging.output_dir={tmp_path}",
              f"logging.cache_dir={cache}"]
    straight = train(load_config(None, [*common, "logging.run_name=straight"])).run_dir

    killed = tmp_path / "killed"
    proc = cli("train", *common, "logging.run_name=killed")

    def mid_save() -> Path | None:  # a save in progress, after at least one complete checkpoint
        root = killed / CHECKPOINTS
        tmp = [p for p in root.glob("iter_*.tmp") if int(p.name[5:11]) >= 2] if root.is_dir() else []
        if not tmp:
            return None
        proc.send_signal(signal.SIGSTOP)  # freeze it, then make sure it is still mid-save
        if tmp[0].is_dir():
            return tmp[0]
        proc.send_signal(signal.SIGCONT)
        return None

    partial = wait_for(mid_save, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    k = saved_iteration(killed)
    assert k is not None and k < int(partial.name[5:11]) < 6  # latest still names the previous, complete one

    resume(killed, [])
    assert_same_metrics(killed, straight)
    samples = [(run / "samples.jsonl").read_text().splitlines() for run in (killed, straight)]
    assert samples[0] == samples[1] and samples[0]  # the dead attempt's samples past k are gone
    assert sorted(metrics_by_iteration(killed)) == list(range(7))
    assert "resuming" in (killed / "train.log").read_text()


def assert_no_traceback(stderr: str) -> None:
    at = stderr.find("Traceback")
    assert at < 0, stderr[max(0, at - 1500):at + 1500]


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


@pytest.mark.slow
def test_ray_run_survives_a_dead_role_and_sigterm(tmp_path, cache):
    """Under Ray: kill a critic rank after the first checkpoint (one line, exit within 60 s,
    resumable); resume, SIGTERM it (it checkpoints, exits 143, takes Ray down); resume to the end.
    The metrics match the straight run's."""
    from hybrid_ppo.launch import resume, train

    common = [*SMALL, "train.iterations=6", "train.save_every=2", f"logging.output_dir={tmp_path}",
              f"logging.cache_dir={cache}"]
    straight = train(load_config(None, [*common, "logging.run_name=straight"])).run_dir
    run_dir = tmp_path / "crashy"

    proc = cli("train", *common, "logging.run_name=crashy")
    wait_for(lambda: saved_iteration(run_dir), proc, poll=0.01)
    critic = next(p for p in descendants(proc.pid) if "Critic" in command_line(p))
    critic.kill()  # SIGKILL, by pid: the process this test started
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 60 and proc.returncode == 1
    assert_no_traceback(stderr)
    line = [x for x in stderr.splitlines() if x.startswith("hybrid-ppo:")]
    assert len(line) == 1 and "role 'critic' rank" in line[0] and "the process died" in line[0], stderr[-3000:]
    assert f"`hybrid-ppo resume {run_dir}` continues from iter_" in line[0]

    first = saved_iteration(run_dir)
    proc = cli("resume", str(run_dir))
    wait_for(lambda: (saved_iteration(run_dir) or 0) > first, proc, poll=0.01)
    ray_processes = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert_no_traceback(stderr)
    assert "hybrid-ppo: stopped by SIGTERM after iteration" in stderr
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [command_line(p) for p in alive]
    assert saved_iteration(run_dir) > first  # the stop wrote its own checkpoint

    resume(run_dir, [])
    assert_same_metrics(run_dir, straight)
