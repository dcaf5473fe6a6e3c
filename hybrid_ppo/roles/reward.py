"""Rewards: a sequence-classification model (a Ray role) or a rule function (runs in the driver).

A rule reward is named `package.module:function` in the config and is called as

    function(prompts: list[str], responses: list[str], labels: list[str | None] | None) -> list[float]

with the decoded prompt and response texts (special tokens removed) and the dataset labels (None
where the dataset has none). It must return one finite float per response within
`model.reward_timeout_s` seconds. Anything else fails the step with an error that names the
offending sample, or the function.
"""

from __future__ import annotations

import importlib
import math
import threading
from typing import Callable, Sequence

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.config import Config
from hybrid_ppo.roles.common import FrozenRole, to_device, torch_dtype
from hybrid_ppo.roles.models import load_sequence_classifier

RewardFn = Callable[..., Sequence[float]]


class RewardError(RuntimeError):
    """A reward function misbehaved; the message names the sample."""


def load_reward_fn(spec: str) -> RewardFn:
    """`package.module:function` -> the function, with errors that say which half is wrong."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.reward_fn {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model.reward_fn {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


class RuleReward:
    """A rule reward function, checked on every call."""

    def __init__(self, spec: str, timeout_s: float = 300.0):
        self.spec, self.fn, self.timeout_s = spec, load_reward_fn(spec), timeout_s

    def __call__(self, prompts: list[str], responses: list[str], labels: list[str | None] | None) -> Tensor:
        scores = self._call_with_timeout(prompts, responses, labels)
        if len(scores) != len(responses):
            raise RewardError(f"reward function {self.spec} returned {len(scores)} scores for {len(responses)} responses")
        for i, score in enumerate(scores):
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise RewardError(f"reward function {self.spec} returned {score!r} for sample {i} "
                                  f"(prompt {prompts[i]!r}, response {responses[i]!r}); expected a finite float")
        return torch.tensor(scores, dtype=torch.float32)

    def _call_with_timeout(self, *args) -> list:
        """Run the user's function in a daemon thread. A thread cannot be killed, so a hung call is
        left behind; the run fails anyway, and a daemon thread does not hold the process open."""
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["scores"] = list(self.fn(*args))
            except Exception as err:  # re-raised in the caller's thread, with its sample context
                outcome["error"] = err

        thread = threading.Thread(target=target, name=f"reward {self.spec}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise RewardError(f"reward function {self.spec} did not return within model.reward_timeout_s = "
                              f"{self.timeout_s:g} s ({len(args[1])} responses)")
        if "error" in outcome:
            err = outcome["error"]
            raise RewardError(f"reward function {self.spec} raised {type(err).__name__}: {err}") from err
        return outcome["scores"]  # type: ignore[return-value]


class RewardModel(FrozenRole):
    """A sequence classifier scored at each row's last real token (SCORE_REWARD)."""

    def __init__(self, cfg: Config, dist, model_path: str):
        super().__init__(cfg, dist, lambda: load_sequence_classifier(model_path, torch_dtype(cfg.model.dtype)))

    @torch.no_grad()
    def score(self, seq: Sequences) -> Tensor:
        """[B] one scalar per sequence."""
        out = []
        for c in seq.chunks(self.cfg.train.micro_batch_size):
            c = to_device(c, self.device)
            # transformers pools at each row's last non-pad token, so right-padded responses are fine.
            logits = self.model(input_ids=c.tokens, attention_mask=c.attention_mask,
                                position_ids=position_ids(c.attention_mask)).logits  # [b, 1]
            out.append(logits[:, 0].float().cpu())
        scores = torch.cat(out)
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            raise RewardError(f"reward model returned a non-finite score for sample {int(bad[0, 0])}")
        return scores
