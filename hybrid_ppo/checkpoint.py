"""Checkpoints as directories that appear whole.

A run directory holds two kinds: resumable checkpoints (everything a resume needs, DeepSpeed's
format) and Hugging Face exports of the actor (what vLLM or `from_pretrained` loads, no optimizer):

    RUN_DIR/hf/final/           the actor after the last iteration (HF_FINAL)
    RUN_DIR/hf/iter_000010/     every `logging.save_hf_every` iterations
    RUN_DIR/checkpoints/
      iter_000010/            a complete checkpoint
        actor/  critic/       DeepSpeed's own save_checkpoint: weights, optimizer, LR schedule,
                              written by every rank (ZeRO shards included)
        trainer_state.json    iteration, prompt position, trainer state (e.g. a KL controller)
      iter_000020.tmp/        a save in progress (or one a crash interrupted: never read)
      latest                  the name of the newest complete checkpoint, e.g. "iter_000020"

A save writes into `iter_N.tmp/`, fsyncs every file once every rank has returned (the driver's
call waits for every rank on every node) and the driver sees every file each rank wrote (a rank on
another node writes into the same directory only if the run directory is on a filesystem all
nodes share), renames the directory, and only then replaces `latest` (a temp file and `os.replace`, which is atomic on
POSIX). A crash at any point leaves `latest` naming a complete checkpoint. Older checkpoints
beyond `train.keep_checkpoints` are deleted only after the new one is complete.

Sampling is seeded from (seed, iteration, rank), and the data order from (seed, batches drawn),
so no RNG state is saved: the iteration and the prompt position determine it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from hybrid_ppo.atomic_file import fsync_dir, write_text_atomic
from hybrid_ppo.errors import HybridPPOError

CHECKPOINTS = "checkpoints"
HF_EXPORTS = "hf"
HF_FINAL = f"{HF_EXPORTS}/final"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^iter_(\d{6,})$")


class CheckpointError(HybridPPOError, RuntimeError):
    """No usable checkpoint, or one that does not match the run; the message names the path."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def write_checkpoint(run_dir: Path, iteration: int, write: Callable[[Path], dict[str, Any]], keep: int) -> Path:
    """Make `checkpoints/iter_<iteration>/` appear whole: `write(tmp_dir)` fills a temporary
    directory and returns the trainer state, which goes to STATE_FILE last. Then fsync, rename,
    move `latest`, prune. Returns the final directory."""
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a save that a crash interrupted
    tmp.mkdir(parents=True)
    state = write(tmp)
    _write_json(tmp / STATE_FILE, {"iteration": iteration, **state})
    _fsync_tree(tmp)
    if final.exists():  # the same iteration saved again (resumed, then stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none. A `latest` naming a missing
    or incomplete directory is a CheckpointError (never guessed around)."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not _NAME.match(name) or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {pointer.parent}")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (`iteration` and what the run loop saved)."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def prune(root: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, and leftover `.tmp` saves; never the
    one `latest` names. Returns what was deleted."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    complete = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))
    stale = [p for p in complete[:-keep] if p.name != latest]
    stale += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish a fully written directory under `final`, replacing an older one (an HF export).
    The old one is moved aside first, so `final` is never a mix of the two."""
    _fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def files_under(root: Path) -> list[str]:
    """Every file under `root`, as sorted paths relative to it."""
    return sorted(str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files)


def check_written_files(directory: Path, role: str, per_rank: list[list[str]]) -> None:
    """Every file that each rank of `role` wrote under `directory` (`per_rank[r]`, as the rank saw
    it) must be what the driver sees there too; else the ranks' nodes do not share the run
    directory, and the checkpoint would be incomplete on every node."""
    seen = set(files_under(directory))
    for rank, files in enumerate(per_rank):
        missing = [f for f in files if f not in seen]
        if missing:
            raise CheckpointError(f"{directory}: {role} rank {rank} wrote {len(missing)} file(s) the driver cannot "
                                  f"see (e.g. {missing[0]}): with placement.num_nodes > 1, logging.output_dir "
                                  f"must be on a filesystem every node shares (NFS, Lustre, ...)")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root` on disk before the rename that publishes it (ranks
    wrote the files from their own processes; the rename must not overtake their data)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
