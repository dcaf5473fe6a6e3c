"""Weights & Biases beside TensorBoard: the same iteration metrics, and the samples as a table.

On when `logging.wandb_project` is set; wandb is not imported otherwise, so it costs nothing off.
Offline (`WANDB_MODE=offline`, as on machines with no network) the run is written under
RUN_DIR/wandb for a later `wandb sync`.

Each attempt of a run (the first, then each resume) is its own wandb run in one group named after
the run directory: a resume from iteration k re-logs k+1, k+2, ..., and wandb cannot take back
what a dead attempt logged past k (TensorBoard's purge_step can), so the attempts stay apart
rather than overwriting each other in one history. Every metric is plotted against `iteration`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from hybrid_ppo.config import Config, ConfigError

SAMPLE_COLUMNS = ("prompt", "response", "reward", "label")


def check_wandb_installed(cfg: Config) -> None:
    """Before the run directory exists: a project set without the package is a config error."""
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb_project", cfg.logging.wandb_project,
                          "a project with the wandb package installed (pip install -e '.[wandb]')")


class WandbRun:
    def __init__(self, cfg: Config, run_dir: Path, resume_after: int | None = None):
        check_wandb_installed(cfg)
        import wandb

        self._wandb = wandb
        name = cfg.logging.wandb_run_name or run_dir.name
        self.run = wandb.init(
            project=cfg.logging.wandb_project, name=name if resume_after is None else f"{name}-resume{resume_after}",
            group=run_dir.name, tags=list(cfg.logging.wandb_tags), dir=str(run_dir), config=cfg.to_dict(),
            job_type="train" if resume_after is None else "resume",
        )
        self.run.define_metric("*", step_metric="iteration")

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        self.run.log({"iteration": iteration, **metrics})

    def log_samples(self, iteration: int, rows: Sequence[dict[str, Any]]) -> None:
        data = [[str(row[column]) if column == "label" else row[column] for column in SAMPLE_COLUMNS] for row in rows]
        self.run.log({"iteration": iteration, "samples": self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=data)})

    def close(self) -> None:
        self.run.finish()
        # finish() returns before wandb's service has written the run out (measured: offline, the
        # log file was still empty); teardown waits for it, so a run that ends here is whole on disk.
        self._wandb.teardown()
