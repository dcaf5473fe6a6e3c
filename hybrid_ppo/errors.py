"""The one error boundary: any exception out of a command -> one line and an exit code.

Errors are raised deep down as typed exceptions that name the key, file, line or sample. Only
here are they turned into `hybrid-ppo: <message>`. A failure inside a run (its directory exists)
arrives as `RunFailed`: its traceback is already in train.log, and the line says where, and how
to continue when a checkpoint exists. A rank's own exception is shown, not Ray's wrapper.
"""

from __future__ import annotations

import signal
from pathlib import Path

EXIT_ERROR = 1
EXIT_CONFIG = 2

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, FloatingPointError, TimeoutError,
                                                KeyboardInterrupt)
"""What a user can act on (config, data, model directories, reward functions, placement, dead
roles, divergence, signals). Anything else is a bug in hybrid-ppo and says so."""


def one_line(err: BaseException) -> tuple[str, int]:
    """The message (without the `hybrid-ppo: ` prefix) and the exit code for `err`."""
    from hybrid_ppo.config import ConfigError
    from hybrid_ppo.executor import RoleError
    from hybrid_ppo.stopping import Interrupted

    run_dir: Path | None = None
    checkpoint: Path | None = None
    if type(err).__name__ == "RunFailed":  # launch.RunFailed, without importing the run machinery
        run_dir, checkpoint = err.run_dir, err.checkpoint  # type: ignore[attr-defined]
        err = err.__cause__ or err
    if isinstance(err, RoleError) and not err.died:
        where = f"role '{err.role}' rank {err.rank}" + (f", phase {err.phase}" if err.phase else "")
        cause = err.cause
        message = f"{err.cause_text} ({where})"
    elif isinstance(err, KeyboardInterrupt):
        cause, message = err, "interrupted (Ctrl-C) before the run started"
    else:
        cause, message = err, _text(err)
    constructor = getattr(cause, "actor_init_failed", False)  # a role's __init__ raised (e.g. a bad model dir)
    user_error = isinstance(cause, (*USER_ERRORS, Interrupted)) and not isinstance(cause, NotImplementedError)
    if not constructor and not user_error:
        message = f"internal error, please report it: {type(cause).__name__}: {message}"
    if run_dir is not None:
        if not isinstance(err, Interrupted):  # a requested stop is no failure to debug
            message += f"; traceback in {run_dir / 'train.log'}"
        if checkpoint is not None:
            message += f"; `hybrid-ppo resume {run_dir}` continues from {checkpoint.name}"
        elif isinstance(err, (RoleError, Interrupted)):
            message += "; no checkpoint to resume from (set train.save_every > 0)"
    return message, _exit_code(err, ConfigError, Interrupted)


def is_internal(err: BaseException) -> bool:
    """A bug rather than bad input: its traceback is worth showing when no train.log has it."""
    from hybrid_ppo.stopping import Interrupted

    return type(err).__name__ != "RunFailed" and not isinstance(err, (*USER_ERRORS, Interrupted))


def _exit_code(err: BaseException, config_error: type, interrupted: type) -> int:
    if isinstance(err, interrupted):
        return 128 + err.signum  # type: ignore[attr-defined]  # the shell's convention
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, config_error) or type(err).__name__ == "PlacementError":
        return EXIT_CONFIG
    return EXIT_ERROR


def _text(err: BaseException) -> str:
    """The exception's message on one line (placement errors list one problem per line)."""
    lines = [line.strip() for line in (str(err) or type(err).__name__).splitlines() if line.strip()]
    # A heading line ("infeasible placement plan:") runs on into its list; list items take "; ".
    return "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                   for i, line in enumerate(lines))
