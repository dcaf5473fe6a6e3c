"""CPU tests of decisions that only matter on a GPU box: each takes what the GPU box would hand it
(the environment Ray sets, what vLLM's platform says), so the same code that decides there runs here.
What only a GPU can show is in the `gpu` tests beside the code (tests/test_weight_sync.py, ...)."""

from __future__ import annotations

import os

import pytest
import torch

from hybrid_ppo.config import load_config
from hybrid_ppo.rollout import vllm_engine
from hybrid_ppo.rollout.weight_sync import BucketStager


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


def test_resetting_the_peak_leaves_a_process_without_cuda_without_a_context(monkeypatch):
    """A rollout actor sees its GPU but never initialises CUDA itself (vLLM's processes do the
    work): a memory reading there must not create a CUDA context."""
    from hybrid_ppo.memory import profiler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def initialises_cuda(*_args):
        raise AssertionError("reset_peak_memory_stats initialises CUDA")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", initialises_cuda)
    profiler.reset_peak()
    profiler.release_cached_memory()  # torch's empty_cache returns early without CUDA initialised


class VLLMWorkerStandIn:
    """Stand-in for vLLM's Worker (it cannot be built without vLLM): the attributes the extension
    uses, with a `reload_weights` that records where a tensor created inside it would live."""

    def __init__(self, device: torch.device):
        self.device, self.created_on = device, []

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        list(weights_iterator)
        self.created_on.append(torch.empty(1).device)  # as materialize_meta_tensor allocates: no device


def test_reload_builds_layers_on_the_workers_device():
    from safetensors.torch import save

    from hybrid_ppo.rollout.vllm_worker import WeightSyncExtension

    worker = VLLMWorkerStandIn(torch.device("meta"))  # a device other than the default, as cuda:0 is
    WeightSyncExtension.hppo_load_tensors(worker, save({"w": torch.ones(2)}))
    worker._hppo_held = [("w", torch.ones(2))]
    WeightSyncExtension.hppo_finish_sync(worker)
    assert worker.created_on == [torch.device("meta")] * 2
    assert torch.empty(1).device == torch.device("cpu")  # the default device is back after each


def test_finishing_a_sync_collects_the_reloads_garbage(monkeypatch):
    import gc
    import weakref

    from hybrid_ppo.rollout.vllm_worker import WeightSyncExtension

    class Node:
        pass

    worker = VLLMWorkerStandIn(torch.device("cpu"))
    cycle = Node()
    cycle.self, cycle.tensor = cycle, torch.ones(1024)  # a cycle, as reload temporaries make
    alive = weakref.ref(cycle.tensor)
    del cycle
    gc.disable()  # only the sync's own collection may free it
    try:
        assert alive() is not None
        WeightSyncExtension.hppo_finish_sync(worker)
        assert alive() is None
    finally:
        gc.enable()


def test_a_tp_worker_takes_the_handle_staged_on_its_own_device_whatever_the_order(monkeypatch):
    """Ray need not give a TP engine's workers its bundles' GPUs in order (ray#51117): TP rank 0
    may sit on the second bundle's GPU. Each worker matches its own device, on CPU by bundle."""
    from hybrid_ppo.rollout.vllm_worker import worker_device_key
    from hybrid_ppo.rollout.weight_sync import WeightSyncError, device_key, handle_for

    stagers = [BucketStager(torch.device("cpu"), torch.float32, 4, 1, device_key(torch.device("cpu"), b))
               for b in (2, 3)]  # actor ranks 2 and 3, on bundles 2 and 3
    try:
        handles = [s.stage(0, [("w", torch.zeros(4))]) for s in stagers]
        monkeypatch.setenv("HYBRID_PPO_BUNDLES", "3,2")  # this engine's TP rank 0 on bundle 3
        worker = VLLMWorkerStandIn(torch.device("cpu"))
        assert [handle_for(handles, worker_device_key(worker, r), r).device_key for r in (0, 1)] == ["bundle-3", "bundle-2"]
        with pytest.raises(WeightSyncError, match="no handle was staged on this worker's device bundle-7"):
            handle_for(handles, "bundle-7", 0)
        stagers.append(BucketStager(torch.device("cpu"), torch.float32, 4, 2))  # no key: built outside the executor
        unkeyed = [stagers[-1].stage(k, [("w", torch.zeros(4))]) for k in range(2)]
        assert handle_for(unkeyed, "bundle-3", 1) is unkeyed[1]  # no keys at all: by position
    finally:
        for s in stagers:
            s.close()


def test_the_shared_memory_barrier_runs_on_gloo_only(monkeypatch, tmp_path):
    """The barrier is for DeepSpeed's CPU all-reduce segments; on NCCL it would create a
    communicator the reference and reward roles never use (~256 MiB per rank)."""
    import torch.distributed as torch_dist

    from hybrid_ppo.executor import DistInfo
    from hybrid_ppo import role_process as common

    def barrier():
        raise AssertionError("barrier on NCCL")

    monkeypatch.setattr(torch_dist, "get_backend", lambda *_: "nccl")
    monkeypatch.setattr(torch_dist, "barrier", barrier)
    common._unlink_deepspeed_shm(DistInfo(0, 2, "127.0.0.1", 29500))
    calls = []
    monkeypatch.setattr(torch_dist, "get_backend", lambda *_: "gloo")
    monkeypatch.setattr(torch_dist, "barrier", lambda: calls.append(1))
    common._unlink_deepspeed_shm(DistInfo(0, 2, "127.0.0.1", 29500))
    assert calls == [1]


def test_pinned_blocks_are_counted_as_the_host_allocator_rounds_them():
    from hybrid_ppo.memory.estimate import pinned_block_bytes

    assert [pinned_block_bytes(n) for n in (0, 1, 4096, 4097)] == [0, 1, 4096, 8192]
    assert pinned_block_bytes(128_256 * 4096 * 2) == 1 << 30  # Llama-3.1-8B's embedding, 1.05 GB < 1 GiB
    assert pinned_block_bytes(152_064 * 3584 * 2) == 2 << 30  # Qwen2.5-7B's, 1.09 GB > 1 GiB: pins 2 GiB


def test_a_frozen_role_offloads_into_one_host_buffer_and_comes_back_whole():
    """One block per role is what the planner counts (`pinned_block_bytes` of the role's bytes)."""
    from hybrid_ppo.memory.plan import State
    from hybrid_ppo.memory.residency import ModuleResidency

    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5)).to(torch.bfloat16)
    module.register_buffer("steps", torch.arange(3))  # an int64 buffer after bf16 ones: alignment
    before = {k: v.clone() for k, v in module.state_dict().items()}
    residency = ModuleResidency(module, torch.device("cpu"))
    residency.offload(frozenset({State.WEIGHTS}))
    storages = {t.untyped_storage().data_ptr() for t in residency._host.values()}
    assert len(storages) == 1 and all(p.numel() == 0 for p in module.parameters())
    residency.reload(frozenset({State.WEIGHTS}))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
