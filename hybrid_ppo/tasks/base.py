"""What every prompt source yields: a prompt, and the label a rule reward checks against (if any)."""

from __future__ import annotations

from typing import NamedTuple


class Example(NamedTuple):
    prompt: str
    """Prompt text, without special tokens; the tokenizer adds `<bos>`."""
    label: str | None = None
    """The reference answer a rule reward compares with; None when the prompt source has none."""
