"""Prefix-shared packing: the responses to one prompt read that prompt once.

GRPO, RLOO and DAPO sample `train.samples_per_prompt` responses per prompt. `pack` (algo/packing.py)
puts each sequence's real tokens in one row, so a group of n responses carries its prompt n times.
`pack_shared` lays a group out as

    prompt | response 1 | response 2 | ... | response n

with `position_ids` 0..p-1 on the prompt and p, p+1, ... again on every response, and records which
branch each token is on (0: the prompt, k: response k) and which group. The attention the model
must use (`visible`): a token sees the earlier tokens of its group that are on the prompt or on its
own branch. Every response token then has exactly the context, and the positions, it has alone, so
log-probs, entropies, values and scores equal the unshared layout's; the prompt's hidden states are
shared, and autograd sums their gradient over the group's responses, which is the unshared gradient.

A group is the rows whose prompts are identical (token for token): the layout never depends on the
row order, and a group cut across micro-batches is still correct, only shared less. `group_units`
keeps whole groups together for the micro-batch and rank binning, cutting only a group too long for
the token budget; a unit's size is its distinct tokens (the prompt once).

The result is a `PackedBatch`, so `unpack`, `predict_index` and `last_index` work unchanged; its
`segments` / `branches` say how to build the mask (roles/shared_mask.py does, per attention
implementation). Without any group of two or more, it is plain `pack` (no mask at all).
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.packing import PackedBatch, balanced_shards, pack, real_lengths, token_bins


def prompt_groups(seq: Sequences) -> list[list[int]]:
    """Rows of `seq` with identical real prompt tokens, in order of first appearance."""
    P = seq.prompt_len
    real = seq.attention_mask[:, :P].bool()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in range(len(seq)):
        groups.setdefault(tuple(seq.tokens[row, :P][real[row]].tolist()), []).append(row)
    return list(groups.values())


def pack_shared(seq: Sequences) -> PackedBatch:
    """The real tokens of `seq` in one row, each group's prompt once (see the module docstring)."""
    groups = prompt_groups(seq)
    if all(len(g) == 1 for g in groups):
        return pack(seq)
    P = seq.prompt_len
    prompt_lengths = seq.attention_mask[:, :P].sum(-1).tolist()
    response_lengths = seq.attention_mask[:, P:].sum(-1).tolist()  # real response tokens start at column P
    if min(prompt_lengths) == 0:  # the first response token needs a position that predicts it
        raise ValueError(f"row {prompt_lengths.index(0)} has an empty prompt")
    pieces, positions, segments, branches = [], [], [], []
    response_start = [0] * len(seq)  # packed offset of each row's response
    prompt_end = [0] * len(seq)  # packed offset of each row's prompt's last token
    offset = 0
    for g, rows in enumerate(groups):
        p = prompt_lengths[rows[0]]
        pieces.append(seq.tokens[rows[0], P - p:P])
        positions.append(torch.arange(p))
        branches.append(torch.zeros(p, dtype=torch.long))
        segments.append(torch.full((p,), g))
        cursor = offset + p
        for k, row in enumerate(rows, start=1):
            r = response_lengths[row]
            prompt_end[row], response_start[row] = offset + p - 1, cursor
            pieces.append(seq.tokens[row, P:P + r])
            positions.append(torch.arange(p, p + r))  # as if the response followed its prompt alone
            branches.append(torch.full((r,), k))
            segments.append(torch.full((r,), g))
            cursor += r
        offset = cursor
    device = seq.tokens.device
    starts, ends = torch.tensor(response_start, device=device), torch.tensor(prompt_end, device=device)
    lengths = torch.tensor(response_lengths, device=device)
    rows, cols = seq.action_mask.bool().nonzero(as_tuple=True)
    # Response token 0 is predicted by the prompt's last token (shared), token t by its own token t-1.
    predict_index = torch.where(cols == 0, ends[rows], starts[rows] + cols - 1)
    last_index = torch.where(lengths > 0, starts + lengths - 1, ends)
    return PackedBatch(tokens=torch.cat(pieces)[None], position_ids=torch.cat(positions).to(device)[None],
                       predict_index=predict_index, targets=seq.responses[rows, cols], rows=rows, cols=cols,
                       last_index=last_index, shape=tuple(seq.action_mask.shape),
                       segments=torch.cat(segments).to(device), branches=torch.cat(branches).to(device))


