"""Run outputs: metrics.jsonl (always), TensorBoard events (optional), the memory timeline.

Metric names are namespaced like cleanrl's charts: rollout/, reward/, kl/, loss/, actor/,
critic/, eval/, memory/, time/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from hybrid_ppo.atomic_file import write_text_atomic
from hybrid_ppo.errors import Diverged
from hybrid_ppo.memory.plan import CHECKPOINT_PHASES
from hybrid_ppo.memory.scheduler import Move
from hybrid_ppo.samples import FILE_NAME as SAMPLES_FILE


class MetricsWriter:
    """Appends to a run's metrics. `resume_after=k` (a resume from iteration k's checkpoint) first
    drops whatever a dead attempt logged past k, so no iteration appears twice or goes missing."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_after: int | None = None,
                 tags: dict[str, str] | None = None, tracker: Any = None):
        self.tags = dict(tags or {})
        self.tracker = tracker
        """A `wandb_run.WandbRun` (or None): sent the same metrics as TensorBoard, closed with the writer."""
        """Written on every metrics.jsonl line (e.g. the advantage estimator), never to TensorBoard."""
        self.path = run_dir / "metrics.jsonl"
        if resume_after is not None:
            keep_through(self.path, resume_after)
            keep_through(run_dir / SAMPLES_FILE, resume_after)
            keep_timeline_through(run_dir / "memory_timeline.jsonl", resume_after)
        self._file = self.path.open("a")
        self._timeline = (run_dir / "memory_timeline.jsonl").open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the dead attempt's events from k+1 on.
            purge = None if resume_after is None else resume_after + 1
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise Diverged(f"non-finite metric(s) at iteration {step}: {', '.join(bad)}")
        self._file.write(json.dumps({"iteration": step, **self.tags, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def log_moves(self, step: int, moves: Iterable[Move]) -> None:
        for move in moves:
            self._timeline.write(json.dumps({"iteration": step, **move.as_record()}) + "\n")
        self._timeline.flush()

    def close(self) -> None:
        self._file.close()
        self._timeline.close()
        if self._tb is not None:
            self._tb.close()
        if self.tracker is not None:
            self.tracker.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl (or memory timeline) file; [] when there is none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_through(path: Path, iteration: int) -> None:
    """Rewrite a JSONL log with only the records of iterations <= `iteration` (atomically)."""
    if not path.is_file():
        return
    records = [r for r in read_metrics(path) if r["iteration"] <= iteration]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def keep_timeline_through(path: Path, iteration: int) -> None:
    """Rewrite a memory timeline with what led up to checkpoint `iteration`, atomically.

    Moves are logged under the iteration the trainer had finished when they ran, so label k
    holds an eval after iteration k, checkpoint k's save moves, then the dead attempt's next
    iteration: keep records labelled < k, and those labelled k through the end of the save."""
    if not path.is_file():
        return
    records = read_metrics(path)
    at_k = [i for i, r in enumerate(records) if r["iteration"] == iteration]
    saves = [i for i in at_k if records[i].get("phase") in CHECKPOINT_PHASE_NAMES]
    end = -1
    if saves:  # the end of the first block of save moves
        end = saves[0]
        while end + 1 < len(records) and records[end + 1]["iteration"] == iteration \
                and records[end + 1].get("phase") in CHECKPOINT_PHASE_NAMES:
            end += 1
    kept = [r for i, r in enumerate(records) if r["iteration"] < iteration or r["iteration"] == iteration and i <= end]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


CHECKPOINT_PHASE_NAMES = frozenset(p.value for p in CHECKPOINT_PHASES)


def combine(key: str, values: list[float]) -> float:
    """One value from many (micro-batches, ranks): `*_max` / `*_min` keep the extreme, the rest average."""
    if key.endswith("_max"):
        return max(values)
    if key.endswith("_min"):
        return min(values)
    return sum(values) / len(values)


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Combine each metric over the ranks that reported it (`combine`)."""
    keys = {k for stats in per_rank for k in stats}
    return {k: combine(k, [s[k] for s in per_rank if k in s]) for k in sorted(keys)}


def peak_memory(moves: Iterable[Move]) -> dict[str, Any]:
    """Highest reading any rank reported after the moves, per field (device GiB on GPU, host RSS on CPU)."""
    peaks: dict[str, float] = {}
    for move in moves:
        for rank in move.ranks:
            for field, value in rank["after"].items():
                if value is not None:
                    peaks[field] = max(peaks.get(field, 0.0), value)
    return peaks
