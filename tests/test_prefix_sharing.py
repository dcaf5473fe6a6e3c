"""Prefix-shared packing (algo/prefix_sharing.py, roles/shared_mask.py): each group's prompt packed
once gives the same log-probs, entropies, values, rewards and gradients as the unshared layouts,
on the stock chat-model fixtures, with prompts of different lengths and responses that end early;
micro-batches hold whole groups and count distinct tokens; a model that cannot take the mask is
refused (or, left to the default, falls back to plain packing)."""

from __future__ import annotations

import pytest
import torch
from helpers import grouped_sequences, tiny_cfg

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.prefix_sharing import group_shards, group_units, pack_shared, unit_lengths, visible
from hybrid_ppo.config import ConfigError
from hybrid_ppo.roles.forward import group_bins, in_micro_batches, response_logprobs
from hybrid_ppo.roles.shared_mask import check_prefix_sharing, resolve_prefix_sharing

FAMILIES = ["llama3", "qwen2.5", "qwen3", "mistral"]
ATOL = 1e-5  # fp32


def _groups(vocab: int, seed: int = 0) -> Sequences:
    return grouped_sequences(vocab, torch.Generator().manual_seed(seed), prompt_lengths=(5, 2, 7), samples=3)


def test_pack_shared_layout_by_hand():
    # rows 0 and 2 share the prompt [11, 12]; row 1 is alone (prompt [13], left-padded)
    tokens = torch.tensor([[0, 11, 12, 21, 22], [0, 0, 13, 31, 0], [0, 11, 12, 23, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 1, 0]])
    packed = pack_shared(Sequences(tokens, attention, attention[:, 3:]))
    assert packed.tokens.tolist() == [[11, 12, 21, 22, 23, 13, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]  # each response continues from its prompt
    assert packed.predict_index.tolist() == [1, 2, 5, 1]  # 21 and 23 both predicted by the prompt's last token
    assert packed.targets.tolist() == [21, 22, 31, 23]
    assert packed.last_index.tolist() == [3, 6, 4]
    assert packed.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [[1.0, 2.0], [3.0, 0.0], [4.0, 0.0]]
    allowed = visible(packed.segments, packed.branches).int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0]  # 23 sees its prompt and itself, never 21 or 22
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0]
    assert allowed[6] == [0, 0, 0, 0, 0, 1, 1]  # another group is never seen


