"""Logits for the response positions only: the same log-probs as the full-logits computation, and
the LM head never sees a prompt position (so no [B, P+R, V] tensor exists)."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo import ops
from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.roles.forward import response_logits, response_logprobs

VOCAB = 32_000


def _model(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()  # Qwen2.5-0.5B ties its head


def _sequences() -> Sequences:
    """Left-padded prompts (P = 7) and right-padded responses (R = 5), as the trainer assembles them."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (3, 12), generator=gen)
    attention = torch.ones_like(tokens)
    attention[0, :3] = 0  # a short prompt
    attention[2, 10:] = 0  # a response that ended early
    tokens[attention == 0] = 0
    return Sequences(tokens, attention, attention[:, 7:].clone())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_response_logprobs_equal_full_logits(arch):
    model, seq = _model(arch), _sequences()
    full = model(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                 position_ids=position_ids(seq.attention_mask)).logits  # [B, P+R, V]
    expected = ops.logprobs(full[:, seq.prompt_len - 1:-1], seq.responses, temperature=0.7)
    got = response_logprobs(model, seq, temperature=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the gradients that train the actor agree too
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model(input_ids=seq.tokens, attention_mask=seq.attention_mask,
                 position_ids=position_ids(seq.attention_mask)).logits
    ops.logprobs(full[:, seq.prompt_len - 1:-1], seq.responses, temperature=0.7).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_lm_head_sees_only_response_positions():
    model, seq = _model("llama"), _sequences()
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, inputs, out: shapes.append(tuple(out.shape)))
    logits = response_logits(model, seq)
    assert shapes == [(3, 5, VOCAB)] and logits.shape == (3, 5, VOCAB)
