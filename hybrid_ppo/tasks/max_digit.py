"""max-digit: the built-in verifiable task, with its rule reward.

The prompt is a short list of digits, `max 3 7 1 9 =`; the one correct response is the largest
digit, `9`, followed by EOS. Digits repeat freely, so there are 10**4 = 10,000 distinct prompts.

Why this task. It is checkable by a rule (no reward model), tiny enough that a 110k-parameter
Llama learns it in seconds on CPU, and it leaves room for RL to show an effect:

- The supervised warm-up (`hybrid_ppo.tasks.warmup`) sees the correct label with probability
  `warmup.teacher_accuracy` (t, about 0.3) and otherwise the answer of a weak annotator,
  `heuristic_label`: the FIRST digit of the list. That label is right only when the first digit
  happens to be the largest (P = sum_k 0.1 * ((k + 1) / 10) ** 3 ≈ 0.30 for 4 uniform digits).
- So where the two differ, the warmed-up policy puts about 1 - t of its mass on the first digit
  and t on the max: greedy decoding mostly follows the heuristic (held-out greedy accuracy
  measured at 27-45 % over seeds), while sampling at temperature 1 still finds the max about half
  of the time. The model has learnt both features; it just ranks the wrong one first.
- RL with `reward` (1 for the max, 0 otherwise) then only has to shift mass from one learnt
  feature to the other. Measured with plain REINFORCE at batch 64 (lr 5e-4), held-out greedy
  accuracy passes 80 % within about 10 updates and 95 % within about 20.

Splits. Each digit tuple belongs to exactly one split, decided by a stable hash of the tuple
(`EVAL_FRACTION` of tuples are held out), so held-out accuracy is measured on prompts the warm-up
and PPO never saw.

The reward contract (for this and any user `reward_fn`): `reward(prompts, responses, labels)`
returns one float per response. Prompts and responses are decoded text without special tokens;
the response is what the policy generated before its first EOS, the EOS not included; labels are
the examples' labels (None where a prompt source has none). This reward ignores surrounding
whitespace and scores 1.0 only for exactly one word equal to the answer digit; anything else
(several words, a non-digit, an empty response, a response that ran to `max_new_tokens` without
EOS and so carries extra words) scores 0.0.
"""

from __future__ import annotations

from typing import Sequence

from hybrid_ppo.errors import InputError
from hybrid_ppo.tasks.base import Example, seeded_picks, stable_split

TASK_NAME = "max-digit"
NUM_DIGITS = 4
KEYWORD, EQUALS = "max", "="
EVAL_FRACTION = 0.2
"""Share of digit tuples in the held-out split (by hash); the rest are the train split."""
SPLITS = ("train", "eval")


def format_prompt(digits: Sequence[int]) -> str:
    """(3, 7, 1, 9) -> 'max 3 7 1 9 ='."""
    return " ".join([KEYWORD, *map(str, digits), EQUALS])


def parse_prompt(prompt: str) -> tuple[int, ...]:
    """'max 3 7 1 9 =' -> (3, 7, 1, 9); ValueError for anything that is not a max-digit prompt."""
    words = prompt.split()
    if len(words) < 3 or words[0] != KEYWORD or words[-1] != EQUALS or not all(
        len(w) == 1 and w.isdigit() for w in words[1:-1]
    ):
        raise InputError(f"not a {TASK_NAME} prompt (expected like 'max 3 7 1 9 ='): {prompt!r}")
    return tuple(int(w) for w in words[1:-1])


def answer(prompt: str) -> str:
    """The correct response: the largest digit of the prompt, as text."""
    return str(max(parse_prompt(prompt)))


def heuristic_label(prompt: str) -> str:
    """The weak annotator of the warm-up: the first digit (right only when it is the largest)."""
    return str(parse_prompt(prompt)[0])


def split_of(digits: Sequence[int]) -> str:
    """'train' or 'eval', from a stable hash of the tuple (the same on every machine and run)."""
    return stable_split(",".join(map(str, digits)), EVAL_FRACTION)


def split_problems(split: str) -> list[tuple[int, ...]]:
    """Every digit tuple of `split`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {' | '.join(SPLITS)}")
    every = (tuple(int(c) for c in f"{i:0{NUM_DIGITS}d}") for i in range(10**NUM_DIGITS))
    return [digits for digits in every if split_of(digits) == split]


def make_examples(split: str, n: int, seed: int) -> list[Example]:
    """`n` labelled examples of `split`, in a seeded random order.

    They are distinct while n <= the split's size (about 8,000 train / 2,000 eval); beyond that the
    split is repeated, each pass reshuffled.
    """
    picked = seeded_picks(split_problems(split), n, f"{TASK_NAME}/{split}/{seed}")
    prompts = [format_prompt(digits) for digits in picked]
    return [Example(prompt, answer(prompt)) for prompt in prompts]


def is_correct(response: str, label: str) -> bool:
    """True when the response is exactly the one word `label` (surrounding whitespace ignored)."""
    return response.split() == [label]


def reward(prompts: list[str], responses: list[str], labels: list[str] | None = None) -> list[float]:
    """Rule reward: 1.0 for the correct digit alone, 0.0 otherwise (see the module docstring).

    Labels, when given, are the reference answers; a missing one (None) is computed from its prompt.
    """
    if len(prompts) != len(responses) or (labels is not None and len(labels) != len(prompts)):
        raise ValueError(
            f"reward: got {len(prompts)} prompts, {len(responses)} responses and "
            f"{'no' if labels is None else len(labels)} labels; the lengths must match"
        )
    labels = labels if labels is not None else [None] * len(prompts)
    return [
        1.0 if is_correct(response, label if label is not None else answer(prompt)) else 0.0
        for prompt, response, label in zip(prompts, responses, labels)
    ]
