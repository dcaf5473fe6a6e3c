"""Advantage estimators: PPO's GAE with a critic, and three critic-free ones.

All take per-token rewards ``[B, T]`` (the sequence reward at each row's last response token,
minus the KL penalty per token when ``algo.kl_in=reward``) and the response ``mask``. Rows of
one prompt are contiguous: rows ``g*n .. g*n+n-1`` are the ``n = samples_per_prompt`` responses
to prompt ``g``, as ``launch.run`` lays them out and ``Experience.shard`` keeps them.

- ``gae``: ``hybrid_ppo.ops.gae`` over rewards and the critic's values; whitened if configured.
- ``grpo``: each response's summed reward ``s``, normalised in its group,
  ``(s − mean_g) / (std_g + eps)`` (std with Bessel's correction, as OpenRLHF and verl), on every
  response token. ``grpo_std_norm=false`` drops the division (Dr. GRPO).
- ``rloo``: ``s_i − mean_{j≠i} s_j``, the leave-one-out baseline, on every response token.
- ``reinforce_pp``: REINFORCE++, the discounted return of the token rewards,
  ``G_t = Σ_k γ^k r_{t+k}`` (``ops.gae`` with V = 0, λ = 1), whitened over the whole batch.

A group whose rewards are all equal has zero advantage (never NaN). Whitening is over the whole
batch: on several ranks ``whiten`` takes an ``all_reduce`` that sums across them (two passes:
the mean, then the variance about it), so the result equals the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from hybrid_ppo.algo.types import AdvantageEstimator  # noqa: F401  # re-exported

from hybrid_ppo import ops
from hybrid_ppo.algo.advantages import Advantages, whiten
from hybrid_ppo.algo.ppo import masked_sum

if TYPE_CHECKING:
    from hybrid_ppo.config import AlgoConfig

GROUP_STD_EPS = 1e-6
"""Added to a group's std before dividing: an all-equal group (std 0) gives 0, not NaN."""

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks that share a batch (identity on one process)."""


@dataclass(frozen=True)
class AdvantageBatch:
    """What the ADVANTAGE phase reads; ranks get contiguous row shards of whole groups."""

    rewards: Tensor  # [B, T] fp32 per-token rewards, 0 off the mask
    mask: Tensor  # [B, T] 1 on response tokens
    values: Tensor | None = None  # [B, T] V_old(s_t) from the critic; None without one

    def shard(self, num_shards: int) -> list["AdvantageBatch"]:
        from hybrid_ppo.algo.experience import equal_slices

        return [AdvantageBatch(self.rewards[s], self.mask[s], None if self.values is None else self.values[s])
                for s in equal_slices(self.rewards.shape[0], num_shards)]

    def to(self, device: torch.device) -> "AdvantageBatch":
        return AdvantageBatch(self.rewards.to(device), self.mask.to(device),
                              None if self.values is None else self.values.to(device))


def sequence_scores(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B] each response's total reward: the sequence reward plus any per-token KL penalty."""
    return masked_sum(rewards.float(), mask, dim=-1)


def grpo_advantages(scores: Tensor, group_size: int, std_norm: bool = True) -> Tensor:
    """[B] (s − mean_g) / (std_g + eps) per group of ``group_size`` contiguous rows (no division
    when ``std_norm`` is False)."""
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if std_norm:
        centred = centred / (groups.std(-1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """[B] s_i − mean of the other n − 1 scores of its group."""
    groups = _groups(scores, group_size)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} responses do not form groups of {group_size} (need >= 2 per group)")
    return scores.float().reshape(-1, group_size)


def estimate(batch: AdvantageBatch, algo: "AlgoConfig", group_size: int,
             all_reduce: AllReduce | None = None) -> Advantages:
    """Advantages (and, with a critic, returns) of ``batch`` under ``algo.advantage_estimator``.

    ``all_reduce`` makes whitening batch-global when the batch is sharded over ranks; group
    estimators need none, since every shard holds whole groups.
    """
    estimator, mask = AdvantageEstimator(algo.advantage_estimator), batch.mask
    if estimator is AdvantageEstimator.GAE:
        if batch.values is None:
            raise ValueError("gae needs the critic's values")
        adv, returns = ops.gae(batch.rewards, batch.values, mask, gamma=algo.gamma, lam=algo.lam)
        if algo.whiten_advantages:
            adv = whiten(adv, mask, all_reduce=all_reduce)
        return Advantages(adv, returns)
    if estimator is AdvantageEstimator.REINFORCE_PP:
        returns = ops.gae(batch.rewards, torch.zeros_like(batch.rewards), mask, gamma=algo.gamma, lam=1.0).advantages
        return Advantages(whiten(returns, mask, all_reduce=all_reduce), None)
    scores = sequence_scores(batch.rewards, mask)
    if estimator is AdvantageEstimator.GRPO:
        per_sequence = grpo_advantages(scores, group_size, algo.grpo_std_norm)
    else:
        per_sequence = rloo_advantages(scores, group_size)
    return Advantages(torch.where(mask.bool(), per_sequence[:, None], 0.0), None)
