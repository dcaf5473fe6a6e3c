"""Two PPO iterations of the default job on real Ray (2 fake GPUs), DeepSpeed on gloo, HF engine."""

from __future__ import annotations

import json
import math

import pytest

from hybrid_ppo.config import load_config

EXPECTED_KEYS = {
    "reward/mean", "kl/mean", "loss/policy", "loss/value", "actor/approx_kl", "actor/clip_frac", "actor/entropy",
    "critic/clip_frac", "rollout/tokens_per_s", "rollout/response_tokens", "rollout/sync_mib",
    *(f"time/{phase}" for phase in ("generate", "score_actor", "score_reference", "score_critic", "score_reward",
                                    "advantage", "train_critic", "train_actor", "sync")),
    "memory/train_actor/host_rss_gib",
}


@pytest.mark.slow
def test_default_job_two_iterations(tmp_path):
    from transformers import AutoModelForCausalLM

    from hybrid_ppo.launch import train

    cfg = load_config(None, ["train.iterations=2", "warmup.steps=20", "data.eval_size=32",
                             f"logging.output_dir={tmp_path}", "logging.run_name=e2e"])
    result = train(cfg)

    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [line for line in lines if "reward/mean" in line]
    assert [line["iteration"] for line in iterations] == [1, 2]
    for line in iterations:
        assert EXPECTED_KEYS <= line.keys(), EXPECTED_KEYS - line.keys()
        assert all(math.isfinite(v) for v in line.values())
    evals = [line["eval/reward_mean"] for line in lines if "eval/reward_mean" in line]
    assert len(evals) == 2 and all(0.0 <= e <= 1.0 for e in evals)

    timeline = [json.loads(line) for line in (result.run_dir / "memory_timeline.jsonl").read_text().splitlines()]
    assert {"offload", "reload"} <= {m["direction"] for m in timeline}
    assert all(len(m["ranks"]) == 2 for m in timeline if m["role"] == "actor")  # both ranks moved

    checkpoint = result.run_dir / "checkpoint"
    assert (checkpoint / "config.json").exists() and (checkpoint / "tokenizer.json").exists()
    assert not (result.run_dir / "checkpoint.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert list((result.run_dir / "tensorboard").iterdir())
