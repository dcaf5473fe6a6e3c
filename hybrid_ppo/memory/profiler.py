"""Memory readings: device memory from NVML and torch.cuda, host memory from psutil.

`snapshot()` is cheap enough to call before and after every residency move. Without a GPU,
NVML raises `NVMLError_LibraryNotFound`; the device fields are then None and only the host RSS
is measured, so CPU runs still produce a timeline.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import psutil
import torch

GIB = 1 << 30


@dataclass(frozen=True)
class MemorySnapshot:
    host_rss_gib: float  # this process's resident set
    device_allocated_gib: float | None  # torch.cuda.memory_allocated: live tensors of this process
    device_reserved_gib: float | None  # torch.cuda.memory_reserved: what the caching allocator holds
    device_used_gib: float | None  # NVML: the whole GPU, every process (vLLM included)
    device_peak_gib: float | None = None  # torch.cuda.max_memory_allocated since this process's last move

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@lru_cache(maxsize=1)
def _nvml_handle():
    """NVML handle of this process's GPU, or None where there is no NVML (no GPU, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        index = int(visible) if visible.isdigit() else 0
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVMLError_LibraryNotFound on CPU machines; also a missing pynvml
        return None


def snapshot() -> MemorySnapshot:
    host = psutil.Process().memory_info().rss / GIB
    if not torch.cuda.is_available():
        return MemorySnapshot(host, None, None, None)
    used = None
    handle = _nvml_handle()
    if handle is not None:
        import pynvml

        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
    return MemorySnapshot(host, torch.cuda.memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB, used,
                          torch.cuda.max_memory_allocated() / GIB)


def reset_peak() -> None:
    """Start a new peak window: the next snapshot's `device_peak_gib` covers what runs after this.

    Only in a process that already uses CUDA: `reset_peak_memory_stats` initialises CUDA
    (torch/cuda/memory.py: it asks for the current device), and a rollout actor, whose GPU work
    runs in vLLM's own processes, would pay a CUDA context (~500 MiB) per GPU for a reading of
    nothing. The other calls here are safe: `memory_stats` and `empty_cache` return early
    without CUDA initialised."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def release_cached_memory() -> None:
    """Hand freed blocks back to the driver so the next phase's role can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
