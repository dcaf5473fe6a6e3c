"""The roles' fused LM-head path: the same log-probs and gradients as materialized response logits,
the same actor update under ZeRO-2 and ZeRO-3 on 2 ranks (tied and untied heads), and the heads it
refuses by name."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile

import pytest
import torch

from helpers import ragged_sequences

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


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("qwen2", False), ("qwen2", True)],
                         ids=["untied", "tied", "tied-checkpointed"])
def test_fused_equals_materialized_values_and_gradients(arch, checkpointing):
    model, seq = _model(arch), _sequences()
    if checkpointing:  # transformers recomputes the layers in backward only in train mode (no dropout here)
        model.gradient_checkpointing_enable()
        model.train()
    shapes = []  # what lm_head's module call returned: the logits, or (log-probs, entropy) when fused
    model.lm_head.register_forward_hook(
        lambda mod, inputs, out: shapes.append(tuple(out.shape) if torch.is_tensor(out) else [tuple(o.shape) for o in out]))

    def run(fused: bool):
        model.zero_grad()
        lp, entropy = response_logprobs(model, seq, 0.7, with_entropy=True, fused=fused)
        (lp.sum() + 0.1 * entropy.sum()).backward()
        return lp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]

    fused = run(True)
    assert shapes == [[(3, 5), (3, 5)]]  # lm_head's module ran (its hooks fired) and gave no [B, R, V] logits
    materialized = run(False)
    assert shapes[1:] == [(3, 5, VOCAB)]
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
        assert lm_head_path(gemma, "actor") == MATERIALIZED
        assert lm_head_path(_model("llama"), "actor") == FUSED
    text = caplog.text
    assert "Gemma2ForCausalLM has final_logit_softcapping=30.0" in text
    assert "LM head fused" in text


# -- the actor's update, ZeRO-2 and ZeRO-3, 2 ranks under Ray ----------------------------------------
def _flat_params(instance) -> torch.Tensor:
    """All parameters, whole (ZeRO-3: gathered; collective, so both ranks are called at once)."""
    from hybrid_ppo.roles.deepspeed_engine import gathered_parameters

    with gathered_parameters(instance.engine):
        return torch.cat([p.detach().flatten().clone() for p in instance.engine.module.parameters()])


def _head_weight_seen(instance) -> list:
    """Shapes of the weight that the fused op receives, recorded while the actor runs (ZeRO-3 must
    hand it the full [V, H] weight, not its numel-0 partition)."""
    from hybrid_ppo import ops

    seen = instance.__dict__.setdefault("_seen", [])
    if not getattr(ops.linear_logprobs, "_recording", False):
        original = ops.linear_logprobs

        def recording(hidden, weight, labels, **kwargs):
            seen.append(tuple(weight.shape))
            return original(hidden, weight, labels, **kwargs)

        recording._recording = True
        ops.linear_logprobs = recording
    return seen


def _force_materialized(instance) -> str:
    instance.lm_head_path = MATERIALIZED
    return instance.lm_head_path


def _experience() -> Experience:
    gen = torch.Generator().manual_seed(0)
    seq = ragged_sequences(gen)
    action = seq.action_mask
    old = -torch.rand(8, 4, generator=gen) * action
    adv = torch.randn(8, 4, generator=gen) * action
    return Experience.build(seq, old_logprobs=old, ref_logprobs=old, rewards=torch.zeros(8, 4), advantages=adv)


@pytest.mark.slow
# lr: the step is lr * g / eps. At V = 151,936 the gradients are ~1e5 x smaller, and at lr = 100 the
# updates (~1e-6) sat at the fp32 resolution of the weights they change (~2e-9 at 0.02): lr 1e5 lifts them.
@pytest.mark.parametrize("zero_stage,family,lr", [(2, None, 100), (3, None, 100), (3, "qwen2.5", 100_000)],
                         ids=["zero2-untied", "zero3-untied", "zero3-tied"])
def test_actor_update_fused_equals_materialized_two_ranks(zero_stage, family, lr, tiny_model_dir, chat_checkpoint):
    """Adam with eps far above |g| (as in test_actor_update.py) makes the step linear in the gradient,
    so equal updates mean equal gradients. Tied: Qwen2.5's shape (V = 151,936, embedding = head)."""
    import ray

    from hybrid_ppo.config import load_config
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor

    model_dir = tiny_model_dir if family is None else str(chat_checkpoint(family))
    cache = tempfile.mkdtemp(prefix="hppo18", dir="/tmp")  # short: Ray's socket paths live under it
    cfg = load_config(None, ["placement.num_gpus=2", f"train.zero_stage={zero_stage}", f"logging.cache_dir={cache}",
                             "rollout.max_new_tokens=4", "train.rollout_batch_size=8", "train.mini_batch_size=8",
                             "train.micro_batch_size=2", "train.ppo_epochs=1", "train.weight_decay=0",
                             "train.max_grad_norm=1e9", f"train.actor_lr={lr}", "train.adam_eps=1000",
                             "algo.kl_coef=0", "algo.entropy_coef=0.01"])
    shards = _experience().shard(2)
    updates = {}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    try:
        for path in (FUSED, MATERIALIZED):
            executor = RayExecutor(cfg).start()
            try:
                actor = executor.spawn("actor", Actor, model_dir)
                if path == MATERIALIZED:
                    assert ray.get([h.__ray_call__.remote(_force_materialized) for h in actor.members]) == [path] * 2
                else:
                    assert ray.get([h.__ray_call__.remote(lambda a: a.lm_head_path) for h in actor.members]) == [path] * 2
                    ray.get([h.__ray_call__.remote(_head_weight_seen) for h in actor.members])
                before = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])[0]
                actor.call_each("train", [(shard, 0) for shard in shards])
                after = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])
                torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)  # ranks agree exactly
                updates[path] = after[0] - before
                if path == FUSED:
                    seen = ray.get([h.__ray_call__.remote(_head_weight_seen) for h in actor.members])
                    full = tuple(_head_shape(model_dir))
                    assert all(s and set(s) == {full} for s in seen), (seen, full)  # every call: the whole head
            finally:
                executor.shutdown()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(cache, ignore_errors=True)
    scale = float(updates[MATERIALIZED].abs().max())
    assert scale > 1e-6  # the step did something
    torch.testing.assert_close(updates[FUSED], updates[MATERIALIZED], rtol=1e-4, atol=1e-4 * scale)


def _head_shape(model_dir: str) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.vocab_size, config.hidden_size
