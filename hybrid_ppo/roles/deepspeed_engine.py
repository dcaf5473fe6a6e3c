"""The DeepSpeed engine shared by the two trained roles (actor and critic).

ZeRO-2 uses torch AdamW. ZeRO-3 uses DeepSpeed's FusedAdam (DeepSpeedCPUAdam is what its CPU
offload would use), because `offload_states` under ZeRO-3 refuses any other optimizer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hybrid_ppo.config import Config, DType


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    micro = cfg.train.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.mini_batch_size // (micro * world_size),
        "train_batch_size": cfg.train.mini_batch_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": {"stage": cfg.train.zero_stage, "overlap_comm": False},
        "bf16": {"enabled": cfg.model.dtype == DType.BF16},
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }


@contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, load weights straight into partitions (each rank holds 1/N), not whole models.

    transformers reads the live HfDeepSpeedConfig during from_pretrained; it must outlive the load.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)
    yield
    del keep_alive


def _optimizer(cfg: Config, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.train.zero_stage == 3:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=lr, weight_decay=cfg.train.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)


def build_engine(cfg: Config, world_size: int, lr: float, load: Callable[[], nn.Module]):
    """`load()` builds the module (inside ZeRO-3 partitioned loading when stage 3); returns the engine."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    with zero3_loading(ds_config):
        model = load()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(cfg, params, lr), config=ds_config)
    return engine


@contextmanager
def gathered_parameters(engine, params: list[nn.Parameter] | None = None) -> Iterator[None]:
    """Full `params` (default: all) on every rank for the duration under ZeRO-3; a no-op for
    ZeRO-2, whose ranks hold full parameters anyway. Collective: every rank must enter."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    params = list(engine.module.parameters()) if params is None else params
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full_numel(param: nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it away (numel() == 0)."""
    return getattr(param, "ds_numel", param.numel())
