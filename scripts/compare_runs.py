#!/usr/bin/env python
"""Whole jobs side by side: held-out score before and after, wall time, peak host memory.

    python scripts/compare_runs.py configs/tiny-cpu.yaml configs/tiny-cpu-grpo.yaml [--set key=value ...]

Runs `hybrid-ppo train CONFIG` for each config, one after the other, and samples the resident
memory of the whole process tree (the driver, Ray's own processes and every role actor) every
0.2 s. The peak is the sum of RSS over that tree: pages shared between processes (torch's
libraries, Ray's object store in /dev/shm) count once per process, so it overstates what the
box needs, but the same way for every config. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SAMPLE_S = 0.2
SCORE_LINE = re.compile(r"held-out (accuracy|mean reward): before PPO ([\d.]+) -> after PPO ([\d.]+)")


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # it exited between listing and reading
            pass
    return total


def run_one(config: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hybrid_ppo.cli", "train", config, *overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(SAMPLE_S)
    reader.join()
    seconds = time.perf_counter() - start
    match = next((SCORE_LINE.search(line) for line in reversed(output) if SCORE_LINE.search(line)), None)
    if proc.returncode != 0 or match is None:
        sys.stderr.write("".join(output[-40:]))
        raise SystemExit(f"{config}: exit code {proc.returncode}")
    return {"config": config, "overrides": overrides, "metric": match.group(1), "before": float(match.group(2)),
            "after": float(match.group(3)), "wall_s": round(seconds, 1), "peak_tree_rss_gib": round(peak / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", action="append", default=[], help="an override for every run (key=value)")
    parser.add_argument("--out", default="compare_runs.json")
    args = parser.parse_args(argv)
    rows = [run_one(config, args.set) for config in args.configs]
    print(f"{'config':<32} {'held-out':<12} {'before':>7} {'after':>7} {'wall s':>7} {'peak RSS GiB':>13}")
    for r in rows:
        print(f"{Path(r['config']).name:<32} {r['metric']:<12} {r['before']:>7.3f} {r['after']:>7.3f} "
              f"{r['wall_s']:>7.1f} {r['peak_tree_rss_gib']:>13.2f}")
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
