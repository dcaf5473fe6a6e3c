#!/usr/bin/env python
"""Where every GiB goes, phase by phase.

    python scripts/profile_memory.py RUN_DIR                      # report on a finished run
    python scripts/profile_memory.py --train [CONFIG] [key=value ...]   # run 3 iterations, then report

Prints one row per PPO phase and one column per role (GiB on that role's fullest GPU, after the
phase's residency moves), plus the per-GPU total and the seconds spent moving states, and writes
the same as JSON (`--out`). On a GPU run the readings are torch's allocated device memory; on a
CPU run only each process's host RSS exists, which offloading does not change: profile on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybrid_ppo.memory.report import load_timeline, memory_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="*", help="a run directory, or with --train: [CONFIG] [key=value ...]")
    parser.add_argument("--train", action="store_true", help="train first (train.iterations=3 unless overridden)")
    parser.add_argument("--iteration", type=int, default=None, help="which iteration (default: the last full one)")
    parser.add_argument("--out", default=None, help="JSON path (default: RUN_DIR/memory_report.json)")
    args = parser.parse_args(argv)
    if args.train:
        from hybrid_ppo.cli import _split_args
        from hybrid_ppo.config import load_config
        from hybrid_ppo.launch import train

        path, overrides = _split_args(args.target)
        if not any(o.startswith("train.iterations=") for o in overrides):
            overrides = ["train.iterations=3", *overrides]
        run_dir = train(load_config(path, overrides)).run_dir
    elif len(args.target) == 1:
        run_dir = Path(args.target[0])
    else:
        parser.error("give one run directory, or --train [CONFIG] [key=value ...]")
    report = memory_report(load_timeline(run_dir), args.iteration)
    print(report.table())
    out = Path(args.out) if args.out else run_dir / "memory_report.json"
    out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
