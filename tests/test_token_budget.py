"""Micro-batches by token budget: the actor's update from packed, budget-binned micro-batches equals
the padded update with fixed micro-batches, under real DeepSpeed ZeRO-2 and ZeRO-3 on 2 ranks
(Ray); the ranks' bins differ in count, so the equalization and the exact loss weights are both
exercised. Scoring passes bin the same way and give the rows back in order."""

from __future__ import annotations

import shutil
import sys
import tempfile

import pytest
import torch

from hybrid_ppo.algo.experience import Experience, Sequences

ROWS, PROMPT, RESPONSE = 16, 3, 4
BUDGET = 11  # two of the longest sequences (3 + 4 = 7 tokens) never fit one micro-batch


def _experience() -> Experience:
    """16 samples: prompts of 1-3 real tokens (left-padded), responses of 1-4 (right-padded).
    Rank 0's half is mostly long, rank 1's mostly short, so their bin counts differ."""
    gen = torch.Generator().manual_seed(0)
    prompt_lengths = torch.tensor([3, 3, 2, 3, 3, 2, 3, 3, 1, 2, 1, 1, 2, 1, 3, 1])
    lengths = torch.tensor([4, 4, 3, 4, 4, 4, 3, 4, 1, 2, 1, 1, 2, 1, 1, 2])
    prompt_mask = (torch.arange(PROMPT)[None, :] >= PROMPT - prompt_lengths[:, None]).long()
    action = (torch.arange(RESPONSE)[None, :] < lengths[:, None]).long()
    tokens = torch.randint(4, 14, (ROWS, PROMPT + RESPONSE), generator=gen)
    attention = torch.cat([prompt_mask, action], 1)
    tokens = torch.where(attention.bool(), tokens, 0)
    seq = Sequences(tokens, attention, action)
    old = -torch.rand(ROWS, RESPONSE, generator=gen) * action
    adv = torch.randn(ROWS, RESPONSE, generator=gen) * action
    return Experience.build(seq, old_logprobs=old, ref_logprobs=old, rewards=torch.zeros(ROWS, RESPONSE),
                            advantages=adv)


def _flat_params(instance) -> torch.Tensor:
    from hybrid_ppo.roles.deepspeed_engine import gathered_parameters

    with gathered_parameters(instance.engine):
        return torch.cat([p.detach().flatten().clone() for p in instance.engine.module.parameters()])


def _micro_batch_counts(instance, shard, iteration) -> list[int]:
    order = torch.Generator().manual_seed(0)
    return instance.epoch_micro_batches(shard, order)[1]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,loss_agg", [(2, "token_mean"), (3, "seq_mean_token_mean")])
def test_budgeted_packed_update_equals_padded(tiny_model_dir, zero_stage, loss_agg):
    """Adam with eps far above |g| (as in test_actor_update.py) makes the step linear in the
    gradient, so equal updates mean equal gradients; two mini-batches make two optimizer steps."""
    import ray

    from hybrid_ppo.config import load_config
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor

    cache = tempfile.mkdtemp(prefix="hppo16", dir="/tmp")  # short: Ray's socket paths live under it
    common = ["placement.num_gpus=2", f"train.zero_stage={zero_stage}", f"logging.cache_dir={cache}",
              f"rollout.max_new_tokens={RESPONSE}", f"data.max_prompt_tokens={PROMPT}", f"train.rollout_batch_size={ROWS}",
              "train.mini_batch_size=8", "train.micro_batch_size=2", "train.ppo_epochs=1", "train.weight_decay=0",
              "train.max_grad_norm=1e9", "train.actor_lr=100", "train.adam_eps=1000", "algo.kl_coef=0",
              "algo.entropy_coef=0.01", f"algo.loss_agg={loss_agg}"]
    variants = {"padded": [], "budget": ["train.packing=true", f"train.max_tokens_per_micro_batch={BUDGET}"]}
    shards = _experience().shard(2)  # the same rows per rank both ways, so the same mini-batches
    updates = {}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    try:
        for name, extra in variants.items():
            executor = RayExecutor(load_config(None, common + extra)).start()
            try:
                actor = executor.spawn("actor", Actor, tiny_model_dir)
                if name == "budget":
                    counts = ray.get([h.__ray_call__.remote(_micro_batch_counts, s, 0)
                                      for h, s in zip(actor.members, shards)])
                    assert counts[0] == counts[1]  # equalized over ranks ...
                    assert counts[0] != [2, 2]  # ... and not the padded path's fixed accumulation
                before = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])[0]
                actor.call_each("train", [(shard, 0) for shard in shards])
                after = ray.get([h.__ray_call__.remote(_flat_params) for h in actor.members])
                torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)  # ranks agree exactly
                updates[name] = after[0] - before
            finally:
                executor.shutdown()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(cache, ignore_errors=True)
    scale = float(updates["padded"].abs().max())
    assert scale > 1e-6  # the step did something
    torch.testing.assert_close(updates["budget"], updates["padded"], rtol=1e-4, atol=1e-4 * scale)


def test_scoring_in_token_bins_keeps_row_order(tiny_model_dir):
    from hybrid_ppo.roles.forward import in_micro_batches, response_logprobs
    from hybrid_ppo.roles.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, torch.float32).eval()
    seq = _experience().sequences
    calls = []

    def score(chunk):
        calls.append(int(chunk.attention_mask.sum()))
        return response_logprobs(model, chunk, 1.0, packed=True)

    with torch.no_grad():
        want = response_logprobs(model, seq, 1.0)
        got = in_micro_batches(score, seq, micro_batch_size=2, budget=BUDGET)
    assert max(calls) <= BUDGET and sum(calls) == int(seq.attention_mask.sum())
    mask = seq.action_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
