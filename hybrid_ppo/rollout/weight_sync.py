"""Actor -> engine weights in flat buckets: one transfer and one barrier per bucket, not per tensor.

A bucket is one contiguous 1-D tensor of a single dtype plus the (name, shape) table to cut it
back into HF-named tensors. Buckets travel through Ray's object store today (host memory); CUDA
IPC handles for colocated engines are the planned fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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


def bucket_plan(sizes: list[tuple[torch.dtype, int]], bucket_bytes: int) -> list[list[int]]:
    """Indices of tensors (given as (dtype, numel)) grouped in order into same-dtype buckets of at
    most `bucket_bytes`; a tensor bigger than that gets a bucket of its own."""
    open_buckets: dict[torch.dtype, list[int]] = {}
    filled: dict[torch.dtype, int] = {}
    done: list[list[int]] = []
    for index, (dtype, numel) in enumerate(sizes):
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if open_buckets.get(dtype) and filled[dtype] + nbytes > bucket_bytes:
            done.append(open_buckets.pop(dtype))
        if dtype not in open_buckets:
            open_buckets[dtype], filled[dtype] = [], 0
        open_buckets[dtype].append(index)
        filled[dtype] += nbytes
    return done + list(open_buckets.values())


def pack_bucket(items: list[tuple[str, Tensor]]) -> WeightBucket:
    """One host bucket from full tensors of one dtype."""
    flat = torch.cat([t.reshape(-1) for _, t in items]).cpu()
    return WeightBucket(flat, [n for n, _ in items], [tuple(t.shape) for _, t in items])


def pack_buckets(named: list[tuple[str, Tensor]], bucket_bytes: int) -> list[WeightBucket]:
    """All of `named` as buckets (see `bucket_plan`)."""
    plan = bucket_plan([(t.dtype, t.numel()) for _, t in named], bucket_bytes)
    return [pack_bucket([named[i] for i in indices]) for indices in plan]
