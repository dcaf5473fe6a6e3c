"""The algorithm's choices as enums, with no dependencies: the config validates against them and
the algorithm switches on them, so both import them from here without importing each other.
`hybrid_ppo.algo.estimators` and `hybrid_ppo.algo.ppo` re-export them (older imports keep working).
"""

from __future__ import annotations

from enum import Enum


class AdvantageEstimator(str, Enum):
    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce_pp"

    @property
    def needs_critic(self) -> bool:
        return self is AdvantageEstimator.GAE

    @property
    def uses_groups(self) -> bool:
        """Compares the responses to one prompt, so it needs samples_per_prompt >= 2."""
        return self in (AdvantageEstimator.GRPO, AdvantageEstimator.RLOO)


class LossAgg(str, Enum):
    """How per-token losses become one number (``aggregate``).

    - ``TOKEN_MEAN``: Σ_tokens loss / tokens. Every token weighs the same.
    - ``SEQ_MEAN_TOKEN_MEAN``: mean over sequences of each one's token mean. Every sequence
      weighs the same, so a long response's tokens count less (GRPO's original loss).
    - ``SEQ_MEAN_TOKEN_SUM_NORM``: mean over sequences of Σ_tokens loss / horizon, a constant
      (``rollout.max_new_tokens``): Dr. GRPO's fix for GRPO's length bias.
    """

    TOKEN_MEAN = "token_mean"
    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq_mean_token_sum_norm"


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
