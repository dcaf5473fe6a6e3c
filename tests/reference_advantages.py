"""The driver-side GAE the estimator must agree with (algo/estimators.py runs it on the ranks,
whitening with all-reduced sums): kept here, as the tests' oracle, not shipped."""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid_ppo import ops
from hybrid_ppo.algo.advantages import Advantages, whiten


@torch.no_grad()
def compute_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                       whiten_advantages: bool = True, backend: str = "auto") -> Advantages:
    """GAE advantages and returns (`ops.gae`), then optionally whitened advantages. Returns are
    A + V from the raw advantages, so whitening changes only what the actor sees."""
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return Advantages(advantages=advantages, returns=returns)
