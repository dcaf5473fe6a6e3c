"""How a role's model runs on a batch of sequences: the response positions' logits or log-probs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences, position_ids


def response_logits(model: nn.Module, seq: Sequences) -> Tensor:
    """[B, R, V] logits of the distributions that produced each response token.

    Position P-1+t predicts response token t. Only those R positions go through the LM head
    (transformers' `logits_to_keep` takes the indices), so no [B, P+R, V] tensor ever exists: with
    a 150k vocabulary the prompt's logits would dwarf everything else in a micro-batch."""
    keep = torch.arange(seq.prompt_len - 1, seq.tokens.shape[1] - 1, device=seq.tokens.device)
    out = model(input_ids=seq.tokens, attention_mask=seq.attention_mask, position_ids=position_ids(seq.attention_mask),
                logits_to_keep=keep)
    return out.logits


def response_logprobs(model: nn.Module, seq: Sequences, temperature: float, with_entropy: bool = False,
                      inplace_backward: bool = False, fused: bool = False):
    """log pi(a_t | s_t) at the rollout temperature for every response token, through the one
    door to the kernels (which scale by the temperature without a [B, R, V] copy). `fused`: no
    [B, R, V] logits at all (roles/lm_head.py, whose `lm_head_path` says when that is possible)."""
    from hybrid_ppo import ops

    if fused:
        from hybrid_ppo.roles.lm_head import fused_response_logprobs

        return fused_response_logprobs(model, seq, temperature, with_entropy)

    return ops.logprobs(response_logits(model, seq), seq.responses, temperature=temperature,
                        with_entropy=with_entropy, inplace_backward=inplace_backward)


def to_device(seq: Sequences, device: torch.device) -> Sequences:
    return Sequences(seq.tokens.to(device), seq.attention_mask.to(device), seq.action_mask.to(device))
