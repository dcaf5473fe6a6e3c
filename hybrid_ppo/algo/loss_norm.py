"""Exact loss weights under gradient accumulation and data parallelism.

A mini-batch is `grad_accum` consecutive micro-batches on each of `world` ranks. DeepSpeed
divides every micro-batch loss by `grad_accum` inside `engine.backward`, and ZeRO averages the
gradients over the ranks. So if each micro-batch contributes

    Σ_its tokens loss_t / N_tokens(mini-batch) × grad_accum × world

the optimizer sees Σ over the whole mini-batch / N_tokens: the token mean of the mini-batch,
whatever each micro-batch's own token count. Dividing by the micro-batch's own count instead
(a mean of means) would give the tokens of a short micro-batch more weight. Sequence-level
aggregations divide by the mini-batch's sequence count the same way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from hybrid_ppo.algo.ppo import LossNorm


def mini_batch_norms(masks: Sequence[Tensor], grad_accum: int, world_size: int, horizon: float,
                     all_reduce: Callable[[Tensor], Tensor] | None = None,
                     sizes: Sequence[int] | None = None) -> list[LossNorm]:
    """One `LossNorm` per micro-batch of an epoch, from the action masks of this rank's
    micro-batches in the order they are trained. `all_reduce` sums over the ranks (one call per
    epoch: a sync point, of a [mini-batches, 2] tensor). `sizes`: micro-batches in each mini-batch,
    where they vary (a token budget; the engine's boundaries are then set by the caller); default
    `grad_accum` each. `grad_accum` is always the engine's configured accumulation, the divisor
    DeepSpeed applies in backward. Every rank must train the same number of micro-batches per
    mini-batch, which the config's batch arithmetic (or `packing.equal_bins`) guarantees."""
    if sizes is None:
        if len(masks) % grad_accum:
            raise ValueError(f"{len(masks)} micro-batches do not form mini-batches of {grad_accum}")
        sizes = [grad_accum] * (len(masks) // grad_accum)
    if sum(sizes) != len(masks):
        raise ValueError(f"{len(masks)} micro-batches do not form mini-batches of {list(sizes)}")
    counts = torch.tensor([[float(m.sum()), float(m.shape[0])] for m in masks], dtype=torch.float64)
    mini_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))  # [micro-batches]
    per_mini = torch.zeros(len(sizes), 2, dtype=torch.float64).index_add_(0, mini_of, counts)  # [minis, (tokens, seqs)]
    if all_reduce is not None:
        per_mini = all_reduce(per_mini)
    scale = float(grad_accum * world_size)
    return [LossNorm(tokens=float(per_mini[j, 0]), sequences=float(per_mini[j, 1]), horizon=horizon, scale=scale)
            for j in mini_of.tolist()]
