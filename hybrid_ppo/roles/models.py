"""The transformers models behind the roles: causal LM (actor, reference), value model (critic),
sequence classifier (reward model). All load from local directories; nothing is downloaded."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.errors import InputError

log = logging.getLogger(__name__)
SCORE_WEIGHT = "score.weight"  # the num_labels x hidden head of transformers' decoder classifiers


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
    if not isinstance(getattr(model, "score", None), nn.Linear):  # scored by roles.reward.score_last_token
        raise InputError(f"reward model {path!r} ({type(model).__name__}) has no linear `score` head")
    return model


def is_sequence_classifier(path: str) -> bool:
    """Whether the checkpoint at `path` was saved as a sequence classifier (a reward model)."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(_local_dir(path)).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


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
            trained_head = _reward_model_head(path, dtype)
            self.backbone = AutoModel.from_pretrained(_local_dir(path), dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        hidden = self.backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.zeros_(self.value_head.bias)
        if trained_head is not None:  # a reward model's score head already reads this backbone
            with torch.no_grad():
                self.value_head.weight.copy_(trained_head.weight)
                if trained_head.bias is not None:
                    self.value_head.bias.copy_(trained_head.bias)
            log.info("critic from %s: value head = the reward model's trained `score` head", path)
        else:
            # A small head keeps early value errors small, so the first critic steps do not swamp
            # the backbone with large gradients (OpenRLHF and TRL start near zero too).
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
            log.info("critic from %s: fresh value head (the checkpoint is not a sequence classifier)", path)
        self.config = self.backbone.config

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()

    def forward(self, seq: Sequences, packed: bool = False, shared: bool = False) -> Tensor:
        """[B, R] values of the states before each response token, in fp32 (0 on padding when `packed`:
        the real tokens in one row, algo/packing.py; each group's prompt once where `shared`)."""
        if packed:
            from hybrid_ppo.roles.forward import pack_layout, packed_hidden

            batch = pack_layout(seq, shared)
            hidden = packed_hidden(self.backbone, batch)  # [T, H]
            return batch.unpack(self.value_head(hidden[batch.predict_index]).squeeze(-1).float())
        hidden = self.backbone(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                               position_ids=position_ids(seq.attention_mask)).last_hidden_state
        values = self.value_head(hidden[:, seq.prompt_len - 1:-1]).squeeze(-1)
        return values.float()


def _reward_model_head(path: str, dtype: torch.dtype) -> nn.Linear | None:
    """The trained `score` head of a sequence-classifier checkpoint (num_labels = 1), read from its
    safetensors without building the model; None for a causal LM."""
    if not is_sequence_classifier(path):
        return None
    import json

    from safetensors import safe_open

    index = Path(path) / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"].get(SCORE_WEIGHT) if index.is_file() else "model.safetensors"
    if shard is None or not (Path(path) / shard).is_file():
        raise InputError(f"critic {path!r}: a sequence-classifier checkpoint without a {SCORE_WEIGHT!r} tensor "
                         "in safetensors; cannot reuse its head")
    with safe_open(str(Path(path) / shard), framework="pt") as tensors:
        if SCORE_WEIGHT not in tensors.keys():
            raise InputError(f"critic {path!r}: no {SCORE_WEIGHT!r} tensor in {shard}; cannot reuse its head")
        weight = tensors.get_tensor(SCORE_WEIGHT)
    if weight.shape[0] != 1:
        raise InputError(f"critic {path!r}: its score head has {weight.shape[0]} outputs; a value head needs 1 "
                         "(a reward model with num_labels = 1)")
    head = nn.Linear(weight.shape[1], 1, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head
