"""hybrid_ppo.rewards.math / .format: real math-verify, real worker processes."""

import threading
import time

import pytest

from hybrid_ppo.rewards import format as format_reward
from hybrid_ppo.rewards import math as math_reward
from hybrid_ppo.roles.reward import RuleReward


@pytest.mark.parametrize("response, label, expected", [
    ("so \\boxed{1/2}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{3}", ["2", "3"], 1.0),            # list of accepted answers
    ("\\boxed{\\frac{2}{3}}", "1/2", 0.0),      # wrong
    ("\\boxed{7}", "8", 0.0),
    ("the answer is 1/2", "1/2", 0.0),          # no \boxed{}
    ("\\boxed{", "1", 0.0),                     # never closed
    ("\\boxed{1} then \\boxed{2}", "2", 1.0),   # the last one counts
    ("\\boxed{1} then \\boxed{2}", "1", 0.0),
    ("\\boxed{}", "1", 0.0),
    ("\\boxed{2}", None, 0.0),                  # no label
])
def test_accuracy_table(response, label, expected):
    assert math_reward.accuracy(["p"], [response], [label]) == [expected]


def test_last_boxed_nested_braces():
    assert math_reward.last_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert math_reward.last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert math_reward.last_boxed("nothing") is None
    assert math_reward.accuracy(["p"], ["\\boxed{\\frac{1}{2^{1}}}"], ["0.5"]) == [1.0]


def test_pathological_answer_returns_within_limit_from_a_thread():
    # 10**(10**(10**10)) would make sympy work for ever; run from a non-main thread like RuleReward does.
    bad = "\\boxed{10^{10^{10^{10^{10}}}}!}"
    out: dict = {}

    def target():
        start = time.monotonic()
        out["scores"] = math_reward.accuracy(["p", "p"], [bad, "\\boxed{2}"], ["3", "2"], timeout_s=2.0)
        out["elapsed"] = time.monotonic() - start

    math_reward.accuracy(["p"], ["\\boxed{1}"], ["1"])  # warm the pool: spawn + import are not the sample's time
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert out["scores"][0] == 0.0
    assert out["elapsed"] < 2.0 * 2 + 5  # the limit for the stuck sample, plus a fresh pool for the next
    assert math_reward.accuracy(["p"], ["\\boxed{2}"], ["2"]) == [1.0]  # the pool recovers


def test_malformed_input_scores_zero():
    assert math_reward.accuracy(["p"] * 3, ["\\boxed{\\frac{", "\\boxed{)(}", "\\boxed{" + "{" * 500 + "}" * 500 + "}"],
                                ["1", "1", "1"]) == [0.0, 0.0, 0.0]


def test_accuracy_through_rule_reward():
    reward = RuleReward("hybrid_ppo.rewards.math:accuracy", timeout_s=60)
    assert reward(["p", "p"], ["\\boxed{0.5}", "no"], ["1/2", "1/2"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("response, expected", [
    ("<think>because</think> 42", 1.0),
    ("<think>a\nb</think>\n\\boxed{1}", 1.0),
    ("<think>because</think>", 0.0),       # no answer after the thinking
    ("42", 0.0),
    ("<think>unclosed 42", 0.0),
])
def test_format_reward(response, expected):
    assert format_reward.think_answer(["p"], [response], [None]) == [expected]


def test_format_custom_pattern():
    assert format_reward.matches(["Answer: 3", "3"], r"Answer: \d+") == [1.0, 0.0]


@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{17}", 1.0),
    ("\\boxed{3} then \\boxed{x+1}", 1.0),   # the last one counts, right or wrong
    ("\\boxed{}", 0.0),                      # what SmolLM2-135M-Instruct writes
    ("\\boxed{ }", 0.0),
    ("\\boxed{4", 0.0),                      # never closed
    ("17", 0.0),
])
def test_boxed_format_reward(response, expected):
    assert format_reward.boxed(["p"], [response], [None]) == [expected]


def test_a_cold_pool_does_not_spend_the_first_samples_time_limit():
    # Spawning the workers and importing math-verify take seconds (longer on a loaded box): before
    # the pool was warmed at start, a right answer in a run's first batch could score 0.
    math_reward._kill_pool()
    assert math_reward.accuracy(["p", "p"], ["\\boxed{1/2}", "\\boxed{3}"], ["0.5", "3"], timeout_s=0.5) == [1.0, 1.0]
