"""What every role process shares, rollout workers included: its torch.distributed group, its
device and dtype, and the residency calls the memory scheduler makes on it.

Each multi-rank role (actor, critic, reference, ...) forms its *own* process group (gloo on CPU,
nccl on GPU) at its own port: roles never share a collective, so one role's ranks can run while
another's are offloaded. It sits below `roles` and `rollout`, so both import it without a loop.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import torch

from hybrid_ppo.config import DType
from hybrid_ppo.memory.plan import State
from hybrid_ppo.memory.profiler import release_cached_memory, reset_peak, snapshot
from hybrid_ppo.memory.residency import Residency


def role_device() -> torch.device:
    """Ray gives each rank exactly one visible GPU, so it is always cuda:0 when there is one."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(dtype: DType) -> torch.dtype:
    return torch.bfloat16 if dtype == DType.BF16 else torch.float32


def init_distributed(dist: Any) -> None:
    """Join this role's process group (`dist` is an executor.DistInfo). A no-op when one exists,
    as in the local executor, where every role shares the process's world of size 1."""
    import deepspeed
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port), RANK=str(dist.rank),
                      WORLD_SIZE=str(dist.world_size), LOCAL_RANK="0", LOCAL_SIZE="1")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        # NVLS (H100/H200) adds ~288 MiB per rank to a communicator (vllm#9699), more than the
        # planner's NCCL_COMMUNICATOR_BYTES; the roles' collectives are ZeRO gathers, not NVLS work.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    _unlink_deepspeed_shm(dist)


DEEPSPEED_SHM = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""deepspeed/ops/csrc/cpu/comm/shm.cpp's name for a rank's all-reduce workspace (CPU only)."""


def _unlink_deepspeed_shm(dist: Any) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MiB /dev/shm segment per rank when all ranks are on
    one host (LOCAL_SIZE == world size: here, groups of one rank) and never unlinks it, so every
    such role of every CPU run left one behind (78 of them on our dev machine after a day of tests).
    By the time init returns on every rank, each has mapped its peers' segments, so the names can go.
    The memory stays mapped, and the kernel frees it with the processes."""
    import torch.distributed as torch_dist

    if torch_dist.get_backend() != "gloo":
        return  # DeepSpeed's CPU all-reduce only; a barrier on NCCL would build a communicator for nothing
    if dist.world_size > 1:
        torch_dist.barrier()  # every peer has opened this rank's segment
    Path(DEEPSPEED_SHM.format(uid=os.getuid(), addr=dist.master_addr, port=dist.master_port,
                              rank=dist.rank)).unlink(missing_ok=True)


class ResidentRole:
    """The scheduler's handle on a role: move named states and report memory around the move."""

    residency: Residency

    def started(self) -> None:
        """Called once by the executor when every rank of the role is built. DeepSpeed's
        offload_states() runs gc.collect() three times; over the ~10^6 objects that torch,
        transformers and DeepSpeed leave after start-up that cost ~0.75 s per offload (measured on
        CPU). Freezing them, once they exist, makes each collect scan only what came later (~1 ms)."""
        gc.freeze()

    def offload_states(self, states: list[str]) -> dict[str, Any]:
        return self._move(self.residency.offload, states, count_before=True)

    def reload_states(self, states: list[str]) -> dict[str, Any]:
        return self._move(self.residency.reload, states, count_before=False)

    def resident_states(self) -> list[str]:
        return sorted(s.value for s in self.residency.resident)

    def _move(self, move, states: list[str], count_before: bool) -> dict[str, Any]:
        moving = frozenset(State(s) for s in states)
        # Bytes are counted from the tensors while they are resident: before an offload, after a reload.
        moved = self.residency.state_bytes(moving) if count_before else None
        before = snapshot()
        start = time.perf_counter()
        move(moving)
        release_cached_memory()
        seconds = time.perf_counter() - start
        after = snapshot()
        reset_peak()  # the next move's `before` peak is then the peak of the phase this move starts
        if moved is None:
            moved = self.residency.state_bytes(moving)
        return {"seconds": seconds, "before": before.as_dict(), "after": after.as_dict(), "bytes": moved,
                "wall_time": time.time(),  # the x axis of memory_timeline.png
                "pid": os.getpid()}  # roles sharing a process (local executor) share these readings
