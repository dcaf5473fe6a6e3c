"""No redundant forward passes: an exactly on-policy update takes its old log-probs from the training
forward (no SCORE_ACTOR), with the same step as the scored ones; with the KL off there is no
reference at all (no placement slot, no phase, no Ray actor)."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

from helpers import ragged_sequences

from hybrid_ppo.algo.experience import Experience
from hybrid_ppo.config import load_config
from hybrid_ppo.executor import LOCALHOST, DistInfo, free_port
from hybrid_ppo.launch import memory_plan
from hybrid_ppo.memory.plan import Phase, Role, validate_plan
from hybrid_ppo.placement import make_plan, roles_for

ON_POLICY = ["train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=2", "train.ppo_epochs=1"]


@pytest.mark.parametrize("overrides, skipped", [
    (ON_POLICY + ["algo.kl_coef=0"], True),
    (ON_POLICY + ["algo.kl_in=loss", "algo.kl_estimator=k3"], True),  # the KL is in the loss: nothing needs pi_old first
    (ON_POLICY, False),  # KL in the reward: shaped before the advantages, from the scored pi_old
    (ON_POLICY + ["algo.kl_in=loss", "algo.kl_estimator=k3", "algo.kl_target=0.1"], False),  # the controller reads it
    (["train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=2", "train.ppo_epochs=2", "algo.kl_coef=0"], False),
    (["train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=2", "train.ppo_epochs=1",
      "algo.kl_coef=0"], False),  # two mini-batches: the second is off-policy
])
def test_score_actor_is_skipped_exactly_when_on_policy(overrides, skipped):
    cfg = load_config(None, overrides)
    plan = memory_plan(cfg)
    validate_plan(plan)
    assert (Phase.SCORE_ACTOR not in plan) == skipped == (not cfg.scores_old_logprobs)
    assert Phase.TRAIN_ACTOR in plan


def test_kl_off_places_and_plans_no_reference():
    cfg = load_config(None, ["algo.kl_coef=0"])
    assert "reference" not in roles_for(cfg) and "reference" not in make_plan(cfg).roles
    plan = memory_plan(cfg)
    assert Phase.SCORE_REFERENCE not in plan and all(Role.REFERENCE not in r for r in plan.values())
    validate_plan(plan)
    assert "reference" in roles_for(load_config(None, ["algo.kl_coef=0", "algo.kl_target=0.1"]))  # adaptive: it starts at 0
    assert "reference" in make_plan(load_config()).roles


def _experience() -> Experience:
    gen = torch.Generator().manual_seed(0)
    seq = ragged_sequences(gen)
    action = seq.action_mask
    adv = torch.randn(8, 4, generator=gen) * action
    return Experience.build(seq, old_logprobs=None, ref_logprobs=None, rewards=torch.zeros(8, 4), advantages=adv)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_skipped_score_actor_gives_the_same_step(tiny_model_dir, packing):
    """Adam with eps far above |g| (test_actor_update.py): equal updates mean equal gradients."""
    from dataclasses import replace

    from hybrid_ppo.roles.actor import Actor

    cfg = load_config(None, ["placement.executor=local", "placement.num_gpus=1", "rollout.max_new_tokens=4",
                             *ON_POLICY, "train.weight_decay=0", "train.max_grad_norm=1e9",
                             "train.actor_lr=100", "train.adam_eps=1000", "algo.kl_coef=0", "algo.entropy_coef=0.01",
                             f"train.packing={str(packing).lower()}"])
    assert not cfg.scores_old_logprobs
    experience, updates = _experience(), []
    for scored in (True, False):
        actor = Actor(cfg, DistInfo(0, 1, LOCALHOST, free_port()), tiny_model_dir)
        before = torch.cat([p.detach().flatten().clone() for p in actor.engine.module.parameters()])
        batch = replace(experience, old_logprobs=actor.logprobs(experience.sequences)) if scored else experience
        stats = actor.train(batch, iteration=0)
        assert stats["actor/ratio_max"] == pytest.approx(1.0, abs=1e-5)  # on-policy either way
        updates.append(torch.cat([p.detach().flatten() for p in actor.engine.module.parameters()]) - before)
    scale = float(updates[0].abs().max())
    assert scale > 1e-6
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_kl_off_runs_no_reference_ray_actor(tiny_model_dir):
    import ray
    from ray._private import state

    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.launch import build_roles
    from hybrid_ppo.memory.scheduler import MemoryScheduler

    cache = tempfile.mkdtemp(prefix="hppo16r", dir="/tmp")  # short: Ray's socket paths live under it
    cfg = load_config(None, ["placement.num_gpus=2", "algo.kl_coef=0", "algo.advantage_estimator=grpo",
                             "train.samples_per_prompt=2", f"logging.cache_dir={cache}"])
    executor = RayExecutor(cfg).start()
    try:
        roles = build_roles(executor, cfg, MemoryScheduler(memory_plan(cfg)),
                            {"actor": tiny_model_dir, "critic": None, "reference": tiny_model_dir, "reward": None})
        assert roles.reference is None and roles.critic is None
        alive = [a["ActorClassName"] for a in state.actors().values() if a["State"] == "ALIVE"]
        assert sum("Actor" == name.split(".")[-1] for name in alive) == 2, alive  # the actor's 2 ranks are there
        assert not any("Reference" in name for name in alive), alive
        assert ray.is_initialized()
    finally:
        executor.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
