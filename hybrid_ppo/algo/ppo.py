"""PPO losses and KL estimators for token-level LLM training.

Every tensor here is ``[B, T]`` (batch × response positions) unless noted, and
``mask`` is 1 (or True) on response tokens and 0 on prompt and padding.
Padded positions never influence a result: masked reductions select with
``torch.where`` rather than multiply, so even a NaN under the mask is ignored.

Losses are token-level means over the whole batch (every response token
weighs the same, long responses weigh more), as in cleanrl and OpenRLHF.
Diagnostics (``clip_frac``, ``approx_kl``) are detached 0-d tensors; calling
``.item()`` on them is a CPU-GPU sync point, so the caller decides when.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

# exp(-r) in the k3 estimator overflows fp32 for r < -88, and a single token with
# a large |r| dominates the batch mean. Clamping r to ±20 bounds exp(-r) by
# e^20 ≈ 4.9e8; ordinary log-ratios (|r| of a few nats) are untouched.
K3_LOG_RATIO_LIMIT = 20.0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is set (over all of them if ``dim`` is None)."""
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    An empty mask (no response tokens) gives 0, not NaN: the count is floored at 1.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


class KLEstimator(str, Enum):
    """Schulman's per-token estimators of KL(π ‖ π_ref) from samples of π.

    With r = log π(a|s) − log π_ref(a|s) for a sampled token a:

    - ``K1 = r``: unbiased, high variance, negative on some tokens.
    - ``K2 = r² / 2``: biased, low variance, always ≥ 0.
    - ``K3 = exp(−r) − 1 + r``: unbiased, low variance, always ≥ 0.

    See http://joschu.net/blog/kl-approx.html.
    """

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator | str) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref), ``[B, T]``; not masked.

    ``estimator`` is a ``KLEstimator`` or its value ("k1", "k2", "k3"). Only k3
    clamps the log-ratio, to ±``K3_LOG_RATIO_LIMIT``, because only k3
    exponentiates it.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    estimator = KLEstimator(estimator)
    if estimator is KLEstimator.K1:
        return log_ratio
    if estimator is KLEstimator.K2:
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
    return torch.expm1(-log_ratio) + log_ratio


def kl_loss(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator | str
) -> Tensor:
    """KL(π ‖ π_ref) as a loss term (token-level masked mean), for when the KL
    penalty goes into the loss rather than into the reward."""
    return masked_mean(kl_penalty(logprobs, ref_logprobs, estimator), mask)


class PolicyLoss(NamedTuple):
    loss: Tensor  # [] clipped surrogate loss, differentiable
    clip_frac: Tensor  # [] detached: fraction of response tokens where the clipped term binds
    approx_kl: Tensor  # [] detached: k3 estimate of KL(π_old ‖ π)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> PolicyLoss:
    """PPO clipped surrogate loss.

    With ρ = exp(log π − log π_old) and advantage A, per token::

        loss_t = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A)

    averaged over response tokens. ``clip_frac`` counts the tokens where the
    clipped term is strictly the smaller one, i.e. where the token gives no
    gradient. ``approx_kl`` is k3 of KL(π_old ‖ π) on tokens sampled from
    π_old: mean(ρ − 1 − log ρ), as in cleanrl.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    advantages = advantages.float()
    surrogate = ratio * advantages
    clipped_surrogate = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(-torch.min(surrogate, clipped_surrogate), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_surrogate < surrogate).float(), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
    return PolicyLoss(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


class ValueLoss(NamedTuple):
    loss: Tensor  # [] value loss, differentiable
    clip_frac: Tensor  # [] detached: fraction of response tokens where the clipped error is used


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None,
) -> ValueLoss:
    """Critic loss, optionally clipped around the rollout-time values.

    Per token, with V_clip = V_old + clip(V − V_old, −ε, ε) and return R::

        loss_t = 0.5 · max((V − R)², (V_clip − R)²)

    averaged over response tokens. ``clip_eps=None`` gives the plain
    0.5 · (V − R)² and ``clip_frac`` 0. ``clip_frac`` counts the tokens where
    the clipped error is strictly the larger one.
    """
    values, returns = values.float(), returns.float()
    error = (values - returns).square()
    if clip_eps is None:
        return ValueLoss(loss=0.5 * masked_mean(error, mask), clip_frac=error.new_zeros(()))
    old_values = old_values.float()
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.max(error, clipped_error), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_error > error).float(), mask)
    return ValueLoss(loss=loss, clip_frac=clip_frac)
