"""The one error boundary: any exception out of a command -> one line and an exit code.

Errors the user can act on (config, data, model directories, reward functions, placement,
checkpoints, divergence, signals) are raised deep down as subclasses of `HybridPPOError` that name
the key, file, line or sample. Only here are they turned into `hybrid-ppo: <message>`; so are
`OSError` (a missing or unreadable file) and Ctrl-C. Anything else is a bug in hybrid-ppo, even
a `ValueError` from torch: its line says so and where its traceback is.

A failure inside a run (its directory exists) arrives as `RunFailed`: its traceback is already
in train.log, and the line says where, and how to continue when a checkpoint exists. A rank's own
exception is shown, not Ray's wrapper.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

EXIT_ERROR = 1
EXIT_CONFIG = 2


class HybridPPOError(Exception):
    """Base of every error hybrid-ppo raises for the user to act on; its message is the one line."""

    exit_code = EXIT_ERROR


class InputError(HybridPPOError, ValueError):
    """Bad input that no more specific class covers (a command's arguments, a file, a function)."""


class Diverged(HybridPPOError, FloatingPointError):
    """Training produced a non-finite value; the message names what and where (lower the lr)."""


class RunFailed(HybridPPOError):
    """A run whose directory exists failed; `__cause__` is why, train.log has the traceback."""

    def __init__(self, run_dir: Path, checkpoint: Path | None):
        self.run_dir, self.checkpoint = run_dir, checkpoint
        super().__init__(f"run in {run_dir} failed")


USER_ERRORS: tuple[type[BaseException], ...] = (HybridPPOError, OSError, KeyboardInterrupt, MemoryError)
"""What a user can act on. Anything else is a bug in hybrid-ppo and says so."""

BUG = "internal error, please report it"


def is_user_error(err: BaseException) -> bool:
    return is_user_error_type(type(err))


def is_user_error_type(cls: type) -> bool:
    return (issubclass(cls, USER_ERRORS) or is_out_of_memory(cls)) and not issubclass(cls, NotImplementedError)


def is_out_of_memory(cls: type) -> bool:
    """torch.OutOfMemoryError (a RuntimeError), host MemoryError, or Ray's OutOfMemoryError (its
    memory monitor killed a role because the node ran low): the user acts on it with a smaller
    micro-batch or engine share, or fewer other jobs on the box. torch and Ray are looked up, not
    imported: errors.py imports nothing heavy, and whatever ran out of memory imported them long before."""
    found = (getattr(sys.modules.get("torch"), "OutOfMemoryError", None),
             getattr(sys.modules.get("ray.exceptions"), "OutOfMemoryError", None))
    return issubclass(cls, MemoryError) or any(isinstance(oom, type) and issubclass(cls, oom) for oom in found)


OUT_OF_MEMORY_HINT = ("out of memory: lower train.micro_batch_size (or rollout.gpu_memory_utilization for "
                      "the engine); `hybrid-ppo plan CONFIG` estimates every phase")


def one_line(err: BaseException, traceback_file: Path | None = None) -> tuple[str, int]:
    """The message (without the `hybrid-ppo: ` prefix) and the exit code for `err`.

    `traceback_file`: where the CLI wrote the traceback of a bug outside a run (see `save_traceback`).
    """
    from hybrid_ppo.executor import RoleError
    from hybrid_ppo.stopping import Interrupted

    run_dir: Path | None = None
    checkpoint: Path | None = None
    if isinstance(err, RunFailed):
        run_dir, checkpoint = err.run_dir, err.checkpoint
        err = err.__cause__ or err
    suffix = ""
    if isinstance(err, RoleError) and not err.died:
        where = f"role '{err.role}' rank {err.rank}" + (f", phase {err.phase}" if err.phase else "")
        cause_type, cause_name = err.cause_type, err.cause_type_name
        raw, suffix = err.cause_text, f" ({where})"
    elif isinstance(err, KeyboardInterrupt):
        cause_type, cause_name, raw = type(err), type(err).__name__, "interrupted (Ctrl-C) before the run started"
    else:
        cause_type, cause_name, raw = type(err), type(err).__name__, str(err) or type(err).__name__
    text = _joined(raw)
    if cause_type is not None and is_out_of_memory(cause_type):
        # Ray's runs on for 40 lines (the node's memory table): its first says what happened, and
        # train.log keeps the rest.
        message = f"{OUT_OF_MEMORY_HINT}: {_first_line(raw)}{suffix}"
    elif not (cause_type is not None and is_user_error_type(cause_type)):
        message = f"{BUG}: {cause_name}: {text}{suffix}"
        if run_dir is None and traceback_file is not None:
            message += f"; traceback in {traceback_file}"
    else:
        message = text + suffix
    if run_dir is not None:
        if not isinstance(err, Interrupted):  # a requested stop is no failure to debug
            message += f"; traceback in {run_dir / 'train.log'}"
        if checkpoint is not None:
            message += f"; `hybrid-ppo resume {run_dir}` continues from {checkpoint.name}"
        elif isinstance(err, (RoleError, Interrupted)):
            message += "; no checkpoint to resume from (set train.save_every > 0)"
    return message, _exit_code(err, Interrupted)


def is_internal(err: BaseException) -> bool:
    """A bug rather than bad input, and no train.log holds its traceback (see `save_traceback`)."""
    return not isinstance(err, RunFailed) and not is_user_error(err)


def save_traceback(err: BaseException) -> Path:
    """Write a bug's traceback to a file of its own (the terminal gets one line naming it)."""
    path = Path(tempfile.gettempdir()) / f"hybrid-ppo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.traceback"
    path.write_text("".join(traceback.format_exception(err)))
    return path


def _exit_code(err: BaseException, interrupted: type) -> int:
    if isinstance(err, interrupted):
        return 128 + err.signum  # type: ignore[attr-defined]  # the shell's convention
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return err.exit_code if isinstance(err, HybridPPOError) else EXIT_ERROR


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _joined(text: str) -> str:
    """A message on one line (placement errors list one problem per line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A heading line ("infeasible placement plan:") runs on into its list; list items take "; ".
    return "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                   for i, line in enumerate(lines))
