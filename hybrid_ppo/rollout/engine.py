"""The protocol every rollout engine follows, with vLLM's semantics.

* `sleep(level)`: level 1 moves the weights to host memory and frees the KV cache; level 2
  discards the weights too (the next SYNC overwrites them anyway, so copying them out is waste).
* `wake_up(tags)`: tags are `"weights"` and `"kv_cache"`. Waking `weights` alone after level 2
  gives allocated but undefined weights: `load_weights` must fill them before `generate`.
* `load_weights(named tensors)`: HF parameter names, full (unsharded) tensors.
* `load_bucket(handles)` / `finish_weight_sync()`: the same, from buffers the actor ranks staged
  (rollout/weight_sync.py): one handle per worker of the engine, whole layers per bucket.
* `close()`: stop for good, releasing what would outlive a killed process (vLLM's
  shared-memory queues); the executor calls it before it kills the role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from hybrid_ppo.memory.residency import SleepableEngine
from hybrid_ppo.seeding import derived_seed

if TYPE_CHECKING:
    from hybrid_ppo.rollout.weight_sync import BucketHandle

WAKE_TAGS = ("weights", "kv_cache")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # seeds this call's sampling (None: the engine's own RNG); see sampling_seed

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Generation:
    response_ids: Tensor  # [B, R] int64, R = max_new_tokens, right-padded with the pad id
    response_mask: Tensor  # [B, R] 1 on generated tokens up to and including the first EOS (any EOS id)
    logprobs: Tensor | None = None  # [B, R] float32 engine's log pi(token) as sampled (temperature, top-p); 0 on padding


class RolloutEngine(SleepableEngine, Protocol):
    """An engine the rollout worker drives; `sleep`, `wake_up` and `memory_bytes` come from the
    residency protocol, which the memory scheduler drives."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation: ...

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None: ...

    def load_bucket(self, handles: list[BucketHandle]) -> None: ...

    def finish_weight_sync(self) -> None: ...

    def probe_bucket(self, handles: list[BucketHandle]) -> str | None: ...

    def close(self) -> None: ...


def sampling_seed(seed: int, iteration: int, rank: int) -> int:
    """The sampling seed of one engine in one iteration (seeding.py: a resume samples the same)."""
    return derived_seed(seed, iteration, rank)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, P] ids and attention mask, prompts right-aligned so every response starts at column P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def response_mask(response_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """[B, R] 1 up to and including each row's first stop token (the first of any of `eos_ids`);
    all ones for a row that never ends."""
    is_eos = is_stop(response_ids, eos_ids).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before position t
    return (eos_before == 0).long()


def is_stop(token_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """Boolean tensor: which tokens are one of the end-of-response ids."""
    return torch.isin(token_ids, torch.tensor(list(eos_ids), dtype=token_ids.dtype, device=token_ids.device))


def pad_responses(rows: Tensor, width: int, pad_id: int) -> Tensor:
    """Right-pad generated ids [B, r] to the fixed width R so every engine's output stacks."""
    if rows.shape[1] >= width:
        return rows[:, :width]
    pad = torch.full((rows.shape[0], width - rows.shape[1]), pad_id, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, pad], dim=1)


def check_weight(engine: str, shapes: dict[str, torch.Size], name: str, shape: Sequence[int]) -> None:
    """A full tensor an engine may load: one of its parameters, at that parameter's shape."""
    if name not in shapes:
        raise KeyError(f"{engine} has no parameter {name!r}")
    if tuple(shapes[name]) != tuple(shape):
        raise ValueError(f"weight {name!r}: engine shape {tuple(shapes[name])}, got {tuple(shape)}")


def check_wake_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    unknown = [t for t in tags if t not in WAKE_TAGS]
    if unknown:
        raise ValueError(f"unknown wake_up tag(s) {unknown}; allowed: {', '.join(WAKE_TAGS)}")
    return tags


def logprob_diff_max(engine_logprobs: Tensor, actor_logprobs: Tensor, mask: Tensor) -> float:
    """max |engine log-prob - actor log-prob| over the sampled tokens: how far the policy that
    generated differs from the one being trained (weight sync, kernels, dtype, top-p)."""
    if not mask.any():
        return 0.0
    return float((engine_logprobs.float() - actor_logprobs.float()).abs()[mask.bool()].max())
