"""The actor under ZeRO-3 (FusedAdam, partitioned loading): staging a sync gathers each bucket
in turn and yields the full weights, and offload / reload leave a trainable engine."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.config import load_config
from hybrid_ppo.executor import LocalExecutor
from hybrid_ppo.rollout.weight_sync import opened_bucket
from helpers import tiny_cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    model = build_tiny_llama(build_tokenizer(), seed=0)
    model.save_pretrained(path)
    return str(path), {n: p.detach().clone() for n, p in model.named_parameters()}


def _sequences() -> Sequences:
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (32, 10))
    return Sequences(tokens, torch.ones_like(tokens), torch.ones(32, 3, dtype=torch.long))


def _staged_weights(actor, bucket_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Every bucket the actor stages for a sync, read back from shared memory as an engine would."""
    count = actor.call("begin_weight_sync", bucket_bytes)[0]
    weights: dict[str, torch.Tensor] = {}
    try:
        for k in range(count):
            with opened_bucket(actor.call("stage_bucket", k)[0]) as named:
                weights.update((name, tensor.clone()) for name, tensor in named)
    finally:
        actor.call("end_weight_sync")
    return weights, count


@pytest.mark.slow
def test_zero3_actor_exports_full_weights_in_buckets(checkpoint):
    from hybrid_ppo.roles.actor import Actor

    path, weights = checkpoint
    cfg = tiny_cfg("train.zero_stage=3")
    executor = LocalExecutor(cfg).start()
    try:
        actor = executor.spawn("actor", Actor, path)
        engine = actor.members[0].engine
        assert engine.zero_optimization_stage() == 3
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned, not whole

        exported, count = _staged_weights(actor, 64 << 10)  # 64 KiB: several buckets (of whole layers)
        assert count > 3
        assert exported.keys() == weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(exported[name], tensor, msg=name)

        actor.call("offload_states", ["train_state", "weights"])
        actor.call("reload_states", ["weights"])  # SCORE: weights back, optimizer state stays off
        seq = _sequences()
        old_logprobs = actor.call("logprobs", seq)[0]
        actor.call("reload_states", ["train_state"])
        zeros = torch.zeros_like(old_logprobs)
        experience = Experience.build(seq, old_logprobs=old_logprobs, ref_logprobs=old_logprobs, values=zeros,
                                      rewards=zeros, advantages=torch.randn(old_logprobs.shape), returns=zeros)
        stats = actor.call("train", experience, 0)[0]
        assert stats["actor/epochs"] == cfg.train.ppo_epochs
        after, _ = _staged_weights(actor)
        assert any(not torch.equal(after[name], weights[name]) for name in weights)  # the step moved weights
    finally:
        executor.shutdown()
