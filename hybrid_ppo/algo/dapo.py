"""DAPO's sampling-side pieces (Yu et al. 2025): overlong reward shaping and dynamic sampling.

* Overlong shaping: a response longer than `max_new_tokens - buffer` tokens loses reward linearly,
  down to `-factor` at `max_new_tokens` (a truncated response gets the full penalty):

      penalty(L) = -factor * clamp((L - (max_new_tokens - buffer)) / buffer, 0, 1)

* Dynamic sampling: a group of responses to one prompt whose rewards are all equal has zero
  advantage under GRPO or RLOO, so it adds no policy gradient. `SignalGroups` keeps the groups
  with signal over sampling rounds until there are `target` of them. If the rounds run out first,
  it trains on the groups it has, padded with all-equal groups up to a whole `unit` (the fewest
  groups that fill mini-batches on every rank): a short batch must still split into equal shards
  of whole groups and whole mini-batches. The padding is counted in the metrics, never silent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Sequences


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, factor: float) -> Tensor:
    """[B] the (non-positive) penalty of responses of `lengths` tokens."""
    start = max_new_tokens - buffer
    return -factor * ((lengths.float() - start) / buffer).clamp(0.0, 1.0)


def signal_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[G] True for each group of `group_size` contiguous rows whose rewards are not all equal."""
    groups = rewards.reshape(-1, group_size)
    return (groups != groups[:, :1]).any(-1)


def group_unit(mini_batch_size: int, group_size: int, ranks: int) -> int:
    """The fewest groups whose samples fill whole mini-batches and split into equal shards of
    whole groups over `ranks`."""
    per_mini = mini_batch_size // math.gcd(mini_batch_size, group_size)  # groups that fill mini-batches
    return per_mini * ranks // math.gcd(per_mini, ranks)


def rows_of(groups: Tensor, group_size: int) -> Tensor:
    """Row indices of the groups `groups` (indices), in order."""
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


class SignalGroups:
    """The groups kept over the rounds of one iteration's dynamic sampling."""

    def __init__(self, target: int, group_size: int, unit: int):
        self.target, self.group_size, self.unit = target, group_size, unit
        self.signal: list[Tensor] = []  # per round: [G] which groups have signal

    def add(self, rewards: Tensor) -> None:
        self.signal.append(signal_groups(rewards, self.group_size))

    @property
    def kept(self) -> int:
        return min(self.target, sum(int(s.sum()) for s in self.signal))

    @property
    def full(self) -> bool:
        return self.kept >= self.target

    def padding(self) -> int:
        """All-equal groups added so a short batch fills whole units (0 once full)."""
        return max(self.unit, math.ceil(self.kept / self.unit) * self.unit) - self.kept if not self.full else 0

    def picks(self) -> list[Tensor]:
        """Per round, the rows to train on: groups with signal in round order up to `target`, then
        the padding from the all-equal groups of the latest rounds."""
        left, pad = self.target, self.padding()
        chosen = []
        for signal in self.signal:
            keep = signal.nonzero()[:, 0][:left]
            left -= len(keep)
            chosen.append(keep)
        for r in reversed(range(len(self.signal))):
            spare = (~self.signal[r]).nonzero()[:, 0][:pad]
            pad -= len(spare)
            chosen[r] = torch.cat([chosen[r], spare]).sort().values
        return [rows_of(c, self.group_size) for c in chosen]

    def metrics(self) -> dict[str, float]:
        drawn = sum(len(s) for s in self.signal)
        return {"sampling/rounds": float(len(self.signal)), "sampling/groups_drawn": float(drawn),
                "sampling/groups_dropped": float(sum(int((~s).sum()) for s in self.signal)),
                "sampling/groups_with_signal": float(self.kept), "sampling/short": float(not self.full),
                "sampling/padding_groups": float(self.padding())}


def cat_sequences(parts: list[Sequences], pad_id: int) -> Sequences:
    """Rows of several batches as one: prompts left-padded again to the widest P (so every
    response still starts at column P), responses already share the width R."""
    width = max(p.prompt_len for p in parts)
    tokens, attention = [], []
    for p in parts:
        pad = width - p.prompt_len
        tokens.append(torch.nn.functional.pad(p.tokens, (pad, 0), value=pad_id))
        attention.append(torch.nn.functional.pad(p.attention_mask, (pad, 0), value=0))
    return Sequences(torch.cat(tokens), torch.cat(attention), torch.cat([p.action_mask for p in parts]))


def without_rows(seq: Sequences, rows: Tensor) -> Sequences:
    """`seq` with the action mask of `rows` ([B] bool) cleared: those responses leave the loss
    (their tokens still form the sequence the model reads)."""
    return Sequences(seq.tokens, seq.attention_mask, torch.where(rows[:, None], 0, seq.action_mask))
