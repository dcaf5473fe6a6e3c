"""Applies the phase plan on every phase change: offloads first, then reloads.

Offloading every role that leaves the device before reloading any role that arrives means the
peak of a transition is never "old phase + new phase". Each move is timed and carries the memory
readings its ranks took before and after it; the trainer writes them to the run's memory timeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from hybrid_ppo.memory.plan import ROLE_STATES, Phase, ResidentStates, Role, State, resident, validate_plan


class RoleGroupLike(Protocol):
    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]: ...


@dataclass(frozen=True)
class Move:
    phase: Phase | None  # None: the offload right after a role is built
    role: Role
    direction: str  # "offload" or "reload"
    states: tuple[str, ...]
    seconds: float
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: memory before / after

    def as_record(self) -> dict[str, Any]:
        return {"phase": self.phase.value if self.phase else "startup", "role": self.role.value, "direction": self.direction,
                "states": list(self.states), "seconds": self.seconds, "ranks": self.ranks}


class MemoryScheduler:
    """Moves role states so that each phase finds exactly what the plan says resident."""

    def __init__(self, plan: Mapping[Phase, ResidentStates]):
        validate_plan(plan)
        self.plan = plan
        self.groups: dict[Role, RoleGroupLike] = {}
        self.resident: dict[Role, frozenset[State]] = {}
        self.phase: Phase | None = None

    def register(self, role: Role, group: RoleGroupLike) -> list[Move]:
        """Adopt a freshly built role (everything resident) and offload all of it, unless the plan
        keeps everything resident. Called right after each role is built, so a big box never holds
        every role at once; the first `enter` brings back what its phase needs."""
        self.groups[role] = group
        self.resident[role] = ROLE_STATES[role]
        keep = frozenset(ROLE_STATES[role]) if self._keeps_everything(role) else frozenset()
        return self._move(None, role, "offload", self.resident[role] - keep)

    def enter(self, phase: Phase) -> list[Move]:
        """Switch to `phase`: offload for every role, then reload for every role."""
        if phase not in self.plan:
            raise ValueError(f"phase {phase.value} is not in this run's plan (phases: "
                             f"{', '.join(p.value for p in self.plan)})")
        targets = {role: resident(self.plan, phase, role) for role in self.groups}
        moves = [self._move(phase, role, "offload", self.resident[role] - targets[role]) for role in self.groups]
        moves += [self._move(phase, role, "reload", targets[role] - self.resident[role]) for role in self.groups]
        self.phase = phase
        return [m for group in moves for m in group]

    def _keeps_everything(self, role: Role) -> bool:
        return all(resident(self.plan, p, role) == ROLE_STATES[role] for p in self.plan)

    def _move(self, phase: Phase | None, role: Role, direction: str, states: frozenset[State]) -> list[Move]:
        if not states:
            return []
        names = sorted(s.value for s in states)
        start = time.perf_counter()
        ranks = self.groups[role].call(f"{direction}_states", names)
        seconds = time.perf_counter() - start
        if direction == "offload":
            self.resident[role] = self.resident[role] - states
        else:
            self.resident[role] = self.resident[role] | states
        return [Move(phase, role, direction, tuple(names), seconds, ranks)]
