"""Loss aggregation against hand values, and its exactness under gradient accumulation and ranks.

The pure tests split a batch into micro-batches of unequal token counts, weight each with
`mini_batch_norms`, undo what DeepSpeed does (÷ grad_accum in backward, average over ranks) and
compare with the whole batch. The slow test does it for real: a DeepSpeed actor trained on the
same experience in 1 micro-batch and in 4 must make the same update.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hybrid_ppo.algo.loss_norm import mini_batch_norms
from hybrid_ppo.algo.ppo import LossAgg, aggregate, policy_loss


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


LOSS = t([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
MASK = t([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("agg, expected", [
    (LossAgg.TOKEN_MEAN, (1 + 2 + 3 + 4) / 4),  # every token weighs the same
    (LossAgg.SEQ_MEAN_TOKEN_MEAN, (2.0 + 4.0) / 2),  # row means 2 and 4
    (LossAgg.SEQ_MEAN_TOKEN_SUM_NORM, (6 / 4 + 4 / 4) / 2),  # row sums over the horizon T = 4
])
def test_aggregate_hand_values(agg, expected) -> None:
    assert_close(aggregate(LOSS, MASK, agg), torch.tensor(expected))


def _batch(rows: int = 16, width: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return torch.randn(rows, width, generator=gen), mask


@pytest.mark.parametrize("agg", list(LossAgg))
@pytest.mark.parametrize("ranks, grad_accum", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_micro_batches_and_ranks_reproduce_the_whole_batch(agg, ranks, grad_accum) -> None:
    per_token, mask = _batch()
    per_token.requires_grad_()
    whole = aggregate(per_token, mask, agg, mini_batch_norms([mask], 1, 1, horizon=7)[0])
    rows = per_token.shape[0] // (ranks * grad_accum)
    micros = [slice(i * rows, (i + 1) * rows) for i in range(ranks * grad_accum)]
    assert len({float(mask[s].sum()) for s in micros}) > 1 or len(micros) == 1  # unequal token counts
    rank_masks = [[mask[s] for s in micros[r * grad_accum:(r + 1) * grad_accum]] for r in range(ranks)]

    def all_reduce(local: torch.Tensor) -> torch.Tensor:  # sums every rank's counts, as gloo would
        return sum(torch.tensor([[float(m.sum()), float(m.shape[0])] for m in masks]).reshape(-1, grad_accum, 2)
                   .sum(1).double() for masks in rank_masks)

    # DeepSpeed divides each micro-batch loss by grad_accum and averages the gradients over ranks.
    total = 0.0
    for r in range(ranks):
        norms = mini_batch_norms(rank_masks[r], grad_accum, ranks, horizon=7, all_reduce=all_reduce)
        for s, norm in zip(micros[r * grad_accum:(r + 1) * grad_accum], norms):
            total = total + aggregate(per_token[s], mask[s], agg, norm) / grad_accum / ranks
    assert_close(total, whole)
    grad_whole = torch.autograd.grad(whole, per_token)[0]
    assert_close(torch.autograd.grad(total, per_token)[0], grad_whole)


def test_mean_of_micro_means_would_differ() -> None:
    """The control: the naive weighting (each micro-batch its own token mean) is measurably off here."""
    per_token, mask = _batch()
    halves = [slice(0, 8), slice(8, 16)]
    naive = sum(aggregate(per_token[s], mask[s]) for s in halves) / 2
    assert abs(float(naive - aggregate(per_token, mask))) > 1e-3


# ---------------------------------------------------------------- clip-higher and dual-clip

def test_clip_higher_and_dual_clip_hand_values() -> None:
    # ratios 1.5 (A=+1), 0.5 (A=-1), 4.0 (A=-1); eps 0.2, eps_high 0.28, dual-clip c = 3.
    ratios, adv = t([[1.5, 0.5, 4.0]]), t([[1.0, -1.0, -1.0]])
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # token 0: max(-1.5, -1.28) = -1.28; token 1: max(0.5, 0.8) = 0.8; token 2: max(4, 1.2) = 4 -> dual: min(4, 3) = 3
    out = policy_loss(ratios.log(), old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0)
    assert_close(out.loss, torch.tensor((-1.28 + 0.8 + 3.0) / 3))
    assert_close(out.clip_frac_lower, torch.tensor(1 / 3))
    assert_close(out.ratio_max, torch.tensor(4.0))
    assert_close(out.ratio_min, torch.tensor(0.5))
    plain = policy_loss(ratios.log(), old, adv, mask, clip_eps=0.2)
    assert_close(plain.loss, torch.tensor((-1.2 + 0.8 + 4.0) / 3))
    assert float(plain.clip_frac_lower) == 0.0


def test_dual_clip_bounds_the_gradient_of_an_exploded_ratio() -> None:
    logprobs = t([[math.log(4.0)]]).requires_grad_()
    policy_loss(logprobs, torch.zeros(1, 1), t([[-1.0]]), torch.ones(1, 1), 0.2, dual_clip=3.0).loss.backward()
    assert float(logprobs.grad) == 0.0  # the constant bound -c * A carries no gradient


def test_ratio_extremes_stay_extremes_over_micro_batches_and_ranks() -> None:
    from hybrid_ppo.metrics import mean_over_ranks

    ranks = [{"actor/ratio_max": 2.0, "actor/ratio_min": 0.5, "loss/policy": 1.0},
             {"actor/ratio_max": 3.0, "actor/ratio_min": 0.7, "loss/policy": 3.0}]
    assert mean_over_ranks(ranks) == {"actor/ratio_max": 3.0, "actor/ratio_min": 0.5, "loss/policy": 2.0}
