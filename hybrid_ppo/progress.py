"""Progress for long loops: a rich bar on a terminal, one plain log line per iteration otherwise."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("hybrid_ppo")

SHOWN = ("reward/mean", "kl/mean", "loss/policy", "loss/value")


def _summary(stats: dict[str, float]) -> str:
    return "  ".join(f"{k}={stats[k]:.4f}" for k in SHOWN if k in stats)


@contextmanager
def iteration_progress(total: int, done: int = 0) -> Iterator[Callable[[dict[str, float]], None]]:
    """Yields `advance(stats)`, to call once per finished iteration (`done`: already finished, on resume)."""
    if not sys.stdout.isatty():
        def advance(stats: dict[str, float]) -> None:
            nonlocal done
            done += 1
            log.info("iteration %d/%d  %s", done, total, _summary(stats))

        yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}")) as bar:
        task = bar.add_task("", total=total, completed=done)
        yield lambda stats: bar.update(task, advance=1, description=_summary(stats))
