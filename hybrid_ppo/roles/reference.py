"""The reference policy: frozen, computes log pi_ref for the KL term (SCORE_REFERENCE)."""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.config import Config
from hybrid_ppo.role_process import torch_dtype
from hybrid_ppo.roles.forward import in_micro_batches, response_logprobs, to_device
from hybrid_ppo.roles.frozen import FrozenRole
from hybrid_ppo.roles.lm_head import FUSED, lm_head_path
from hybrid_ppo.roles.models import load_causal_lm


class Reference(FrozenRole):
    def __init__(self, cfg: Config, dist, model_path: str):
        super().__init__(cfg, dist, lambda: load_causal_lm(model_path, torch_dtype(cfg.model.dtype)))
        self.lm_head_path = lm_head_path(self.model, role="reference")

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        """[B, R] log pi_ref of the sampled responses, at the rollout temperature like pi_old."""
        train = self.cfg.train
        return in_micro_batches(lambda c: response_logprobs(
            self.model, to_device(c, self.device), self.cfg.rollout.temperature, fused=self.lm_head_path == FUSED,
            packed=train.packing, shared=self.shared).cpu(), seq, train.micro_batch_size, train.max_tokens_per_micro_batch,
            shared=self.shared)