def test_one_sample_per_prompt_is_plain_packing():
    seq = grouped_sequences(100, torch.Generator().manual_seed(0), samples=1)
    assert pack_shared(seq).segments is None
    assert not tiny_cfg("train.packing=true").train.prefix_sharing  # samples_per_prompt = 1
    cfg = tiny_cfg("train.packing=true", "train.samples_per_prompt=4", "train.rollout_batch_size=16",
                   "train.mini_batch_size=16", "train.micro_batch_size=8")
    assert cfg.train.prefix_sharing and cfg.train.share_prompt_prefix is None  # the default: on with packing
    with pytest.raises(ConfigError, match="train.share_prompt_prefix.*unless train.packing=true"):
        tiny_cfg("train.share_prompt_prefix=true")


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_unshared_logprobs_and_entropies(family, chat_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint(family), dtype=torch.float32).eval()
    seq = _groups(model.config.vocab_size)
    mask = seq.action_mask.bool()
    check_prefix_sharing(model, "actor")
    assert pack_shared(seq).tokens.shape[1] < int(seq.attention_mask.sum())  # the prompts really are shared
    with torch.no_grad():
        for fused in (True, False):
            padded = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused)
            packed = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused, packed=True)
            shared = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused, packed=True, shared=True)
            for want, plain, got in zip(padded, packed, shared):
                torch.testing.assert_close(got[mask], want[mask], rtol=ATOL, atol=ATOL)
                torch.testing.assert_close(got[mask], plain[mask], rtol=ATOL, atol=ATOL)
                assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_unshared_values_and_rewards(family, chat_checkpoint):
    from transformers import AutoModelForSequenceClassification

    from hybrid_ppo.roles.models import ValueModel
    from hybrid_ppo.roles.reward import score_last_token

    path = chat_checkpoint(family)
    critic = ValueModel(str(path), torch.float32).eval()
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1).eval()
    seq = _groups(critic.config.vocab_size, seed=1)
    mask = seq.action_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(critic(seq, packed=True, shared=True)[mask], critic(seq)[mask], rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(score_last_token(reward, seq, packed=True, shared=True), score_last_token(reward, seq),
                                   rtol=ATOL, atol=ATOL)


def test_shared_gradients_equal_unshared(chat_checkpoint):
    """The prompt's hidden states are computed once; autograd sums their gradient over the group."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint("qwen2.5"), dtype=torch.float32)
    seq = _groups(model.config.vocab_size, seed=2)
    mask = seq.action_mask.float()
    grads = []
    for shared in (False, True):
        model.zero_grad()
        lp, entropy = response_logprobs(model, seq, 1.0, with_entropy=True, fused=True, packed=True, shared=shared)
        ((lp + 0.1 * entropy) * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for want, got in zip(*grads):
        scale = float(want.abs().max())  # as in test_packing: relative to the tensor's largest gradient
        assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])
def test_other_mask_implementations(attn, chat_checkpoint):
    """eager takes an additive float mask, flex_attention a BlockMask (the GPU path; unfused on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint("llama3"), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    seq = _groups(model.config.vocab_size, seed=3)
    mask = seq.action_mask.bool()
    check_prefix_sharing(model, "actor")
    with torch.no_grad():
        want = response_logprobs(model, seq, 1.0, packed=True)
        got = response_logprobs(model, seq, 1.0, packed=True, shared=True)
    torch.testing.assert_close(got[mask], want[mask], rtol=ATOL, atol=ATOL)


def test_attention_without_a_4d_mask_is_refused_or_falls_back(chat_checkpoint):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def unmasked_attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})

    AttentionInterface.register("causal_only_test_attention", unmasked_attention)
    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint("llama3"), dtype=torch.float32,
                                                 attn_implementation="causal_only_test_attention").eval()
    with pytest.raises(ConfigError, match="train.share_prompt_prefix.*attn_implementation='causal_only_test_attention'"):
        check_prefix_sharing(model, "actor")
    common = ("train.packing=true", "train.samples_per_prompt=2", "train.mini_batch_size=16", "train.micro_batch_size=8")
    assert not resolve_prefix_sharing(tiny_cfg(*common).train, model, "actor")  # the default falls back
    with pytest.raises(ConfigError, match="train.share_prompt_prefix"):
        resolve_prefix_sharing(tiny_cfg(*common, "train.share_prompt_prefix=true").train, model, "actor")


def test_micro_batches_and_shards_hold_whole_groups():
    seq = grouped_sequences(100, torch.Generator().manual_seed(4), prompt_lengths=(9, 3, 6, 2), samples=4,
                            max_response=6)
    groups = [set(range(g * 4, g * 4 + 4)) for g in range(4)]
    budget = 30
    bins = group_bins(seq, micro_batch_size=4, budget=budget)
    assert sorted(r for b in bins for r in b) == list(range(len(seq)))
    for b in bins:
        sub = seq.select(torch.tensor(b))
        assert pack_shared(sub).tokens.shape[1] <= budget  # the budget counts distinct tokens
        for group in groups:  # a group is cut only where it alone is over the budget
            whole = unit_lengths(seq, [sorted(group)])[0] <= budget
            assert not whole or not (group & set(b)) or group <= set(b)
    assert [len(u) for u in group_units(seq)] == [4, 4, 4, 4]
    assert all(len(s) == 8 and any(set(s) >= g for g in groups) for s in group_shards(seq, 2))
    for shard in group_shards(seq, 2):
        assert all(group <= set(shard) or not group & set(shard) for group in groups)
    fixed = group_bins(seq, micro_batch_size=8)
    assert [set(b) for b in fixed] == [groups[0] | groups[1], groups[2] | groups[3]]


