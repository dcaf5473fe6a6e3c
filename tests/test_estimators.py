"""Advantage estimators against hand-worked numbers, and the ADVANTAGE phase sharded over ranks.

The sharded test runs the rank-side computation (`algo.estimators.estimate` with the all-reduce the
trained roles use) on three real gloo processes, and checks it against the single-process,
driver-side reference on a batch with left padding and holes in the masks.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from hybrid_ppo.algo.estimators import (AdvantageBatch, AdvantageEstimator, estimate, grpo_advantages,
                                        rloo_advantages, sequence_scores)
from hybrid_ppo.config import AlgoConfig, ConfigError, load_config
from reference_advantages import compute_advantages


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def algo(estimator: str, **kw) -> AlgoConfig:
    return AlgoConfig(advantage_estimator=AdvantageEstimator(estimator), **kw)


# Two groups of 4 responses. Each row's sequence reward sits on its last response token; rows have
# different lengths (right padding). Group 0 scores 1, 0, 0, 1; group 1 is all 1 (all equal).
MASK = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1],
          [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def _rewards() -> torch.Tensor:
    rewards = torch.zeros_like(MASK)
    for row, score in enumerate(SCORES):
        rewards[row, int(MASK[row].sum()) - 1] = score
    return rewards


def test_grpo_hand_values() -> None:
    # Group 0: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735 -> ±0.5 / 0.57735 = ±0.866025.
    out = estimate(AdvantageBatch(_rewards(), MASK), algo("grpo"), group_size=4)
    per_row = [0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0, 0.0]
    assert_close(out.advantages, t(per_row)[:, None] * MASK, atol=2e-6, rtol=0)  # every response token
    assert out.returns is None and torch.isfinite(out.advantages).all()


def test_dr_grpo_only_centres() -> None:
    out = estimate(AdvantageBatch(_rewards(), MASK), algo("grpo", grpo_std_norm=False), group_size=4)
    assert_close(out.advantages, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])[:, None] * MASK)


def test_rloo_hand_values() -> None:
    # Group 0: a 1 is compared with the mean of (0, 0, 1) = 1/3 -> 2/3; a 0 with (1, 0, 1) -> -2/3.
    out = estimate(AdvantageBatch(_rewards(), MASK), algo("rloo"), group_size=4)
    per_row = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]
    assert_close(out.advantages, t(per_row)[:, None] * MASK)


def test_group_scores_include_the_kl_penalty_in_the_reward() -> None:
    rewards = t([[-0.1, -0.1, 1.0, 0.0], [-0.2, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert_close(sequence_scores(rewards, mask), t([0.8, -0.2]))
    assert_close(grpo_advantages(t([0.8, -0.2]), 2, std_norm=False), t([0.5, -0.5]))
    assert_close(rloo_advantages(t([0.8, -0.2]), 2), t([1.0, -1.0]))


def test_all_equal_groups_give_zero_not_nan() -> None:
    for estimator in ("grpo", "rloo"):
        out = estimate(AdvantageBatch(torch.ones(4, 3), torch.ones(4, 3)), algo(estimator), group_size=2)
        assert torch.equal(out.advantages, torch.zeros(4, 3)), estimator


def test_reinforce_pp_hand_values() -> None:
    # gamma 1: returns G_t = sum of the rewards from t on: row 0 (0.8, 0.9, 1.0), row 1 (-0.2, 0.0).
    # Whitened over the 5 tokens: mean 0.5, deviations (.3, .4, .5, -.7, -.5), variance 1.24 / 5.
    rewards = t([[-0.1, -0.1, 1.0, 0.0], [-0.2, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = estimate(AdvantageBatch(rewards, mask), algo("reinforce_pp", gamma=1.0), group_size=1)
    std = math.sqrt(1.24 / 5)
    assert_close(out.advantages, t([[0.3, 0.4, 0.5, 0.0], [-0.7, -0.5, 0.0, 0.0]]) / std, atol=1e-5, rtol=1e-5)


def test_gae_estimator_is_the_driver_reference() -> None:
    rewards, values = torch.randn(8, 4), torch.randn(8, 4)
    out = estimate(AdvantageBatch(rewards, MASK, values), algo("gae", gamma=0.9, lam=0.8), group_size=1)
    ref = compute_advantages(rewards, values, MASK, 0.9, 0.8, whiten_advantages=True)
    assert_close(out.advantages, ref.advantages)
    assert_close(out.returns, ref.returns)


def test_group_estimators_refuse_single_samples() -> None:
    with pytest.raises(ConfigError, match="train.samples_per_prompt.*got 1.*>= 2.*grpo"):
        load_config(None, ["algo.advantage_estimator=grpo"])
    with pytest.raises(ValueError, match="do not form groups of 3"):
        rloo_advantages(torch.ones(4), 3)
    cfg = load_config(None, ["algo.advantage_estimator=reinforce_pp"])  # no groups needed
    assert not cfg.algo.advantage_estimator.needs_critic


# ---------------------------------------------------------------- sharded over ranks

WORLD = 3


def _batch() -> AdvantageBatch:
    """6 rows: left padding (leading zeros), holes (zeros inside the response), right padding."""
    gen = torch.Generator().manual_seed(0)
    mask = t([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0],
              [1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rewards = torch.randn(6, 6, generator=gen) * mask
    values = torch.randn(6, 6, generator=gen) * mask
    return AdvantageBatch(rewards, mask, values)


def _rank_main(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:  # what TrainedRole.all_reduce_sum does
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    shard = _batch().shard(WORLD)[rank]
    for name, cfg, n in [("gae", algo("gae", gamma=0.9, lam=0.8), 1), ("reinforce_pp", algo("reinforce_pp"), 1),
                         ("grpo", algo("grpo"), 2)]:
        out = estimate(shard, cfg, n, all_reduce)
        results.put((name, rank, out.advantages, out.returns))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_advantages_equal_the_driver_reference() -> None:
    from hybrid_ppo.executor import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, results)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(3 * WORLD)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_name = {name: sorted((r, a, ret) for n, r, a, ret in got if n == name) for name in ("gae", "reinforce_pp", "grpo")}
    batch = _batch()
    ref = compute_advantages(batch.rewards, batch.values, batch.mask, 0.9, 0.8, whiten_advantages=True)
    assert_close(torch.cat([a for _, a, _ in by_name["gae"]]), ref.advantages, atol=1e-6, rtol=1e-5)
    assert_close(torch.cat([r for _, _, r in by_name["gae"]]), ref.returns)
    for name, n in (("reinforce_pp", 1), ("grpo", 2)):
        whole = estimate(batch, algo(name), n)
        assert_close(torch.cat([a for _, a, _ in by_name[name]]), whole.advantages, atol=1e-6, rtol=1e-5)
    # Whitening was batch-global: each shard alone is not mean 0, the whole batch is.
    gae_shards = [a for _, a, _ in by_name["gae"]]
    assert abs(float(torch.cat(gae_shards)[batch.mask.bool()].mean())) < 1e-5
    assert max(abs(float(a[s.mask.bool()].mean())) for a, s in zip(gae_shards, batch.shard(WORLD))) > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("estimator, n", [("gae", 1), ("reinforce_pp", 1), ("grpo", 2)])
def test_estimators_on_cuda_go_through_the_triton_gae(estimator, n) -> None:
    """On a GPU the rank-side path runs `ops.gae` on CUDA tensors (the Triton kernel); it must match
    the CPU reference."""
    batch = _batch()
    cpu = estimate(batch, algo(estimator, gamma=0.9, lam=0.8), n)
    gpu = estimate(batch.to(torch.device("cuda")), algo(estimator, gamma=0.9, lam=0.8), n)
    assert gpu.advantages.is_cuda
    assert_close(gpu.advantages.cpu(), cpu.advantages, atol=1e-5, rtol=1e-5)
