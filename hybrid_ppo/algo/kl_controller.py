"""The KL coefficient over a run: fixed, or adaptive (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2).

The adaptive controller is proportional control in log space. With KL the measured KL(π ‖ π_ref)
per sequence and target KL_targ,

    e = clip(KL / KL_targ − 1, −0.2, 0.2)
    β ← β · (1 + e · n / horizon)

after each batch of n samples, so β changes by at most a factor e^0.2 per `horizon` samples.
"""

from __future__ import annotations

from typing import Any

ERROR_CLIP = 0.2
"""The proportional error's bound, from the paper: one batch never moves β by more than 20 % × n / horizon."""


class KLController:
    """β for the next iteration; `update` after each batch. Fixed when `target` is None.
    `state_dict` / `load_state_dict` let a checkpoint carry β across a resume."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init_coef), target, horizon

    def update(self, current_kl: float, num_samples: int) -> float:
        """Move β toward the target after a batch of `num_samples` whose mean KL was `current_kl`."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
            self.value *= 1.0 + error * num_samples / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), state["target"], int(state["horizon"])
