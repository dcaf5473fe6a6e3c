"""DAPO dynamic sampling through the real launcher: groups whose rewards are all equal are never
trained on, the batch is refilled from more prompts, the round cap holds; and GRPO + reward_fns +
dynamic sampling + overlong shaping + TIS on the default task under Ray."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest

from hybrid_ppo.config import load_config
from helpers import IN_PROCESS

GROUP = 2
FLAT = 0.5


def first_group_flat(prompts, responses, labels):
    """The first group of every batch scores FLAT on every sample (no signal); every other group
    scores 1 then 0 (signal), whatever was generated."""
    return [FLAT if i < GROUP else float(i % GROUP == 0) for i in range(len(responses))]


def _run(tmp_path, name, *overrides, executor=IN_PROCESS):
    from hybrid_ppo.launch import train

    cfg = load_config(None, [*executor, "algo.advantage_estimator=grpo", f"train.samples_per_prompt={GROUP}",
                             "algo.kl_in=loss", "algo.kl_estimator=k3", "algo.dynamic_sampling=true",
                             "train.iterations=2", "warmup.steps=20", "data.eval_size=8",
                             "logging.samples_per_iteration=1000", f"logging.output_dir={tmp_path}",
                             f"logging.run_name={name}", *overrides])
    run_dir = train(cfg).run_dir
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = defaultdict(list)
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        samples[row["iteration"]].append(row["reward"])
    return [m for m in metrics if "reward/mean" in m], samples


FLAT_REWARD = ["model.reward_fn=test_dynamic_sampling:first_group_flat", "train.rollout_batch_size=4",
               "train.mini_batch_size=8", "train.micro_batch_size=4"]  # 4 groups of 2 = one unit on 1 rank


@pytest.mark.slow
def test_flat_groups_are_dropped_and_the_batch_refilled(tmp_path):
    steps, samples = _run(tmp_path, "refill", *FLAT_REWARD, "algo.max_sampling_rounds=3")
    assert len(steps) == 2
    for step in steps:  # round 1: 3 groups with signal; round 2 fills the 4th
        assert step["sampling/rounds"] == 2 and step["sampling/groups_dropped"] == 2
        assert step["sampling/groups_with_signal"] == 4 and step["sampling/short"] == 0
        assert step["sampling/padding_groups"] == 0
        assert step["reward/mean"] == 0.5 and step["reward/std"] == 0.5  # only 1/0 pairs were trained on
    for rewards in samples.values():  # every trained row, in order: groups of 2 with differing rewards
        assert len(rewards) == 8 and FLAT not in rewards
        assert all(rewards[g] != rewards[g + 1] for g in range(0, 8, GROUP))


@pytest.mark.slow
def test_round_cap_trains_on_what_there_is_and_says_so(tmp_path):
    steps, samples = _run(tmp_path, "cap", *FLAT_REWARD, "algo.max_sampling_rounds=1")
    for step in steps:  # 3 groups with signal and one flat group to fill the unit of 4
        assert step["sampling/rounds"] == 1 and step["sampling/short"] == 1
        assert step["sampling/groups_with_signal"] == 3 and step["sampling/padding_groups"] == 1
    for rewards in samples.values():
        assert len(rewards) == 8 and rewards.count(FLAT) == GROUP


@pytest.mark.slow
def test_grpo_reward_fns_dynamic_sampling_under_ray(tmp_path):
    """The default task, its max-digit reward and a weighted format term, dynamic sampling,
    overlong shaping and TIS, under Ray with 2 fake GPUs."""
    fns = ('model.reward_fns=[{fn: "hybrid_ppo.tasks.max_digit:reward", weight: 1.0, name: digit},'
           ' {fn: "test_dynamic_sampling:first_group_flat", weight: 0.5, name: flat}]')
    steps, _ = _run(tmp_path, "ray", "model.reward_fn=null", fns, "train.rollout_batch_size=8",
                    "train.mini_batch_size=16", "train.micro_batch_size=4", "algo.max_sampling_rounds=2",
                    "algo.overlong_buffer=2", "algo.mask_truncated=true", "algo.tis_cap=2",
                    executor=())
    assert len(steps) == 2
    for step in steps:
        assert all(math.isfinite(v) for k, v in step.items() if k != "estimator")
        assert 0.0 <= step["reward/digit_mean"] <= 1.0 and 0.0 <= step["reward/flat_mean"] <= 1.0
        assert -1.0 <= step["reward/overlong_penalty_mean"] <= 0.0
        # the total is the weighted sum of the terms' means, plus the penalty
        expected = step["reward/digit_mean"] + 0.5 * step["reward/flat_mean"] + step["reward/overlong_penalty_mean"]
        assert step["reward/mean"] == pytest.approx(expected, abs=1e-5)
        assert 1 <= step["sampling/rounds"] <= 2
        assert step["sampling/groups_with_signal"] + step["sampling/padding_groups"] in (8, 16)  # whole units of 8 groups
        assert step["sampling/groups_drawn"] == 8 * step["sampling/rounds"]
        assert 0.0 < step["tis/weight_mean"] <= 2.0 and 0.0 <= step["tis/capped_fraction"] <= 1.0
        assert step["rollout/logprob_diff_max"] < 1e-3  # HF engine and actor agree: weights near 1
        assert step["tis/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        rows = GROUP * (step["sampling/groups_with_signal"] + step["sampling/padding_groups"])
        assert step["rollout/masked_truncated"] == round(step["rollout/truncated_frac"] * rows)
        assert step["estimator"] == "grpo"
