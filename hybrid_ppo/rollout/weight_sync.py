"""Actor -> engine weights in flat buckets: one transfer and one barrier per bucket, not per tensor.

A bucket is one contiguous 1-D tensor of a single dtype plus the (name, shape) table to cut it
back into HF-named tensors. Buckets travel through Ray's object store today (host memory); CUDA
IPC handles for colocated engines are the planned fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor


@dataclass
class WeightBucket:
    flat: Tensor  # [numel] one dtype, on the host
    names: list[str]
    shapes: list[tuple[int, ...]]

    def unpack(self) -> Iterator[tuple[str, Tensor]]:
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            numel = int(torch.Size(shape).numel())
            yield name, self.flat[offset:offset + numel].view(shape)
            offset += numel

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def pack_buckets(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> list[WeightBucket]:
    """Group tensors (in order, per dtype) into buckets of at most `bucket_bytes`; a bigger tensor gets its own."""
    open_buckets: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
    sizes: dict[torch.dtype, int] = {}
    done: list[WeightBucket] = []
    for name, tensor in named:
        dtype, nbytes = tensor.dtype, tensor.numel() * tensor.element_size()
        if open_buckets.get(dtype) and sizes[dtype] + nbytes > bucket_bytes:
            done.append(_flatten(open_buckets.pop(dtype)))
        if dtype not in open_buckets:
            open_buckets[dtype], sizes[dtype] = [], 0
        open_buckets[dtype].append((name, tensor))
        sizes[dtype] += nbytes
    done.extend(_flatten(items) for items in open_buckets.values())
    return done


def _flatten(items: list[tuple[str, Tensor]]) -> WeightBucket:
    flat = torch.cat([t.reshape(-1) for _, t in items]).cpu()
    return WeightBucket(flat, [n for n, _ in items], [tuple(t.shape) for _, t in items])
