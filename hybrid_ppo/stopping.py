"""SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption): stop at the next iteration boundary.

The first signal only sets a flag. The run loop sees it after the current iteration, writes a
checkpoint when `train.save_every > 0`, and raises `Interrupted`; the executor's shutdown then
takes the Ray processes down. A second signal abandons the current phase: `check_abandoned()`
raises at the next phase boundary, and within a second from a blocked Ray wait. The handler never
raises itself: inside ray.wait (Cython) an exception from a handler surfaces as a SystemError.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hybrid_ppo.errors import HybridPPOError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_abandon_on: list[int] = []  # the signal that asked to abandon the phase, while a StopRequest is installed


def check_abandoned() -> None:
    """Raise Interrupted if a second signal asked to abandon the current phase (cheap; call often)."""
    if _abandon_on:
        raise Interrupted(_abandon_on[0], None, None)


class Interrupted(HybridPPOError):
    """The run stopped on a signal; `checkpoint` is where it can continue from (None: nowhere)."""

    def __init__(self, signum: int, iteration: int | None, checkpoint: Path | None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        name = signal.Signals(signum).name
        where = "in the middle of an iteration" if iteration is None else f"after iteration {iteration}"
        super().__init__(f"stopped by {name} {where}")  # the CLI adds where to continue from


class StopRequest:
    """Whether a stop was asked for; installed as the handler of SIGINT and SIGTERM while inside."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # the second one: abandon whatever is running
            _abandon_on[:] = [signum]
            return
        self.signum = signum
        log.warning("%s received: stopping after the current iteration (send it again to abandon it)",
                    signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            _abandon_on.clear()
            for s, handler in previous.items():
                signal.signal(s, handler)
