"""word-math: one-step arithmetic word problems with `\\boxed{}` answers, generated in code.

For a real pretrained chat model (e.g. SmolLM2-135M-Instruct, `scripts/get_smollm2.py`) with the
math reward (`hybrid_ppo.rewards.math:accuracy`): no data is downloaded. Each prompt is a chat (one
user message) that asks for the answer in `\\boxed{}`; the label is the number as text.

Measured on SmolLM2-135M-Instruct (16 held-out prompts, greedy, 40 tokens): it almost never writes
a filled `\\boxed{}` (math accuracy 0/16; often an empty `\\boxed{}`), though its last number is
the label in 19-31 % of answers. The math reward alone therefore gives GRPO no signal on it yet: a
format term (model.reward_fns) or a prompt it follows is still to be found.

Splits. A problem is its (template, a, b) triple; each triple belongs to one split by a stable hash
(`EVAL_FRACTION` held out), so held-out accuracy is measured on problems never trained on.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

from hybrid_ppo.tasks.base import Example, seeded_picks, stable_split

TASK_NAME = "word-math"
EVAL_FRACTION = 0.2
SPLITS = ("train", "eval")
INSTRUCTION = "Put the final answer in \\boxed{}."
NAMES = ("Tom", "Ana", "Sam", "Lee")
ITEMS = ("apples", "pens", "books", "coins")


class Template(NamedTuple):
    text: str
    answer: Callable[[int, int], int]
    valid: Callable[[int, int], bool] = lambda a, b: True


TEMPLATES = (
    Template("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", lambda a, b: a + b),
    Template("{name} has {a} {item} and gives {b} away. How many {item} are left?", lambda a, b: a - b,
             lambda a, b: a > b),
    Template("{name} buys {a} bags with {b} {item} in each. How many {item} is that in all?", lambda a, b: a * b,
             lambda a, b: a <= 9 and b <= 9),
    Template("{a} {item} are shared equally by {b} friends. How many {item} does each friend get?",
             lambda a, b: a // b, lambda a, b: 2 <= b <= 5 and a % b == 0),
)
NUMBERS = range(2, 31)


class Problem(NamedTuple):
    template: int
    a: int
    b: int

    def prompt(self) -> list[dict]:
        name, item = NAMES[(self.a + self.b) % len(NAMES)], ITEMS[(self.a * self.b) % len(ITEMS)]
        question = TEMPLATES[self.template].text.format(name=name, item=item, a=self.a, b=self.b)
        return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]

    def answer(self) -> str:
        return str(TEMPLATES[self.template].answer(self.a, self.b))


def split_of(problem: Problem) -> str:
    """'train' or 'eval', from a stable hash of the problem (the same on every machine and run)."""
    return stable_split(repr(tuple(problem)), EVAL_FRACTION)


def split_problems(split: str) -> list[Problem]:
    """Every problem of `split`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {' | '.join(SPLITS)}")
    every = (Problem(t, a, b) for t, a, b in itertools.product(range(len(TEMPLATES)), NUMBERS, NUMBERS)
             if TEMPLATES[t].valid(a, b))
    return [p for p in every if split_of(p) == split]


def make_examples(split: str, n: int, seed: int) -> list[Example]:
    """`n` labelled chat examples of `split` in a seeded order (distinct while n <= the split's size)."""
    picked = seeded_picks(split_problems(split), n, f"{TASK_NAME}/{split}/{seed}")
    return [Example(p.prompt(), p.answer(), source=f"builtin:{TASK_NAME}[{split} {p.template},{p.a},{p.b}]")
            for p in picked]
