"""Log-probs of the response tokens without their [B, R, V] logits: the model's body gives the final
hidden states, and `ops.linear_logprobs` fuses the LM head with the log-prob (and entropy) op.

Which path a role takes is decided once, at start (`lm_head_path`), and logged:

* ``fused`` - the default.
* ``materialized`` - `roles.forward.response_logits` + `ops.logprobs`, for what the fused op cannot do:
  heads that transform the logits after the matmul (a soft-cap or a logit scale, refused by name), and
  DeepSpeed ZeRO-3, where the head weight is a partition (numel 0) outside lm_head's own forward and
  `deepspeed.zero.GatheredParameters` would cut its gradient; running the op inside lm_head's hooked
  forward is the way to make ZeRO-3 right, not done yet.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.algo.packing import PackedBatch

log = logging.getLogger(__name__)

FUSED, MATERIALIZED = "fused", "materialized"

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""HF config attributes of heads whose logits are not just `h @ W.T + b` (Gemma 2, Cohere, Granite)."""


def lm_head_path(model: nn.Module, zero_stage: int, role: str) -> str:
    """`FUSED` or `MATERIALIZED` for this model (an HF causal LM) under ZeRO `zero_stage`; logs why."""
    config = getattr(model, "config", None)
    transforms = [f"{a}={getattr(config, a)}" for a in LOGIT_TRANSFORMS if getattr(config, a, None) is not None]
    head = model.get_output_embeddings()
    if transforms:
        why = f"{type(model).__name__} has {', '.join(transforms)}, which the fused LM-head op cannot apply"
    elif not isinstance(head, nn.Linear):
        why = f"{type(model).__name__}'s output embedding is a {type(head).__name__}, not an nn.Linear"
    elif zero_stage == 3:
        why = "ZeRO-3 partitions the head weight outside lm_head's forward (fused path not wired for ZeRO-3 yet)"
    else:
        log.info("%s: LM head fused with the log-prob op (no [B, R, V] logits)", role)
        return FUSED
    log.info("%s: materialized [B, R, V] response logits: %s", role, why)
    return MATERIALIZED


def response_hidden(model: nn.Module, seq: Sequences) -> Tensor:
    """[B, R, H] final hidden states (after the body's last norm) at the positions P-1+t that predict
    response token t: what lm_head would turn into `response_logits`."""
    out = model.get_decoder()(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                              position_ids=position_ids(seq.attention_mask))
    return out.last_hidden_state[:, seq.prompt_len - 1:-1]


def fused_response_logprobs(model: Any, seq: Sequences, temperature: float, with_entropy: bool = False):
    """`common.response_logprobs` through the fused op; `model` an HF causal LM or a DeepSpeed engine
    (ZeRO-2: its parameters are whole, and gradients reach them through plain autograd)."""
    from hybrid_ppo import ops

    hf = getattr(model, "module", model)
    head = hf.get_output_embeddings()
    return ops.linear_logprobs(response_hidden(hf, seq), head.weight, seq.responses, temperature=temperature,
                               with_entropy=with_entropy, bias=head.bias)


def fused_packed_logprobs(model: Any, packed: PackedBatch, temperature: float, with_entropy: bool = False):
    """`fused_response_logprobs` on a packed row (algo/packing.py): [N] for the N real response tokens,
    the hidden states taken at the packed positions that predict them."""
    from hybrid_ppo import ops
    from hybrid_ppo.roles.forward import packed_hidden

    hf = getattr(model, "module", model)
    head = hf.get_output_embeddings()
    hidden = packed_hidden(hf.get_decoder(), packed)[packed.predict_index]  # [N, H]
    return ops.linear_logprobs(hidden, head.weight, packed.targets, temperature=temperature,
                               with_entropy=with_entropy, bias=head.bias)
