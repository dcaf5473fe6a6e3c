"""The ADVANTAGE phase's pieces: token-level rewards and whitening (GAE itself is ``ops.gae``, called
by algo/estimators.py).

Tensors are ``[B, T]`` over response positions unless noted; ``mask`` is 1 on
response tokens, 0 on prompt and padding (left or right).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from hybrid_ppo.algo.ppo import masked_sum

# Added to the variance before the square root, so a constant batch whitens to
# zeros instead of NaN.
WHITEN_EPS = 1e-8


class Advantages(NamedTuple):
    advantages: Tensor  # [B, T] fp32 GAE advantages (whitened if asked), 0 off the mask
    returns: Tensor | None  # [B, T] fp32 critic targets A + V from the unwhitened A, 0 off the mask; None without a critic


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS,
           all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalize ``x`` with the mean and variance of its masked entries, over the whole batch.

    The variance is the biased (population) one, mean((x − μ)²), so the masked
    result has exactly zero mean and unit population std (up to ``eps``), and a
    single masked entry does not divide by zero. ``shift_mean=False`` only
    scales: x / σ. Entries where ``mask`` is 0 come out 0 and never influence
    μ or σ.

    With ``all_reduce`` (a sum over the ranks that share the batch) μ and σ are those of the
    whole batch: one reduce of (Σx, n), then one of Σ(x − μ)², the same two passes as on one process.
    """
    reduce = all_reduce if all_reduce is not None else (lambda t: t)
    sums = reduce(torch.stack([masked_sum(x, mask), masked_sum(torch.ones_like(x), mask)]))
    count = sums[1].clamp(min=1)
    mean = sums[0] / count
    var = reduce(masked_sum((x - mean).square(), mask).reshape(1))[0] / count
    centered = x - mean if shift_mean else x
    whitened = centered * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def last_token_index(mask: Tensor) -> Tensor:
    """``[B]`` index of the last position where ``mask`` is set in each row (0 for an empty row).

    Covers a response ending in EOS with right padding after it, a truncated
    response that fills the row, and left padding before the response.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=-1)


def token_rewards(
    sequence_rewards: Tensor,
    kl: Tensor | None,
    mask: Tensor,
    kl_coef: float,
) -> Tensor:
    """Per-token rewards ``[B, T]`` (fp32) for GAE.

    Every response token gets −kl_coef · kl_t (skipped when ``kl`` is None);
    the last response token of each row also gets the sequence reward
    ``sequence_rewards[b]`` from the reward model or task. A row with an empty
    mask gets all zeros. Positions off the mask are 0.
    """
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None:
        rewards = torch.where(mask.bool(), -kl_coef * kl.float(), rewards)
    has_response = mask.bool().any(dim=-1)  # [B]
    final_reward = torch.where(has_response, sequence_rewards.float(), 0.0)  # [B]
    return rewards.scatter_add(-1, last_token_index(mask).unsqueeze(-1), final_reward.unsqueeze(-1))
