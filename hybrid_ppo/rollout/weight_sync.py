"""Actor -> engine weights, bucket by bucket, with the driver carrying only control messages.

Every engine worker shares its GPU with one actor rank (placement: actor rank i and rollout
worker i on bundle i), and every actor rank holds each bucket in full at some point anyway
(ZeRO-3 gathers it on every rank; ZeRO-2 ranks hold all weights). So the handoff is local:

1. The driver asks every actor rank to stage bucket k (`Actor.stage_bucket`): gather it, cast
   it to the rollout dtype and copy it into a staging buffer the engine can open. Each rank
   returns a `BucketHandle`: names, shapes, dtype and where the bytes are. A few hundred bytes.
2. The driver gives handle i to the engine worker on GPU i (`RolloutWorker.load_bucket`), which
   opens it, loads the weights and returns. That return is the one barrier per bucket: only
   after it may the actor rank overwrite the buffer with a later bucket.
3. After the last bucket, the actor ranks unlink their buffers (`Actor.end_weight_sync`), and the
   driver removes any shared-memory segment still named by a handle (a rank that died before
   cleaning up), so nothing is left in /dev/shm, also after a failure.

Transports, same protocol:

* CUDA: the buffer is a device tensor; the handle carries `reduce_tensor`'s IPC payload, and the
  engine copies device to device. No host hop.
* CPU: the buffer is a file in /dev/shm that the actor rank maps (`torch.from_file`). The HF
  engine reads it straight into its parameters (`read_bucket_into`: no mapping, no extra
  memory); vLLM's workers map it read-only (`opened_bucket`) for vLLM's loader to copy from.

Buckets are whole decoder layers (`bucket_plan`), so the parts vLLM fuses (q/k/v, gate/up) never
straddle two buckets and an engine can apply each bucket as it arrives. With `slots=2` the
driver stages bucket k+1 while the engines load bucket k; peak extra memory per GPU is `slots`
buffers of the largest bucket on the actor side, and one opened bucket in the engine.

On paper, 7B bf16 on 8xH100 (ZeRO-3 actor, 8 engines at TP=1, 512 MiB buckets):

* Weights: 7.0e9 params x 2 B = 14.0 GB. A decoder layer is ~202M params = 405 MB, so buckets
  are one layer each: ~34 buckets (32 layers, embeddings, head). Extra memory per GPU: one
  405 MB staging buffer (two with rollout.weight_sync_slots=2).
* Gather: each GPU receives 7/8 of every bucket over NVLink: 14.0 GB x 7/8 = 12.3 GB at a
  conservative 150 GB/s of NCCL all-gather per GPU = 0.08 s. (ZeRO-2: nothing to gather.)
* Stage: read the gathered layer, write the staging buffer: 2 x 14.0 GB at ~2.5 TB/s of HBM3
  = 0.011 s.
* Load: the engine reads the buffer through its IPC handle and writes its weights, and vLLM's
  layerwise reload copies each layer once more into its kernel tensors: 4 x 14.0 GB / 2.5 TB/s
  = 0.022 s.
* Control: per bucket one Ray call to the 8 actor ranks, one to the 8 engines and one vLLM
  collective_rpc, ~5 ms each: 34 x 3 x 5 ms = 0.51 s.

Total ~0.62 s, under the 2 s goal even at half these bandwidths. Control, not bandwidth,
dominates: bigger buckets (fewer round trips) are the first lever. The CPU benchmark
(scripts/bench_weight_sync.py) measures the same protocol on this machine; the CUDA IPC
transport itself is exercised by a `gpu` test (tests/test_weight_sync.py).
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "hppo-sync-"
"""Every staging segment is /dev/shm/hppo-sync-<pid>-<slot>-<random>: easy to find and to check."""

BUCKET_TIMEOUT_S = 600.0
"""One bucket is at most ~1 s of work on a real box: a rank that has not answered in 10 minutes
hangs, and the sync fails naming it instead of waiting forever."""

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


class WeightSyncError(RuntimeError):
    """A sync that could not finish; names the engine (or actor rank) and the bucket."""


# -- the plan -----------------------------------------------------------------------------------
def layer_key(name: str) -> str:
    """The unit a bucket never splits: `model.layers.3` for every tensor of decoder layer 3, the
    name itself for anything outside the decoder layers (embeddings, final norm, head)."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


