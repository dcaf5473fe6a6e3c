"""Run role classes as Ray actors in the one placement group, or in this process; same interface.

Roles (`hybrid_ppo/roles/`) are plain classes built as `cls(cfg, dist, *extra_args)`. The Ray
executor (`ray_executor.py`) is the one place where Ray wraps them; the local executor here builds
them in this process. Each role gets its own `DistInfo` (its own port), so it can form its own
torch.distributed group. Importing this module starts nothing and imports no Ray.

    executor = make_executor(cfg).start()
    actor = executor.spawn("actor", Actor)
    actor.call_each("train", [(shard,) for shard in shards])  # rank i gets shards[i]
    executor.shutdown()

Every `call*` blocks until all ranks answer (a driver sync point); `submit*` returns a `Pending`
so two roles can run at once (e.g. both ends of a weight sync). An exception in a rank surfaces in
the driver as `RoleError` naming the role, the rank and the method.
"""

from __future__ import annotations

import logging
import re
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hybrid_ppo.config import Config, ExecutorKind
from hybrid_ppo.errors import HybridPPOError
from hybrid_ppo.placement import roles_for

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hybrid_ppo.ray_executor import RayExecutor

LOCALHOST = "127.0.0.1"
"""Rendezvous address of every role group: the trainer is single-node."""

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class DistInfo:
    """How one rank of a role joins its role's torch.distributed group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    bundles: tuple[int, ...] = ()
    """Placement-group bundles this rank owns (a TP rollout engine: one per worker); () in-process."""

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


class RoleError(HybridPPOError, RuntimeError):
    """An exception raised inside one rank of a role, re-raised in the driver.

    `died`: the rank's process is gone (killed, out of memory), rather than its code raising.
    `phase`: the PPO phase it failed in, filled in by the trainer.
    """

    def __init__(self, role: str, rank: int, method: str, cause: BaseException, died: bool = False):
        self.role, self.rank, self.method, self.died = role, rank, method, died
        self.phase: str | None = None
        inner = getattr(cause, "cause", None)  # RayTaskError carries the rank's own exception
        self.cause = inner if isinstance(inner, BaseException) else cause
        super().__init__(role, rank, method, self.cause)

    def __str__(self) -> str:
        where = f"role '{self.role}' rank {self.rank}" + (f" in phase {self.phase}" if self.phase else "")
        if self.died:
            return f"{where}: the process died during {self.method}()"
        return f"{where}: {self.method}() raised {type(self.cause).__name__}: {self.cause_text}"

    @property
    def cause_text(self) -> str:
        """The rank's own message. A failed constructor reaches us as Ray's ActorDiedError, whose
        text is the whole remote traceback: its last line is the rank's `Type: message`."""
        text = _ANSI_ESCAPE.sub("", str(self.cause))  # Ray colours its remote tracebacks
        if getattr(self.cause, "actor_init_failed", False):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[-1] if lines else text
        return text


class RoleTimeout(HybridPPOError, TimeoutError):
    """Ranks of a role that did not finish a call in time; the message names them."""


class Pending:
    """Results of a submitted call, in rank order. `result()` blocks until every rank is done;
    with `timeout_s`, at most that long, then TimeoutError names the ranks still running."""

    def __init__(self, resolve: Callable[..., list]):
        self._resolve: Callable[..., list] | None = resolve
        self._value: list = []

    def result(self, timeout_s: float | None = None) -> list:
        if self._resolve is not None:
            resolve, self._resolve = self._resolve, None
            self._value = resolve(timeout_s) if timeout_s is not None else resolve()
        return self._value


class RoleGroup(ABC):
    """All ranks of one role. Results come back in rank order."""

    name: str
    world_size: int

    @abstractmethod
    def submit_each(self, method: str, per_rank_args: Sequence[tuple], **kwargs: Any) -> Pending:
        """Start `method(*per_rank_args[i], **kwargs)` on every rank i; do not wait."""

    @abstractmethod
    def submit_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Pending:
        """Start `method` on one rank; `result()` is a one-element list."""

    @property
    @abstractmethod
    def members(self) -> list:
        """The rank objects: Ray actor handles, or the in-process instances."""

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Pending:
        return self.submit_each(method, [args] * self.world_size, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """The same arguments to every rank; blocks; results in rank order."""
        return self.submit(method, *args, **kwargs).result()

    def call_each(self, method: str, per_rank_args: Sequence[tuple], **kwargs: Any) -> list:
        """Rank i gets `*per_rank_args[i]` (shards of a batch); blocks; results in rank order."""
        return self.submit_each(method, per_rank_args, **kwargs).result()

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.submit_rank(rank, method, *args, **kwargs).result()[0]

    def _check_args(self, per_rank_args: Sequence[tuple]) -> None:
        if len(per_rank_args) != self.world_size:
            raise ValueError(f"role '{self.name}': {len(per_rank_args)} argument tuples for "
                             f"{self.world_size} ranks")

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"role '{self.name}': rank {rank} outside 0..{self.world_size - 1}")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


class _Ports:
    """Hands out distinct free ports: one per role group."""

    def __init__(self) -> None:
        self._given: set[int] = set()

    def take(self) -> int:
        port = free_port()
        while port in self._given:
            port = free_port()
        self._given.add(port)
        return port


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


def make_executor(cfg: Config) -> RayExecutor | LocalExecutor:
    """The executor that `placement.executor` names (not started)."""
    if cfg.placement.executor == ExecutorKind.LOCAL:
        return LocalExecutor(cfg)
    from hybrid_ppo.ray_executor import RayExecutor

    return RayExecutor(cfg)
