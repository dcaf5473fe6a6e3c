"""CPU tests of decisions that only matter on a GPU box: each takes what the GPU box would hand it
(the environment Ray sets, what vLLM's platform says), so the same code that decides there runs here.
What only a GPU can show is in the `gpu` tests beside the code (tests/test_weight_sync.py, ...)."""

from __future__ import annotations

import os

import pytest
import torch

from hybrid_ppo.config import load_config
from hybrid_ppo.rollout import vllm_engine


class CudaPlatformStandIn:
    """Stand-in for vLLM's CUDA platform, which vLLM picks through NVML on a GPU box (no GPU here)."""

    @staticmethod
    def is_cuda_alike() -> bool:
        return True


def _tp2_config():
    return load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel_size=2", "placement.num_gpus=2"])


def test_a_tp2_engine_decides_cuda_from_the_platform_in_the_environment_ray_gives_it(monkeypatch):
    """Ray gives a TP>1 engine's actor (num_gpus=0) CUDA_VISIBLE_DEVICES='' (ray#53643): torch sees
    no GPU there, vLLM's platform still does. The engine must take vLLM's word."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what torch says in that actor
    cfg = _tp2_config()
    cuda = vllm_engine.engine_on_cuda(CudaPlatformStandIn())
    assert cuda is True
    kwargs = vllm_engine._placement_kwargs(cfg, cuda)
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["enable_sleep_mode"] is True
    assert "kv_cache_memory_bytes" not in kwargs  # the planner's gpu_memory_utilization, not a CPU cache
    with vllm_engine._gpus_visible_to_ray_workers(cfg, cuda):
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # vLLM refuses an empty one (vllm#8402)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # put back: nothing else in the actor sees the GPUs


def test_the_cpu_platform_keeps_the_environment_and_the_mp_backend(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    class CpuPlatform:
        @staticmethod
        def is_cuda_alike() -> bool:
            return False

    cfg = _tp2_config()
    cuda = vllm_engine.engine_on_cuda(CpuPlatform())
    assert vllm_engine._placement_kwargs(cfg, cuda)["distributed_executor_backend"] == "mp"
    with vllm_engine._gpus_visible_to_ray_workers(cfg, cuda):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
