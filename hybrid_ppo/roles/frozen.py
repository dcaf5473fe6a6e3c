"""The roles that only run forwards (reference, reward model)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from hybrid_ppo.config import Config
from hybrid_ppo.memory.residency import ModuleResidency
from hybrid_ppo.role_process import ResidentRole, init_distributed, role_device
from hybrid_ppo.roles.forward import check_packing
from hybrid_ppo.roles.shared_mask import resolve_prefix_sharing


class FrozenRole(ResidentRole):
    """A model that only runs forwards (reference, reward model): on its device, no grads,
    moved to host and back as a whole by the scheduler."""

    def __init__(self, cfg: Config, dist: Any, load: Callable[[], nn.Module]):
        init_distributed(dist)  # no collectives today; the group is there for sharded inference
        self.cfg, self.device = cfg, role_device()
        self.model = load().to(self.device).eval()
        self.model.requires_grad_(False)
        self.residency = ModuleResidency(self.model, self.device)
        role = type(self).__name__.lower()
        if cfg.train.packing:
            check_packing(self.model, role)
        self.shared = resolve_prefix_sharing(cfg.train, self.model, role, dist.rank)  # algo/prefix_sharing.py
