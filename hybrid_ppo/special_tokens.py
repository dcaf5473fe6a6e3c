"""The pad id and the set of end-of-response ids of a checkpoint, resolved once.

Stock checkpoints disagree about both. Qwen2.5-Instruct's `config.json` has no `pad_token_id`
and ends a turn with `<|im_end|>` (151645) while its `generation_config.json` also lists
`<|endoftext|>` (151643); Llama-3.1-Instruct lists three EOS ids (128001, 128008, 128009) and its
tokenizer has no pad token at all. Every part of the trainer (both engines, the response mask,
the decoded text a reward sees, the reward model) reads the ids from `resolve_special_tokens`,
so they cannot disagree with each other.

* **EOS ids**: the union, in this order, of `generation_config.json`'s `eos_token_id`, the
  config's `eos_token_id` (each an int or a list) and the tokenizer's EOS token. Generation stops
  at any of them; a response ends at the first.
* **Pad id**: the tokenizer's pad token, else the config's `pad_token_id`, else the first EOS id
  (the documented fallback, as transformers' `generate` does). The pad id only fills positions
  that every mask already excludes, so pad == EOS is safe: nothing ever finds a sequence's end
  by looking for the pad id (the reward model uses the attention mask).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hybrid_ppo.errors import HybridPPOError

log = logging.getLogger(__name__)


class SpecialTokenError(HybridPPOError, ValueError):
    """A checkpoint from which no EOS id can be found."""


class TokenizerMismatchError(HybridPPOError, ValueError):
    """Two models that must share a tokenizer (actor and reward model) do not."""


@dataclass(frozen=True)
class SpecialTokens:
    pad_id: int
    """Fills prompt (left) and response (right) padding; never used to find where a sequence ends."""
    eos_ids: tuple[int, ...]
    """A response ends at the first of any of these ids (non-empty, no duplicates)."""
    pad_source: str = "tokenizer"
    """Where `pad_id` came from: 'tokenizer', 'config' or 'eos' (the fallback)."""


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def special_tokens_from(config: Any, generation_config: Any | None, tokenizer: Any | None,
                        where: str = "model") -> SpecialTokens:
    """Resolve from already-loaded objects (any of `generation_config` / `tokenizer` may be None)."""
    eos_ids = _unique([*_as_ids(getattr(generation_config, "eos_token_id", None)),
                       *_as_ids(getattr(config, "eos_token_id", None)),
                       *_as_ids(getattr(tokenizer, "eos_token_id", None))])
    if not eos_ids:
        raise SpecialTokenError(f"{where}: no EOS id in config.json, generation_config.json or the tokenizer; "
                                "set eos_token_id in config.json")
    tokenizer_pad = getattr(tokenizer, "pad_token_id", None)
    config_pad = getattr(config, "pad_token_id", None)
    if tokenizer_pad is not None:
        return SpecialTokens(int(tokenizer_pad), eos_ids, "tokenizer")
    if config_pad is not None:
        return SpecialTokens(int(config_pad), eos_ids, "config")
    return SpecialTokens(eos_ids[0], eos_ids, "eos")


def resolve_special_tokens(model_path: str | Path) -> SpecialTokens:
    """Pad and EOS ids of the local checkpoint at `model_path` (config, generation config and
    tokenizer, whichever it has). Every process that resolves the same path gets the same ids."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(model_path)
    config = AutoConfig.from_pretrained(path)
    generation_config = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                             "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return special_tokens_from(config, generation_config, tokenizer, where=str(path))
