"""A non-finite loss under gradient accumulation (4 micro-batches per optimizer step) discards the
WHOLE optimizer step on every rank: no micro-batch of it reaches the weights, and the step is
counted once. Real Ray (2 fake GPUs), the real critic, DeepSpeed ZeRO-2 on gloo.

The NaN comes from the data, as in test_nonfinite_loss.py: NaN returns in rank 1's shard.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.config import load_config

ROWS = 16  # per rank; micro-batches of 2 -> 8 per epoch; 4 per optimizer step -> 2 steps per epoch
EPOCHS = 2


@pytest.fixture(scope="module")
def critic_pair():
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.critic import Critic
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    cache = tempfile.mkdtemp(prefix="hppo", dir="/tmp")  # short: Ray's socket paths live under it
    build_tiny_llama(build_tokenizer(), seed=0).save_pretrained(f"{cache}/tiny")
    cfg = load_config(None, ["train.max_skipped_steps=100", "train.rollout_batch_size=32", "train.micro_batch_size=2",
                             "train.mini_batch_size=16", f"train.ppo_epochs={EPOCHS}", f"logging.cache_dir={cache}"])
    executor = RayExecutor(cfg).start()
    try:
        yield executor.spawn("critic", Critic, f"{cache}/tiny")
    finally:
        executor.shutdown()
        shutil.rmtree(cache, ignore_errors=True)


def _shard(nan_rows: list[int]) -> Experience:
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (ROWS, 8))
    seq = Sequences(tokens, torch.ones_like(tokens), torch.ones(ROWS, 3, dtype=torch.long))
    zeros = torch.zeros(ROWS, 3)
    returns = torch.rand(ROWS, 3)
    returns[nan_rows] = float("nan")
    return Experience(seq, old_logprobs=zeros, ref_logprobs=zeros, values=zeros, rewards=zeros, advantages=zeros,
                      returns=returns)


@pytest.mark.slow
def test_a_nan_micro_batch_discards_its_whole_accumulated_step(critic_pair):
    probe = _shard([]).sequences
    before = critic_pair.call_rank(0, "values", probe)
    # 9 of rank 1's 16 rows are NaN: every optimizer step (8 rows) holds at least one, but most
    # micro-batches (2 rows) of some steps are clean. Before this fix the clean ones were stepped on.
    stats = critic_pair.call_each("train", [(_shard([]), 0), (_shard(list(range(9))), 0)])
    assert [s["critic/skipped_steps"] for s in stats] == [2.0 * EPOCHS] * 2  # optimizer steps, on both ranks
    torch.testing.assert_close(critic_pair.call_rank(0, "values", probe), before, rtol=0, atol=0)
    torch.testing.assert_close(critic_pair.call_rank(1, "values", probe), before, rtol=0, atol=0)

    # One NaN row: one of each epoch's 2 steps is dropped, the other is taken (the weights move).
    stats = critic_pair.call_each("train", [(_shard([]), 1), (_shard([5]), 1)])
    assert [s["critic/skipped_steps"] for s in stats] == [1.0 * EPOCHS] * 2
    assert all(torch.isfinite(torch.tensor(s["loss/value"])) for s in stats)
    after = critic_pair.call_rank(0, "values", probe)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    torch.testing.assert_close(critic_pair.call_rank(1, "values", probe), after, rtol=0, atol=0)
