"""Two PPO iterations of a stock-chat-model fixture under real Ray (2 fake GPUs), on chat prompts
from a JSONL file and from a local `datasets` directory, with a rule reward that checks what the
reward contract promises: no stop token, no special token, labels and metadata as the data has them."""

from __future__ import annotations

import json
import math

import pytest

from hybrid_ppo.config import load_config
from model_fixtures import FAMILIES
from helpers import IN_PROCESS

SEEN: list[dict] = []  # what the reward saw, per call (it runs in this process, the driver)
SPECIAL_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
                 "<|begin_of_text|>", "<|start_header_id|>")


def chat_reward(prompts, responses, labels, metadata):
    """1 when the response mentions the label's first answer, 0 otherwise; fails on any leak."""
    for response in responses:
        assert not any(token in response for token in SPECIAL_TEXTS), f"special token in a response: {response!r}"
    SEEN.append({"prompts": list(prompts), "labels": list(labels), "metadata": list(metadata)})
    return [float(str(label[0]) in response) for label, response in zip(labels, responses)]


ROWS = [{"prompt": [{"role": "system", "content": "Answer with one digit."},
                    {"role": "user", "content": f"What is the largest digit in {a} {b}?"}],
         "label": [str(max(a, b)), "nine"], "row": i} for i, (a, b) in enumerate([(3, 7), (9, 1), (4, 2), (5, 8)])]


def _config(tmp_path, actor, train_data, eval_data, run: str, *overrides: str):
    return load_config(None, [
        f"model.actor={actor}", f"data.prompts={train_data}", f"data.eval_prompts={eval_data}",
        "model.reward_fn=test_chat_train:chat_reward", "data.max_prompt_tokens=96", "data.eval_size=4",
        "train.iterations=2", "train.rollout_batch_size=4", "train.mini_batch_size=4", "train.micro_batch_size=2",
        "train.ppo_epochs=1", "rollout.max_new_tokens=6", "logging.samples_per_iteration=3",
        f"logging.output_dir={tmp_path}", f"logging.run_name={run}", "logging.tensorboard=false", *overrides])


def _check_run(result, family: str) -> list[dict]:
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward/mean" in line]
    assert [s["iteration"] for s in steps] == [1, 2]
    assert all(math.isfinite(v) for line in lines for k, v in line.items() if k != "estimator")
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 1, 2, 2, 2]
    assert all(set(s) == {"iteration", "prompt", "response", "reward", "label"} for s in samples)
    bos = FAMILIES[family].bos
    for s in samples:  # the rendered chat template, BOS once (the template's own)
        assert "Answer with one digit." in s["prompt"] and isinstance(s["label"], list)
        assert bos is None or s["prompt"].count(bos) == 1
    assert len(SEEN) == 4  # eval before, 2 iterations, eval after
    assert all(sorted(m["row"] for m in call["metadata"]) == [0, 1, 2, 3] for call in SEEN)
    assert all(call["labels"][0][1] == "nine" for call in SEEN)  # a list label arrives as a list
    assert (result.run_dir / "hf" / "final" / "tokenizer_config.json").exists()
    return steps


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_qwen_chat_from_a_datasets_directory_and_jsonl_under_ray(tmp_path, chat_checkpoint):
    """Trains on a `datasets` directory (save_to_disk), evaluates on a chat JSONL: both readers in one run."""
    import datasets

    from hybrid_ppo.launch import train

    SEEN.clear()
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    eval_data = _write_jsonl(tmp_path / "eval.jsonl", ROWS)
    result = train(_config(tmp_path, chat_checkpoint("qwen2.5"), tmp_path / "ds", eval_data, "qwen"))
    steps = _check_run(result, "qwen2.5")
    seconds = [round(sum(v for k, v in s.items() if k.startswith("time/") and not k.endswith("_moves")), 2)
               for s in steps]
    print(f"\nqwen2.5 chat fixture under Ray (2 fake GPUs): seconds per iteration {seconds}, run {result.seconds:.1f}s")


@pytest.mark.slow
def test_llama3_chat_jsonl_in_one_process(tmp_path, chat_checkpoint):
    """No pad token anywhere, three EOS ids, a template that writes BOS: the local executor."""
    from hybrid_ppo.launch import train

    SEEN.clear()
    data = _write_jsonl(tmp_path / "chat.jsonl", ROWS)
    result = train(_config(tmp_path, chat_checkpoint("llama3"), data, data, "llama",
                           *IN_PROCESS))
    _check_run(result, "llama3")
