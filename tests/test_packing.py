"""Packed micro-batches (algo/packing.py): the real tokens of several sequences in one row give the
same log-probs, entropies, values and rewards as the padded [B, P+R] rectangle, for the stock
chat-model fixtures; a model whose attention would cross the packed sequences is refused at start;
token bins and balanced shards."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.packing import TokenBudgetError, balanced_shards, pack, token_bins
from hybrid_ppo.config import ConfigError
from hybrid_ppo.roles.forward import check_packing, response_logprobs

FAMILIES = ["llama3", "qwen2.5", "qwen3", "mistral"]
PROMPT_LENGTHS = [3, 6, 4, 1]  # left-padded to P = 6
RESPONSE_LENGTHS = [5, 2, 1, 3]  # responses that end early, right-padded to R = 5
PAD = 0


def _sequences(vocab: int, seed: int = 0) -> Sequences:
    gen = torch.Generator().manual_seed(seed)
    P, R = max(PROMPT_LENGTHS), max(RESPONSE_LENGTHS)
    tokens = torch.randint(1, vocab, (len(PROMPT_LENGTHS), P + R), generator=gen)
    attention = torch.zeros_like(tokens)
    for row, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)):
        attention[row, P - p:P + r] = 1
    tokens[attention == 0] = PAD
    return Sequences(tokens, attention, attention[:, P:].clone())


def test_pack_layout_by_hand():
    tokens = torch.tensor([[0, 11, 12, 21, 22], [13, 14, 15, 23, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    packed = pack(Sequences(tokens, attention, attention[:, 3:]))
    assert packed.tokens.tolist() == [[11, 12, 21, 22, 13, 14, 15, 23]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.predict_index.tolist() == [1, 2, 6]  # the positions before 21, 22 and 23
    assert packed.targets.tolist() == [21, 22, 23]
    assert packed.last_index.tolist() == [3, 7]
    assert packed.unpack(torch.tensor([1.0, 2.0, 3.0])).tolist() == [[1.0, 2.0], [3.0, 0.0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_logprobs_and_entropies(family, chat_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint(family), dtype=torch.float32).eval()
    seq = _sequences(model.config.vocab_size)  # ids over the whole (padded) vocabulary
    mask = seq.action_mask.bool()
    check_packing(model, "actor")
    with torch.no_grad():
        for fused in (True, False):
            padded = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused)
            packed = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused, packed=True)
            for want, got in zip(padded, packed):
                torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
                assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_values_and_rewards(family, chat_checkpoint):
    from transformers import AutoModelForSequenceClassification

    from hybrid_ppo.roles.models import ValueModel
    from hybrid_ppo.roles.reward import score_last_token

    path = chat_checkpoint(family)
    critic = ValueModel(str(path), torch.float32).eval()
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1).eval()
    seq = _sequences(critic.config.vocab_size, seed=1)
    mask = seq.action_mask.bool()
    check_packing(critic, "critic")
    check_packing(reward, "reward")
    with torch.no_grad():
        torch.testing.assert_close(critic(seq, packed=True)[mask], critic(seq)[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score_last_token(reward, seq, packed=True), score_last_token(reward, seq),
                                   rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_padded(chat_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint("qwen2.5"), dtype=torch.float32)
    seq = _sequences(model.config.vocab_size, seed=2)
    mask = seq.action_mask.float()
    grads = []
    for packed in (False, True):
        model.zero_grad()
        lp, entropy = response_logprobs(model, seq, 1.0, with_entropy=True, fused=True, packed=packed)
        ((lp + 0.1 * entropy) * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for want, got in zip(*grads):
        # fp32 sums in another order (a [T, H] body instead of [B, P+R, H], a 151,936-row softmax):
        # differences relative to the tensor's largest gradient, not to each tiny element
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale


def test_attention_that_crosses_packed_sequences_is_refused(chat_checkpoint):
    """A named stand-in for an implementation packing cannot use: an attention function registered
    with transformers that ignores masks (the mask utilities then build none), so a packed row's
    sequences see each other."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def unmasked_attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": False})

    AttentionInterface.register("unmasked_test_attention", unmasked_attention)
    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint("llama3"), dtype=torch.float32,
                                                 attn_implementation="unmasked_test_attention").eval()
    with pytest.raises(ConfigError, match="LlamaForCausalLM with attn_implementation='unmasked_test_attention'"):
        check_packing(model, "actor")


def test_token_bins_respect_the_budget_and_balance():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.distributions.LogNormal(5.0, 1.0).sample((256,)).clamp(1, 1024).long().tolist()
    bins = token_bins(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(256))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 2048
    assert len(bins) <= -(-sum(lengths) // 2048) + 1  # LPT on this shape: at most one bin over the bound
    assert token_bins(lengths, 2048, min_bins=len(bins) + 3).__len__() == len(bins) + 3
    del gen


def test_a_budget_under_the_longest_sequence_names_it():
    with pytest.raises(TokenBudgetError, match="longest sequence, 300 tokens \\(row 2"):
        token_bins([10, 20, 300, 5], 256)


def test_budget_config_checks():
    from helpers import tiny_cfg

    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch.*train.packing=true"):
        tiny_cfg("train.max_tokens_per_micro_batch=64")
    cfg = tiny_cfg("train.packing=true")
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    with pytest.raises(ConfigError, match=f"longest sequence a rollout can make.*= {longest} tokens"):
        tiny_cfg("train.packing=true", f"train.max_tokens_per_micro_batch={longest - 1}")
    assert tiny_cfg("train.packing=true", f"train.max_tokens_per_micro_batch={longest}").train.max_tokens_per_micro_batch == longest


def test_balanced_shards_equal_sizes_and_close_loads():
    lengths = [1000, 900, 50, 40, 30, 20, 10, 5]
    shards = balanced_shards(lengths, 2)
    assert [len(s) for s in shards] == [4, 4]
    loads = sorted(sum(lengths[i] for i in s) for s in shards)
    assert loads[1] - loads[0] <= 100  # contiguous shards would be 1990 against 65
