"""Reward sources: weighted reward_fns with the builtin rewards, and exactly one source per run."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.config import ConfigError, load_config
from hybrid_ppo.errors import InputError
from hybrid_ppo.rewards import math as math_reward
from hybrid_ppo.rewards.combine import term_metrics
from hybrid_ppo.roles.reward import build_reward

MATH_AND_FORMAT = ('model.reward_fns=[{fn: "hybrid_ppo.rewards.math:accuracy", weight: 1.0},'
                   ' {fn: "hybrid_ppo.rewards.format:think_answer", weight: 0.25, name: fmt}]')


def test_weighted_builtin_rewards_total_and_terms():
    # Start math-verify's worker processes first, with a generous limit: on a loaded machine their
    # spawn and import can outlast the per-sample 5 s, which would score a right answer 0.
    math_reward.accuracy(["p", "p"], ["\\boxed{1}", "\\boxed{2}"], ["1", "2"], timeout_s=300)
    cfg = load_config(None, ["model.reward_fn=null", MATH_AND_FORMAT])
    reward = build_reward(cfg)
    responses = ["<think>2+2</think> \\boxed{4}",  # right, formatted: 1 + 0.25
                 "\\boxed{4}",                      # right, no think block: 1
                 "<think>hm</think> \\boxed{5}",   # wrong, formatted: 0.25
                 "no idea"]                         # neither: 0
    scores = reward(["p"] * 4, responses, ["4"] * 4, [{}] * 4)
    torch.testing.assert_close(scores.total, torch.tensor([1.25, 1.0, 0.25, 0.0]))
    assert set(scores.terms) == {"accuracy", "fmt"}
    torch.testing.assert_close(scores.terms["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores.terms["fmt"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert term_metrics(scores.terms) == {"reward/accuracy_mean": 0.5, "reward/fmt_mean": 0.5}


def test_single_reward_fn_is_one_unlogged_term():
    reward = build_reward(load_config())
    scores = reward(["max 1 9 ="], ["9"], ["9"], [{}])
    assert scores.total.tolist() == [1.0] and scores.terms == {}
    assert build_reward(load_config(None, ["model.reward_fn=null", "model.reward_model=/models/rm"])) is None


@pytest.mark.parametrize("overrides, key, allowed", [
    ([MATH_AND_FORMAT], "model.reward_fns", "exactly one reward source"),  # reward_fn still set
    (["model.reward_url=http://localhost:1/score"], "model.reward_url", "set: reward_fn, reward_url"),
    (["model.reward_fn=null"], "model.reward_fn", "none is set"),
    (["model.reward_fn=null", "model.reward_fns=[]"], "model.reward_fns", "non-empty"),
    (["model.reward_fn=null", 'model.reward_fns=[{fn: "nocolon"}]'], "model.reward_fns[0].fn", "module:function"),
    (["model.reward_fn=null", 'model.reward_fns=[{fn: "a:f"}, {fn: "b:f"}]'], "model.reward_fns", "distinct names"),
    (["model.reward_fn=null", 'model.reward_fns=[{fn: "a:f", weight: .nan}]'], "model.reward_fns[0].weight", "finite"),
    (["model.reward_fn=null", "model.reward_url=localhost:8000"], "model.reward_url", "http://"),
    (["model.reward_retries=-1"], "model.reward_retries", ">= 0"),
    (["model.reward_batch_size=0"], "model.reward_batch_size", "> 0"),
])
def test_reward_source_refusals(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


def test_a_bad_term_is_named_by_its_index():
    cfg = load_config(None, ["model.reward_fn=null",
                             'model.reward_fns=[{fn: "hybrid_ppo.rewards.math:accuracy"}, {fn: "hybrid_ppo.rewards.math:nope"}]'])
    with pytest.raises(InputError, match=r"model.reward_fns\[1\].fn .*has no function 'nope'"):
        build_reward(cfg)


def test_reward_fns_survive_the_saved_config(tmp_path):
    """A run's config.yaml (to_dict) loads back to the same reward_fns, as resume needs."""
    import yaml

    from hybrid_ppo.launch import resume_config

    cfg = load_config(None, ["model.reward_fn=null", MATH_AND_FORMAT])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = resume_config(tmp_path, ["model.reward_retries=5"])
    assert again.model.reward_fns == cfg.model.reward_fns and again.model.reward_retries == 5
    with pytest.raises(ConfigError, match="no change on resume"):
        resume_config(tmp_path, ['model.reward_fns=[{fn: "hybrid_ppo.rewards.math:accuracy", weight: 2.0}]'])
