"""The driver's half of a weight sync: it orders the buckets and passes handles, never tensors.

    n = actor.call("begin_weight_sync")            every rank plans the same n buckets
    for k in range(n):
        handles = actor.submit("stage_bucket", k)  rank i: bucket k in a buffer on GPU i
        rollout.submit_each("load_bucket", ...)    engine worker on GPU i opens handle i: the barrier
    actor.call("end_weight_sync")                  also after a failure

With two slots the driver stages bucket k+1 while the engines load bucket k (the actor and the
engine are different processes), and waits for both before it stages k+2 into k's slot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from hybrid_ppo.executor import RoleError
from hybrid_ppo.rollout.weight_sync import BUCKET_TIMEOUT_S, WeightSyncError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    bytes_per_engine: int  # the model's bytes in the rollout dtype: what each engine received
    buckets: int

    def metrics(self) -> dict[str, float]:
        return {"rollout/sync_seconds": self.seconds, "rollout/sync_gib": self.bytes_per_engine / 2**30,
                "rollout/sync_buckets": float(self.buckets)}


def sync_weights(actor, rollout, tensor_parallel_size: int, bucket_bytes: int | None = None,
                 slots: int = 1, timeout_s: float = BUCKET_TIMEOUT_S) -> SyncStats:
    """Every actor rank hands each bucket to the engine worker on its own GPU (module docstring).

    Engine e's TP workers sit on GPUs e*tp .. e*tp+tp-1, so engine e gets handles e*tp .. e*tp+tp-1.
    Raises `WeightSyncError` naming the engine or actor rank and the bucket.
    """
    start = time.perf_counter()
    try:
        count = _result(actor.submit("begin_weight_sync", bucket_bytes, slots), timeout_s, "planning the buckets")[0]
        staged = actor.submit("stage_bucket", 0)
        nbytes = 0
        for k in range(count):
            handles = _result(staged, timeout_s, f"staging bucket {k + 1} of {count}")
            nbytes += handles[0].nbytes
            if slots > 1 and k + 1 < count:  # overlap: stage k+1 into the other slot while k loads
                staged = actor.submit("stage_bucket", k + 1)
            per_engine = [([h.to_wire() for h in handles[e * tensor_parallel_size:(e + 1) * tensor_parallel_size]],)
                          for e in range(rollout.world_size)]
            try:
                _result(rollout.submit_each("load_bucket", per_engine), timeout_s, "")
            except (RoleError, TimeoutError) as err:
                rank = getattr(err, "rank", "?")
                raise WeightSyncError(f"weight sync: rollout engine {rank} failed on {handles[0].describe()} "
                                      f"of {count}: {err}") from err
            if slots == 1 and k + 1 < count:
                staged = actor.submit("stage_bucket", k + 1)
        _result(rollout.submit("finish_weight_sync"), timeout_s, "finishing")
        return SyncStats(time.perf_counter() - start, nbytes, count)
    finally:
        _end(actor, timeout_s)


def _result(pending, timeout_s: float, what: str) -> list[Any]:
    try:
        return pending.result(timeout_s=timeout_s)
    except RoleError as err:
        if err.role != "actor" or not what:
            raise
        raise WeightSyncError(f"weight sync: actor rank {err.rank} failed {what}: {err}") from err


def _end(actor, timeout_s: float) -> None:
    """End the sync on the actor ranks; a failure here must not hide the one that ended the sync."""
    try:
        actor.submit("end_weight_sync").result(timeout_s=timeout_s)
    except Exception as err:  # noqa: BLE001 - a dead rank's buffers went with its process
        log.warning("weight sync: ending the sync on the actor ranks failed: %s", err)
