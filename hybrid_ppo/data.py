"""Prompt datasets: where prompts come from, how they become token ids, how they are batched.

A prompt spec (config `data.prompts` / `data.eval_prompts`) is `builtin:<task>` (a task generated
in code: `max-digit`, the default job's, or `word-math`, for a real chat model) or a local path:

* a JSONL file, one object per line (blank lines are skipped);
* a parquet file, or a directory of them;
* a Hugging Face `datasets` directory written by `save_to_disk` (a DatasetDict must hold one
  split, or one named `train`).

Each row holds the prompt under `data.input_key` and an optional label under `data.label_key`:

    {"prompt": "max 3 7 1 9 =", "label": "9"}
    {"prompt": [{"role": "user", "content": "Largest digit of 3 7 1 9?"}], "label": ["9", "nine"],
     "source": "gsm-lite"}

The prompt is a string or a chat (a list of {"role", "content"} messages). The label may be any
JSON value and reaches the reward function as it is; the row's other fields reach it as
`metadata` (see `hybrid_ppo.roles.reward`). Chats are rendered with the tokenizer's chat template
(`add_generation_prompt=True`), and rendered text is tokenized without adding special tokens
again: the template already wrote its BOS. Every problem is a `DataError` that names the file
and line (or row) and what is wrong. Nothing is downloaded: a missing path is an error.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from hybrid_ppo.config import BUILTIN_PREFIX, Config, DataConfig, OverlongPrompts
from hybrid_ppo.errors import HybridPPOError
from hybrid_ppo.tasks import max_digit, word_math
from hybrid_ppo.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DataError", "Example", "PreparedPrompts", "PromptBatches", "encode_prompts", "eval_prompts",
           "load_prompts", "prepare_prompts", "read_jsonl", "render_examples", "render_prompt", "train_prompts"]

log = logging.getLogger(__name__)

BUILTIN_DATASETS = {max_digit.TASK_NAME: max_digit, word_math.TASK_NAME: word_math}
"""Tasks generated in code: name -> module with `make_examples(split, n, seed)`."""
SPLITS = ("train", "eval")


class DataError(HybridPPOError, ValueError):
    """Bad prompt data; the message names the file and line (or row) and the problem."""


def load_prompts(spec: str, split: str, cfg: Config) -> list[Example]:
    """Examples of `split` ('train' or 'eval') from a builtin dataset, a file or a dataset directory.

    builtin:<task> (max-digit, word-math): 'train' is the whole train split in a seeded order (`train.seed`), 'eval'
    the first `data.eval_size` held-out examples. A path is one split by itself: 'train' returns
    every row, 'eval' the first `data.eval_size`. Chats stay unrendered (see `render_examples`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {' | '.join(SPLITS)}")
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_DATASETS:
            known = " | ".join(BUILTIN_PREFIX + known_name for known_name in BUILTIN_DATASETS)
            raise DataError(f"unknown builtin dataset {spec!r}; known: {known}")
        task = BUILTIN_DATASETS[name]
        size = len(task.split_problems(split)) if split == "train" else cfg.data.eval_size
        return task.make_examples(split, size, cfg.train.seed)
    examples = read_prompt_source(spec, cfg.data)
    return examples if split == "train" else examples[: cfg.data.eval_size]


def train_prompts(cfg: Config) -> list[Example]:
    """The training prompts of `cfg` (`data.prompts`)."""
    return load_prompts(cfg.data.prompts, "train", cfg)


def eval_prompts(cfg: Config) -> list[Example]:
    """The held-out prompts of `cfg`: `data.eval_prompts`, or the builtin task's held-out split."""
    return load_prompts(cfg.data.eval_prompts or cfg.data.prompts, "eval", cfg)


def read_prompt_source(spec: str, data: DataConfig = DataConfig()) -> list[Example]:
    """Every row of a JSONL file, parquet file(s) or `datasets` directory, in order."""
    path = Path(spec)
    if not path.exists():
        raise DataError(f"prompt data {spec!r} does not exist (expected a JSONL or parquet file, a local "
                        "`datasets` directory, or builtin:max-digit | builtin:word-math; nothing is downloaded)")
    if path.is_file() and path.suffix != ".parquet":
        return read_jsonl(path, data)
    rows = _dataset_rows(path)
    examples = [_parse_row(row, f"{path}[row {i}]", data) for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{path}: no prompts (the dataset is empty)")
    return examples


def read_jsonl(path: str | Path, data: DataConfig = DataConfig()) -> list[Example]:
    """Every line of a JSONL prompt file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {str(path)!r} does not exist (expected a JSONL file or a builtin:<task>)")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{number}", data))
    if not examples:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return examples


def _dataset_rows(path: Path) -> Iterable[dict]:
    """Rows of parquet file(s) or a `save_to_disk` directory, read with the `datasets` library."""
    import datasets

    try:
        if path.is_file() or not any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
            if not files:
                raise DataError(f"{path}: neither a `datasets` directory (save_to_disk) nor a folder of parquet files")
            return datasets.load_dataset("parquet", data_files=files, split="train")
        loaded = datasets.load_from_disk(str(path))
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable data; name the path once
        raise DataError(f"{path}: cannot read it with `datasets` ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(loaded)}; save one split, or name one 'train'")
        return loaded["train"]
    return loaded


def _parse_line(line: str, where: str, data: DataConfig) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    return _parse_row(row, where, data)


def _parse_row(row: Any, where: str, data: DataConfig) -> Example:
    key = data.input_key
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a {key!r} field, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing {key!r} (data.input_key), got keys {sorted(row)}")
    prompt = row[key]
    if isinstance(prompt, list):
        _check_chat(prompt, where, key)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: {key!r} must be a string or a list of {{role, content}} messages, "
                        f"got {type(prompt).__name__}")
    metadata = {k: v for k, v in row.items() if k not in (key, data.label_key)}
    return Example(prompt, row.get(data.label_key), metadata, source=where)


def _check_chat(messages: list, where: str, key: str) -> None:
    if not messages:
        raise DataError(f"{where}: {key!r} is an empty chat")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} of {key!r} needs a string 'role' and a string 'content', "
                            f"got {message!r}")


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list, apply_chat_template: bool | None,
                  where: str) -> str | None:
    """The text the model sees for `prompt`, or None for a plain string left as it is.

    A chat (or, with `apply_chat_template=true`, a string as one user message) goes through the
    tokenizer's chat template with `add_generation_prompt=True`."""
    if isinstance(prompt, str) and apply_chat_template is not True:
        return None
    if apply_chat_template is False:
        raise DataError(f"{where}: the prompt is a chat, but data.apply_chat_template=false; "
                        "set it to null or true, or give a string")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the prompt is a chat, but the actor's tokenizer has no chat template "
                        f"(give strings, or a checkpoint whose tokenizer_config.json has chat_template)")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template may raise on roles it does not know (jinja's raise_exception)
        raise DataError(f"{where}: the chat template refused this chat ({type(err).__name__}: {err})") from None


def render_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                    apply_chat_template: bool | None) -> list[Example]:
    """Examples whose prompt is text: chats rendered through the chat template (`templated`)."""
    out = []
    for ex in examples:
        text = render_prompt(tokenizer, ex.prompt, apply_chat_template, ex.source or "prompt")
        out.append(ex if text is None else ex._replace(prompt=text, templated=True))
    return out


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int, templated: bool = False
) -> list[list[int]]:
    """Token ids of each prompt (no padding); ValueError if one is too long.

    Plain text gets the tokenizer's own special tokens (its BOS); `templated` text already holds
    them, so none are added. Prompts are never silently cut: a cut prompt is a different question
    than the one labelled.
    """
    ids = tokenizer(list(prompts), add_special_tokens=not templated)["input_ids"] if prompts else []
    for index, row in enumerate(ids):
        if len(row) > max_prompt_tokens:
            raise DataError(
                f"prompt {index} has {len(row)} tokens, more than data.max_prompt_tokens = {max_prompt_tokens}: "
                f"{prompts[index][:80]!r}"
            )
    return ids


