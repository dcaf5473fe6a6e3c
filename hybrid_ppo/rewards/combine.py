"""Every reward source of a run as one list: a weighted sum of scorers, each term kept for its metric.

`model.reward_fn`, `model.reward_fns` and `model.reward_url` all become a `CombinedReward` of
`RewardSource`s (built in `roles/reward.py:build_reward`): one weight-1 term for a single function or
URL, one term per entry of `reward_fns`. The trainer calls it once per batch and logs the total as
`reward/mean` and, for `reward_fns`, each unweighted term as `reward/<name>_mean`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

Scorer = Callable[[list[str], list[str], list[Any], list[dict]], Tensor]
"""(prompts, responses, labels, metadata) -> [B] float32 scores, already checked (count, finite)."""


@dataclass(frozen=True)
class RewardSource:
    name: str  # the metric's name: reward/<name>_mean
    weight: float
    score: Scorer


class RewardScores(NamedTuple):
    total: Tensor  # [B] the weighted sum: the sequence reward
    terms: dict[str, Tensor]  # name -> [B] unweighted scores of each logged term ({} when not logged per term)


class CombinedReward:
    """Σ_k weight_k · score_k(prompts, responses, labels, metadata)."""

    def __init__(self, sources: list[RewardSource], log_terms: bool):
        if not sources:
            raise ValueError("a CombinedReward needs at least one source")
        self.sources, self.log_terms = sources, log_terms

    def __call__(self, prompts: list[str], responses: list[str], labels: list[Any],
                 metadata: list[dict]) -> RewardScores:
        terms = {s.name: s.score(prompts, responses, labels, metadata) for s in self.sources}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for source in self.sources:
            total = total + source.weight * terms[source.name]
        return RewardScores(total, terms if self.log_terms else {})


def term_metrics(terms: dict[str, Tensor]) -> dict[str, float]:
    """`reward/<name>_mean` of each term."""
    return {f"reward/{name}_mean": float(scores.float().mean()) for name, scores in terms.items()}
