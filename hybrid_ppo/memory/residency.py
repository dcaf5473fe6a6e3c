"""Residency adapters: how each kind of role moves its states off the device and back.

The scheduler only says *which* states to move; an adapter knows *how*:

* `DeepSpeedResidency`: `engine.offload_states(include=...)` / `engine.reload_states()`.
* `ModuleResidency`: a frozen torch module (reference, reward model) copies its tensors to host
  memory and leaves empty tensors behind, so a forward on an offloaded module fails loudly
  instead of silently running on stale or host memory. The same holds on CPU, which is why CPU
  runs catch a wrong plan too.
* `EngineResidency`: a rollout engine's `sleep(level)` / `wake_up(tags)`.

Each adapter also counts the bytes of its states from the tensors themselves (`state_bytes`), per
component, so the profiler can put them beside the planner's estimate. A tensor counts once
however many views of it exist (storages are deduplicated), and wherever it lives at the time.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hybrid_ppo.compat import deepspeed as deepspeed_compat
from hybrid_ppo.memory.plan import State


class Residency(Protocol):
    """What the scheduler needs from a role: the resident set, the two moves, and their size."""

    resident: set[State]

    def offload(self, states: frozenset[State]) -> None: ...

    def reload(self, states: frozenset[State]) -> None: ...

    def state_bytes(self, states: frozenset[State]) -> dict[str, dict[str, int]]: ...


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None and empty tensors count 0)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class _Tracked:
    """Keeps `resident` honest: a move of a state that is not where it should be is a bug."""

    def __init__(self, states: frozenset[State]):
        self.managed = frozenset(states)
        self.resident: set[State] = set(states)

    def _check(self, states: frozenset[State], *, want_resident: bool) -> frozenset[State]:
        unknown = states - self.managed
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state(s) {sorted(s.value for s in unknown)}")
        wrong = {s for s in states if (s in self.resident) != want_resident}
        if wrong:
            where = "already offloaded" if want_resident else "already resident"
            raise RuntimeError(f"{type(self).__name__}: state(s) {sorted(s.value for s in wrong)} {where}")
        return states


DEEPSPEED_STATE_TYPES = {
    State.WEIGHTS: ["lp_params"],
    State.TRAIN_STATE: ["optim_states", "hp_params", "lp_grads", "contiguous_grad_buffer"],
}
"""Our states as DeepSpeed's `OffloadStateTypeEnum` names."""


def _ds_state_types(states: frozenset[State]) -> list:
    return deepspeed_compat.offload_state_types([kind for s in states for kind in DEEPSPEED_STATE_TYPES[s]])


class DeepSpeedResidency(_Tracked):
    """Actor / critic: a DeepSpeed ZeRO engine's weights and training state."""

    def __init__(self, engine):
        super().__init__(frozenset({State.WEIGHTS, State.TRAIN_STATE}))
        self.engine = engine

    def offload(self, states: frozenset[State]) -> None:
        if not self._check(states, want_resident=True):
            return
        self.engine.offload_states(include=_ds_state_types(states))
        self.resident -= states

    def state_bytes(self, states: frozenset[State]) -> dict[str, dict[str, int]]:
        """Per state, per DeepSpeed state type (`OffloadStateTypeEnum` names): bytes on this rank."""
        tensors = deepspeed_compat.state_tensors(self.engine)
        return {s.value: {kind: tensor_bytes(tensors[kind]) for kind in DEEPSPEED_STATE_TYPES[s] if kind in tensors}
                for s in states}

    def reload(self, states: frozenset[State]) -> None:
        if not self._check(states, want_resident=False):
            return
        # DeepSpeed's reload_states() brings back everything it offloaded; SCORE, e.g., reloads
        # the weights without the optimizer.
        with deepspeed_compat.reloading_only(self.engine, _ds_state_types(states)):
            self.engine.reload_states()
        self.resident |= states


class ModuleResidency(_Tracked):
    """A frozen module's parameters and buffers, copied to host memory and back."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__(frozenset({State.WEIGHTS}))
        self.module, self.device = module, device
        self._host: dict[str, torch.Tensor] = {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    def state_bytes(self, states: frozenset[State]) -> dict[str, dict[str, int]]:
        """The module's parameters and buffers, resident or in their host copies."""
        tensors = [self._host.get(name, t) for name, t in self._tensors().items()]
        return {s.value: {"params": tensor_bytes(tensors)} for s in states}

    def offload(self, states: frozenset[State]) -> None:
        """Into one flat host buffer (pinned on CUDA), each tensor a view of it. Pinned blocks are
        rounded up to a power of two (memory/estimate.py `pinned_block_bytes`): one block per role
        wastes at most one rounding, and is what `hybrid-ppo plan` counts; a block per tensor
        rounded each of hundreds of tensors."""
        if not self._check(states, want_resident=True):
            return
        tensors = self._tensors()
        flat = torch.empty(sum(_padded(t) for t in tensors.values()), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")
        offset = 0
        for name, tensor in tensors.items():
            nbytes, padded = tensor.numel() * tensor.element_size(), _padded(tensor)
            host = flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor.data)
            self._host[name] = host
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)
            offset += padded
        self.resident -= states

    def reload(self, states: frozenset[State]) -> None:
        if not self._check(states, want_resident=False):
            return
        for name, tensor in self._tensors().items():
            tensor.data = self._host.pop(name).to(self.device, non_blocking=True)
        self.resident |= states


def _padded(tensor: torch.Tensor) -> int:
    """A tensor's bytes rounded up to 16, so every view into a flat uint8 buffer is aligned for its dtype."""
    return -(-tensor.numel() * tensor.element_size() // 16) * 16


class SleepableEngine(Protocol):
    """What residency needs of a rollout engine (rollout/engine.py's `RolloutEngine` is one)."""

    def sleep(self, level: int) -> None: ...

    def wake_up(self, tags: list[str]) -> None: ...

    def memory_bytes(self) -> dict[str, int]: ...


class EngineResidency(_Tracked):
    """A rollout engine: sleep(level) drops both states, wake_up(tags) brings back the named ones."""

    def __init__(self, engine: SleepableEngine, sleep_level: int):
        super().__init__(frozenset({State.WEIGHTS, State.KV_CACHE}))
        self.engine, self.sleep_level = engine, sleep_level

    def offload(self, states: frozenset[State]) -> None:
        if not self._check(states, want_resident=True):
            return
        if states == {State.WEIGHTS} and State.KV_CACHE in self.resident:
            raise ValueError("a rollout engine cannot drop its weights and keep its KV cache")
        if states == self.resident:
            self.engine.sleep(self.sleep_level)
        else:
            # Dropping only the KV cache: vLLM sleeps all or nothing, so sleep at level 1
            # (weights to host) and wake the weights again. Costs one host round trip.
            self.engine.sleep(1)
            self.engine.wake_up([State.WEIGHTS.value])
        self.resident -= states

    def state_bytes(self, states: frozenset[State]) -> dict[str, dict[str, int]]:
        """What the engine says its weights and KV cache occupy (a size it cannot tell is left out)."""
        sizes = self.engine.memory_bytes()
        return {s.value: {s.value: sizes[s.value]} for s in states if s.value in sizes}

    def reload(self, states: frozenset[State]) -> None:
        if not self._check(states, want_resident=False):
            return
        self.engine.wake_up(sorted(s.value for s in states))
        self.resident |= states
