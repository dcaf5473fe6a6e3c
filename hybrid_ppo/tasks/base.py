"""What every prompt source yields: a prompt, and the label a rule reward checks against (if any)."""

from __future__ import annotations

import hashlib
import random
from typing import Any, NamedTuple, Sequence, TypeVar

T = TypeVar("T")


class Example(NamedTuple):
    prompt: str | list
    """Prompt text; or, straight from a data file and before rendering, a chat (a list of
    {"role", "content"} messages). `hybrid_ppo.data.render_examples` turns chats into text."""
    label: Any = None
    """The reference answer a rule reward compares with (any JSON value, as the data has it); None
    when the prompt source has none."""
    metadata: dict | None = None
    """The data row's other fields, handed to a reward function that takes `metadata`."""
    templated: bool = False
    """True when `prompt` is a rendered chat template: it already holds its special tokens (BOS
    included), so it is tokenized without adding any. False: the tokenizer adds its own, as for
    any plain text."""
    source: str = ""
    """Where the example came from (`file:line`, or `dir[row]`), for error messages."""


def stable_split(key: str, eval_fraction: float) -> str:
    """'train' or 'eval' for a problem named `key`, from a hash: the same on every machine and run."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
    return "eval" if bucket < eval_fraction else "train"


def seeded_picks(pool: Sequence[T], n: int, seed_key: str) -> list[T]:
    """`n` items of `pool` in a random order seeded by `seed_key`: distinct while n <= len(pool),
    beyond that the pool is repeated, each pass reshuffled."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool, rng, picked = list(pool), random.Random(seed_key), []
    while len(picked) < n:
        rng.shuffle(pool)
        picked.extend(pool[: n - len(picked)])
    return picked
