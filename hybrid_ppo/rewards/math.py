"""Math answer reward: `hybrid_ppo.rewards.math:accuracy` as `model.reward_fn`.

The answer is the content of the response's last `\\boxed{...}` (nested braces handled); it is
compared to the label symbolically with `math-verify` (so `1/2`, `0.5` and `\\frac{1}{2}` agree).
A label is a string or a list of accepted answers. No answer, an unparsable one, or one that
takes longer than `SAMPLE_TIMEOUT_S` scores 0.0; no response makes the function raise. The
limit counts from a warm worker: a pool's start-up (spawn, imports) is not a sample's time.

Why a process pool: math-verify bounds its own parsing and sympy work with SIGALRM, which works
only in the main thread, and a reward may run in a thread (RuleReward) or a Ray actor. So its own
timeouts are switched off and each sample runs in a worker process that is killed when it overruns:
a pathological expression cannot hang the step, and a thread cannot be killed.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import multiprocessing
import threading
from typing import Any, Sequence

SAMPLE_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 300.0
WORKERS = 2

_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced; None if there is none
    or it is never closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def _accepted(label: Any) -> list[str]:
    if label is None:
        return []
    if isinstance(label, (list, tuple)):
        return [str(x) for x in label if x is not None]
    return [str(label)]


def score_one(answer: str, accepted: list[str]) -> float:
    """1.0 if `answer` equals any accepted answer symbolically. Runs in a worker process."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # It warns on every call that its timeouts are off; they are off on purpose (see the module doc).
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    # `$...$` makes the latex extractor read the whole answer, not hunt for a boxed part in it.
    target = parse(f"${answer}$", extraction_config=configs, parsing_timeout=None)
    if not target:
        return 0.0
    for gold_text in accepted:
        gold = parse(f"${gold_text}$", extraction_config=configs, parsing_timeout=None)
        if gold and verify(gold, target, timeout_seconds=None):
            return 1.0
    return 0.0


def _warm() -> float:
    """A worker's first job: the imports and math-verify's first parse (seconds, under load more)."""
    return score_one("1", ["1"])


def _get_pool() -> cf.ProcessPoolExecutor:
    """The worker pool, started and warmed: a fresh worker's spawn and imports must not count
    against the first samples' `SAMPLE_TIMEOUT_S` (on a loaded box they took longer, and right
    answers scored 0). A pool that cannot start within `STARTUP_TIMEOUT_S` raises."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn, not fork: the caller may hold threads (Ray, torch) that a fork would copy mid-state.
            pool = cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
            warming = [pool.submit(_warm) for _ in range(WORKERS)]
            cf.wait(warming, timeout=STARTUP_TIMEOUT_S)
            if not all(w.done() and not w.exception() for w in warming):
                _kill(pool)
                raise RuntimeError(f"math-verify workers did not start within {STARTUP_TIMEOUT_S:g} s")
            _pool = pool
        return _pool


def _kill_pool() -> None:
    """Drop a pool with a stuck worker: its processes are killed, the next call starts a fresh one."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        _kill(pool)


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    for proc in list(getattr(pool, "_processes", {}).values()):  # the executor has no public kill
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def accuracy(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any] | None,
             timeout_s: float = SAMPLE_TIMEOUT_S) -> list[float]:
    """1.0 per response whose last boxed answer matches its label, else 0.0; no response makes it
    raise (only workers that cannot start at all do)."""
    labels = list(labels) if labels is not None else [None] * len(responses)
    scores = [0.0] * len(responses)
    jobs: dict[int, cf.Future] = {}
    for i, (response, label) in enumerate(zip(responses, labels)):
        answer, accepted = last_boxed(response or ""), _accepted(label)
        if answer is not None and answer.strip() and accepted:
            try:
                jobs[i] = _get_pool().submit(score_one, answer, accepted)
            except BrokenProcessPool:  # a worker died: start over for the rest
                _kill_pool()
    for i, job in jobs.items():
        try:
            # Each sample's limit counts from when the caller starts waiting for it; samples run
            # WORKERS at a time, so a stuck one costs at most timeout_s before the pool is replaced.
            scores[i] = float(job.result(timeout=timeout_s))
        except cf.TimeoutError:
            _kill_pool()
        except Exception:  # parse error, or the pool broke under a killed worker: no credit
            pass
    return scores
