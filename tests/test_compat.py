"""hybrid_ppo/compat: the DeepSpeed internals that offloading counts and edits, on a real engine at
every ZeRO stage, so a DeepSpeed upgrade that moves them fails here, by name, not as a wrong byte
count or a silent full reload mid-run."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from hybrid_ppo.compat import UpstreamChanged
from hybrid_ppo.compat import deepspeed as ds_compat
from hybrid_ppo.config import load_config
from hybrid_ppo.executor import LOCALHOST, DistInfo, free_port
from hybrid_ppo.memory.plan import State
from hybrid_ppo.memory.residency import DeepSpeedResidency
from helpers import tiny_cfg

KINDS = {2: {"lp_params", "hp_params", "optim_states", "lp_grads"},
         3: {"lp_params", "hp_params", "optim_states", "lp_grads", "contiguous_grad_buffer"}}


def _engine(stage: int):
    from hybrid_ppo.role_process import init_distributed
    from hybrid_ppo.roles.deepspeed_engine import build_engine

    init_distributed(DistInfo(0, 1, LOCALHOST, free_port()))  # a no-op once a world exists
    cfg = tiny_cfg(f"train.zero_stage={stage}")
    torch.manual_seed(0)
    engine = build_engine(cfg, 1, 1e-3, lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)))
    while engine.global_steps < 1:  # micro-batches up to the first optimizer step: Adam's moments exist
        engine.backward(engine(torch.randn(8, 16)).square().mean())
        engine.step()
    return engine


@pytest.mark.parametrize("stage", [2, 3])  # the stages train.zero_stage allows
def test_offloaded_tensors_are_found_at_every_zero_stage(stage):
    engine = _engine(stage)
    tensors = ds_compat.state_tensors(engine)
    assert set(tensors) == KINDS[stage]
    for kind in ("lp_params", "hp_params", "optim_states"):
        assert sum(t.numel() for t in tensors[kind] if t is not None) > 0, kind
    # Counted bytes survive a real offload and reload of only the weights, which leaves the
    # optimizer's states on the host: reloading_only's edit of DeepSpeed's private set works.
    residency = DeepSpeedResidency(engine)
    both = frozenset({State.WEIGHTS, State.TRAIN_STATE})
    counted = residency.state_bytes(both)
    residency.offload(both)
    residency.reload(frozenset({State.WEIGHTS}))
    assert residency.resident == {State.WEIGHTS}
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    assert OffloadStateTypeEnum.optim_states in engine.optimizer.offloaded_states  # still offloaded
    assert OffloadStateTypeEnum.lp_params not in engine.optimizer.offloaded_states
    residency.reload(frozenset({State.TRAIN_STATE}))
    assert residency.state_bytes(both) == counted


def test_a_moved_internal_names_library_version_and_attribute():
    with pytest.raises(UpstreamChanged, match=r"deepspeed .*ZeRO-1/2 optimizer has no attribute 'averaged_gradients'"
                                              r".*checked against 0\.19\.8"):
        ds_compat.zero2_state_tensors(types.SimpleNamespace())


def test_every_state_type_name_is_deepspeeds():
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    from hybrid_ppo.memory.residency import DEEPSPEED_STATE_TYPES

    names = [kind for kinds in DEEPSPEED_STATE_TYPES.values() for kind in kinds]
    assert [t.name for t in ds_compat.offload_state_types(names)] == names
    assert all(isinstance(t, OffloadStateTypeEnum) for t in ds_compat.offload_state_types(names))
    with pytest.raises(UpstreamChanged, match="OffloadStateTypeEnum has no attribute 'lp_weights'"):
        ds_compat.offload_state_types(["lp_weights"])
