"""Truncated importance sampling (TIS) for the engine/trainer mismatch (Yao et al. 2025).

The engine samples from π_engine (its kernels, its dtype), while PPO's ratio is taken against
π_old, the actor's own log-probs of the same tokens. The policy-gradient term of every token is
weighted by

    w_t = min(π_old(a_t) / π_engine(a_t), C),    C = algo.tis_cap

detached: it corrects the sampling distribution, it is not optimised. Where the two agree, w = 1
and the update is plain PPO/GRPO.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hybrid_ppo.algo.ppo import masked_mean


class TISWeights(NamedTuple):
    weights: Tensor  # [B, R] min(π_old / π_engine, C), 1 off the mask
    capped: Tensor  # [B, R] bool: the ratio was above C (on the mask only)


def tis_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> TISWeights:
    """The per-token weights; the log-ratio is clamped at log C before exp, so it never overflows."""
    log_ratio = old_logprobs.float() - engine_logprobs.float()
    on = mask.bool()
    weights = torch.where(on, log_ratio.clamp(max=math.log(cap)).exp(), 1.0)
    return TISWeights(weights, on & (log_ratio > math.log(cap)))


def tis_metrics(tis: TISWeights, mask: Tensor) -> dict[str, float]:
    return {"tis/weight_mean": float(masked_mean(tis.weights, mask.float())),
            "tis/capped_fraction": float(masked_mean(tis.capped.float(), mask.float()))}
