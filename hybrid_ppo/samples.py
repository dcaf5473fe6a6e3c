"""`samples.jsonl`: a few rollouts per iteration, so a user can read what the policy generates.

One JSON object per sample: `iteration`, `prompt` (the text the model saw, after the chat
template), `response` (decoded, without special tokens), `reward` and `label`. Lines are
appended and flushed each iteration, so a crashed run keeps what it had written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

FILE_NAME = "samples.jsonl"


class SampleLog:
    def __init__(self, run_dir: Path, per_iteration: int, tracker: Any = None):
        self.path, self.per_iteration = Path(run_dir) / FILE_NAME, per_iteration
        self.tracker = tracker
        """Also given each iteration's rows (`wandb_run.WandbRun.log_samples`), or None."""

    def write(self, iteration: int, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float],
              labels: Sequence[Any]) -> None:
        """The first `per_iteration` samples of the batch (batches are already shuffled)."""
        count = min(self.per_iteration, len(responses))
        if count == 0:
            return
        rows = [{"prompt": prompts[i], "response": responses[i], "reward": float(rewards[i]), "label": labels[i]}
                for i in range(count)]
        with self.path.open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({"iteration": iteration, **row}, ensure_ascii=False, default=str) + "\n")
        if self.tracker is not None:
            self.tracker.log_samples(iteration, rows)
