"""Every role in this process, world size 1: for debugging, and for GPU boxes without Ray."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from hybrid_ppo.config import Config
from hybrid_ppo.executor.base import LOCALHOST, DistInfo, Pending, RoleError, RoleGroup, free_port
from hybrid_ppo.placement import roles_for

log = logging.getLogger(__name__)


class LocalRoleGroup(RoleGroup):
    """A role's single in-process rank. Calls run eagerly at submit; errors surface at result()."""

    def __init__(self, name: str, instance: Any):
        self.name, self.world_size, self.instance = name, 1, instance

    @property
    def members(self) -> list:
        return [self.instance]

    def submit_each(self, method: str, per_rank_args: Sequence[tuple], **kwargs: Any) -> Pending:
        self._check_args(per_rank_args)
        return self.submit_rank(0, method, *per_rank_args[0], **kwargs)

    def submit_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Pending:
        self._check_rank(rank)
        try:
            bound = getattr(self.instance, method)
        except AttributeError:
            raise AttributeError(f"role '{self.name}' has no method '{method}'") from None
        try:
            value = [bound(*args, **kwargs)]
        except Exception as err:
            error = RoleError(self.name, 0, method, err)
            error.__cause__ = err

            def fail(*_timeout: float) -> list:  # it already ran: nothing to wait for
                raise error

            return Pending(fail)
        return Pending(lambda *_timeout: value)


class LocalExecutor:
    """Every role in this process, world size 1, all sharing one DistInfo (one world of size 1).

    For debugging, and for GPU boxes without Ray. Roles must tolerate a torch.distributed group
    that another role already initialized.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist: DistInfo | None = None
        self._groups: list[LocalRoleGroup] = []

    def start(self) -> LocalExecutor:
        self.dist = DistInfo(0, 1, LOCALHOST, free_port())
        return self

    def spawn(self, role: str, cls: type, *extra_args: Any, wait: bool = True) -> LocalRoleGroup:
        del wait  # construction is synchronous here
        if self.dist is None:
            raise RuntimeError("LocalExecutor.spawn() before start()")
        if role not in roles_for(self.cfg):
            raise ValueError(f"role '{role}' is not run by this config; roles: {', '.join(roles_for(self.cfg))}")
        try:
            instance = cls(self.cfg, self.dist, *extra_args)
        except Exception as err:
            raise RoleError(role, 0, "__init__", err) from err
        if callable(getattr(instance, "started", None)):
            instance.started()
        group = LocalRoleGroup(role, instance)
        self._groups.append(group)
        return group

    def shutdown(self) -> None:
        """Close the roles that can close, and drop them all. The process-wide torch.distributed
        world of size 1 stays: DeepSpeed caches its groups for the life of the process, so a
        destroyed world would leave the next local run (a second job in one process, as in the
        tests) holding dangling groups."""
        for group in self._groups:
            close = getattr(group.instance, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - the others must still close
                    log.warning("closing role '%s' failed: %s", group.name, err)
        self._groups.clear()

    def __enter__(self) -> LocalExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
