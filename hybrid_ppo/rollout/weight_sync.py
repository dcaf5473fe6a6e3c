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
3. After the last bucket the engines close what they opened (`finish_weight_sync`) and the actor
   ranks end the sync (`Actor.end_weight_sync`), also after a failure.

Transports, same protocol:

* CUDA: the buffer is a device tensor; the handle carries `reduce_tensor`'s IPC payload, made
  once per buffer (`BucketStager._slot_location` says why that matters), and the engine copies
  device to device. No host hop. The buffer is freed after every sync.
* CPU: the buffer is a memfd the actor rank maps; the engine maps it read-only. It is kept
  between syncs: `BucketStager` says why, and why that can't leak.

Either way the engine opens each buffer once per sync, on the first bucket staged in it, and keeps
it open until the sync ends (`OpenedBuffers`). A buffer is reused for every bucket, so opening it
per bucket would repeat the IPC open (CUDA) or the page-table work (CPU) for nothing. On CPU that
took the engine's side of a 100M sync from 69 ms to 31-49 ms: a readinto() per bucket, against
one mapping. scripts/bench_weight_sync.py measures the whole sync.

Buckets are whole decoder layers (`bucket_plan`), so the parts vLLM fuses (q/k/v, gate/up) never
straddle two buckets and an engine can apply each bucket as it arrives. With `slots=2` the
driver stages bucket k+1 while the engines load bucket k; peak extra memory per GPU is `slots`
buffers of the largest bucket on the actor side, and one opened bucket in the engine.

On paper, 7B bf16 on 8xH100 (ZeRO-3 actor, 8 engines at TP=1, 512 MiB buckets):

* Weights: 7.0e9 params x 2 B = 14.0 GB. A decoder layer is ~202M params = 405 MB, so buckets
  are one layer each: ~34 buckets (32 layers, embeddings, head). Extra memory per GPU: one
  staging buffer as big as the largest bucket, 405 MB here (two with
  rollout.weight_sync_slots=2). A big vocabulary can make it larger: Qwen2.5-7B's embedding
  (152,064 x 3,584 x 2 B) is a 1.09 GB bucket of its own.
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

import functools
import mmap
import os
import pickle
import re
import uuid
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from hybrid_ppo.errors import HybridPPOError

SHM_PREFIX = "hppo-sync-"
"""Every CPU staging buffer is a memfd named hppo-sync-<pid>-<slot>-<random>: in /proc/<pid>/fd
and /proc/<pid>/maps as /memfd:hppo-sync-..., easy to find and to check."""

BUCKET_TIMEOUT_S = 600.0
"""One bucket is at most ~1 s of work on a real box: a rank that has not answered in 10 minutes
hangs, and the sync fails naming it instead of waiting forever."""

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


class WeightSyncError(HybridPPOError, RuntimeError):
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
    units = [[i for i, _ in unit] for _, unit in groupby(enumerate(names), key=lambda item: layer_key(item[1]))]
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
    location: str | bytes  # shm: /proc/<actor pid>/fd/<memfd>; cuda_ipc: pickled reduce_tensor() payload
    buffer: str  # the staging buffer's unique name: the bucket's bytes start at its offset 0
    device_key: str = ""  # the staging rank's GPU (its UUID; on CPU its bundle): `device_key()`
    pid_space: str = ""  # where the staging rank's pid means that process: `pid_space()`; "" unknown

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
                "dtype": self.dtype, "transport": self.transport, "location": self.location, "buffer": self.buffer,
                "device_key": self.device_key}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> BucketHandle:
        return cls(int(wire["index"]), tuple(wire["names"]), tuple(tuple(s) for s in wire["shapes"]),
                   wire["dtype"], wire["transport"], wire["location"], wire["buffer"], wire.get("device_key", ""))

    def describe(self) -> str:
        """`bucket 3 (model.layers.2.self_attn.q_proj.weight .. model.layers.2.mlp.down_proj.weight, 0.2 MiB)`:
        numbered from 1, as a person counts."""
        return f"bucket {self.index + 1} ({self.names[0]} .. {self.names[-1]}, {self.nbytes / 2**20:.1f} MiB)"


