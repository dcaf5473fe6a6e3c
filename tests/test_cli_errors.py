"""The CLI as a user runs it (a subprocess): every error a user can act on is one line on stderr,
`hybrid-ppo: <message>`, no traceback, a non-zero exit, and no run directory when the error
could be found before the run started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, extra_path: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "kernels"), *([str(extra_path)] if extra_path else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, "-m", "hybrid_ppo.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(out: subprocess.CompletedProcess, message: str, code: int | None = None) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("hybrid-ppo:")]
    assert out.returncode != 0, out.stderr[-2000:]
    if code is not None:
        assert out.returncode == code
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert len(lines) == 1, out.stderr[-3000:]
    assert message in lines[0], lines[0]
    return lines[0]


BAD_INPUTS = {
    "config value": (["algo.gamma=3"], "config key 'algo.gamma': got 3.0; allowed: a number in [0, 1]", 2),
    "unknown key": (["algo.gama=0.9"], "config key 'algo.gama'", 2),
    "missing prompts": (["data.prompts={tmp}/none.jsonl", "data.eval_prompts={tmp}/none.jsonl"],
                        "none.jsonl' does not exist", 1),
    "bad prompt line": (["data.prompts={tmp}/bad.jsonl", "data.eval_prompts={tmp}/bad.jsonl"],
                        "bad.jsonl:2: 'prompt' must be a string or a list of", 1),
    "model directory": (["model.actor={tmp}/no-model"], "is not a directory", 1),
    "model without config.json": (["model.actor={tmp}"], "has no config.json: not a Hugging Face model directory", 1),
    "reward function": (["model.reward_fn=hybrid_ppo.tasks.max_digit:nope"], "has no function 'nope'", 1),
    "reward module syntax": (["model.reward_fn=broken_rewards:score"],
                             "syntax error in {tmp}/broken_rewards.py:2", 1),
    "infeasible placement": (["placement.gpu_per_role=0.5"], "infeasible placement plan", 2),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One warm-up cache for the module: the builtin model is warmed up once, not per case."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_no_run_directory(tmp_path, cache, case):
    overrides, message, code = BAD_INPUTS[case]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "max 1 2 3 4 ="}\n{"prompt": 5}\n')
    (tmp_path / "broken_rewards.py").write_text("def score(prompts, responses, labels):\n    return [1.0 for\n")
    args = [o.format(tmp=tmp_path) for o in overrides]
    out = run_cli("train", *args, "warmup.steps=20", f"logging.output_dir={tmp_path}/runs",
                  f"logging.cache_dir={cache}", "logging.run_name=bad", cwd=tmp_path)
    assert_one_line(out, message.format(tmp=tmp_path), code)
    assert not (tmp_path / "runs" / "bad").exists()


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    out = run_cli("resume", str(tmp_path / "nothing-here"), cwd=tmp_path)
    assert_one_line(out, "is not a run directory (no config.yaml)", 1)
    out = run_cli("resume", cwd=tmp_path)
    assert_one_line(out, "resume needs the run directory", 1)


@pytest.mark.slow
def test_a_hanging_reward_function_fails_the_run_in_one_line(tmp_path, cache):
    """A failure inside a run: one line that points at train.log, which holds the traceback."""
    (tmp_path / "slow_rewards.py").write_text("import time\n\ndef hangs(prompts, responses, labels):\n"
                                              "    time.sleep(600)\n")
    out = run_cli("train", "model.reward_fn=slow_rewards:hangs", "model.reward_timeout_s=2", "warmup.steps=20",
                  "data.eval_size=16", "placement.executor=local", "placement.num_gpus=1",
                  "logging.tensorboard=false", f"logging.output_dir={tmp_path}/runs",
                  f"logging.cache_dir={cache}", "logging.run_name=hang", cwd=tmp_path, extra_path=tmp_path)
    run_dir = tmp_path / "runs" / "hang"
    line = assert_one_line(out, "reward function slow_rewards:hangs did not return within "
                                "model.reward_timeout_s = 2 s", 1)
    assert f"traceback in {run_dir / 'train.log'}" in line
    assert "Traceback" in (run_dir / "train.log").read_text()
