"""The phase plan as data, and the scheduler applying it to real roles.

The scheduler test builds the real Actor / Critic (DeepSpeed ZeRO-2 on gloo), Reference and
rollout worker in-process (local executor), walks an iteration's phases, and asks every role
what it holds. It also checks that the moves are real: an offloaded reference cannot run a
forward, and scoring reloads the actor's weights without its optimizer state.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.config import load_config
from hybrid_ppo.memory.plan import (PHASE_PLAN, Phase, Role, State, describe, resident,
                                    resident_everything, validate_plan)
from hybrid_ppo.memory.scheduler import MemoryScheduler
from helpers import tiny_cfg


class RecordingGroup:
    """A one-rank role that records the calls the scheduler makes (for ordering checks)."""

    def __init__(self, role: Role, log: list):
        self.role, self.log, self.world_size = role, log, 1

    def call(self, method: str, states: list[str]):
        self.log.append((self.role, method, tuple(states)))
        return [{"seconds": 0.0, "before": {}, "after": {}}]


def test_plan_covers_every_phase_and_only_real_states():
    validate_plan(PHASE_PLAN)
    assert resident(PHASE_PLAN, Phase.GENERATE, Role.ROLLOUT) == {State.WEIGHTS, State.KV_CACHE}
    assert resident(PHASE_PLAN, Phase.GENERATE, Role.ACTOR) == frozenset()
    # SCORE holds one model at a time
    for phase in (Phase.SCORE_ACTOR, Phase.SCORE_REFERENCE, Phase.SCORE_CRITIC, Phase.SCORE_REWARD):
        assert len(PHASE_PLAN[phase]) == 1
    # SYNC never wakes the KV cache
    assert State.KV_CACHE not in resident(PHASE_PLAN, Phase.SYNC, Role.ROLLOUT)


def test_bad_plans_are_refused():
    missing = {p: r for p, r in PHASE_PLAN.items() if p != Phase.SYNC}
    with pytest.raises(ValueError, match="no entry for phase.*sync"):
        validate_plan(missing)
    bad = dict(PHASE_PLAN, **{Phase.ADVANTAGE: {Role.REFERENCE: frozenset({State.TRAIN_STATE})}})
    with pytest.raises(ValueError, match="reference has no state.*train_state"):
        validate_plan(bad)


def test_describe_shows_every_phase():
    table = describe(PHASE_PLAN, list(Role))
    assert all(p.value in table for p in Phase)
    assert "kv_cache+weights" in table


def test_scheduler_offloads_before_it_reloads():
    log: list = []
    scheduler = MemoryScheduler(PHASE_PLAN)
    for role in (Role.ROLLOUT, Role.ACTOR, Role.CRITIC):
        scheduler.register(role, RecordingGroup(role, log))
    assert [entry[1] for entry in log] == ["offload_states"] * 3  # built, then straight off the device
    log.clear()
    scheduler.enter(Phase.TRAIN_ACTOR)
    scheduler.enter(Phase.SYNC)  # actor drops train_state, rollout wakes weights
    assert log[-2:] == [(Role.ACTOR, "offload_states", ("train_state",)), (Role.ROLLOUT, "reload_states", ("weights",))]
    log.clear()
    moves = scheduler.enter(Phase.GENERATE)
    directions = [m.direction for m in moves]
    assert directions == sorted(directions, key=lambda d: d != "offload")  # every offload first
    assert {(m.role, m.direction) for m in moves} == {(Role.ACTOR, "offload"), (Role.ROLLOUT, "reload")}


def test_no_offload_plan_keeps_everything():
    log: list = []
    scheduler = MemoryScheduler(resident_everything())
    scheduler.register(Role.ACTOR, RecordingGroup(Role.ACTOR, log))
    for phase in Phase:
        scheduler.enter(phase)
    assert log == []


@pytest.fixture(scope="module")
def local_roles(tiny_model_dir):
    from hybrid_ppo.executor import LocalExecutor
    from hybrid_ppo.launch import build_roles

    cfg = tiny_cfg("train.micro_batch_size=8")
    executor = LocalExecutor(cfg).start()
    scheduler = MemoryScheduler(PHASE_PLAN)
    roles = build_roles(executor, cfg, scheduler, {"actor": tiny_model_dir, "critic": tiny_model_dir,
                                                   "reference": tiny_model_dir, "reward": None})
    yield roles, scheduler
    executor.shutdown()


def _sequences() -> Sequences:
    tokens = torch.tensor([[0, 5, 6, 7, 8], [4, 5, 6, 7, 2]])
    return Sequences(tokens, torch.ones_like(tokens), torch.ones(2, 2, dtype=torch.long))


@pytest.mark.slow
def test_real_roles_hold_what_the_plan_says(local_roles):
    roles, scheduler = local_roles
    groups = {Role.ACTOR: roles.actor, Role.CRITIC: roles.critic, Role.REFERENCE: roles.reference,
              Role.ROLLOUT: roles.rollout}
    for group in groups.values():  # right after build, everything is offloaded
        assert group.call("resident_states") == [[]]
    for phase in [*Phase, Phase.GENERATE, Phase.TRAIN_ACTOR, Phase.SCORE_REFERENCE]:
        scheduler.enter(phase)
        for role, group in groups.items():
            want = sorted(s.value for s in resident(PHASE_PLAN, phase, role))
            assert group.call("resident_states") == [want], f"{role.value} in {phase.value}"


@pytest.mark.slow
def test_moves_are_real(local_roles):
    roles, scheduler = local_roles
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    scheduler.enter(Phase.SCORE_ACTOR)
    actor = roles.actor.members[0]
    # weights came back for the forward, the optimizer state did not
    assert OffloadStateTypeEnum.optim_states in actor.engine.optimizer.offloaded_states
    assert OffloadStateTypeEnum.lp_params not in actor.engine.optimizer.offloaded_states
    assert roles.actor.call("logprobs", _sequences())[0].shape == (2, 2)
    reference = roles.reference.members[0]
    assert all(p.numel() == 0 for p in reference.model.parameters())  # offloaded: nothing left behind
    with pytest.raises(Exception):
        roles.reference.call("logprobs", _sequences())
    scheduler.enter(Phase.SCORE_REFERENCE)
    assert roles.reference.call("logprobs", _sequences())[0].shape == (2, 2)
    scheduler.enter(Phase.TRAIN_ACTOR)
    assert not actor.engine.optimizer.offloaded_states
