"""The roles' fused LM-head path: the same log-probs and gradients as materialized response logits,
the same actor update under ZeRO-2 on 2 ranks, and the heads it refuses by name."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile

import pytest
import torch

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.roles.forward import response_logprobs
from hybrid_ppo.roles.lm_head import FUSED, MATERIALIZED, lm_head_path

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
    """Left-padded prompts (P = 7) and right-padded responses (R = 5)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (3, 12), generator=gen)
    attention = torch.ones_like(tokens)
    attention[0, :3] = 0
    attention[2, 10:] = 0
    tokens[attention == 0] = 0
    return Sequences(tokens, attention, attention[:, 7:].clone())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied heads
def test_fused_equals_materialized_values_and_gradients(arch):
    model, seq = _model(arch), _sequences()
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, inputs, out: shapes.append(tuple(out.shape)))

    def run(fused: bool):
        model.zero_grad()
        lp, entropy = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused)
        (lp.sum() + 0.1 * entropy.sum()).backward()
        return lp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]

    fused = run(True)
    assert shapes == []  # lm_head's module never ran: no [B, R, V] logits
    materialized = run(False)
    assert shapes == [(3, 5, VOCAB)]
    torch.testing.assert_close(fused[0], materialized[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], materialized[1], rtol=1e-5, atol=1e-5)
    for g, w in zip(fused[2], materialized[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_heads_with_a_logit_transform_are_refused_by_name(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=30.0))
    with caplog.at_level(logging.INFO, logger="hybrid_ppo.roles.lm_head"):
        assert lm_head_path(gemma, 2, "actor") == MATERIALIZED
        assert lm_head_path(_model("llama"), 2, "actor") == FUSED
        assert lm_head_path(_model("llama"), 3, "actor") == MATERIALIZED
    text = caplog.text
    assert "Gemma2ForCausalLM has final_logit_softcapping=30.0" in text
    assert "ZeRO-3" in text and "LM head fused" in text


# -- the actor's update, ZeRO-2, 2 ranks under Ray ---------------------------------------------------
def _flat_params(instance) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in instance.engine.module.parameters()])


def _force_materialized(instance) -> str:
    instance.lm_head_path = MATERIALIZED
    return instance.lm_head_path


def _experience() -> Experience:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 14, (8, 3), generator=gen)
    response = torch.randint(4, 14, (8, 4), generator=gen)
    lengths = torch.tensor([1, 4, 2, 4, 1, 3, 4, 2])
    action = (torch.arange(4)[None, :] < lengths[:, None]).long()
    tokens = torch.cat([prompt, torch.where(action.bool(), response, 0)], 1)
    seq = Sequences(tokens, torch.cat([torch.ones_like(prompt), action], 1), action)
    old = -torch.rand(8, 4, generator=gen) * action
    adv = torch.randn(8, 4, generator=gen) * action
    return Experience.build(seq, old_logprobs=old, ref_logprobs=old, rewards=torch.zeros(8, 4), advantages=adv)


@pytest.mark.slow
def test_actor_update_fused_equals_materialized_zero2_two_ranks(tiny_model_dir):
    """Adam with eps far above |g| (as in test_actor_update.py) makes the step linear in the gradient,
    so equal updates mean equal gradients."""
    import ray

    from hybrid_ppo.config import load_config
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor

    cache = tempfile.mkdtemp(prefix="hppo18", dir="/tmp")  # short: Ray's socket paths live under it
    cfg = load_config(None, ["placement.num_gpus=2", "train.zero_stage=2", f"logging.cache_dir={cache}",
                             "rollout.max_new_tokens=4", "train.rollout_batch_size=8", "train.mini_batch_size=8",
                             "train.micro_batch_size=2", "train.ppo_epochs=1", "train.weight_decay=0",
                             "train.max_grad_norm=1e9", "train.actor_lr=100", "train.adam_eps=1000",
                             "algo.kl_coef=0", "algo.entropy_coef=0.01"])
    shards = _experience().shard(2)
    updates = {}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    try:
        for path in (FUSED, MATERIALIZED):
            executor = RayExecutor(cfg).start()
            try:
                actor = executor.spawn("actor", Actor, tiny_model_dir)
                if path == MATERIALIZED:
                    assert ray.get([h.__ray_call__.remote(_force_materialized) for h in actor.members]) == [path] * 2
                else:
                    assert ray.get([h.__ray_call__.remote(lambda a: a.lm_head_path) for h in actor.members]) == [path] * 2
                before = ray.get(actor.members[0].__ray_call__.remote(_flat_params))
                actor.call_each("train", [(shard, 0) for shard in shards])
                after = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])
                torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)  # ZeRO-2: ranks agree exactly
                updates[path] = after[0] - before
            finally:
                executor.shutdown()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(cache, ignore_errors=True)
    scale = float(updates[MATERIALIZED].abs().max())
    assert scale > 1e-6  # the step did something
    torch.testing.assert_close(updates[FUSED], updates[MATERIALIZED], rtol=1e-4, atol=1e-4 * scale)