def bucket_plan(names: Sequence[str], nbytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensors in order, grouped into buckets of whole layers of at most
    `bucket_bytes`; a layer bigger than that gets a bucket of its own (never a split one)."""
    units: list[list[int]] = []
    keys: list[str] = []
    for index, name in enumerate(names):
        key = layer_key(name)
        if keys and keys[-1] == key:
            units[-1].append(index)
        else:
            keys.append(key)
            units.append([index])
    buckets: list[list[int]] = []
    filled = 0
    for unit in units:
        size = sum(nbytes[i] for i in unit)
        if buckets and filled + size <= bucket_bytes:
            buckets[-1].extend(unit)
            filled += size
        else:
            buckets.append(list(unit))
            filled = size
    return buckets


# -- the control message ------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketHandle:
    """A staged bucket, as the driver passes it from an actor rank to an engine worker."""

    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    transport: str  # "shm" or "cuda_ipc"
    location: str | bytes  # shm: the segment's path; cuda_ipc: pickled reduce_tensor() payload

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_wire(self) -> dict[str, Any]:
        """Plain types only, for vLLM's msgpack RPC to its worker processes."""
        return {"index": self.index, "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtype": self.dtype, "transport": self.transport, "location": self.location}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> BucketHandle:
        return cls(int(wire["index"]), tuple(wire["names"]), tuple(tuple(s) for s in wire["shapes"]),
                   wire["dtype"], wire["transport"], wire["location"])

    def describe(self) -> str:
        """`bucket 3 (model.layers.2.self_attn.q_proj.weight .. model.layers.2.mlp.down_proj.weight, 0.2 MiB)`:
        numbered from 1, as a person counts."""
        return f"bucket {self.index + 1} ({self.names[0]} .. {self.names[-1]}, {self.nbytes / 2**20:.1f} MiB)"


# -- the actor side -----------------------------------------------------------------------------
class BucketStager:
    """One actor rank's staging buffers for one sync: `slots` buffers as big as the largest bucket.

    Bucket k goes to slot k % slots; the driver only stages k + slots after the engine acked k.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity_numel: int, slots: int):
        self.device, self.dtype = device, dtype
        self._paths: list[Path] = []
        self._buffers: list[Tensor] = []
        for slot in range(slots):
            if device.type == "cuda":
                self._buffers.append(torch.empty(capacity_numel, dtype=dtype, device=device))
            else:
                path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{slot}-{uuid.uuid4().hex[:8]}"
                self._paths.append(path)  # recorded first: close() unlinks it even if mapping fails
                self._buffers.append(torch.from_file(str(path), shared=True, size=capacity_numel, dtype=dtype))

    def stage(self, index: int, named: Sequence[tuple[str, Tensor]]) -> BucketHandle:
        """Copy (and cast) `named` full tensors into slot index % slots; return its handle."""
        slot = index % len(self._buffers)
        buffer, offset = self._buffers[slot], 0
        for _, tensor in named:
            numel = tensor.numel()
            buffer[offset:offset + numel].view(tensor.shape).copy_(tensor.detach())
            offset += numel
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the engine reads on another stream/process
            location: str | bytes = _cuda_ipc_payload(buffer)
        else:
            location = str(self._paths[slot])
        return BucketHandle(index, tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named),
                            str(self.dtype).removeprefix("torch."), "cuda_ipc" if self.device.type == "cuda" else "shm",
                            location)

    @property
    def segments(self) -> list[str]:
        """Paths of this stager's shared-memory segments (none on CUDA)."""
        return [str(p) for p in self._paths]

    def close(self) -> None:
        self._buffers.clear()
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths.clear()


def _cuda_ipc_payload(buffer: Tensor) -> bytes:
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps(reduce_tensor(buffer))


# -- the engine side ----------------------------------------------------------------------------
@contextmanager
def opened_bucket(handle: BucketHandle, device: torch.device | None = None) -> Iterator[list[tuple[str, Tensor]]]:
    """The bucket's HF-named tensors as views of the actor's buffer, valid inside the block only:
    the consumer must copy them (engines load weights by copying). Unmapped on exit."""
    if handle.transport == "shm":
        if not os.path.exists(handle.location):
            raise FileNotFoundError(f"{handle.describe()}: shared-memory segment {handle.location} is gone "
                                    f"(the actor rank that staged it ended the sync)")
        # A private mapping reads the actor's bytes and can never create or grow the segment.
        flat = torch.from_file(str(handle.location), shared=False, size=handle.numel, dtype=handle.torch_dtype)
    elif handle.transport == "cuda_ipc":
        rebuild, args = pickle.loads(handle.location)
        args = list(args)
        args[6] = (device or torch.device("cuda", torch.cuda.current_device())).index  # receiver's own index
        flat = rebuild(*args)
    else:
        raise ValueError(f"{handle.describe()}: unknown transport {handle.transport!r}")
    try:
        yield list(unpack(flat, handle.names, handle.shapes))
    finally:
        del flat


def read_bucket_into(handle: BucketHandle, destinations: dict[str, Tensor]) -> None:
    """Shared memory straight into the engine's own tensors: one kernel copy per tensor, and no
    mapping, so no page-table work and no extra memory in the engine (HF engine, CPU). Each
    destination must be contiguous, on the host, of the bucket's dtype and shape."""
    if handle.transport != "shm":
        raise ValueError(f"{handle.describe()}: read_bucket_into() reads shared memory, not {handle.transport!r}")
    try:
        segment = open(handle.location, "rb", buffering=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"{handle.describe()}: shared-memory segment {handle.location} is gone "
                                f"(the actor rank that staged it ended the sync)") from None
    with segment:
        for name, shape in zip(handle.names, handle.shapes):
            target = destinations[name]
            if target.dtype != handle.torch_dtype or tuple(target.shape) != tuple(shape) or not target.is_contiguous():
                raise ValueError(f"{handle.describe()}: {name!r} is {handle.dtype} {tuple(shape)}, the engine's "
                                 f"{str(target.dtype).removeprefix('torch.')} {tuple(target.shape)}")
            view = target.view(-1).view(torch.uint8).numpy()
            if segment.readinto(view) != view.nbytes:
                raise EOFError(f"{handle.describe()}: segment {handle.location} ended inside {name!r}")


def unpack(flat: Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> Iterator[tuple[str, Tensor]]:
    offset = 0
    for name, shape in zip(names, shapes):
        numel = int(torch.Size(shape).numel())
        yield name, flat[offset:offset + numel].view(shape)
        offset += numel


def remove_segments(paths: Sequence[str]) -> int:
    """Unlink staging segments (a sync's last resort, for a rank that died holding them);
    returns how many were still there. Only names this module makes are touched."""
    removed = 0
    for path in set(paths):
        if Path(path).name.startswith(SHM_PREFIX) and os.path.exists(path):
            Path(path).unlink(missing_ok=True)
            removed += 1
    return removed


def leftover_segments() -> list[str]:
    """Staging segments in /dev/shm right now (tests and benchmarks check this is empty)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")) if SHM_DIR.is_dir() else []
