"""What both executors share: a rank's rendezvous (`DistInfo`), a role's group of ranks
(`RoleGroup`), a call in flight (`Pending`), the errors a rank's failure becomes, and ports."""

from __future__ import annotations

import importlib
import re
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

from hybrid_ppo.errors import HybridPPOError

LOCALHOST = "127.0.0.1"
"""Rendezvous address of the local executor's one-process world. Under Ray a role group meets at
its rank-0 node's IP instead (`executor.ray.rendezvous`)."""

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|[A-Z]\w*)): (?P<message>.*)$")


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
        return f"{where}: {self.method}() raised {self.cause_type_name}: {self.cause_text}"

    def _remote_last_line(self) -> tuple[str, str] | None:
        """A failed Ray constructor reaches us as Ray's ActorDiedError, which keeps only the text
        of the remote traceback (not the exception): its last line is the rank's `Type: message`."""
        if not getattr(self.cause, "actor_init_failed", False):
            return None
        lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(self.cause)).splitlines() if line.strip()]
        match = _EXCEPTION_LINE.match(lines[-1]) if lines else None
        return (match["type"], match["message"]) if match else None

    @property
    def cause_text(self) -> str:
        """The rank's own message."""
        remote = self._remote_last_line()
        return remote[1] if remote else _ANSI_ESCAPE.sub("", str(self.cause))  # Ray colours its tracebacks

    @property
    def cause_type_name(self) -> str:
        remote = self._remote_last_line()
        return remote[0].rpartition(".")[2] if remote else type(self.cause).__name__

    @property
    def cause_type(self) -> type | None:
        """The rank's exception class; for a failed Ray constructor, the class its traceback's last
        line names (None if that names no class importable here)."""
        remote = self._remote_last_line()
        if remote is None:
            return None if getattr(self.cause, "actor_init_failed", False) else type(self.cause)
        module, _, name = remote[0].rpartition(".")
        try:
            found = getattr(importlib.import_module(module or "builtins"), name)
        except (ImportError, AttributeError, ValueError):
            return None
        return found if isinstance(found, type) and issubclass(found, BaseException) else None


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


def free_port(host: str = LOCALHOST, taken: Collection[int] = ()) -> int:
    """A TCP port on `host` ("" = every interface of this machine) that was free a moment ago
    (the OS picks it), and not one of `taken`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


class Ports:
    """The rendezvous ports given out so far, one per role group, by node address: a new group's
    port must differ from those on its node (a port freed by the OS is not yet bound by the group
    that got it)."""

    def __init__(self) -> None:
        self._given: dict[str, set[int]] = {}

    def taken(self) -> dict[str, frozenset[int]]:
        return {addr: frozenset(ports) for addr, ports in self._given.items()}

    def record(self, addr: str, port: int) -> None:
        self._given.setdefault(addr, set()).add(port)
