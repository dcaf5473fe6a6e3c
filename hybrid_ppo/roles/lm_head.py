"""Log-probs of the response tokens without their [B, R, V] logits: lm_head, for one forward, hands
its input hidden states to `ops.linear_logprobs`, the LM head fused with the log-prob (and entropy) op.

Which path a role takes is decided once, at start (`lm_head_path`), and logged:

* ``fused`` - the default.
* ``materialized`` - `roles.forward.response_logits` + `ops.logprobs`, for what the fused op cannot do:
  heads that transform the logits after the matmul (a soft-cap or a logit scale, refused by name) and
  output embeddings that are not an `nn.Linear`.

ZeRO-3 takes the fused path too. Outside lm_head's own forward its weight is a partition (numel 0), and
`deepspeed.zero.GatheredParameters` would cut the gradient; so the op runs *inside* lm_head's forward
(`_head_returns_logprobs`), during the model's ordinary forward, where DeepSpeed's module hooks gather
the weight before it, gather it again before its backward, and partition the full gradient it
returns, exactly as for the plain head. (The body's hidden states + a bare head call skipped the root
module's ZeRO-3 hooks and gave a wrong update under ZeRO-3 on 2 ranks.)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.packing import PackedBatch

log = logging.getLogger(__name__)

FUSED, MATERIALIZED = "fused", "materialized"


def lm_head_path(model: nn.Module, role: str) -> str:
    """`FUSED` or `MATERIALIZED` for this model (an HF causal LM, under any ZeRO stage); logs why."""
    from hybrid_ppo.ops import logit_transforms

    transforms = logit_transforms(getattr(model, "config", None))
    head = model.get_output_embeddings()
    if transforms:
        why = f"{type(model).__name__} has {', '.join(transforms)}, which the fused LM-head op cannot apply"
    elif not isinstance(head, nn.Linear):
        why = f"{type(model).__name__}'s output embedding is a {type(head).__name__}, not an nn.Linear"
    else:
        log.info("%s: LM head fused with the log-prob op (no [B, R, V] logits)", role)
        return FUSED
    log.info("%s: materialized [B, R, V] response logits: %s", role, why)
    return MATERIALIZED


def fused_response_logprobs(model: Any, seq: Sequences, temperature: float, with_entropy: bool = False):
    """`common.response_logprobs` through the fused op; `model` an HF causal LM or a DeepSpeed engine.

    The model runs whole, through the engine's (and the root module's) forward like the materialized
    path, with lm_head returning log-probs instead of logits: under ZeRO-3 the root module's hooks
    (end of forward, the parameter coordinator's step) fire as usual, not only lm_head's."""
    from hybrid_ppo.ops import LogProbsWithEntropy
    from hybrid_ppo.roles.forward import response_logits

    head = getattr(model, "module", model).get_output_embeddings()
    with _head_returns_logprobs(head, seq.responses, temperature):
        lp, entropy = response_logits(model, seq)  # here lm_head returned (log-probs, entropy), not logits
    return LogProbsWithEntropy(lp, entropy) if with_entropy else lp


@contextmanager
def _head_returns_logprobs(head: nn.Linear, labels: Tensor, temperature: float) -> Iterator[None]:
    """For the duration, `head(hidden [B, R, H])` returns fp32 `(logprobs, entropy)` [B, R] of `labels`
    under its logits instead of the logits. A module call, not a function call: the forward pre/post
    hooks that DeepSpeed put on `head` fire around it, so the op sees the full [V, H] weight and its
    full gradient reaches ZeRO-3's partitioning (a tied weight is the same Parameter: one gradient,
    summed by autograd)."""
    from hybrid_ppo import ops

    def forward(hidden: Tensor) -> tuple[Tensor, Tensor]:
        out = ops.linear_logprobs(hidden, head.weight, labels, temperature=temperature, with_entropy=True,
                                  bias=head.bias)
        return out.logprobs, out.entropy  # a plain tuple of tensors: DeepSpeed hooks each one for backward

    head.forward = forward  # an instance attribute shadows nn.Linear.forward; nn.Module.__call__ runs it
    try:
        yield
    finally:
        del head.forward


def fused_packed_logprobs(model: Any, packed: PackedBatch, temperature: float, with_entropy: bool = False):
    """`fused_response_logprobs` on a packed row (algo/packing.py): [N] for its N real response
    tokens. The same head swap, so ZeRO-3 sees an ordinary forward: `logits_to_keep` hands lm_head
    the hidden states of the positions that predict them, [1, N, H]."""
    from hybrid_ppo.ops import LogProbsWithEntropy
    from hybrid_ppo.roles.forward import packed_response_logits

    head = getattr(model, "module", model).get_output_embeddings()
    with _head_returns_logprobs(head, packed.targets[None], temperature):
        lp, entropy = packed_response_logits(model, packed, keep_batch_dim=True)  # lm_head gave (log-probs, entropy)
    return LogProbsWithEntropy(lp[0], entropy[0]) if with_entropy else lp[0]
