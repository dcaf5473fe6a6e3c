#!/usr/bin/env python
"""Kill a process of a run at a chosen phase, resume, and check the result is the straight run's.

    python scripts/chaos.py [--cells critic:0:train_critic actor:1:checkpoint_actor:4 driver:-:generate ...]

For every cell ROLE:RANK:PHASE[:ITERATION] it runs `hybrid-ppo train` (default job, small: 6 iterations,
a checkpoint every 2), watches `memory_timeline.jsonl` from outside, and SIGKILLs the process as
soon as the run enters PHASE of iteration `--at` (the scheduler logs its moves at phase entry;
a phase that moves nothing is not seen, so pick phases that move something). ROLE is a role
(actor, critic, reference, rollout, reward) or `driver`; RANK orders a role's processes by start
time; ITERATION (default `--at`) is as the timeline logs it: 0-based inside an iteration, the
number of iterations done for a save (saves come after iterations 2, 4, 6). Then it runs `hybrid-ppo resume RUN_DIR` to the end and compares metrics.jsonl with a
straight run, every metric but timings and memory readings, for equality (as tests/test_resume.py).

No hook inside the run: the kill comes from here, so normal runs pay nothing for it.
Prints the matrix (detected: seconds from the kill to the one-line error, or for the driver to
the last Ray process gone; one line without a traceback; `latest` still complete; resumed;
identical) and writes `chaos.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"actor": "Actor", "critic": "Critic", "reference": "Reference", "rollout": "RolloutWorker",
           "reward": "RewardModel"}
"""Role -> the class whose name Ray puts in its actor processes' titles (`ray::Critic.train`)."""
NOT_COMPARED = ("time/", "memory/", "rollout/tokens_per_s", "rollout/sync_seconds", "estimator")
DEFAULT_CELLS = ["critic:0:train_critic", "actor:1:train_actor", "reference:0:score_reference",
                 "rollout:0:generate", "actor:0:checkpoint_actor:4", "driver:-:sync"]


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    return subprocess.Popen([sys.executable, "-m", "hybrid_ppo.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        it = record.pop("iteration")
        merged.setdefault(it, {}).update({k: v for k, v in record.items() if not k.startswith(NOT_COMPARED)})
    return merged


def latest_iteration(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        state = pointer.parent / pointer.read_text().strip() / "trainer_state.json"
        return json.loads(state.read_text())["iteration"]
    except (OSError, ValueError):
        return None


def wait_for_phase(run_dir: Path, proc: subprocess.Popen, iteration: int, phase: str, timeout: float) -> bool:
    path, offset, deadline = run_dir / "memory_timeline.jsonl", 0, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind("\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                r = json.loads(line)
                if r.get("iteration") == iteration and r.get("phase") == phase:
                    return True
        time.sleep(0.002)
    return False


def target(driver: psutil.Process, role: str, rank: str) -> psutil.Process:
    if role == "driver":
        return driver
    ranks = []
    for p in driver.children(recursive=True):
        try:
            if f"ray::{CLASSES[role]}" in " ".join(p.cmdline()):
                ranks.append(p)
        except psutil.Error:
            pass
    ranks.sort(key=lambda p: p.create_time())
    return ranks[int(rank)]


def run_cell(cell: str, common: list[str], out: Path, at: int, straight: Path) -> dict:
    role, rank, phase, *when = cell.split(":")
    at = int(when[0]) if when else at
    name = cell.replace(":", "_").replace("-", "x")
    run_dir = out / name
    result = {"cell": cell, "killed": False}
    proc = cli("train", *common, f"logging.run_name={name}")
    if not wait_for_phase(run_dir, proc, at, phase, timeout=900):
        proc.kill()
        result["error"] = f"never saw phase {phase} of iteration {at}: {proc.communicate()[1][-500:]}"
        return result
    driver = psutil.Process(proc.pid)
    victim = target(driver, role, rank)
    family = driver.children(recursive=True)
    saving = latest_iteration(run_dir)
    victim.send_signal(signal.SIGKILL)  # by pid: a process this script started
    killed_at = time.monotonic()
    result["killed"] = True
    if role == "driver":
        _, alive = psutil.wait_procs(family, timeout=120)
        result["detected_s"] = round(time.monotonic() - killed_at, 1)
        result["left_alive"] = len(alive)
        proc.wait()
        stderr = ""
        result["one_line"] = None
    else:
        try:
            stderr = proc.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            stderr = proc.communicate()[1]
        result["detected_s"] = round(time.monotonic() - killed_at, 1)
        lines = [x for x in stderr.splitlines() if x.startswith("hybrid-ppo:")]
        result["one_line"] = len(lines) == 1 and "Traceback" not in stderr and proc.returncode == 1
        result["message"] = lines[0][:300] if lines else stderr[-300:]
    after = latest_iteration(run_dir)
    result["latest_before_kill"], result["latest_after_kill"] = saving, after
    result["latest_complete"] = after is not None and (after == saving or not phase.startswith("save"))
    resumed = cli("resume", str(run_dir))
    stderr = resumed.communicate()[1]
    result["resumed"] = resumed.returncode == 0
    if not result["resumed"]:
        result["resume_error"] = stderr[-500:]
        return result
    got, want = metrics(run_dir), metrics(straight)
    differing = sorted({f"{it}:{k}" for it in set(got) | set(want) for k in set(got.get(it, {})) | set(want.get(it, {}))
                        if got.get(it, {}).get(k) != want.get(it, {}).get(k)})
    result["identical"] = not differing
    result["differing"] = differing[:10]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", default=DEFAULT_CELLS, metavar="ROLE:RANK:PHASE")
    parser.add_argument("--at", type=int, default=3, help="the iteration (0-based, as the timeline logs it) to kill in")
    parser.add_argument("--output-dir", default=str(REPO / "runs" / time.strftime("chaos-%Y%m%d-%H%M%S")))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    out = Path(args.output_dir)
    common = ["warmup.steps=20", "data.eval_size=16", "logging.tensorboard=false", "train.iterations=6",
              "train.save_every=2", f"logging.output_dir={out}", *args.set]
    straight = cli("train", *common, "logging.run_name=straight")
    if straight.wait() != 0:
        print(straight.stderr.read()[-2000:], file=sys.stderr)
        return 1
    rows = []
    for cell in args.cells:
        rows.append(run_cell(cell, common, out, args.at, out / "straight"))
        print(json.dumps(rows[-1]), flush=True)
        (out / "chaos.json").write_text(json.dumps({"common": common, "at": args.at, "rows": rows}, indent=1))
    print(f"\n{'cell':<28} {'detected s':>10} {'one line':>8} {'latest ok':>9} {'resumed':>7} {'identical':>9}")
    for r in rows:
        print(f"{r['cell']:<28} {r.get('detected_s', '-')!s:>10} {r.get('one_line', '-')!s:>8} "
              f"{r.get('latest_complete', '-')!s:>9} {r.get('resumed', '-')!s:>7} {r.get('identical', '-')!s:>9}")
    ok = all(r.get("resumed") and r.get("identical") and r.get("latest_complete") and r.get("detected_s", 99) < 60
             and r.get("one_line") is not False for r in rows)
    print(f"wrote {out / 'chaos.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