@functools.cache  # read once: it cannot change while the process lives
def pid_space() -> str:
    """Which /proc this process sees: the kernel (its boot id) and the pid namespace. A host
    handle's /proc/<actor pid>/fd/<fd> names the actor's buffer only where both match. Colocation
    keeps actor rank i and engine worker i on one node, but on another node (or in another
    container) the same path would name some other process, or nothing, so `OpenedBuffers`
    refuses it instead of misreading."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc: nothing to compare, and the open below fails by itself
        return ""


# -- which handle is whose -----------------------------------------------------------------------
def device_key(device: torch.device, bundle: int | None) -> str:
    """What names a GPU the same way in every process: its UUID on CUDA (device indices differ with
    each process's CUDA_VISIBLE_DEVICES), as OpenRLHF (`get_physical_gpu_id`) and verl
    (`get_device_uuid`) key their IPC handles. On CPU, the placement bundle stands for the GPU, so
    the same matching runs in the CPU tests; "" where neither is known (one engine worker)."""
    if device.type == "cuda":
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    return "" if bundle is None else f"bundle-{bundle}"


def handle_for(handles: Sequence[BucketHandle], key: str, position: int) -> BucketHandle:
    """The handle staged on this worker's GPU. Matching by position (TP rank j takes the j-th
    handle) holds only if Ray gives a TP engine's workers its bundles' GPUs in bundle order, which
    it does not promise (ray#51117); so match by `device_key`. By position only where no handle
    carries a key (an engine built outside the executor, as in tests), or there is just one."""
    if len(handles) == 1 or not any(h.device_key for h in handles):
        return handles[position]
    for handle in handles:
        if handle.device_key == key:
            return handle
    raise WeightSyncError(f"{handles[0].describe()}: no handle was staged on this worker's device {key or '(unknown)'}; "
                          f"staged on: {', '.join(h.device_key for h in handles)}")


# -- the actor side -----------------------------------------------------------------------------
class BucketStager:
    """One actor rank's staging buffers: `slots` buffers as big as the largest bucket.

    Bucket k goes to slot k % slots; the driver only stages k + slots after the engine acked k.

    Where the buffers live decides how long they live (`kept_between_syncs`):

    * CUDA: device memory, freed after every sync; the next phase needs it. Allocating it again
      is cheap (torch's caching allocator).
    * CPU: an anonymous shared-memory file (`memfd_create`), kept for the actor's life. Fresh
      shared pages are the slow part of a CPU sync: on our 2-core CI VM they fault in at
      1.1-1.4 GB/s against 19-20 GB/s for a copy into pages already there. A 100M model (whose
      98 MB embedding makes the buffer) spent ~100 of its ~250 ms per sync allocating and
      freeing the buffer. Kept, it costs one largest bucket of host memory per actor rank. It has no
      name in /dev/shm and is never limited by its size (Docker's default is 64 MiB). The kernel
      frees it with the last process that holds it, so no crash can leak it. Engines reach it as
      /proc/<actor pid>/fd/<fd>, open it for one sync, and check its name on opening.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity_numel: int, slots: int,
                 device_key: str = "", on_host: bool = False):
        self.device, self.dtype, self.capacity_numel, self.device_key = device, dtype, capacity_numel, device_key
        self.on_host = on_host or device.type != "cuda"
        """Host memfd buffers: always on CPU; on CUDA the `host` transport (rollout.weight_sync_transport),
        the same code as on CPU, the copies going device -> host here and host -> device in the engine."""
        token = uuid.uuid4().hex[:8]
        self._names = [f"{SHM_PREFIX}{os.getpid()}-{slot}-{token}" for slot in range(slots)]
        self._fds: list[int] = []
        self._buffers: list[Tensor] = []
        for name in self._names:
            if not self.on_host:
                self._buffers.append(torch.empty(capacity_numel, dtype=dtype, device=device))
            else:
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
                self._fds.append(fd)  # recorded first: close() closes it even if mapping fails
                os.ftruncate(fd, capacity_numel * dtype.itemsize)
                self._buffers.append(torch.frombuffer(mmap.mmap(fd, capacity_numel * dtype.itemsize), dtype=dtype))
        self._locations: list[str | bytes | None] = [None] * slots  # made on a slot's first bucket
        self.shared_handles = 0
        """How many slot handles this stager has made: the engine must open each exactly once (CUDA
        IPC counts the opens; see `_slot_location`). A slot no bucket used makes none."""

    @property
    def kept_between_syncs(self) -> bool:
        return self.on_host

    def fits(self, device: torch.device, dtype: torch.dtype, capacity_numel: int, slots: int,
             on_host: bool = False) -> bool:
        """Whether this stager can serve a sync that needs these buffers (it is reused if so)."""
        return (bool(self._buffers) and (self.device, self.dtype, len(self._buffers)) == (device, dtype, slots)
                and self.on_host == (on_host or device.type != "cuda") and capacity_numel <= self.capacity_numel)

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
        return BucketHandle(index, tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named),
                            str(self.dtype).removeprefix("torch."), "shm" if self.on_host else "cuda_ipc",
                            self._slot_location(slot), self._names[slot], self.device_key,
                            pid_space() if self.on_host else "")

    def _slot_location(self, slot: int) -> str | bytes:
        """Where the engine finds slot `slot`: made once, on the slot's first bucket, and the same
        bytes sent with every later bucket staged in it.

        On CUDA this is what keeps a sync from leaking its buffer. Every `reduce_tensor` call shares
        the storage anew (`_share_cuda_`), and each share makes an IPC reference counter set to 1
        (torch/csrc/CudaIPCTypes.cpp, `GetNewRefCountedSentData`); only a consumer's rebuild of that
        payload counts it down (torch/multiprocessing/reductions.py, `rebuild_cuda_tensor`:
        `_release_ipc_counter` on a cache hit, the storage's deleter otherwise). The engine opens
        each buffer once per sync (`OpenedBuffers`), so one payload per bucket left the counters of
        buckets 2..n at 1: freed, the buffer went to torch's IPC "limbo" for good, where
        `empty_cache` cannot reach it (1.05 GB per slot per sync for Llama-3.1-8B's embedding).
        One payload per slot, one open per slot: every counter reaches 0 when the engine closes."""
        location = self._locations[slot]
        if location is None:
            if not self.on_host:
                location = _cuda_ipc_payload(self._buffers[slot])
                _IN_PROCESS[self._names[slot]] = self._buffers[slot]
            else:
                location = f"/proc/{os.getpid()}/fd/{self._fds[slot]}"
            self._locations[slot] = location
            self.shared_handles += 1
        return location

    def close(self) -> None:
        self._buffers.clear()  # the mapping ends with its last view
        self._locations = [None] * len(self._locations)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if not self.on_host:
            release_ipc_memory()


def release_ipc_memory() -> None:
    """After the engines closed a sync's buffers: free the blocks torch parked while an engine still
    held them (`ipc_collect`: blocks whose IPC counter has reached 0), then return the cache to the
    driver so the next phase's role can use it. verl's colocated sync does the same (one
    `reduce_tensor` per buffer, then `torch.cuda.ipc_collect()`)."""
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()


_IN_PROCESS: "weakref.WeakValueDictionary[str, Tensor]" = weakref.WeakValueDictionary()
"""This process's CUDA staging buffers by name, for an engine in the same process (the local
executor): CUDA IPC is for other processes, so such an engine uses the tensor itself."""

# rebuild_cuda_tensor's arguments (torch/multiprocessing/reductions.py) that name the IPC counter
_STORAGE_CLS, _STORAGE_DEVICE, _REF_COUNTER_HANDLE, _REF_COUNTER_OFFSET = 4, 6, 11, 12


def _open_own_buffer(buffer: Tensor, args: Sequence[Any]) -> Tensor:
    """An engine in the actor's own process opens the buffer: the tensor itself, and the payload's
    IPC counter released, as torch's `rebuild_cuda_tensor` does when the storage is already in
    this process (its cache-hit branch), so the buffer is freed like any other when the sync ends."""
    args[_STORAGE_CLS]._release_ipc_counter(args[_REF_COUNTER_HANDLE], args[_REF_COUNTER_OFFSET],
                                            device=args[_STORAGE_DEVICE])
    return buffer


def _cuda_ipc_payload(buffer: Tensor) -> bytes:
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps(reduce_tensor(buffer))


# -- the engine side ----------------------------------------------------------------------------
class OpenedBuffers:
    """The engine side of one sync: each staging buffer opened on the first bucket staged in it and
    kept open for the buckets after it, until `close()` at the end of the sync.

    On CPU a buffer is mapped read-only; on CUDA its IPC handle is opened once. The mapping ends
    when the last view of it is gone, so a view a loader kept stays valid (it never dangles).
    """

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self._flat: dict[str, Tensor] = {}
        self.opened = 0  # buffers opened, over this object's life: one per staged slot per sync

    @contextmanager
    def bucket(self, handle: BucketHandle) -> Iterator[list[tuple[str, Tensor]]]:
        """The bucket's HF-named tensors as views of the actor's buffer, valid inside the block only:
        the consumer copies them (engines load weights by copying). Leaving the block is the point
        after which the engine may ack, and the actor overwrite the buffer: on CUDA it first waits
        for the copies still reading it."""
        flat = self._flat.get(handle.buffer)
        if flat is None:
            flat = self._flat[handle.buffer] = self._open(handle)
            self.opened += 1
        try:
            yield list(unpack(flat[:handle.numel], handle.names, handle.shapes))
        except BaseException:
            self.close()  # the sync has failed: hold nothing of it
            raise
        if flat.device.type == "cuda":
            torch.cuda.synchronize(flat.device)

    def _open(self, handle: BucketHandle) -> Tensor:
        if handle.transport == "shm":
            if handle.pid_space and handle.pid_space != pid_space():
                raise WeightSyncError(f"{handle.describe()}: staged by an actor rank on another host or in another pid "
                                      f"namespace ({handle.pid_space}; here {pid_space() or 'unknown'}), so "
                                      f"{handle.location} does not name its buffer here. Actor rank i and engine "
                                      f"worker i must share a node (executor/ray.py places them in one bundle)")
            gone = FileNotFoundError(f"{handle.describe()}: staging buffer {handle.buffer} is gone "
                                     f"(the actor rank that staged it closed it, or ended)")
            try:
                fd = os.open(handle.location, os.O_RDONLY)  # never creates or grows anything
            except FileNotFoundError:
                raise gone from None
            except PermissionError:
                raise PermissionError(f"{handle.describe()}: may not open {handle.location}, the actor rank's "
                                      f"staging buffer: roles must run as one user, and /proc must not be "
                                      f"mounted with hidepid") from None
            try:
                if f"/memfd:{handle.buffer} " not in os.readlink(f"/proc/self/fd/{fd}") + " ":
                    raise gone  # the actor closed the buffer and reused the descriptor's number
                region = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            with warnings.catch_warnings():  # read-only by design: the engine only copies out of it
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                return torch.frombuffer(region, dtype=handle.torch_dtype)  # keeps `region` mapped
        if handle.transport == "cuda_ipc":
            rebuild, args = pickle.loads(handle.location)
            own = _IN_PROCESS.get(handle.buffer)
            if own is not None:
                return _open_own_buffer(own, args)
            args = list(args)
            args[6] = (self.device or torch.device("cuda", torch.cuda.current_device())).index  # receiver's own index
            return rebuild(*args)
        raise ValueError(f"{handle.describe()}: unknown transport {handle.transport!r}")

    def close(self) -> None:
        self._flat.clear()


PROBE_NAME = "hppo.transport_probe"


def probe_tensor() -> Tensor:
    """What an actor rank stages to learn whether its engines can open its handles (`probe_opened`)."""
    return torch.arange(16, dtype=torch.float32)


def probe_opened(handle: BucketHandle, device: torch.device | None = None) -> str | None:
    """Open a probe handle as a sync would; None if it opened and read back right, else why not
    (the first line of the error, e.g. CUDA's refusal to open an IPC handle in a container)."""
    try:
        with opened_bucket(handle, device) as named:
            if not torch.equal(named[0][1].float().cpu(), probe_tensor()):
                return "the probe bucket read back different values"
    except Exception as err:  # noqa: BLE001 - reported as the reason to fall back, not raised
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


@contextmanager
def opened_bucket(handle: BucketHandle, device: torch.device | None = None) -> Iterator[list[tuple[str, Tensor]]]:
    """One bucket on its own (tests, and a reader outside a sync): opened, read, closed."""
    buffers = OpenedBuffers(device)
    try:
        with buffers.bucket(handle) as named:
            yield named
    finally:
        buffers.close()


def unpack(flat: Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> Iterator[tuple[str, Tensor]]:
    offset = 0
    for name, shape in zip(names, shapes):
        numel = int(torch.Size(shape).numel())
        yield name, flat[offset:offset + numel].view(shape)
        offset += numel


def staging_mappings() -> dict[int, set[str]]:
    """Which processes on this machine map a CPU staging buffer, and which ones: {pid: names}.
    Outside a sync only actor ranks should (tests check it; a process that exits unmaps)."""
    found: dict[int, set[str]] = {}
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        names = set(re.findall(rf"/memfd:({SHM_PREFIX}[\w-]+)", text))
        if names:
            found[int(maps.parent.name)] = names
    return found
