"""The phase -> residency plan: which states of which role must be on the device in each phase.

Read the table top to bottom as one PPO iteration.

* GENERATE holds only the rollout engine (weights + KV cache). Every training role is offloaded,
  not just the actor and critic as in OpenRLHF: the reference and reward model are dead weight here.
* SCORE runs one model at a time, each for its forward only, so its peak is one model's weights
  plus activations. The engine sleeps first (level 2 discards its weights; SYNC refills them).
* ADVANTAGE is a pass over [B, T] rewards and values (GAE through `ops.gae`, whitening) on the
  critic's ranks, or the actor's without a critic: they use their devices, not their weights, so
  no model needs to be resident.
* TRAIN_CRITIC and TRAIN_ACTOR each hold one model's params + grads + optimizer, never both.
* SYNC holds the actor's weights and the engine's weights only. The KV cache stays asleep until
  GENERATE, so the peak during the copy is two copies of the weights and nothing else.
* CHECKPOINT_ACTOR and CHECKPOINT_CRITIC (every `train.save_every` iterations, and to load a checkpoint on
  resume) each hold one trained role's weights + training state, because DeepSpeed's
  save_checkpoint / load_checkpoint read and write both. One role at a time, like SCORE. A save
  comes between SYNC and GENERATE, so the engine keeps the weights SYNC gave it (a level-2 sleep
  would discard them and cost another sync); its KV cache stays asleep. The peak is one trained
  role's state + the engine's weights, with no activations.

Roles not named in a phase have nothing resident. `resident_everything()` is the plan used when
`memory.offload=false`: every state stays put, which is handy for debugging but not a memory plan.

A config that runs fewer roles gets fewer phases: `phase_plan(roles)` drops every phase that exists
only for a role the config does not run (`PHASE_ROLE`). A critic-free estimator (GRPO, RLOO,
REINFORCE++) has no critic, so its plan has no SCORE_CRITIC, TRAIN_CRITIC or CHECKPOINT_CRITIC, and the trainer,
which walks the plan, never enters them. SCORE_REWARD stays without a reward model: a rule reward
runs in the driver during it.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, Mapping


class Phase(str, Enum):
    GENERATE = "generate"
    SCORE_ACTOR = "score_actor"  # old log-probs
    SCORE_REFERENCE = "score_reference"  # reference log-probs
    SCORE_CRITIC = "score_critic"  # values
    SCORE_REWARD = "score_reward"  # reward-model scores (a rule reward runs in the driver instead)
    ADVANTAGE = "advantage"
    TRAIN_CRITIC = "train_critic"
    TRAIN_ACTOR = "train_actor"
    SYNC = "sync"
    CHECKPOINT_ACTOR = "checkpoint_actor"  # the actor's DeepSpeed checkpoint (written, or read on resume)
    CHECKPOINT_CRITIC = "checkpoint_critic"  # the critic's


SCORE_PHASES = (Phase.SCORE_ACTOR, Phase.SCORE_REFERENCE, Phase.SCORE_CRITIC, Phase.SCORE_REWARD)
CHECKPOINT_PHASES = (Phase.CHECKPOINT_ACTOR, Phase.CHECKPOINT_CRITIC)


class Role(str, Enum):
    ACTOR = "actor"
    CRITIC = "critic"
    REFERENCE = "reference"
    REWARD = "reward"
    ROLLOUT = "rollout"


class State(str, Enum):
    WEIGHTS = "weights"  # what a forward needs (DeepSpeed lp_params, module params, engine weights)
    TRAIN_STATE = "train_state"  # grads, optimizer moments and fp32 master weights
    KV_CACHE = "kv_cache"  # the rollout engine's cache pool


ResidentStates = Mapping[Role, frozenset[State]]

# The states each role has at all; a plan may only ask for these.
ROLE_STATES: dict[Role, frozenset[State]] = {
    Role.ACTOR: frozenset({State.WEIGHTS, State.TRAIN_STATE}),
    Role.CRITIC: frozenset({State.WEIGHTS, State.TRAIN_STATE}),
    Role.REFERENCE: frozenset({State.WEIGHTS}),
    Role.REWARD: frozenset({State.WEIGHTS}),
    Role.ROLLOUT: frozenset({State.WEIGHTS, State.KV_CACHE}),
}

_W, _T, _KV = State.WEIGHTS, State.TRAIN_STATE, State.KV_CACHE

PHASE_PLAN: dict[Phase, ResidentStates] = {
    Phase.GENERATE: {Role.ROLLOUT: frozenset({_W, _KV})},
    Phase.SCORE_ACTOR: {Role.ACTOR: frozenset({_W})},
    Phase.SCORE_REFERENCE: {Role.REFERENCE: frozenset({_W})},
    Phase.SCORE_CRITIC: {Role.CRITIC: frozenset({_W})},
    Phase.SCORE_REWARD: {Role.REWARD: frozenset({_W})},
    Phase.ADVANTAGE: {},
    Phase.TRAIN_CRITIC: {Role.CRITIC: frozenset({_W, _T})},
    Phase.TRAIN_ACTOR: {Role.ACTOR: frozenset({_W, _T})},
    # Weights only: the KV cache wakes at GENERATE, after the copy, so the two never coexist.
    Phase.SYNC: {Role.ACTOR: frozenset({_W}), Role.ROLLOUT: frozenset({_W})},
    Phase.CHECKPOINT_ACTOR: {Role.ACTOR: frozenset({_W, _T}), Role.ROLLOUT: frozenset({_W})},
    Phase.CHECKPOINT_CRITIC: {Role.CRITIC: frozenset({_W, _T}), Role.ROLLOUT: frozenset({_W})},
}


PHASE_ROLE: dict[Phase, Role] = {
    Phase.SCORE_REFERENCE: Role.REFERENCE,
    Phase.SCORE_CRITIC: Role.CRITIC,
    Phase.TRAIN_CRITIC: Role.CRITIC,
    Phase.CHECKPOINT_CRITIC: Role.CRITIC,
}
"""Phases that exist only for one role: a plan without that role has no such phase."""

OPTIONAL_PHASES = (Phase.SCORE_ACTOR,)
"""Phases a plan may drop although its role runs: an on-policy update takes its old log-probs from
the training forward (`Config.scores_old_logprobs`)."""


def phase_plan(roles: Iterable[Role], score_actor: bool = True) -> dict[Phase, ResidentStates]:
    """PHASE_PLAN for the roles a config runs: phases of absent roles dropped, and absent roles
    dropped from the phases that remain; no SCORE_ACTOR unless `score_actor`. Phase order is
    iteration order."""
    present = set(roles)
    return {phase: {role: states for role, states in residency.items() if role in present}
            for phase, residency in PHASE_PLAN.items()
            if (phase not in PHASE_ROLE or PHASE_ROLE[phase] in present) and (score_actor or phase != Phase.SCORE_ACTOR)}


def resident(plan: Mapping[Phase, ResidentStates], phase: Phase, role: Role) -> frozenset[State]:
    """States of `role` that must be on the device during `phase` (empty: fully offloaded)."""
    return plan[phase].get(role, frozenset())


def resident_everything(roles: Iterable[Role] = tuple(Role), score_actor: bool = True) -> dict[Phase, ResidentStates]:
    """The no-offload plan for `roles` (default: all): every role keeps every state in every phase."""
    roles = tuple(roles)
    return {phase: {role: ROLE_STATES[role] for role in roles} for phase in phase_plan(roles, score_actor)}


def validate_plan(plan: Mapping[Phase, ResidentStates]) -> None:
    """Refuse a plan that skips a phase its roles need, or asks a role for a state it does not have.
    A phase of `PHASE_ROLE` may be absent only when the plan never names its role."""
    named = {role for residency in plan.values() for role in residency}
    missing = [p.value for p in Phase if p not in plan and p not in OPTIONAL_PHASES
               and (p not in PHASE_ROLE or PHASE_ROLE[p] in named)]
    if missing:
        raise ValueError(f"memory plan has no entry for phase(s): {', '.join(missing)}")
    for phase, residency in plan.items():
        for role, states in residency.items():
            extra = set(states) - ROLE_STATES[role]
            if extra:
                names = ", ".join(sorted(s.value for s in extra))
                raise ValueError(f"memory plan, phase {phase.value}: role {role.value} has no state(s) {names}")


def describe(plan: Mapping[Phase, ResidentStates], roles: list[Role]) -> str:
    """The plan as a text table: one row per phase, one column per role."""
    width = max(len(r.value) for r in roles) + 12
    header = f"{'phase':<16}" + "".join(f"{r.value:<{width}}" for r in roles)
    rows = [header]
    for phase in plan:
        cells = []
        for role in roles:
            states = sorted(s.value for s in resident(plan, phase, role))
            cells.append(f"{'+'.join(states) or '-':<{width}}")
        rows.append(f"{phase.value:<16}" + "".join(cells))
    return "\n".join(rows)