def visible(segments: Tensor, branches: Tensor) -> Tensor:
    """[T, T] bool: query i may attend key j (causal, same group, j on the prompt or on i's branch)."""
    T = segments.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same_group = segments[:, None] == segments[None, :]
    same_branch = (branches[None, :] == 0) | (branches[:, None] == branches[None, :])
    return causal & same_group & same_branch


def group_units(seq: Sequences, budget: int | None = None) -> list[list[int]]:
    """Rows of `seq` in units for binning: whole groups (see `prompt_groups`), each cut into as few
    consecutive pieces as keep a piece's distinct tokens within `budget` (a group of long
    responses can be longer than one micro-batch; a piece still shares its prompt)."""
    P = seq.prompt_len
    prompt_lengths = seq.attention_mask[:, :P].sum(-1).tolist()
    response_lengths = seq.attention_mask[:, P:].sum(-1).tolist()
    units: list[list[int]] = []
    for rows in prompt_groups(seq):
        piece, load = [], prompt_lengths[rows[0]]
        for row in rows:
            if piece and budget is not None and load + response_lengths[row] > budget:
                units.append(piece)
                piece, load = [], prompt_lengths[rows[0]]
            piece.append(row)
            load += response_lengths[row]
        units.append(piece)
    return units


def unit_lengths(seq: Sequences, units: Seq[Seq[int]]) -> list[int]:
    """Distinct tokens of each unit: what a prefix-shared micro-batch spends on it."""
    P = seq.prompt_len
    prompt_lengths = seq.attention_mask[:, :P].sum(-1).tolist()
    response_lengths = seq.attention_mask[:, P:].sum(-1).tolist()
    return [prompt_lengths[u[0]] + sum(response_lengths[r] for r in u) for u in units]


def equal_unit_bins(seq: Sequences, minis: Seq[list[list[int]]], budget: int,
                    max_over_ranks) -> list[tuple[list[list[int]], list[list[int]]]]:
    """`packing.equal_bins` over units: for each mini-batch's units (rows of `seq`), bins of unit
    indices of at most `budget` distinct tokens, with every rank ending up with the same bin count
    per mini-batch. A rank with fewer units than the agreed count cuts its largest unit in two
    (groups shared less, never a rank out of step); every rank holds as many rows per mini-batch,
    so a count never exceeds what its rows can fill. Returns (units, bins) per mini-batch. One
    all-reduce per round (the counts' maximum and minimum over the ranks)."""
    minis = [list(units) for units in minis]
    counts = max_over_ranks([len(token_bins(unit_lengths(seq, units), budget)) for units in minis])
    while True:
        for units, count in zip(minis, counts):
            while len(units) < count:
                largest = max(range(len(units)), key=lambda u: len(units[u]))
                if len(units[largest]) < 2:
                    break
                half = len(units[largest]) // 2
                units[largest:largest + 1] = [units[largest][:half], units[largest][half:]]
        bins = [token_bins(unit_lengths(seq, units), budget, min_bins=k) for units, k in zip(minis, counts)]
        spread = max_over_ranks([len(b) for b in bins] + [-len(b) for b in bins])
        most, fewest = spread[:len(bins)], [-c for c in spread[len(bins):]]
        if most == list(counts) and fewest == list(counts):
            return list(zip(minis, bins))
        counts = most


def group_shards(seq: Sequences, num_shards: int) -> list[list[int]]:
    """`packing.balanced_shards` of whole groups: equal-size shards with balanced distinct-token sums,
    no group on two ranks. Groups of unequal sizes, or a group count the shards do not divide,
    cannot make equal shards of whole groups: then the rows are balanced one by one."""
    groups = prompt_groups(seq)
    if len({len(g) for g in groups}) > 1 or len(groups) % num_shards:
        return balanced_shards(real_lengths(seq), num_shards)
    shards = balanced_shards(unit_lengths(seq, groups), num_shards)
    return [sorted(row for g in shard for row in groups[g]) for shard in shards]
