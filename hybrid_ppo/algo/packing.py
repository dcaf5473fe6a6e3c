"""Padding-free micro-batches: the real tokens of several sequences back to back in one row.

A `Sequences` block is a `[B, P+R]` rectangle (prompts left-padded, responses right-padded). `pack`
keeps only its real tokens, concatenated into one `[1, T]` row, with `position_ids` restarting at 0
on each sequence's first token. transformers' mask utilities read those restarts as sequence
boundaries (when no attention mask and no cache is passed) and keep attention inside each sequence;
on CUDA flash-attention takes the same restarts as its varlen `cu_seqlens`. The model's outputs at
the packed positions come back in the `[B, R]` layout with `PackedBatch.unpack`, so the losses do
not change.

`token_bins` and `balanced_shards` group sequences by their real token counts: micro-batches of
at most a token budget, and data-parallel shards of equal size with balanced token sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.errors import InputError


@dataclass(frozen=True)
class PackedBatch:
    tokens: Tensor  # [1, T] every sequence's real tokens, back to back (T = sum of real lengths)
    position_ids: Tensor  # [1, T] 0 at each sequence's first token
    predict_index: Tensor  # [N] packed position whose output predicts response token n (N real response tokens)
    targets: Tensor  # [N] the response tokens themselves
    rows: Tensor  # [N] row of response token n in the [B, R] layout
    cols: Tensor  # [N] its column there
    last_index: Tensor  # [B] packed position of each sequence's last real token
    shape: tuple[int, int]  # (B, R) of the layout the outputs go back to
    # Prefix sharing (algo/prefix_sharing.py) only; None: sequences separated by the position_ids restarts alone.
    segments: Tensor | None = None  # [T] the group (prompt) of each packed token
    branches: Tensor | None = None  # [T] 0 on a group's prompt, k on its k-th response

    def unpack(self, per_token: Tensor) -> Tensor:
        """[N] -> [B, R]: each response token's value in its place, 0 on padding (differentiable)."""
        out = per_token.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), per_token)


def pack(seq: Sequences) -> PackedBatch:
    """The real tokens of `seq` in one row (see the module docstring)."""
    real = seq.attention_mask.bool()  # [B, P+R]: each row's real tokens are contiguous
    lengths = real.sum(-1)  # [B]
    if bool((lengths == 0).any()):
        raise ValueError(f"row {int((lengths == 0).nonzero()[0, 0])} has no real token to pack")
    prompt_lengths = real[:, :seq.prompt_len].sum(-1)  # [B]
    if bool((prompt_lengths == 0).any()):  # the first response token needs a position that predicts it
        raise ValueError(f"row {int((prompt_lengths == 0).nonzero()[0, 0])} has an empty prompt")
    starts = lengths.cumsum(0) - lengths  # [B] packed offset of each sequence
    total = int(lengths.sum())
    position_ids = torch.arange(total, device=seq.tokens.device) - starts.repeat_interleave(lengths)
    rows, cols = seq.action_mask.bool().nonzero(as_tuple=True)  # row-major, as the rows' tokens are packed
    predict_index = starts[rows] + prompt_lengths[rows] + cols - 1
    return PackedBatch(tokens=seq.tokens[real][None], position_ids=position_ids[None], predict_index=predict_index,
                       targets=seq.responses[rows, cols], rows=rows, cols=cols, last_index=starts + lengths - 1,
                       shape=tuple(seq.action_mask.shape))


def real_lengths(seq: Sequences) -> list[int]:
    """Real (non-pad) tokens of each row: what a packed micro-batch spends on it."""
    return seq.attention_mask.sum(-1).tolist()


class TokenBudgetError(InputError):
    """A sequence longer than train.max_tokens_per_micro_batch."""


def check_budget(lengths: Seq[int], budget: int) -> None:
    """Refuse a budget that cannot hold the longest sequence, naming it."""
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[longest] > budget:
        raise TokenBudgetError(f"config key 'train.max_tokens_per_micro_batch': got {budget}; allowed: >= the longest "
                               f"sequence, {lengths[longest]} tokens (row {longest} of the batch)")


def token_bins(lengths: Seq[int], budget: int, min_bins: int = 1) -> list[list[int]]:
    """Indices of `lengths` in the fewest bins (at least `min_bins`, at most one per sequence) of at most
    `budget` tokens each, balanced: longest first, each into the least-loaded bin (LPT). Bins keep
    their indices in ascending order. Raises for a sequence over the budget."""
    check_budget(lengths, budget)
    count = max(min_bins, -(-sum(lengths) // budget), 1)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    while True:
        bins: list[list[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in order:
            target = min(range(count), key=loads.__getitem__)
            bins[target].append(i)
            loads[target] += lengths[i]
        if max(loads) <= budget or count >= len(lengths):
            return [sorted(b) for b in bins if b]
        count += 1


def balanced_shards(lengths: Seq[int], num_shards: int) -> list[list[int]]:
    """`num_shards` equal-size shards of the indices of `lengths`, with balanced token sums: longest
    first, each into the lightest shard that still has room. Indices ascending within a shard."""
    if len(lengths) % num_shards:
        raise ValueError(f"batch of {len(lengths)} does not split into {num_shards} equal shards")
    size = len(lengths) // num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    loads = [0] * num_shards
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = min((s for s in range(num_shards) if len(shards[s]) < size), key=loads.__getitem__)
        shards[target].append(i)
        loads[target] += lengths[i]
    return [sorted(s) for s in shards]


def equal_bins(groups: Seq[Seq[int]], budget: int, max_over_ranks) -> list[list[list[int]]]:
    """`token_bins` of each group of lengths, with every rank ending up with the same bin count per
    group (ZeRO's collectives run once per micro-batch): `max_over_ranks` takes a list of counts
    and returns their element-wise maximum over the ranks (one all-reduce per round; one round
    unless a rank's LPT needs more bins than the agreed count). Every rank must hold the same
    number of sequences per group, so a count never exceeds what a group can fill."""
    bins = [token_bins(lengths, budget) for lengths in groups]
    while True:
        counts = max_over_ranks([len(b) for b in bins])
        bins = [token_bins(lengths, budget, min_bins=k) for lengths, k in zip(groups, counts)]
        if max_over_ranks([len(b) for b in bins]) == list(counts):
            return bins
