"""The transformers models behind the roles: causal LM (actor, reference), value model (critic),
sequence classifier (reward model). All load from local directories; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences, position_ids


def _local_dir(path: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path!r} does not exist (models load from local directories only)")
    return path


def load_causal_lm(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_local_dir(path), dtype=dtype)


def load_sequence_classifier(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(_local_dir(path), dtype=dtype, num_labels=1)
    if model.config.pad_token_id is None:
        raise ValueError(f"reward model {path!r} has no pad_token_id; it cannot find each row's last token")
    return model


class ValueModel(nn.Module):
    """A transformer backbone with a scalar head: V(s_t) for every position."""

    def __init__(self, path: str, dtype: torch.dtype):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # A causal-LM checkpoint has an lm_head the backbone drops on purpose: keep that expected
        # "UNEXPECTED key" report out of every critic rank's log.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.backbone = AutoModel.from_pretrained(_local_dir(path), dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        hidden = self.backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=dtype)
        # A small head keeps early value errors small, so the first critic steps do not swamp the
        # backbone with large gradients (OpenRLHF and TRL start near zero too).
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.config = self.backbone.config

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()

    def forward(self, seq: Sequences) -> Tensor:
        """[B, R] values of the states before each response token, in fp32."""
        hidden = self.backbone(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                               position_ids=position_ids(seq.attention_mask)).last_hidden_state
        values = self.value_head(hidden[:, seq.prompt_len - 1:-1]).squeeze(-1)
        return values.float()
