"""The rollout role: one engine per GPU group, plus the residency handle the scheduler drives."""

from __future__ import annotations

from typing import Any

import torch

from hybrid_ppo.config import Config, EngineKind
from hybrid_ppo.memory.residency import EngineResidency
from hybrid_ppo.role_process import ResidentRole, role_device, torch_dtype
from hybrid_ppo.rollout.engine import Generation, RolloutEngine, SamplingParams
from hybrid_ppo.rollout.weight_sync import BucketHandle


def make_engine(cfg: Config, model_path: str, engine_rank: int = 0) -> RolloutEngine:
    if cfg.rollout.engine == EngineKind.HF:
        from hybrid_ppo.rollout.hf_engine import HFEngine

        if cfg.rollout.full_determinism:
            torch.use_deterministic_algorithms(True)
        return HFEngine(model_path, torch_dtype(cfg.model.dtype), role_device())
    from hybrid_ppo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model_path, engine_rank)


class RolloutWorker(ResidentRole):
    def __init__(self, cfg: Config, dist, model_path: str):
        self.engine = make_engine(cfg, model_path, dist.rank)
        self.residency = EngineResidency(self.engine, cfg.rollout.sleep_level)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation:
        return self.engine.generate(prompt_token_ids, sampling)

    def load_bucket(self, handles: list[dict[str, Any]]) -> int:
        """Load one bucket from the actor ranks on this engine's GPUs (one handle per TP worker,
        in `BucketHandle.to_wire` form). Returning is the ack: the actor may then reuse the buffer."""
        self.engine.load_bucket([BucketHandle.from_wire(h) for h in handles])
        return len(handles)

    def probe_bucket(self, handles: list[dict[str, Any]]) -> str | None:
        """Open a probe handle (`sync_driver.choose_transport`): None if it worked, else why not."""
        return self.engine.probe_bucket([BucketHandle.from_wire(h) for h in handles])

    def finish_weight_sync(self) -> None:
        """Every bucket of the sync has arrived (engines check that nothing is missing)."""
        self.engine.finish_weight_sync()

    def close(self) -> None:
        """The run is over (executor shutdown): the engine stops for good."""
        self.engine.close()
