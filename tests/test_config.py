"""Config loading: the shipped configs load, and every kind of bad input names key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_ppo.config import ConfigError, DType, EngineKind, load_config
from hybrid_ppo.placement import make_plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_config_loads():
    cfg = load_config()
    assert cfg.model.actor == "builtin:tiny-llama"
    assert cfg.rollout.engine == EngineKind.HF
    assert cfg.num_engines == cfg.placement.num_gpus
    assert cfg.grad_accum_steps * cfg.train.micro_batch_size * cfg.placement.num_gpus == cfg.train.mini_batch_size


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["algo.kl_coef=0.02", "train.zero_stage=3", "model.dtype=bf16"])
    assert cfg.algo.kl_coef == 0.02 and cfg.train.zero_stage == 3 and cfg.model.dtype == DType.BF16


def test_8gpu_preset_validates_and_places():
    cfg = load_config(CONFIGS / "llama7b-8gpu.yaml")
    assert cfg.train.zero_stage == 3 and cfg.model.dtype == DType.BF16 and cfg.model.gradient_checkpointing
    assert cfg.num_engines * cfg.rollout.tensor_parallel_size == 8
    plan = make_plan(cfg)
    assert plan.num_bundles == 8
    for bundle in range(8):
        on_bundle = sorted((s.role, s.gpu) for s in plan.slots if s.bundle == bundle)
        assert on_bundle == [("actor", 0.2), ("critic", 0.2), ("reference", 0.2), ("reward", 0.2), ("rollout", 0.2)]


@pytest.mark.parametrize("override, key, allowed", [
    ("algo.gamma=1.5", "algo.gamma", "[0, 1]"),
    ("algo.clip_eps=0", "algo.clip_eps", "(0, 1)"),
    ("train.iterations=0", "train.iterations", "> 0"),
    ("train.iterations=abc", "train.iterations", "int"),
    ("train.zero_stage=1", "train.zero_stage", "2 or 3"),
    ("rollout.engine=sglang", "rollout.engine", "hf | vllm"),
    ("rollout.sleep_level=3", "rollout.sleep_level", "1 or 2"),
    ("algo.kl_estimator=k4", "algo.kl_estimator", "k1 | k2 | k3"),
    ("model.dtype=fp8", "model.dtype", "fp32 | bf16"),
    ("train.mini_batch_size=48", "train.mini_batch_size", "divisor"),
    ("train.micro_batch_size=32", "train.micro_batch_size", "must divide"),
    ("rollout.tensor_parallel_size=3", "rollout.tensor_parallel_size", "divisor of placement.num_gpus"),
    ("model.reward_fn=null", "model.reward_fn", "exactly one"),
    ("model.reward_fn=no_colon", "model.reward_fn", "module:function"),
    ("data.prompts=/tmp/p.jsonl", "data.eval_prompts", "a prompt file or dataset path"),
    ("train.foo=1", "train.foo", "iterations"),
    ("nosection.x=1", "nosection", "model"),
    ("train.iterations", "train.iterations", "section.key=value"),
])
def test_bad_values_name_key_value_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert allowed in info.value.allowed
    assert key in str(info.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="existing YAML file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_cli_reports_config_errors(capsys):
    from hybrid_ppo.cli import main

    assert main(["plan", "algo.gamma=2"]) == 2
    assert "config key 'algo.gamma': got 2" in capsys.readouterr().err
    assert main(["plan", str(CONFIGS / "llama7b-8gpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "reward" in out and "kv_cache+weights" in out
