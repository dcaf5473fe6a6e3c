"""Every seed of a run is derived from `train.seed` (or `rollout.seed`) and where it is used: the
iteration, the rank. Derived, not drawn, so a resumed run draws exactly what the uninterrupted run
would have, with no RNG state in the checkpoint."""

from __future__ import annotations

_FIRST, _NEXT = 1_000_003, 1009  # primes: (seed, iteration, rank) triples in a run never collide


def derived_seed(seed: int, *parts: int) -> int:
    """The seed for `parts` (e.g. iteration, rank) of a run seeded with `seed`, in [0, 2**63)."""
    value = seed
    for index, part in enumerate(parts):
        value = value * (_FIRST if index == 0 else _NEXT) + part
    return value % 2**63
