"""PPO losses and KL estimators for token-level LLM training.

Every tensor here is ``[B, T]`` (batch × response positions) unless noted, and
``mask`` is 1 (or True) on response tokens and 0 on prompt and padding.
Padded positions never influence a result: masked reductions select with
``torch.where`` rather than multiply, so even a NaN under the mask is ignored.

Losses are aggregated by ``LossAgg``; by default a token-level mean (every
response token weighs the same, long responses weigh more), as in cleanrl and
OpenRLHF. Given a ``LossNorm`` (``algo/loss_norm.py``), the divisor is the
whole mini-batch's, across micro-batches and ranks, not the micro-batch's own.
Diagnostics (``clip_frac``, ``approx_kl``) are detached 0-d tensors; calling
``.item()`` on them is a CPU-GPU sync point, so the caller decides when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hybrid_ppo.algo.types import KLEstimator, LossAgg  # noqa: F401  # re-exported

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


@dataclass(frozen=True)
class LossNorm:
    """The divisors of one mini-batch, so a micro-batch's loss is its exact share of it."""

    tokens: float  # response tokens in the whole mini-batch (every micro-batch on every rank)
    sequences: float  # sequences in the whole mini-batch
    horizon: float  # SEQ_MEAN_TOKEN_SUM_NORM's constant divisor
    scale: float = 1.0  # multiplies the share; undoes the engine's own averaging (see loss_norm.py)


def aggregate(per_token: Tensor, mask: Tensor, agg: LossAgg | str = LossAgg.TOKEN_MEAN,
              norm: LossNorm | None = None) -> Tensor:
    """``per_token`` ``[B, T]`` reduced by ``agg``. Without ``norm`` the batch given is the whole
    batch (its own token and sequence counts; horizon T)."""
    agg = LossAgg(agg)
    if norm is None:
        norm = LossNorm(tokens=float(masked_sum(torch.ones_like(per_token), mask).clamp(min=1)),
                        sequences=float(max(per_token.shape[0], 1)), horizon=float(per_token.shape[-1]))
    if agg is LossAgg.TOKEN_MEAN:
        total = masked_sum(per_token, mask) / max(norm.tokens, 1.0)
    elif agg is LossAgg.SEQ_MEAN_TOKEN_MEAN:
        total = masked_mean(per_token, mask, dim=-1).sum() / max(norm.sequences, 1.0)
    else:
        total = (masked_sum(per_token, mask, dim=-1) / norm.horizon).sum() / max(norm.sequences, 1.0)
    return total * norm.scale


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
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator | str,
    agg: LossAgg | str = LossAgg.TOKEN_MEAN, norm: LossNorm | None = None,
) -> Tensor:
    """KL(π ‖ π_ref) as a loss term (aggregated like the policy loss), for when the KL
    penalty goes into the loss rather than into the reward. Use k3 or k2 here: k1's gradient
    has zero expectation on-policy (the config refuses it)."""
    return aggregate(kl_penalty(logprobs, ref_logprobs, estimator), mask, agg, norm)


class PolicyLoss(NamedTuple):
    loss: Tensor  # [] clipped surrogate loss, differentiable
    clip_frac: Tensor  # [] detached: fraction of response tokens where the clipped term binds
    approx_kl: Tensor  # [] detached: k3 estimate of KL(π_old ‖ π)
    ratio_max: Tensor  # [] detached: largest ρ over response tokens (1 if there are none)
    ratio_min: Tensor  # [] detached: smallest ρ over response tokens (1 if there are none)
    clip_frac_lower: Tensor  # [] detached: fraction where dual-clip's bound −c·A binds (0 without it)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: LossAgg | str = LossAgg.TOKEN_MEAN,
    norm: LossNorm | None = None,
    token_weights: Tensor | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate loss, with optional clip-higher and dual-clip.

    With ρ = exp(log π − log π_old), advantage A, ε_hi = ``clip_eps_high`` (default ε), per token::

        loss_t = max(−ρ·A, −clip(ρ, 1 − ε, 1 + ε_hi)·A)
        dual-clip (c > 1), where A < 0:   loss_t = min(loss_t, −c·A)

    then times ``token_weights`` (detached; truncated importance weights, ``algo/tis.py``) if given,
    aggregated by ``agg`` (token mean by default). Dual-clip bounds the loss of a token whose
    ratio exploded on a negative advantage (Ye et al. 2020). ``clip_frac`` counts the tokens
    where the clipped term is strictly the larger loss, i.e. where the token gives no gradient.
    ``approx_kl`` is k3 of KL(π_old ‖ π) on tokens sampled from π_old: mean(ρ − 1 − log ρ),
    as in cleanrl.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    advantages = advantages.float()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = torch.max(unclipped, clipped)
    lower = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        lower = (advantages < 0) & (bound < per_token)
        per_token = torch.where(lower, bound, per_token)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().float()
    loss = aggregate(per_token, mask, agg, norm)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
        on_mask = ratio[mask.bool()]
        ratio_max = on_mask.max() if on_mask.numel() else ratio.new_ones(())
        ratio_min = on_mask.min() if on_mask.numel() else ratio.new_ones(())
        clip_frac_lower = masked_mean(lower.float(), mask)
    return PolicyLoss(loss, clip_frac, approx_kl, ratio_max, ratio_min, clip_frac_lower)


class ValueLoss(NamedTuple):
    loss: Tensor  # [] value loss, differentiable
    clip_frac: Tensor  # [] detached: fraction of response tokens where the clipped error is used


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None,
    agg: LossAgg | str = LossAgg.TOKEN_MEAN,
    norm: LossNorm | None = None,
) -> ValueLoss:
    """Critic loss, optionally clipped around the rollout-time values.

    Per token, with V_clip = V_old + clip(V − V_old, −ε, ε) and return R::

        loss_t = 0.5 · max((V − R)², (V_clip − R)²)

    aggregated by ``agg`` (token mean by default). ``clip_eps=None`` gives the plain
    0.5 · (V − R)² and ``clip_frac`` 0. ``clip_frac`` counts the tokens where
    the clipped error is strictly the larger one.
    """
    values, returns = values.float(), returns.float()
    error = (values - returns).square()
    if clip_eps is None:
        return ValueLoss(loss=0.5 * aggregate(error, mask, agg, norm), clip_frac=error.new_zeros(()))
    old_values = old_values.float()
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * aggregate(torch.max(error, clipped_error), mask, agg, norm)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_error > error).float(), mask)
    return ValueLoss(loss=loss, clip_frac=clip_frac)
