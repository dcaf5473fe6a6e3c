#!/usr/bin/env python
"""Memory report of a finished run: a thin wrapper around `hybrid-ppo profile`'s report writer.

    python scripts/profile_memory.py RUN_DIR     # writes RUN_DIR/memory_report.{json,txt}, memory_timeline.png

To run and profile in one go, use `hybrid-ppo profile [CONFIG] [key=value ...]` instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hybrid_ppo.config import load_config
from hybrid_ppo.profile_run import write_profile


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    result = write_profile(run_dir, load_config(run_dir / "config.yaml"))
    print(result.table)
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
