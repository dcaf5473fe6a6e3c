"""Format reward: 1.0 when the response matches a regex (default: `<think>...</think>` then an answer).

Use it as `model.reward_fn: hybrid_ppo.rewards.format:think_answer`, or wrap `matches` with your own
pattern in a one-line function of your module. `boxed` is the format half of a math run: it pays for
an answer in the form `math:accuracy` reads, right or wrong, so a small model that never writes one
(SmolLM2-135M-Instruct leaves `\\boxed{}` empty) still gets a signal to learn the form from.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*\S.*", re.DOTALL)


def matches(responses: Sequence[str], pattern: re.Pattern | str = THINK_ANSWER) -> list[float]:
    """1.0 per response the whole of which matches `pattern`, else 0.0."""
    regex = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern
    return [1.0 if regex.fullmatch(r or "") else 0.0 for r in responses]


def think_answer(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any] | None) -> list[float]:
    """1.0 for `<think>reasoning</think>` followed by a non-empty answer."""
    return matches(responses)


def boxed(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any] | None) -> list[float]:
    """1.0 for a response whose last `\\boxed{...}` holds something (what `math:accuracy` grades)."""
    from hybrid_ppo.rewards.math import last_boxed

    return [1.0 if (answer := last_boxed(r or "")) is not None and answer.strip() else 0.0 for r in responses]
