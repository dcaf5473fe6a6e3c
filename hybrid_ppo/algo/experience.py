"""What one rollout produces, and what PPO trains on.

`Sequences` is the generation output every scoring role reads. `Experience` is built complete in
one step (`Experience.build`), after scoring and advantages, and is never mutated afterwards;
ranks receive shards of it (`shard`) and iterate micro-batches (`micro_batches`).

Layout: prompt tokens are left-padded to a common length P, responses right-padded to R, so the
response of every row starts at column P and response token t is predicted by position P-1+t.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch
from torch import Tensor

from hybrid_ppo.errors import Diverged


@dataclass(frozen=True)
class Sequences:
    tokens: Tensor  # [B, P+R] int64: left-padded prompt, then right-padded response
    attention_mask: Tensor  # [B, P+R] 1 on real (non-pad) tokens
    action_mask: Tensor  # [B, R] 1 on response tokens up to and including EOS

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.action_mask.shape[1]

    @property
    def responses(self) -> Tensor:  # [B, R] the actions
        return self.tokens[:, self.prompt_len:]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor | slice) -> "Sequences":
        return Sequences(self.tokens[index], self.attention_mask[index], self.action_mask[index])

    def shard(self, num_shards: int) -> list["Sequences"]:
        """Contiguous equal shards, one per data-parallel rank."""
        return [self.select(rows) for rows in equal_slices(len(self), num_shards)]

    def chunks(self, size: int) -> list["Sequences"]:
        """Consecutive row blocks of `size` (the last may be smaller)."""
        return [self.select(slice(start, start + size)) for start in range(0, len(self), size)]


def equal_slices(num_rows: int, num_shards: int) -> list[slice]:
    if num_rows % num_shards:
        raise ValueError(f"batch of {num_rows} does not split into {num_shards} equal shards")
    size = num_rows // num_shards
    return [slice(i * size, (i + 1) * size) for i in range(num_shards)]


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, L] positions that start at 0 on each row's first real token (left padding aware)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Experience:
    sequences: Sequences
    old_logprobs: Tensor | None  # [B, R] log pi_old(a_t | s_t), at the rollout temperature; None: on-policy, taken from the training forward
    ref_logprobs: Tensor | None  # [B, R] log pi_ref(a_t | s_t); None without a reference (KL off)
    rewards: Tensor  # [B, R] per-token reward (sequence reward at the last token, KL penalty if in reward)
    advantages: Tensor  # [B, R] the estimator's advantages (algo/estimators.py), 0 on padding
    values: Tensor | None = None  # [B, R] V_old(s_t): critic value of the state before action t; None without a critic
    returns: Tensor | None = None  # [B, R] GAE advantages + values before whitening: the critic's target
    tis_weights: Tensor | None = None  # [B, R] min(pi_old / pi_engine, algo.tis_cap) on the policy gradient; None: off

    @classmethod
    def build(cls, sequences: Sequences, **scores: Tensor | None) -> "Experience":
        """All fields at once; shapes are checked so a misaligned score fails here, not in a loss."""
        batch, width = sequences.action_mask.shape
        for name, tensor in scores.items():
            if tensor is None:
                continue
            if tuple(tensor.shape) != (batch, width):
                raise ValueError(f"experience field {name} has shape {tuple(tensor.shape)}, expected {(batch, width)}")
            if not torch.isfinite(tensor).all():
                row = int((~torch.isfinite(tensor)).any(-1).nonzero()[0, 0])
                raise Diverged(f"experience field {name} is not finite (first bad sample: row {row})")
        return cls(sequences=sequences, **scores)

    def __len__(self) -> int:
        return len(self.sequences)

    def select(self, index: Tensor | slice) -> "Experience":
        """Rows `index` of every field."""
        tensors = {f.name: getattr(self, f.name)[index] for f in fields(self)
                   if f.name != "sequences" and getattr(self, f.name) is not None}
        return replace(self, sequences=self.sequences.select(index), **tensors)

    def shard(self, num_shards: int) -> list["Experience"]:
        """Contiguous equal shards, one per data-parallel rank."""
        return [self.select(rows) for rows in equal_slices(len(self), num_shards)]

    def micro_batches(self, size: int, generator: torch.Generator) -> Iterator["Experience"]:
        """One shuffled pass in micro-batches of `size` (the last may be smaller)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start:start + size])
