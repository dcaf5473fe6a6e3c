"""A critic-free estimator has no critic: not in the placement, not in the plan, not in a run.
Also the algorithm's config refusals and the adaptive KL controller."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybrid_ppo.algo.kl_controller import KLController
from hybrid_ppo.config import ConfigError, load_config
from hybrid_ppo.launch import memory_plan
from hybrid_ppo.memory.plan import PHASE_PLAN, Phase, Role, phase_plan, resident_everything, validate_plan
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.placement import make_plan, roles_for

GRPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu-grpo.yaml"
GRPO = ["algo.advantage_estimator=grpo", "train.samples_per_prompt=2", "algo.kl_in=loss", "algo.kl_estimator=k3"]


def test_critic_free_config_places_and_plans_no_critic():
    cfg = load_config(None, GRPO)
    assert roles_for(cfg) == ("actor", "reference", "rollout")
    assert "critic" not in make_plan(cfg).roles
    plan = memory_plan(cfg)
    assert Phase.SCORE_CRITIC not in plan and Phase.TRAIN_CRITIC not in plan
    assert all(Role.CRITIC not in residency for residency in plan.values())
    assert list(plan) == [p for p in PHASE_PLAN if p not in (Phase.SCORE_CRITIC, Phase.TRAIN_CRITIC, Phase.CHECKPOINT_CRITIC)]
    validate_plan(plan)
    assert roles_for(load_config()) == ("actor", "critic", "reference", "rollout")
    default = memory_plan(load_config())  # every phase; with a rule reward, SCORE_REWARD holds no model
    assert list(default) == list(PHASE_PLAN) and default[Phase.SCORE_REWARD] == {}


def test_plan_of_every_role_is_the_full_table_and_advantage_needs_no_weights():
    assert phase_plan(Role) == PHASE_PLAN
    assert PHASE_PLAN[Phase.ADVANTAGE] == {}
    # the no-offload plan follows the roles too
    assert Phase.TRAIN_CRITIC not in resident_everything([Role.ACTOR, Role.ROLLOUT])


def test_a_plan_may_drop_critic_phases_only_without_the_critic():
    bad = {p: r for p, r in PHASE_PLAN.items() if p != Phase.TRAIN_CRITIC}  # still names the critic
    with pytest.raises(ValueError, match="no entry for phase.*train_critic"):
        validate_plan(bad)
    scheduler = MemoryScheduler(phase_plan([Role.ACTOR, Role.ROLLOUT]))
    with pytest.raises(ValueError, match="phase train_critic is not in this run's plan"):
        scheduler.enter(Phase.TRAIN_CRITIC)


@pytest.mark.parametrize("overrides, key, allowed", [
    (["algo.kl_in=loss", "algo.kl_estimator=k1"], "algo.kl_estimator", "k3 or k2"),
    (["algo.advantage_estimator=rloo"], "train.samples_per_prompt", ">= 2"),
    ([*GRPO, "train.rollout_batch_size=3", "train.mini_batch_size=6", "train.micro_batch_size=3",
      "placement.num_gpus=2", "rollout.tensor_parallel_size=2"], "train.rollout_batch_size", "whole groups"),
    (["algo.ptx_coef=0.5"], "data.pretrain", "required when algo.ptx_coef > 0"),
    (["algo.dual_clip=0.5"], "algo.dual_clip", "> 1"),
    (["train.lr_schedule=step"], "train.lr_schedule", "constant | cosine | linear"),
    (["train.adam_beta2=1.0"], "train.adam_beta2", "[0, 1)"),
    (["algo.vf_coef=1.0"], "algo.vf_coef", "one of"),  # removed: it meant nothing with a separate optimizer
])
def test_algorithm_config_refusals(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


def test_adaptive_kl_controller_hand_values_and_state():
    fixed = KLController(0.1)
    assert fixed.update(5.0, 100) == 0.1
    kl = KLController(0.1, target=1.0, horizon=1000)
    # KL 1.5 x the target: error clipped to 0.2 -> 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    assert kl.update(1.5, 100) == pytest.approx(0.102)
    # KL 0.9 of the target: error -0.1 -> 0.102 * (1 - 0.1 * 100 / 1000) = 0.10098
    assert kl.update(0.9, 100) == pytest.approx(0.10098)
    restored = KLController(0.5)
    restored.load_state_dict(json.loads(json.dumps(kl.state_dict())))
    assert restored.update(2.0, 100) == kl.update(2.0, 100)


@pytest.mark.slow
def test_grpo_job_runs_without_a_critic(tmp_path):
    from hybrid_ppo.launch import train

    cfg = load_config(None, [*GRPO, "train.iterations=2", "train.eval_every=1", "warmup.steps=20",
                             "data.eval_size=16", "train.rollout_batch_size=16", "train.mini_batch_size=16",
                             "algo.kl_target=0.05", "algo.dual_clip=3", "placement.executor=local",
                             "placement.num_gpus=1", f"logging.output_dir={tmp_path}", "logging.run_name=grpo",
                             "logging.tensorboard=false"])
    result = train(cfg)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward/mean" in line]
    assert len(steps) == 2 and all(line["estimator"] == "grpo" for line in lines)
    for line in steps:
        assert not any(k.startswith(("time/score_critic", "time/train_critic", "critic/", "loss/value")) for k in line)
        assert {"actor/ratio_max", "actor/pg_clipfrac_lower", "kl/coef", "loss/kl", "actor/lr", "time/step",
                "response/clip_ratio", "reward/shaped_mean"} <= line.keys()
        assert all(math.isfinite(v) for v in line.values() if not isinstance(v, str))
    assert steps[0]["kl/coef"] == cfg.algo.kl_coef != steps[1]["kl/coef"]  # the controller moved it
    assert "eval/reward_mean" in steps[0]  # eval_every=1; the last iteration's eval is the final one
    assert [line["iteration"] for line in lines if "eval/response_tokens" in line] == [0, 1, 2]
    timeline = [json.loads(line) for line in (result.run_dir / "memory_timeline.jsonl").read_text().splitlines()]
    assert {m["role"] for m in timeline} == {"actor", "reference", "rollout"}
    assert result.eval_is_accuracy


def test_plan_command_shows_no_critic_for_grpo(capsys):
    from hybrid_ppo.cli import main

    assert main(["plan", str(GRPO_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "critic" not in out and "train_actor" in out and "advantage" in out
    assert main(["plan", "algo.kl_in=loss"]) == 2  # k1 is the default estimator
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "algo.kl_estimator" in err and "k3 or k2" in err
