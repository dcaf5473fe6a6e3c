"""DeepSpeed internals that offloading needs and no public API gives. Checked against 0.19.8.

* Which tensors `engine.offload_states()` moves, per ZeRO stage, so each residency move can count
  its bytes from the tensors (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, the
  `offload_states` methods of the two optimizers).
* `reload_states()` reloads everything offloaded, so a partial reload edits the optimizer's
  private `offloaded_states` set for the length of the call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from hybrid_ppo.compat import require

CHECKED = "0.19.8"


def _get(obj: object, name: str, owner: str):
    import deepspeed

    return require(obj, name, "deepspeed", deepspeed.__version__, CHECKED, owner)


def offload_state_types(kinds: list[str]) -> list:
    """DeepSpeed's `OffloadStateTypeEnum` members by name (lp_params, optim_states, ...)."""
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    return [_get(OffloadStateTypeEnum, kind, "OffloadStateTypeEnum") for kind in kinds]


def _optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Adam's moments (and step counters), from the wrapped torch optimizer's state."""
    inner = _get(optimizer, "optimizer", type(optimizer).__name__)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def zero2_state_tensors(opt) -> dict[str, list]:
    """The tensors ZeRO-1/2's `offload_states` moves, by `OffloadStateTypeEnum` name."""
    owner = "ZeRO-1/2 optimizer"
    averaged = _get(opt, "averaged_gradients", owner)
    return {"lp_params": list(_get(opt, "bit16_groups_flat", owner)),
            "hp_params": list(_get(opt, "single_partition_of_fp32_groups", owner)),
            "optim_states": _optimizer_state_tensors(opt),
            "lp_grads": [g for group in averaged.values() if group is not None for g in group]}


def zero3_state_tensors(opt) -> dict[str, list]:
    """The tensors ZeRO-3's `offload_states` moves, by `OffloadStateTypeEnum` name. The flat
    parameter buffer and the gradient buffers exist only in some configurations (None otherwise)."""
    owner = "ZeRO-3 optimizer"
    buffer = _get(opt, "lp_param_buffer", owner) if hasattr(opt, "lp_param_buffer") else None
    weights = [buffer] if buffer is not None else [p.ds_tensor for p in _get(opt, "module", owner).parameters()]
    ipg = [getattr(b, "buffer", None) for b in _get(opt, "ipg_buckets", owner).values()]
    return {"lp_params": weights,
            "hp_params": list(_get(opt, "fp32_partitioned_groups_flat", owner)),
            "optim_states": _optimizer_state_tensors(opt),
            "lp_grads": [_get(opt, "grad_partitions_flat_buffer", owner)],
            "contiguous_grad_buffer": [t for t in ipg if isinstance(t, torch.Tensor)]}


def state_tensors(engine) -> dict[str, list]:
    """What `offload_states` would move on this engine, by state type name."""
    if engine.zero_optimization_stage() == 3:
        return zero3_state_tensors(engine.optimizer)
    return zero2_state_tensors(engine.optimizer)


@contextlib.contextmanager
def reloading_only(engine, types: list) -> Iterator[None]:
    """Within the block, `engine.reload_states()` brings back only `types`; the other offloaded
    states stay on the host (they are hidden from, then given back to, the optimizer's set)."""
    offloaded = _get(engine.optimizer, "offloaded_states", type(engine.optimizer).__name__)
    stay = {t for t in offloaded if t not in types}
    offloaded.difference_update(stay)
    try:
        yield
    finally:
        offloaded.update(stay)
