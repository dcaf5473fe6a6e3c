"""The rollout role: one engine per GPU group, plus the residency handle the scheduler drives."""

from __future__ import annotations

from hybrid_ppo.config import Config, EngineKind
from hybrid_ppo.memory.residency import EngineResidency
from hybrid_ppo.roles.common import ResidentRole, role_device, torch_dtype
from hybrid_ppo.rollout.engine import Generation, RolloutEngine, SamplingParams
from hybrid_ppo.rollout.weight_sync import WeightBucket


def make_engine(cfg: Config, model_path: str) -> RolloutEngine:
    if cfg.rollout.engine == EngineKind.HF:
        from hybrid_ppo.rollout.hf_engine import HFEngine

        return HFEngine(model_path, torch_dtype(cfg.model.dtype), role_device())
    from hybrid_ppo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model_path)


class RolloutWorker(ResidentRole):
    def __init__(self, cfg: Config, dist, model_path: str):
        self.engine = make_engine(cfg, model_path)
        self.residency = EngineResidency(self.engine, cfg.rollout.sleep_level)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation:
        return self.engine.generate(prompt_token_ids, sampling)

    def load_weight_buckets(self, buckets: list[WeightBucket]) -> int:
        """Unpack and load each bucket in turn; returns the bytes received."""
        for bucket in buckets:
            self.engine.load_weights(bucket.unpack())
        return sum(b.nbytes for b in buckets)
