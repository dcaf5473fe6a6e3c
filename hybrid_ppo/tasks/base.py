"""What every prompt source yields: a prompt, and the label a rule reward checks against (if any)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Example(NamedTuple):
    prompt: str | list
    """Prompt text; or, straight from a data file and before rendering, a chat (a list of
    {"role", "content"} messages). `hybrid_ppo.data.render_examples` turns chats into text."""
    label: Any = None
    """The reference answer a rule reward compares with (any JSON value, as the data has it); None
    when the prompt source has none."""
    metadata: dict | None = None
    """The data row's other fields, handed to a reward function that takes `metadata`."""
    templated: bool = False
    """True when `prompt` is a rendered chat template: it already holds its special tokens (BOS
    included), so it is tokenized without adding any. False: the tokenizer adds its own, as for
    any plain text."""
    source: str = ""
    """Where the example came from (`file:line`, or `dir[row]`), for error messages."""
