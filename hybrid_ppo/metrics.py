"""Run outputs: metrics.jsonl (always), TensorBoard events (optional), the memory timeline.

Metric names are namespaced like cleanrl's charts: rollout/, reward/, kl/, loss/, actor/,
critic/, eval/, memory/, time/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from hybrid_ppo.memory.scheduler import Move


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._timeline = (run_dir / "memory_timeline.jsonl").open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise FloatingPointError(f"non-finite metric(s) at iteration {step}: {', '.join(bad)}")
        self._file.write(json.dumps({"iteration": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def log_moves(self, step: int, moves: Iterable[Move]) -> None:
        for move in moves:
            self._timeline.write(json.dumps({"iteration": step, **move.as_record()}) + "\n")
        self._timeline.flush()

    def close(self) -> None:
        self._file.close()
        self._timeline.close()
        if self._tb is not None:
            self._tb.close()


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the ranks that reported it."""
    keys = {k for stats in per_rank for k in stats}
    return {k: sum(s[k] for s in per_rank if k in s) / sum(k in s for s in per_rank) for k in sorted(keys)}


def peak_memory(moves: Iterable[Move]) -> dict[str, Any]:
    """Highest reading any rank reported after the moves, per field (device GiB on GPU, host RSS on CPU)."""
    peaks: dict[str, float] = {}
    for move in moves:
        for rank in move.ranks:
            for field, value in rank["after"].items():
                if value is not None:
                    peaks[field] = max(peaks.get(field, 0.0), value)
    return peaks
