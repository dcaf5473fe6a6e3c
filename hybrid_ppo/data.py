"""Prompt datasets: where prompts come from, how they become token ids, how they are batched.

A prompt spec (config `data.prompts` / `data.eval_prompts`) is either `builtin:max-digit` (the
built-in task, `hybrid_ppo.tasks.max_digit`) or a JSONL file with one object per line:

    {"prompt": "max 3 7 1 9 =", "label": "9"}     # "label" is optional

Blank lines are skipped. Anything else is a `ValueError` naming the file and the line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from hybrid_ppo.config import BUILTIN_PREFIX, Config
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Example", "PromptBatches", "encode_prompts", "eval_prompts", "load_prompts", "read_jsonl", "train_prompts"]

BUILTIN_DATASETS = ("max-digit",)
SPLITS = ("train", "eval")


def load_prompts(spec: str, split: str, cfg: Config) -> list[Example]:
    """Examples of `split` ('train' or 'eval') from a builtin dataset or a JSONL file.

    builtin:max-digit: 'train' is the whole train split in a seeded order (`train.seed`), 'eval'
    the first `data.eval_size` held-out examples. A JSONL file is one split by itself: 'train'
    returns every line, 'eval' the first `data.eval_size`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {' | '.join(SPLITS)}")
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_DATASETS:
            known = " | ".join(BUILTIN_PREFIX + known_name for known_name in BUILTIN_DATASETS)
            raise ValueError(f"unknown builtin dataset {spec!r}; known: {known}")
        size = len(max_digit.split_digits(split)) if split == "train" else cfg.data.eval_size
        return max_digit.make_examples(split, size, cfg.train.seed)
    examples = read_jsonl(spec)
    return examples if split == "train" else examples[: cfg.data.eval_size]


def train_prompts(cfg: Config) -> list[Example]:
    """The training prompts of `cfg` (`data.prompts`)."""
    return load_prompts(cfg.data.prompts, "train", cfg)


def eval_prompts(cfg: Config) -> list[Example]:
    """The held-out prompts of `cfg`: `data.eval_prompts`, or the builtin task's held-out split."""
    return load_prompts(cfg.data.eval_prompts or cfg.data.prompts, "eval", cfg)


def read_jsonl(path: str | Path) -> list[Example]:
    """Every `{"prompt": str, "label": str (optional)}` line of a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist (expected a JSONL file or builtin:max-digit)")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' string, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: missing 'prompt' (a string), got keys {sorted(row)}")
    label = row.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}: 'label' must be a string when given, got {label!r}")
    return Example(row["prompt"], label)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt (with `<bos>`, no padding); ValueError if one is too long.

    Prompts are never silently cut: a cut prompt is a different question than the one labelled.
    """
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for index, row in enumerate(ids):
        if len(row) > max_prompt_tokens:
            raise ValueError(
                f"prompt {index} has {len(row)} tokens, more than data.max_prompt_tokens = {max_prompt_tokens}: "
                f"{prompts[index][:80]!r}"
            )
    return ids


class PromptBatches:
    """Endless seeded batches of `batch_size` examples, reshuffled every epoch.

    Every example appears once per epoch. When the dataset size is not a multiple of the batch
    size, a batch spans the end of one epoch and the start of the next, so no example is dropped
    and datasets smaller than a batch still work.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int):
        if not examples:
            raise ValueError("PromptBatches: no examples")
        if batch_size <= 0:
            raise ValueError(f"PromptBatches: batch_size must be > 0, got {batch_size}")
        self.examples, self.batch_size = list(examples), batch_size
        self.epoch = 0
        """Epochs started so far (the epoch the last batch ended in, counting from 1)."""
        self._rng = random.Random(f"prompt-batches/{seed}")
        self._order: list[int] = []
        self.drawn = 0
        """Batches returned so far: the whole position (the order is a function of the seed)."""

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        batch = []
        while len(batch) < self.batch_size:
            if not self._order:
                self._order = list(range(len(self.examples)))
                self._rng.shuffle(self._order)
                self.epoch += 1
            take = self._order[: self.batch_size - len(batch)]
            del self._order[: len(take)]
            batch.extend(self.examples[i] for i in take)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where a checkpointed iterator stopped, by replaying its draws from the seed
        (index shuffles only: cheap even for long runs)."""
        if self.drawn:
            raise RuntimeError("PromptBatches.load_state_dict on an iterator that was already used")
        for _ in range(state["batches_drawn"]):
            next(self)