PromptKey = tuple[str, bool]
"""(prompt text, templated): what determines a prompt's token ids."""


def prompt_key(example: Example) -> PromptKey:
    return (example.prompt, example.templated)


@dataclass(frozen=True)
class PreparedPrompts:
    train: list[Example]
    eval: list[Example]
    token_ids: dict[PromptKey, list[int]]
    """Every prompt, encoded once (`prompt_key(example)` -> ids)."""


def prepare_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase, train: Sequence[Example] | None = None,
                    eval: Sequence[Example] | None = None) -> PreparedPrompts:
    """Render chats, encode every prompt once and apply `data.overlong_prompts` to both splits
    (read here unless the caller read them already, to check the data before loading models)."""
    data = cfg.data
    specs = {"train": data.prompts, "eval": data.eval_prompts or data.prompts}
    splits = {"train": list(train) if train is not None else train_prompts(cfg),
              "eval": list(eval) if eval is not None else eval_prompts(cfg)}
    splits = {name: render_examples(tokenizer, examples, data.apply_chat_template) for name, examples in splits.items()}
    token_ids: dict[PromptKey, list[int]] = {}
    for templated in (False, True):
        texts = sorted({ex.prompt for exs in splits.values() for ex in exs if ex.templated == templated})
        ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"] if texts else []
        token_ids.update({(text, templated): row for text, row in zip(texts, ids)})
    for name, examples in splits.items():
        kept = [ex for ex in examples if len(token_ids[prompt_key(ex)]) <= data.max_prompt_tokens]
        if len(kept) == len(examples):
            continue
        first = next(ex for ex in examples if len(token_ids[prompt_key(ex)]) > data.max_prompt_tokens)
        over = f"{len(token_ids[prompt_key(first)])} tokens, more than data.max_prompt_tokens = {data.max_prompt_tokens}"
        if data.overlong_prompts == OverlongPrompts.ERROR:
            raise DataError(f"{first.source or 'prompt'}: the prompt has {over} "
                            f"(data.overlong_prompts=skip drops such prompts): {first.prompt[:80]!r}")
        if not kept:
            raise DataError(f"{specs[name]}: every {name} prompt is over "
                            f"data.max_prompt_tokens = {data.max_prompt_tokens}; nothing is left after skipping")
        log.info("data: skipped %d of %d %s prompts over data.max_prompt_tokens = %d (e.g. %s)",
                 len(examples) - len(kept), len(examples), name, data.max_prompt_tokens, first.source)
        splits[name] = kept
    return PreparedPrompts(splits["train"], splits["eval"], token_ids)


class PromptBatches:
    """Endless seeded batches of `batch_size` examples, reshuffled every epoch.

    Every example appears once per epoch. When the dataset size is not a multiple of the batch
    size, a batch spans the end of one epoch and the start of the next, so no example is dropped
    and datasets smaller than a batch still work.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int):
        if not examples:
            raise DataError("PromptBatches: no examples")
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
