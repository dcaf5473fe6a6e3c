"""What the actor and critic share: a DeepSpeed engine trained for epochs x micro-batches."""

from __future__ import annotations

import gc
from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Experience
from hybrid_ppo.config import Config
from hybrid_ppo.memory.residency import DeepSpeedResidency
from hybrid_ppo.roles.common import ResidentRole, init_distributed, role_device
from hybrid_ppo.roles.deepspeed_engine import build_engine


class TrainedRole(ResidentRole):
    """A DeepSpeed-wrapped model with a PPO update loop; subclasses supply the loss."""

    name = "trained"

    def __init__(self, cfg: Config, dist, lr: float, load: Callable[[], nn.Module]):
        init_distributed(dist)
        self.cfg, self.rank, self.world_size = cfg, dist.rank, dist.world_size
        self.device = role_device()
        torch.manual_seed(cfg.train.seed + dist.rank)
        self.engine = build_engine(cfg, dist.world_size, lr, load)
        self.residency = DeepSpeedResidency(self.engine)
        # DeepSpeed's offload_states() runs gc.collect() three times. Over the ~10^6 objects that
        # torch, transformers and DeepSpeed leave after start-up that costs ~0.75 s per offload
        # (measured on CPU); freezing them makes each collect scan only what came later (~1 ms).
        gc.freeze()

    def loss(self, micro: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def early_stop(self, epoch_stats: dict[str, list[float]]) -> bool:
        """Whether to skip the remaining epochs (the actor's target_kl)."""
        return False

    def train(self, experience: Experience, iteration: int) -> dict[str, float]:
        """PPO epochs over this rank's shard; DeepSpeed accumulates micro-batches into optimizer steps."""
        self.engine.train()
        order = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + iteration)
        stats: dict[str, list[float]] = defaultdict(list)
        epochs_run = 0
        for _ in range(self.cfg.train.ppo_epochs):
            epoch_stats: dict[str, list[float]] = defaultdict(list)
            for micro in experience.micro_batches(self.cfg.train.micro_batch_size, order):
                loss, parts = self.loss(micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name} loss is {loss.item()} at iteration {iteration}")
                self.engine.backward(loss)
                self.engine.step()
                for key, value in parts.items():
                    epoch_stats[key].append(float(value))
            epochs_run += 1
            for key, values in epoch_stats.items():
                stats[key].extend(values)
            if self.early_stop(epoch_stats):
                break
        summary = {key: sum(v) / len(v) for key, v in stats.items()}
        summary[f"{self.name}/epochs"] = float(epochs_run)
        return summary

    def mean_across_ranks(self, value: float) -> float:
        """All ranks must agree on control flow (a ZeRO step is a collective). A sync point."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return float(tensor) / self.world_size
