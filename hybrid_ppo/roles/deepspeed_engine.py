"""The DeepSpeed engine shared by the two trained roles (actor and critic).

ZeRO-2 uses torch AdamW. ZeRO-3 uses DeepSpeed's FusedAdam (DeepSpeedCPUAdam is what its CPU
offload would use), because `offload_states` under ZeRO-3 refuses any other optimizer.

The LR schedule is a torch `LambdaLR` handed to `deepspeed.initialize`: DeepSpeed steps it after
each optimizer step and saves it in its checkpoints with the optimizer.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hybrid_ppo.config import Config, DType, LRSchedule


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
    t = cfg.train
    adam = dict(lr=lr, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if t.zero_stage == 3:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **adam)
    return torch.optim.AdamW(params, **adam)


def lr_factor(schedule: LRSchedule, warmup_steps: int, total_steps: int, step: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): a linear ramp over the
    first `warmup_steps` (step 0 already at 1/warmup, so no step is wasted at LR 0), then
    constant, or a cosine / linear decay that reaches 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == LRSchedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(t.lr_schedule, t.lr_warmup_steps, t.optimizer_steps, step))


def build_engine(cfg: Config, world_size: int, lr: float, load: Callable[[], nn.Module]):
    """`load()` builds the module (inside ZeRO-3 partitioned loading when stage 3); returns the engine."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    with zero3_loading(ds_config):
        model = load()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params, lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=_lr_scheduler(cfg, optimizer),
                                      config=ds_config)
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
