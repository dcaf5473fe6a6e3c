"""The built-in task: tokenizer, tiny Llama, max-digit reward and splits, warm-up and its cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybrid_ppo.tasks as tasks
from hybrid_ppo.config import Config, LoggingConfig, TrainConfig, WarmupConfig
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example
from hybrid_ppo.tasks.tiny_model import build_tiny_llama
from hybrid_ppo.tasks.tokenizer import build_tokenizer
from hybrid_ppo.tasks.warmup import encode_sft_batch, noisy_labels, warm_up


def small_config(cache_dir: Path, steps: int = 60, seed: int = 0) -> Config:
    return Config(
        warmup=WarmupConfig(steps=steps),
        train=TrainConfig(seed=seed),
        logging=LoggingConfig(cache_dir=str(cache_dir)),
    )


# ---------------------------------------------------------------- tokenizer and model


def test_tokenizer_encodes_task_words_and_round_trips_through_save(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("max 3 7 1 9 =")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids and len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == "max 3 7 1 9 ="
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("9"), tokenizer.eos_token_id],
                            skip_special_tokens=True) == "9"
    assert tokenizer.padding_side == "left"

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("max 3 7 1 9 =")["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert loaded.padding_side == "left"
    batch = loaded(["max 1 =", "max 3 7 1 9 ="], padding=True)["input_ids"]
    assert batch[0][0] == loaded.pad_token_id and batch[0][-1] == batch[1][-1]  # padded on the left


def test_tiny_llama_shape_special_ids_and_seeded_init() -> None:
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=3)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # vLLM's CPU backend needs head_dim 32, 64, ...
    assert cfg.vocab_size == len(tokenizer) and model.dtype == torch.float32
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    again = build_tiny_llama(tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# ---------------------------------------------------------------- the task and its reward


def test_reward_scores_correct_incorrect_and_malformed_responses() -> None:
    prompts = ["max 3 7 1 9 ="] * 8
    responses = ["9", " 9 ", "3", "9 9", "", "nine", "9 <unk>", "max"]
    assert max_digit.reward(prompts, responses) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # Given labels are used as they are (None entries fall back to the prompt's answer).
    assert max_digit.reward(["max 1 2 =", "max 1 2 ="], ["1", "2"], ["1", None]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="lengths must match"):
        max_digit.reward(prompts, responses[:2])


def test_answer_heuristic_and_prompt_parsing() -> None:
    assert max_digit.answer("max 3 7 1 9 =") == "9"
    assert max_digit.heuristic_label("max 3 7 1 9 =") == "3"
    assert max_digit.is_correct("9", "9") and not max_digit.is_correct("9 <eos>", "9")
    with pytest.raises(ValueError, match="not a max-digit prompt"):
        max_digit.parse_prompt("what is 3 + 4 ?")


def test_splits_are_disjoint_cover_every_tuple_and_sample_deterministically() -> None:
    train, held_out = set(max_digit.split_problems("train")), set(max_digit.split_problems("eval"))
    assert not train & held_out and len(train | held_out) == 10**max_digit.NUM_DIGITS
    assert 0.15 < len(held_out) / 10**max_digit.NUM_DIGITS < 0.25
    examples = max_digit.make_examples("eval", 300, seed=1)
    assert examples == max_digit.make_examples("eval", 300, seed=1) != max_digit.make_examples("eval", 300, seed=2)
    assert len({ex.prompt for ex in examples}) == 300  # distinct while n <= split size
    assert all(max_digit.parse_prompt(ex.prompt) in held_out and ex.label == max_digit.answer(ex.prompt)
               for ex in examples)
    assert len(max_digit.make_examples("eval", len(held_out) + 5, seed=0)) == len(held_out) + 5
    with pytest.raises(ValueError, match="unknown split"):
        max_digit.make_examples("test", 3, seed=0)


def test_noisy_labels_mix_teacher_and_heuristic_at_the_requested_rate() -> None:
    examples = max_digit.make_examples("train", 4000, seed=0)
    noisy = noisy_labels(examples, teacher_accuracy=0.35, seed=0)
    differ = [i for i, ex in enumerate(examples) if max_digit.heuristic_label(ex.prompt) != ex.label]
    kept = sum(noisy[i].label == examples[i].label for i in differ) / len(differ)
    assert abs(kept - 0.35) < 0.04
    assert all(noisy[i].label in (examples[i].label, max_digit.heuristic_label(examples[i].prompt))
               for i in range(len(examples)))


# ---------------------------------------------------------------- warm-up and the builtin cache


def test_warm_up_lowers_the_answer_loss() -> None:
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    batch = encode_sft_batch(tokenizer, max_digit.make_examples("eval", 256, seed=0))
    assert (batch["labels"] != -100).sum(1).tolist() == [2] * 256  # the digit and EOS only
    with torch.no_grad():
        before = model(**batch).loss.item()
    warm_up(model, tokenizer, WarmupConfig(steps=60), seed=0)
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.5 * before, (before, after)


def test_resolve_builtin_model_builds_a_loadable_checkpoint_once(tmp_path: Path, monkeypatch) -> None:
    cfg = small_config(tmp_path, steps=60)
    path = tasks.resolve_builtin_model("builtin:tiny-llama", cfg)
    assert path.parent == tmp_path / "warmup" and path.name == tasks.warmup_cache_key("builtin:tiny-llama", cfg)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    enc = tokenizer(["max 3 7 1 9 =", "max 0 5 ="], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    first = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(first.split()) == 1 and first.strip().isdigit()  # the warm-up taught the answer format

    # The second call reuses the cache: a builder that would fail is never called.
    def fail(*_):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setitem(tasks.BUILTIN_MODELS, "tiny-llama", (tasks.BUILTIN_MODELS["tiny-llama"][0], fail))
    assert tasks.resolve_builtin_model("builtin:tiny-llama", cfg) == path
    # Another seed is another entry.
    assert tasks.warmup_cache_key("builtin:tiny-llama", small_config(tmp_path, seed=1)) != path.name


def test_a_crashed_build_leaves_nothing_that_looks_valid(tmp_path: Path, monkeypatch) -> None:
    def crash(cfg: Config, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")  # half written
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(tasks.BUILTIN_MODELS, "tiny-llama", (tasks.BUILTIN_MODELS["tiny-llama"][0], crash))
    with pytest.raises(RuntimeError, match="mid-build"):
        tasks.resolve_builtin_model("builtin:tiny-llama", small_config(tmp_path))
    assert [p for p in (tmp_path / "warmup").iterdir() if not p.name.endswith(".lock")] == []


def test_unknown_builtin_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        tasks.resolve_builtin_model("builtin:gpt-5", small_config(tmp_path))


def test_example_is_a_prompt_and_optional_label() -> None:
    assert Example("max 1 =") == Example(prompt="max 1 =", label=None)


def test_rule_reward_gets_metadata_only_when_it_asks_for_it():
    from hybrid_ppo.roles.reward import RuleReward

    classic = RuleReward("hybrid_ppo.tasks.max_digit:reward")  # the builtin 3-argument reward
    assert not classic.takes_metadata
    assert classic(["max 1 9 ="], ["9"], ["9"], [{"id": 1}]).tolist() == [1.0]
    with_metadata = RuleReward("test_tasks:_reward_from_metadata")
    assert with_metadata.takes_metadata
    assert with_metadata(["p", "q"], ["a", "b"], [None, None], [{"bonus": 2.0}, {}]).tolist() == [2.0, 0.0]


def _reward_from_metadata(prompts, responses, labels, metadata):
    return [float(m.get("bonus", 0.0)) for m in metadata]
