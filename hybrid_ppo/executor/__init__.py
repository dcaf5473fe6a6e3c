"""Run role classes as Ray actors in the one placement group, or in this process; same interface.

Roles (`hybrid_ppo/roles/`) are plain classes built as `cls(cfg, dist, *extra_args)`. The Ray
executor (`executor/ray.py`) is the one place where Ray wraps them; the local executor (`executor/local.py`) builds
them in this process. Each role gets its own `DistInfo` (its own port), so it can form its own
torch.distributed group. Importing this package starts nothing and imports no Ray.

    executor = make_executor(cfg).start()
    actor = executor.spawn("actor", Actor)
    actor.call_each("train", [(shard,) for shard in shards])  # rank i gets shards[i]
    executor.shutdown()

Every `call*` blocks until all ranks answer (a driver sync point); `submit*` returns a `Pending`
so two roles can run at once (e.g. both ends of a weight sync). An exception in a rank surfaces in
the driver as `RoleError` naming the role, the rank and the method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_ppo.config import Config, ExecutorKind
from hybrid_ppo.executor.base import (LOCALHOST, DistInfo, Pending, Ports, RoleError, RoleGroup, RoleTimeout,
                                      free_port)
from hybrid_ppo.executor.local import LocalExecutor

if TYPE_CHECKING:
    from hybrid_ppo.executor.ray import RayExecutor

__all__ = ["LOCALHOST", "DistInfo", "LocalExecutor", "Pending", "Ports", "RoleError", "RoleGroup", "RoleTimeout",
           "free_port", "make_executor"]


def make_executor(cfg: Config) -> RayExecutor | LocalExecutor:
    """The executor that `placement.executor` names (not started)."""
    if cfg.placement.executor == ExecutorKind.LOCAL:
        return LocalExecutor(cfg)
    from hybrid_ppo.executor.ray import RayExecutor

    return RayExecutor(cfg)