def test_shared_scoring_in_token_bins_keeps_row_order(tiny_model_dir):
    from hybrid_ppo.roles.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, torch.float32).eval()
    seq = grouped_sequences(model.config.vocab_size, torch.Generator().manual_seed(5), prompt_lengths=(6, 2, 4),
                            samples=4)
    with torch.no_grad():
        want = response_logprobs(model, seq, 1.0)
        got = in_micro_batches(lambda c: response_logprobs(model, c, 1.0, packed=True, shared=True), seq,
                               micro_batch_size=4, budget=16, shared=True)
    mask = seq.action_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=ATOL, atol=ATOL)


def _grouped_experience():
    """4 prompts (1-3 real tokens) x 4 responses (1-4 tokens): 2 groups per rank."""
    from hybrid_ppo.algo.experience import Experience

    gen = torch.Generator().manual_seed(6)
    seq = grouped_sequences(14, gen, prompt_lengths=(3, 1, 2, 3), samples=4, max_response=4)
    action = seq.action_mask
    old = -torch.rand(action.shape, generator=gen) * action
    adv = torch.randn(action.shape, generator=gen) * action
    return Experience.build(seq, old_logprobs=old, ref_logprobs=old, rewards=torch.zeros(action.shape), advantages=adv)


def _flat_params(instance) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in instance.engine.module.parameters()])


def _micro_batch_rows(instance, shard) -> tuple[bool, list, list[int] | None]:
    micros, sizes = instance.epoch_micro_batches(shard, torch.Generator().manual_seed(0))
    return instance.shared, [m.sequences.tokens[:, :3].tolist() for m in micros], sizes


@pytest.mark.slow
def test_shared_update_equals_unshared(tiny_model_dir):
    """The actor's update (ZeRO-2, 2 ranks, Ray) from prefix-shared micro-batches under a token
    budget equals the one from plain packed micro-batches. One mini-batch per rank, so the group
    shuffle and the row shuffle draw the same mini-batch; Adam with eps far above |g| makes the step
    linear in the gradient (as in test_token_budget.py)."""
    import shutil
    import sys
    import tempfile

    import ray

    from hybrid_ppo.config import load_config
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor

    cache = tempfile.mkdtemp(prefix="hppo17", dir="/tmp")
    common = ["placement.num_gpus=2", "train.zero_stage=2", f"logging.cache_dir={cache}", "rollout.max_new_tokens=4",
              "data.max_prompt_tokens=3", "train.rollout_batch_size=4", "train.samples_per_prompt=4",
              "train.mini_batch_size=16", "train.micro_batch_size=4", "train.ppo_epochs=1", "train.weight_decay=0",
              "train.max_grad_norm=1e9", "train.actor_lr=100", "train.adam_eps=1000", "algo.kl_coef=0",
              "algo.entropy_coef=0.01", "algo.loss_agg=token_mean", "train.packing=true",
              "train.max_tokens_per_micro_batch=20"]
    shards = _grouped_experience().shard(2)  # rows 0-7 and 8-15: two whole groups each
    updates = {}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        for shared in (False, True):
            executor = RayExecutor(load_config(None, common + [f"train.share_prompt_prefix={str(shared).lower()}"])).start()
            try:
                actor = executor.spawn("actor", Actor, tiny_model_dir)
                layouts = ray.get([h.__ray_call__.remote(_micro_batch_rows, s) for h, s in zip(actor.members, shards)])
                assert all(on == shared for on, _, _ in layouts)
                if shared:
                    assert layouts[0][2] == layouts[1][2]  # the same micro-batch count on both ranks
                    for _, micros, _ in layouts:  # each prompt in one micro-batch only (20 tokens hold a group)
                        prompts = [tuple(p) for m in micros for p in {tuple(r) for r in m}]
                        assert len(prompts) == len(set(prompts))
                before = ray.get(actor.members[0].__ray_call__.remote(_flat_params))
                actor.call_each("train", [(shard, 0) for shard in shards])
                after = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])
                torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
                updates[shared] = after[0] - before
            finally:
                executor.shutdown()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(cache, ignore_errors=True)
    scale = float(updates[False].abs().max())
    assert scale > 1e-6
    torch.testing.assert_close(updates[True], updates[False], rtol=1e-4, atol=1e-4 * scale)
