"""Rewards: a sequence-classification model (a Ray role) or a rule function (runs in the driver).

A rule reward is named `package.module:function` in the config and is called as

    function(prompts: list[str], responses: list[str], labels: list) -> list[float]
    function(prompts, responses, labels, metadata: list[dict]) -> list[float]   # if it takes `metadata`

* `prompts`: the text the model saw: the string from the data, or the rendered chat template for
  a chat (so a chat prompt carries the template's markers).
* `responses`: what the policy generated before its first stop token (any EOS id), decoded
  without special tokens: a stop token never reaches the reward.
* `labels`: the data's label field as it is (any JSON value; None where a row has none).
* `metadata`: each row's other fields as a dict (empty for builtin data); passed only to a
  function with a `metadata` parameter (or `**kwargs`), so 3-argument functions keep working.

It must return one finite float per response within `model.reward_timeout_s` seconds. Anything
else fails the step with an error that names the offending sample, or the function.

A reward model is a local `AutoModelForSequenceClassification` (num_labels = 1) that shares the
actor's tokenizer (checked at start: re-tokenizing between tokenizers is out of scope). It scores
each sequence at its last real token, found from the attention mask.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from hybrid_ppo.algo.advantages import last_token_index
from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.config import Config
from hybrid_ppo.errors import HybridPPOError, InputError
from hybrid_ppo.rewards.combine import CombinedReward, RewardSource
from hybrid_ppo.role_process import torch_dtype
from hybrid_ppo.roles.forward import in_micro_batches, pack_layout, packed_hidden, to_device
from hybrid_ppo.roles.frozen import FrozenRole
from hybrid_ppo.roles.models import load_sequence_classifier

RewardFn = Callable[..., Sequence[float]]
log = logging.getLogger(__name__)


class RewardError(HybridPPOError, RuntimeError):
    """A reward function misbehaved; the message names the sample."""


def load_reward_fn(spec: str, key: str = "model.reward_fn") -> RewardFn:
    """`package.module:function` -> the function, with errors that say which half is wrong."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"{key} {spec!r}: cannot import module {module_name!r} ({err})") from None
    except SyntaxError as err:  # the user's own file: name it and the line
        raise InputError(f"{key} {spec!r}: syntax error in {err.filename}:{err.lineno}: {err.msg}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"{key} {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def build_reward(cfg: Config) -> CombinedReward | None:
    """The run's driver-side reward as one weighted list of sources (None with a reward model,
    which scores on its own ranks): `reward_fn` or `reward_url` as one term of weight 1,
    `reward_fns` term by term (each then logged as reward/<name>_mean)."""
    m = cfg.model
    if m.reward_fn is not None:
        sources = [RewardSource(m.reward_fn.rpartition(":")[2], 1.0, RuleReward(m.reward_fn, m.reward_timeout_s))]
    elif m.reward_fns is not None:
        sources = [RewardSource(t.metric_name, t.weight, RuleReward(t.fn, m.reward_timeout_s, f"model.reward_fns[{i}].fn"))
                   for i, t in enumerate(m.reward_fns)]
    elif m.reward_url is not None:
        from hybrid_ppo.rewards.remote import RemoteReward

        sources = [RewardSource("remote", 1.0, RemoteReward(m.reward_url, m.reward_timeout_s, m.reward_retries,
                                                             m.reward_batch_size))]
    else:
        return None
    return CombinedReward(sources, log_terms=m.reward_fns is not None)


class RuleReward:
    """A rule reward function, checked on every call."""

    def __init__(self, spec: str, timeout_s: float = 300.0, key: str = "model.reward_fn"):
        self.spec, self.fn, self.timeout_s = spec, load_reward_fn(spec, key), timeout_s
        self.takes_metadata = _accepts_keyword(self.fn, "metadata")

    def __call__(self, prompts: list[str], responses: list[str], labels: list[Any] | None,
                 metadata: list[dict] | None = None) -> Tensor:
        extra = {"metadata": metadata if metadata is not None else [{} for _ in responses]} if self.takes_metadata else {}
        scores = self._call_with_timeout(prompts, responses, labels, **extra)
        if len(scores) != len(responses):
            raise RewardError(f"reward function {self.spec} returned {len(scores)} scores for {len(responses)} responses")
        for i, score in enumerate(scores):
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise RewardError(f"reward function {self.spec} returned {score!r} for sample {i} "
                                  f"(prompt {prompts[i]!r}, response {responses[i]!r}); expected a finite float")
        return torch.tensor(scores, dtype=torch.float32)

    def _call_with_timeout(self, *args, **kwargs) -> list:
        """Run the user's function in a daemon thread. A thread cannot be killed, so a hung call is
        left behind; the run fails anyway, and a daemon thread does not hold the process open."""
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["scores"] = list(self.fn(*args, **kwargs))
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


def _accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call them the classic way
        return False
    return any(p.name == name or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


TOKENIZER_PROBES = ("Hello world! 1 + 2 = 3.", "  leading spaces\nand a newline", "ünïcödé 😀")


def check_reward_tokenizer(actor_tokenizer, reward_path: str, texts: Sequence[str] = ()) -> None:
    """Refuse a reward model whose tokenizer encodes text differently from the actor's: it scores
    the actor's token ids as they are, and re-tokenizing between tokenizers is out of scope."""
    from transformers import AutoTokenizer

    from hybrid_ppo.special_tokens import TokenizerMismatchError

    has_tokenizer = any((Path(reward_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                      "tokenizer.model"))
    if not has_tokenizer:
        log.warning("reward model %s has no tokenizer files: assuming it shares the actor's tokenizer", reward_path)
        return
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_path)
    if len(reward_tokenizer) != len(actor_tokenizer):
        raise TokenizerMismatchError(f"reward model {reward_path!r}: its tokenizer has {len(reward_tokenizer)} tokens, the "
                         f"actor's {len(actor_tokenizer)}; a reward model must share the actor's tokenizer "
                         "(re-tokenization is not supported)")
    for text in (*TOKENIZER_PROBES, *texts):
        ours, theirs = (t(text, add_special_tokens=False)["input_ids"] for t in (actor_tokenizer, reward_tokenizer))
        if ours != theirs:
            raise TokenizerMismatchError(f"reward model {reward_path!r}: its tokenizer encodes {text[:60]!r} as {theirs[:8]}..., "
                             f"the actor's as {ours[:8]}...; a reward model must share the actor's tokenizer "
                             "(re-tokenization is not supported)")


class RewardModel(FrozenRole):
    """A sequence classifier scored at each row's last real token (SCORE_REWARD)."""

    def __init__(self, cfg: Config, dist, model_path: str):
        super().__init__(cfg, dist, lambda: load_sequence_classifier(model_path, torch_dtype(cfg.model.dtype)))

    @torch.no_grad()
    def score(self, seq: Sequences) -> Tensor:
        """[B] one scalar per sequence."""
        train = self.cfg.train
        scores = in_micro_batches(
            lambda c: score_last_token(self.model, to_device(c, self.device), packed=train.packing,
                                       shared=self.shared).float().cpu(),
            seq, train.micro_batch_size, train.max_tokens_per_micro_batch, shared=self.shared)
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            raise RewardError(f"reward model returned a non-finite score for sample {int(bad[0, 0])}")
        return scores


def score_last_token(model, seq: Sequences, packed: bool = False, shared: bool = False) -> Tensor:
    """[B] the classifier's score at each row's last real token. The backbone and the `score`
    head run separately: transformers' own pooling looks for `pad_token_id`, and a pad id cannot
    say where a row ends (prompts are left-padded, responses right-padded, and pad may be EOS):
    the last 1 of the attention mask does."""
    backbone = getattr(model, model.base_model_prefix)
    if packed:  # the real tokens in one row (algo/packing.py): each sequence's last one is known
        batch = pack_layout(seq, shared)  # `shared`: each group's prompt once (algo/prefix_sharing.py)
        return model.score(packed_hidden(backbone, batch)[batch.last_index])[:, 0]
    hidden = backbone(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                      position_ids=position_ids(seq.attention_mask)).last_hidden_state  # [B, T, H]
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(seq.attention_mask)]
    return model.score(last)[:, 0]  # [B]
