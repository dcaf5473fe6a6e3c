"""The whole pipeline on a real pretrained checkpoint: SmolLM2-135M-Instruct (fetched once by
scripts/get_smollm2.py into .cache/models/), the builtin word-math task through its chat template,
GRPO with the math reward, two iterations in process. What it learns is measured in the README
(configs/smollm2-cpu-grpo.yaml), not here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), str(MODEL_DIR)], check=True)
    return MODEL_DIR


def test_the_fetched_checkpoint_is_a_plain_llama_with_its_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None  # a plain model: it trains and saves as one
    text = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n1+1?<|im_end|>" in text


@pytest.mark.slow
def test_grpo_with_the_math_reward_runs_on_the_real_checkpoint(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from hybrid_ppo.launch import train

    cfg = tiny_cfg(f"model.actor={smollm2}", "model.reward_fn=hybrid_ppo.rewards.math:accuracy",
                   "data.prompts=builtin:word-math", "data.eval_size=4", "data.max_prompt_tokens=128",
                   "rollout.max_new_tokens=16", "train.iterations=2", "train.rollout_batch_size=4",
                   "train.samples_per_prompt=2", "train.mini_batch_size=8", "train.micro_batch_size=4",
                   "train.ppo_epochs=1", "train.actor_lr=1e-5", "algo.advantage_estimator=grpo",
                   "algo.kl_in=loss", "algo.kl_estimator=k3", "algo.tis_cap=2.0", "logging.tensorboard=false",
                   f"logging.output_dir={tmp_path}", "logging.run_name=smol")
    result = train(cfg)

    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [line for line in lines if "reward/mean" in line]
    assert [line["iteration"] for line in iterations] == [1, 2]
    for line in iterations:
        assert 0.0 <= line["reward/mean"] <= 1.0 and math.isfinite(line["loss/policy"])
        # The engine sampled with the weights the actor scores with: their log-probs agree, and TIS
        # (which keeps SCORE_ACTOR on in this on-policy run) weighs every token by about 1.
        assert line["rollout/logprob_diff_max"] < 1e-3
        assert abs(line["tis/weight_mean"] - 1.0) < 1e-3 and line["tis/capped_fraction"] == 0.0
    sample = json.loads((result.run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|im_start|>system") and "\\boxed{}" in sample["prompt"]
    assert sample["label"].isdigit()
    exported = AutoModelForCausalLM.from_pretrained(result.run_dir / "hf" / "final")
    assert exported.config.tie_word_embeddings and exported.lm_head.weight is exported.model.embed_tokens.weight
