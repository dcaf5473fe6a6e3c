"""Built-in tasks and models: what `hybrid-ppo train` runs with no download.

`builtin:tiny-llama` (config `model.actor`) resolves, through `resolve_builtin_model`, to a local
HF directory (weights, config, tokenizer) holding a tiny Llama built in code and warmed up on the
max-digit task (`hybrid_ppo.tasks.warmup`). The directory is cached under
`<logging.cache_dir>/warmup/<hash>`, where the hash covers everything that changes the weights:
the warm-up settings, the task, the architecture and `train.seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from hybrid_ppo.config import BUILTIN_PREFIX, Config
from hybrid_ppo.errors import InputError
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example

__all__ = ["BUILTIN_MODELS", "Example", "max_digit", "resolve_builtin_model", "warmup_cache_key"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the warm-up code changes what it produces, so old cache entries stop matching."""
WARMUP_INFO = "warmup.json"


def _tiny_llama_key(cfg: Config) -> dict[str, Any]:
    from hybrid_ppo.tasks import tiny_model  # torch + transformers: imported on use, not with the package

    return {
        "format": CACHE_FORMAT,
        "model": "tiny-llama",
        "arch": [tiny_model.HIDDEN_SIZE, tiny_model.NUM_HEADS, tiny_model.NUM_LAYERS,
                 tiny_model.INTERMEDIATE_SIZE, tiny_model.MAX_POSITIONS],
        "task": [max_digit.TASK_NAME, max_digit.NUM_DIGITS, max_digit.EVAL_FRACTION, "heuristic=first-digit"],
        "warmup": dataclasses.asdict(cfg.warmup),
        "seed": cfg.train.seed,
    }


def _build_tiny_llama(cfg: Config, out_dir: Path) -> None:
    # torch + transformers: imported on use, so `import hybrid_ppo.tasks.max_digit` (a reward
    # function loaded inside a worker) stays light.
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer
    from hybrid_ppo.tasks.warmup import warm_up

    tokenizer = build_tokenizer()
    model = warm_up(build_tiny_llama(tokenizer, cfg.train.seed), tokenizer, cfg.warmup, cfg.train.seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


BUILTIN_MODELS: dict[str, tuple[Callable[[Config], dict[str, Any]], Callable[[Config, Path], None]]] = {
    "tiny-llama": (_tiny_llama_key, _build_tiny_llama),
}
"""Builtin model name -> (cache-key material from the config, builder that writes an HF dir)."""


def warmup_cache_key(name: str, cfg: Config) -> str:
    """Short hash of every setting that changes the built model's weights."""
    key_fn, _ = _lookup(name)
    material = json.dumps(key_fn(cfg), sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def resolve_builtin_model(name: str, cfg: Config) -> Path:
    """`builtin:tiny-llama` -> a local HF directory with the warmed-up model and its tokenizer.

    Built on first use and cached; a later call with the same settings returns the cached one.
    The build goes to a temporary directory that is renamed into place only when complete, so a
    crash never leaves a half-written checkpoint that looks valid; a lock file keeps concurrent
    callers from building the same entry twice.
    """
    key_fn, build = _lookup(name)
    key = warmup_cache_key(name, cfg)
    root = cfg.logging.resolved_cache_dir / "warmup"
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{key}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        logger.info("building %s (warm-up %d steps) into %s", name, cfg.warmup.steps, final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            build(cfg, tmp)
            info = {"name": name, "key": key, "seconds": round(time.perf_counter() - start, 2), **key_fn(cfg)}
            (tmp / WARMUP_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary shared cache dir
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s in %.1fs", name, time.perf_counter() - start)
    return final


def _lookup(name: str) -> tuple[Callable[[Config], dict[str, Any]], Callable[[Config, Path], None]]:
    short = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else None
    if short not in BUILTIN_MODELS:
        known = " | ".join(BUILTIN_PREFIX + known_name for known_name in BUILTIN_MODELS)
        raise InputError(f"unknown builtin model {name!r}; known: {known}")
    return BUILTIN_MODELS[short]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
