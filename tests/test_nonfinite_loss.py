"""A non-finite loss on ONE rank: both ranks skip that step together, count it, and stop after
`train.max_skipped_steps` in a row. Real Ray (2 fake GPUs), the real critic, DeepSpeed on gloo.

The NaN comes from the data: rank 1's shard carries NaN returns (as a blown-up reward or value
would produce), built with the Experience constructor because `Experience.build` refuses them.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.config import load_config
from hybrid_ppo.executor import RoleError


@pytest.fixture(scope="module")
def critic_pair():
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.critic import Critic
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    cache = tempfile.mkdtemp(prefix="hppo", dir="/tmp")  # short: Ray's socket paths live under it
    build_tiny_llama(build_tokenizer(), seed=0).save_pretrained(f"{cache}/tiny")
    cfg = load_config(None, ["train.max_skipped_steps=3", "train.rollout_batch_size=32",
                             "train.micro_batch_size=8", "train.mini_batch_size=16", f"logging.cache_dir={cache}"])
    executor = RayExecutor(cfg).start()
    try:
        yield executor.spawn("critic", Critic, f"{cache}/tiny")
    finally:
        executor.shutdown()
        shutil.rmtree(cache, ignore_errors=True)


def _shard(nan_rows: slice | None) -> Experience:
    """16 rows (2 micro-batches of 8); `nan_rows` get NaN returns."""
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (16, 8))
    seq = Sequences(tokens, torch.ones_like(tokens), torch.ones(16, 3, dtype=torch.long))
    zeros = torch.zeros(16, 3)
    returns = torch.rand(16, 3)
    if nan_rows is not None:
        returns[nan_rows] = float("nan")
    return Experience(seq, old_logprobs=zeros, ref_logprobs=zeros, values=zeros, rewards=zeros, advantages=zeros,
                      returns=returns)


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_both(critic_pair):
    # One NaN row on rank 1: in each of the 2 epochs exactly one of its 2 micro-batches is bad.
    stats = critic_pair.call_each("train", [(_shard(None), 0), (_shard(slice(0, 1)), 0)])
    assert [s["critic/skipped_steps"] for s in stats] == [2.0, 2.0]  # counted on both ranks
    assert all(torch.isfinite(torch.tensor(s["loss/value"])) for s in stats)

    probe = _shard(None).sequences
    before = critic_pair.call_rank(0, "values", probe)
    # All of rank 1 bad: the 3rd skip in a row stops the run, and no rank took a step meanwhile.
    with pytest.raises(RoleError) as info:
        critic_pair.call_each("train", [(_shard(None), 1), (_shard(slice(0, 16)), 1)])
    assert type(info.value.cause).__name__ == "TrainingDiverged"
    assert "3 optimizer steps in a row skipped for a non-finite loss" in str(info.value.cause)
    assert "train.max_skipped_steps = 3" in str(info.value.cause)
    torch.testing.assert_close(critic_pair.call_rank(0, "values", probe), before, rtol=0, atol=0)
