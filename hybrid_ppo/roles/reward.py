"""Rewards: a sequence-classification model (a Ray role) or a rule function (runs in the driver).

A rule reward is named `package.module:function` in the config and is called as

    function(prompts: list[str], responses: list[str], labels: list[str | None] | None) -> list[float]

with the decoded prompt and response texts (special tokens removed) and the dataset labels (None
where the dataset has none). It must return one finite float per response. Anything else fails
the step with an error that names the offending sample.
"""

from __future__ import annotations

import importlib
import math
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

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_reward_fn(spec)

    def __call__(self, prompts: list[str], responses: list[str], labels: list[str | None] | None) -> Tensor:
        try:
            scores = list(self.fn(prompts, responses, labels))
        except Exception as err:
            raise RewardError(f"reward function {self.spec} raised {type(err).__name__}: {err}") from err
        if len(scores) != len(responses):
            raise RewardError(f"reward function {self.spec} returned {len(scores)} scores for {len(responses)} responses")
        for i, score in enumerate(scores):
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise RewardError(f"reward function {self.spec} returned {score!r} for sample {i} "
                                  f"(prompt {prompts[i]!r}, response {responses[i]!r}); expected a finite float")
        return torch.tensor(scores, dtype=torch.float32)


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
