"""Ray internals with no public API. Checked against ray 2.60.0.

Ray forwards every actor's stdout and stderr to the driver, which prints each line on the
terminal with a coloured `(Actor pid=N)` prefix (`log_to_driver`). The alternative it offers,
`log_to_driver=False`, drops the lines on the driver altogether, so a role's warnings would be in
no log of the run. Instead the printing handler of Ray's stream dispatcher is swapped for one that
hands the lines to a logger (ray/_private/ray_logging: `global_worker_stdstream_dispatcher`,
handler "ray_print_logs", added by `ray.init` in ray/_private/worker.py).
"""

from __future__ import annotations

import functools
import logging
import re

from hybrid_ppo.compat import require

CHECKED = "2.60.0"
RAY_PRINT_HANDLER = "ray_print_logs"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _dispatcher():
    import ray
    from ray._private import ray_logging

    return require(ray_logging, "global_worker_stdstream_dispatcher", "ray", ray.__version__, CHECKED,
                   "ray._private.ray_logging")


def send_worker_output_to(logger: logging.Logger) -> None:
    """From now on, the lines Ray forwards from actors go to `logger` (INFO), not the terminal."""
    dispatcher = _dispatcher()
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.remove_handler(logger.name)  # once per logger, however often Ray is joined
    dispatcher.add_handler(logger.name, functools.partial(_log_lines, logger))


def _log_lines(logger: logging.Logger, data: dict) -> None:
    if data.get("pid") == "autoscaler":  # its status every few seconds: a one-node cluster never scales
        return
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in data.get("lines", ()):
        logger.info("(%s pid=%s) %s", who, data.get("pid"), _ANSI_ESCAPE.sub("", line))
