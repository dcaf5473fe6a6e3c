"""Prompt loading (builtin, JSONL, parquet, `datasets` directories; chats through the chat
template; errors that name the file and line), encoding, overlong prompts and batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hybrid_ppo.config import Config, DataConfig, TrainConfig, load_config
from hybrid_ppo.data import (DataError, PromptBatches, encode_prompts, eval_prompts, load_prompts, prepare_prompts,
                             prompt_key, train_prompts)
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example
from hybrid_ppo.tasks.tokenizer import build_tokenizer


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_builtin_prompts_train_and_eval_are_disjoint_and_sized_by_config() -> None:
    cfg = Config(data=DataConfig(eval_size=100), train=TrainConfig(seed=4))
    train, held_out = train_prompts(cfg), eval_prompts(cfg)
    assert len(held_out) == 100 and len(train) == len(max_digit.split_problems("train"))
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
    where = f"{path}:"
    assert load_prompts(str(path), "train", cfg) == [Example("max 1 2 =", "2", {}, source=where + "1"),
                                                     Example("max 4 =", None, {}, source=where + "3")]
    assert eval_prompts(cfg) == [Example("max 1 2 =", "2", {}, source=where + "1")]


def test_labels_are_any_json_and_other_fields_become_metadata(tmp_path: Path) -> None:
    rows = [{"question": "a", "answer": ["9", "nine"], "id": 3, "tags": ["x"]}, {"question": "b", "answer": {"k": 1.5}},
            {"question": "c", "answer": 7}]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    data = DataConfig(prompts=str(path), eval_prompts=str(path), input_key="question", label_key="answer")
    examples = load_prompts(str(path), "train", Config(data=data))
    assert [e.label for e in examples] == [["9", "nine"], {"k": 1.5}, 7]
    assert [e.metadata for e in examples] == [{"id": 3, "tags": ["x"]}, {}, {}]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps({"prompt": "a"}), "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([json.dumps({"text": "a"})], r"bad\.jsonl:1: missing 'prompt'"),
        ([json.dumps(["a"])], r"bad\.jsonl:1: expected a JSON object"),
        ([json.dumps({"prompt": 5})], r"bad\.jsonl:1: 'prompt' must be a string or a list of"),
        (["{}", json.dumps({"prompt": [{"content": "hi"}]})], r"bad\.jsonl:1: missing 'prompt'"),
        ([json.dumps({"prompt": "a"}), json.dumps({"prompt": [{"content": "hi"}]})],
         r"bad\.jsonl:2: message 0 of 'prompt' needs a string 'role'"),
        ([json.dumps({"prompt": []})], r"bad\.jsonl:1: 'prompt' is an empty chat"),
        (["", "  "], r"bad\.jsonl: no prompts"),
    ],
)
def test_bad_jsonl_names_the_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path), "train", Config())


def test_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl.*does not exist.*nothing is downloaded"):
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


CHATS = [
    {"prompt": [{"role": "system", "content": "Answer with one digit."}, {"role": "user", "content": "max 3 7 1 9 ="}],
     "label": "9", "id": 0},
    {"prompt": [{"role": "user", "content": "max 4 2 ="}], "label": "4", "id": 1},
    {"prompt": "max 5 =", "label": "5", "id": 2},
]


def _chat_cfg(path: Path, *overrides: str) -> Config:
    return load_config(None, [f"data.prompts={path}", f"data.eval_prompts={path}", "data.max_prompt_tokens=64",
                              *overrides])


def _tokenizer(chat_checkpoint, name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_checkpoint(name))


def test_chats_render_through_the_template_and_strings_stay_plain(tmp_path: Path, chat_checkpoint) -> None:
    tokenizer = _tokenizer(chat_checkpoint, "llama3")
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in CHATS])
    prepared = prepare_prompts(_chat_cfg(path), tokenizer)
    first, _, plain = prepared.train
    assert first.templated and first.prompt.startswith("<|begin_of_text|><|start_header_id|>system")
    assert first.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = prepared.token_ids[prompt_key(first)]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # no double BOS
    assert not plain.templated and plain.prompt == "max 5 ="
    assert prepared.token_ids[prompt_key(plain)] == tokenizer("max 5 =")["input_ids"]  # the tokenizer's own BOS

    wrapped = prepare_prompts(_chat_cfg(path, "data.apply_chat_template=true"), tokenizer).train[2]
    assert wrapped.templated and "<|start_header_id|>user<|end_header_id|>\n\nmax 5 =<|eot_id|>" in wrapped.prompt
    with pytest.raises(DataError, match=r"chat\.jsonl:1: the prompt is a chat, but data.apply_chat_template=false"):
        prepare_prompts(_chat_cfg(path, "data.apply_chat_template=false"), tokenizer)


def test_a_chat_without_a_template_names_the_line(tmp_path: Path, chat_checkpoint) -> None:
    tokenizer = _tokenizer(chat_checkpoint, "mistral")
    tokenizer.chat_template = None
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(CHATS[2]), json.dumps(CHATS[1])])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the prompt is a chat, but the actor's tokenizer has no chat template"):
        prepare_prompts(_chat_cfg(path), tokenizer)


def test_datasets_directory_and_parquet_read_like_jsonl(tmp_path: Path, chat_checkpoint) -> None:
    import datasets

    rows = [{"prompt": f"max {i} 1 =", "label": str(max(i, 1)), "difficulty": i % 2} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    expected = [(r["prompt"], r["label"], {"difficulty": r["difficulty"]}) for r in rows]
    for spec in ("ds", "dd", "p.parquet"):
        examples = load_prompts(str(tmp_path / spec), "train", Config())
        assert [(e.prompt, e.label, e.metadata) for e in examples] == expected, spec
    chats = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "id"} for r in CHATS[:2]])
    chats.save_to_disk(str(tmp_path / "chats"))
    prepared = prepare_prompts(_chat_cfg(tmp_path / "chats"), _tokenizer(chat_checkpoint, "qwen2.5"))
    assert [e.prompt.startswith("<|im_start|>") for e in prepared.train] == [True, True]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: neither a `datasets` directory \(save_to_disk\) nor a folder of parquet files"):
        load_prompts(str(tmp_path / "empty"), "train", Config())


def test_overlong_prompts_error_or_skip(tmp_path: Path, caplog) -> None:
    tokenizer = build_tokenizer()
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": p}) for p in
                                              ("max 1 =", "max 3 7 1 9 2 5 =", "max 2 =")])
    base = [f"data.prompts={path}", f"data.eval_prompts={path}", "data.max_prompt_tokens=5"]
    with pytest.raises(DataError, match=r"p\.jsonl:2: the prompt has 9 tokens, more than data.max_prompt_tokens = 5"):
        prepare_prompts(load_config(None, base), tokenizer)
    with caplog.at_level("INFO", logger="hybrid_ppo.data"):
        prepared = prepare_prompts(load_config(None, [*base, "data.overlong_prompts=skip"]), tokenizer)
    assert [e.prompt for e in prepared.train] == ["max 1 =", "max 2 ="] == [e.prompt for e in prepared.eval]
    assert "skipped 1 of 3 train prompts" in caplog.text
    with pytest.raises(DataError, match=r"p\.jsonl: every train prompt is over data.max_prompt_tokens = 2; nothing is left"):
        prepare_prompts(load_config(None, [*base[:2], "data.max_prompt_tokens=2", "data.overlong_prompts=skip"]),
                        tokenizer)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": [{"role": "user", "content": "hi"}]}, {"text": "a"}], r"bad\.jsonl:2: missing 'prompt'"),
    ([{"prompt": [{"content": "hi"}]}], r"bad\.jsonl:1: message 0 of 'prompt' needs a string 'role'"),
])
def test_bad_data_is_one_line_from_the_cli(tmp_path: Path, chat_checkpoint, capsys, rows, message) -> None:
    import re

    from hybrid_ppo.cli import main

    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(r) for r in rows])
    actor = chat_checkpoint("qwen2.5")
    capsys.readouterr()  # building the fixture prints progress bars
    code = main(["train", f"model.actor={actor}", f"data.prompts={bad}",
                 f"data.eval_prompts={bad}", f"logging.output_dir={tmp_path}/runs", "logging.run_name=bad"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("hybrid-ppo: ") and re.search(message, err)
    assert not (tmp_path / "runs" / "bad").exists()
