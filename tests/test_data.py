"""Prompt loading (builtin and JSONL, with errors that name the line), encoding and batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hybrid_ppo.config import Config, DataConfig, TrainConfig
from hybrid_ppo.data import PromptBatches, encode_prompts, eval_prompts, load_prompts, train_prompts
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example
from hybrid_ppo.tasks.tokenizer import build_tokenizer


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_builtin_prompts_train_and_eval_are_disjoint_and_sized_by_config() -> None:
    cfg = Config(data=DataConfig(eval_size=100), train=TrainConfig(seed=4))
    train, held_out = train_prompts(cfg), eval_prompts(cfg)
    assert len(held_out) == 100 and len(train) == len(max_digit.split_digits("train"))
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held_out}
    assert all(ex.label == max_digit.answer(ex.prompt) for ex in held_out)
    assert load_prompts("builtin:max-digit", "eval", cfg) == held_out  # seeded by train.seed
    with pytest.raises(ValueError, match="unknown builtin dataset"):
        load_prompts("builtin:gsm8k", "train", cfg)
    with pytest.raises(ValueError, match="unknown split"):
        load_prompts("builtin:max-digit", "validation", cfg)


def test_jsonl_prompts_with_and_without_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "max 1 2 =", "label": "2"}), "", json.dumps({"prompt": "max 4 ="}),
    ])
    cfg = Config(data=DataConfig(prompts=str(path), eval_prompts=str(path), eval_size=1))
    assert load_prompts(str(path), "train", cfg) == [Example("max 1 2 =", "2"), Example("max 4 =", None)]
    assert eval_prompts(cfg) == [Example("max 1 2 =", "2")]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps({"prompt": "a"}), "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([json.dumps({"text": "a"})], r"bad\.jsonl:1: missing 'prompt'"),
        ([json.dumps(["a"])], r"bad\.jsonl:1: expected a JSON object"),
        ([json.dumps({"prompt": "a", "label": 9})], r"bad\.jsonl:1: 'label' must be a string"),
        (["", "  "], r"bad\.jsonl: no prompts"),
    ],
)
def test_bad_jsonl_names_the_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path), "train", Config())


def test_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.jsonl.*does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"), "train", Config())


def test_encode_prompts_adds_bos_and_rejects_long_prompts_by_index() -> None:
    tokenizer = build_tokenizer()
    ids = encode_prompts(tokenizer, ["max 1 =", "max 3 7 1 9 ="], max_prompt_tokens=7)
    assert [len(row) for row in ids] == [4, 7] and ids[0][0] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="prompt 1 has 7 tokens, more than data.max_prompt_tokens = 6"):
        encode_prompts(tokenizer, ["max 1 =", "max 3 7 1 9 ="], max_prompt_tokens=6)


def test_prompt_batches_cover_each_epoch_reshuffle_and_are_seeded() -> None:
    examples = [Example(str(i)) for i in range(10)]
    batches = PromptBatches(examples, batch_size=4, seed=0)
    first_epochs = [next(batches) for _ in range(5)]  # 20 examples = exactly 2 epochs
    assert all(len(batch) == 4 for batch in first_epochs) and batches.epoch == 2
    flat = [ex.prompt for batch in first_epochs for ex in batch]
    assert Counter(flat[:10]) == Counter(flat[10:]) == Counter(str(i) for i in range(10))
    assert flat[:10] != flat[10:]  # reshuffled
    again = PromptBatches(examples, batch_size=4, seed=0)
    assert [next(again) for _ in range(5)] == first_epochs
    assert [next(PromptBatches(examples, batch_size=4, seed=1)) for _ in range(1)] != first_epochs[:1]
    # A dataset smaller than one batch still fills batches.
    assert len(next(PromptBatches(examples[:3], batch_size=8, seed=0))) == 8
