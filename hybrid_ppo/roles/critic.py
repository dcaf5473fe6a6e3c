"""The critic: a value-head model as a DeepSpeed engine. Values in SCORE, the clipped value
regression in TRAIN_CRITIC."""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.algo.ppo import LossNorm, value_loss
from hybrid_ppo.config import Config
from hybrid_ppo.role_process import torch_dtype
from hybrid_ppo.roles.forward import to_device
from hybrid_ppo.roles.models import ValueModel
from hybrid_ppo.roles.trained import TrainedRole


class Critic(TrainedRole):
    name = "critic"

    def __init__(self, cfg: Config, dist, model_path: str):
        super().__init__(cfg, dist, cfg.train.critic_lr, lambda: ValueModel(model_path, torch_dtype(cfg.model.dtype)))

    @torch.no_grad()
    def values(self, seq: Sequences) -> Tensor:
        """[B, R] V_old(s_t) (SCORE_CRITIC)."""
        self.engine.eval()
        return self.in_micro_batches(
            lambda c: self.engine(to_device(c, self.device), packed=self.cfg.train.packing, shared=self.shared).cpu(), seq)

    def loss(self, micro: Experience, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value regression, as this micro-batch's share of the mini-batch (`norm`). No
        vf_coef: the critic has its own optimizer, where a loss scale would only shift Adam's eps
        and gradient clipping, not the balance with the policy loss it means in a shared model."""
        seq = to_device(micro.sequences, self.device)
        values = self.engine(seq, packed=self.cfg.train.packing, shared=self.shared)
        out = value_loss(values, micro.values.to(self.device), micro.returns.to(self.device),
                         seq.action_mask.float(), self.cfg.algo.value_clip_eps, self.cfg.algo.loss_agg, norm)
        return out.loss, {"loss/value": out.loss.detach(), "critic/clip_frac": out.clip_frac}
