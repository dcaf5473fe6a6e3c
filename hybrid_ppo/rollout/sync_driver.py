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

from hybrid_ppo.config import ConfigError
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


def choose_transport(actor, rollout, requested: str, tensor_parallel_size: int,
                     timeout_s: float = BUCKET_TIMEOUT_S) -> str:
    """`rollout.weight_sync_transport` made concrete, once, before the first sync: "cuda_ipc" or "host".

    `auto` and `cuda_ipc` stage a 64-byte probe on every actor rank and have every engine worker
    open the handle of its own GPU, as a sync would. CUDA IPC fails there in containers without
    `--ipc=host` or CAP_SYS_PTRACE; `auto` then falls back to host with one log line saying why,
    `cuda_ipc` stops with a config error. On CPU there is nothing to share by IPC: host."""
    if requested == "host":
        return "host"
    try:
        handles = _result(actor.submit("stage_probe"), timeout_s, "staging the transport probe")
        if any(h is None for h in handles):
            if requested == "cuda_ipc":
                raise ConfigError("rollout.weight_sync_transport", requested, "auto or host: the actor is not on CUDA")
            return "host"
        per_engine = [([h.to_wire() for h in handles[e * tensor_parallel_size:(e + 1) * tensor_parallel_size]],)
                      for e in range(rollout.world_size)]
        failures = [f for f in rollout.submit_each("probe_bucket", per_engine).result(timeout_s=timeout_s) if f]
    finally:
        _end(actor, timeout_s)
    if not failures:
        return "cuda_ipc"
    if requested == "cuda_ipc":
        raise ConfigError("rollout.weight_sync_transport", requested,
                          f"auto or host: an engine could not open a CUDA IPC handle ({failures[0]})")
    log.warning("weight sync: CUDA IPC is not available here (%s); staging buckets in host memory "
                "(rollout.weight_sync_transport=host)", failures[0])
    return "host"


def sync_weights(actor, rollout, tensor_parallel_size: int, bucket_bytes: int | None = None,
                 slots: int = 1, timeout_s: float = BUCKET_TIMEOUT_S, transport: str = "cuda_ipc") -> SyncStats:
    """Every actor rank hands each bucket to the engine worker on its own GPU (module docstring).

    Engine e's TP workers sit on GPUs e*tp .. e*tp+tp-1, so engine e gets handles e*tp .. e*tp+tp-1.
    Raises `WeightSyncError` naming the engine or actor rank and the bucket.
    """
    start = time.perf_counter()
    try:
        count = _result(actor.submit("begin_weight_sync", bucket_bytes, slots, transport), timeout_s,
                        "planning the buckets")[0]
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
