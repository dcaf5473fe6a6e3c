"""DAPO's overlong shaping and group bookkeeping, and truncated importance sampling, against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_ppo.algo import dapo
from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.ppo import policy_loss
from hybrid_ppo.algo.tis import tis_metrics, tis_weights
from hybrid_ppo.config import ConfigError, load_config

GRPO = ["algo.advantage_estimator=grpo", "train.samples_per_prompt=2", "algo.kl_in=loss", "algo.kl_estimator=k3"]


def test_overlong_penalty_hand_values():
    # max_new_tokens 8, buffer 4: free up to 4 tokens, then -0.25 per token of the factor, -factor at 8.
    lengths = torch.tensor([1, 4, 5, 6, 7, 8])
    penalty = dapo.overlong_penalty(lengths, max_new_tokens=8, buffer=4, factor=0.5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.375, -0.5]))
    # buffer = max_new_tokens: the penalty starts at the first token
    torch.testing.assert_close(dapo.overlong_penalty(torch.tensor([0, 2, 4]), 4, 4, 1.0), torch.tensor([0.0, -0.5, -1.0]))


def test_signal_groups_and_unit():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert dapo.signal_groups(rewards, 2).tolist() == [False, True, False, False]
    assert dapo.signal_groups(rewards, 4).tolist() == [True, True]
    assert dapo.group_unit(mini_batch_size=8, group_size=2, ranks=1) == 4  # 4 groups x 2 = one mini-batch
    assert dapo.group_unit(mini_batch_size=6, group_size=4, ranks=2) == 6  # 3 groups fill 2 mini-batches; even for 2 ranks
    assert dapo.group_unit(mini_batch_size=64, group_size=4, ranks=2) == 16


def _round(flat_groups: list[int], groups: int = 4, n: int = 2) -> torch.Tensor:
    """Rewards of one round: the groups in `flat_groups` all-equal, the others 1 then 0."""
    rewards = torch.tensor([1.0, 0.0] * groups)
    for g in flat_groups:
        rewards[g * n:(g + 1) * n] = 0.5
    return rewards


def test_signal_groups_refill_across_rounds():
    pool = dapo.SignalGroups(target=4, group_size=2, unit=4)
    pool.add(_round([0, 2]))  # 2 with signal
    assert not pool.full
    pool.add(_round([1]))  # 3 more: full after its first 2
    assert pool.full and pool.padding() == 0
    picks = pool.picks()
    assert picks[0].tolist() == [2, 3, 6, 7] and picks[1].tolist() == [0, 1, 4, 5]
    assert pool.metrics() == {"sampling/rounds": 2.0, "sampling/groups_drawn": 8.0, "sampling/groups_dropped": 3.0,
                              "sampling/groups_with_signal": 4.0, "sampling/short": 0.0, "sampling/padding_groups": 0.0}


def test_rounds_run_out_pad_to_a_whole_unit_and_say_so():
    pool = dapo.SignalGroups(target=8, group_size=2, unit=4)
    pool.add(_round([0, 1, 2], groups=8))  # 5 with signal, rounds end here
    picks = pool.picks()
    # 5 with signal + 3 all-equal (groups 0, 1, 2) = 8 groups, two whole units
    assert picks[0].tolist() == list(range(16))
    assert pool.metrics()["sampling/short"] == 1.0 and pool.metrics()["sampling/padding_groups"] == 3.0
    empty = dapo.SignalGroups(target=4, group_size=2, unit=4)
    empty.add(_round([0, 1, 2, 3]))  # nothing with signal: one unit of padding
    assert empty.picks()[0].tolist() == list(range(8)) and empty.metrics()["sampling/groups_with_signal"] == 0.0


def test_cat_and_mask_rows():
    a = Sequences(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[1]]))
    b = Sequences(torch.tensor([[8, 9]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[1]]))
    joined = dapo.cat_sequences([a, b], pad_id=0)
    assert joined.tokens.tolist() == [[5, 6, 7], [0, 8, 9]] and joined.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert joined.prompt_len == 2 and joined.responses.tolist() == [[7], [9]]
    masked = dapo.without_rows(joined, torch.tensor([False, True]))
    assert masked.action_mask.tolist() == [[1], [0]] and masked.attention_mask.tolist() == joined.attention_mask.tolist()


def test_tis_weights_and_capping_hand_values():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2)], [math.log(0.3), 0.0, 0.0]])
    engine = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.4)], [math.log(0.01), 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    tis = tis_weights(old, engine, mask, cap=2.0)
    # ratios 1, 3 (capped to 2), 0.5, 30 (capped to 2); off the mask: 1
    torch.testing.assert_close(tis.weights, torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, 1.0]]))
    assert tis.capped.tolist() == [[False, True, False], [True, False, False]]
    assert tis_metrics(tis, mask) == pytest.approx({"tis/weight_mean": 5.5 / 4, "tis/capped_fraction": 0.5})


def test_unit_weights_leave_the_policy_loss_and_its_gradient_unchanged():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=gen)
    adv, mask = torch.randn(4, 5, generator=gen), (torch.rand(4, 5, generator=gen) > 0.2).long()
    logits = (old + 0.1 * torch.randn(4, 5, generator=gen)).requires_grad_()
    plain = policy_loss(logits, old, adv, mask, 0.2)
    (g_plain,) = torch.autograd.grad(plain.loss, logits)
    ones = tis_weights(old, old, mask, cap=2.0).weights  # engine == actor: every weight is 1
    weighted = policy_loss(logits, old, adv, mask, 0.2, token_weights=ones)
    (g_weighted,) = torch.autograd.grad(weighted.loss, logits)
    assert torch.equal(ones, torch.ones_like(ones))
    torch.testing.assert_close(weighted.loss, plain.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_weighted, g_plain, rtol=0, atol=0)
    halves = policy_loss(logits, old, adv, mask, 0.2, token_weights=torch.full((4, 5), 0.5))
    torch.testing.assert_close(halves.loss, 0.5 * plain.loss)


@pytest.mark.parametrize("overrides, key, allowed", [
    (["algo.dynamic_sampling=true"], "algo.dynamic_sampling", "grpo or rloo only"),
    (["algo.overlong_buffer=5"], "algo.overlong_buffer", "at most rollout.max_new_tokens = 4"),
    (["algo.overlong_buffer=0"], "algo.overlong_buffer", "> 0"),
    (["algo.overlong_penalty_factor=-1"], "algo.overlong_penalty_factor", ">= 0"),
    ([*GRPO, "algo.dynamic_sampling=true", "algo.max_sampling_rounds=0"], "algo.max_sampling_rounds", "> 0"),
    (["algo.tis_cap=0.5"], "algo.tis_cap", ">= 1"),
    (["algo.tis_cap=2", "rollout.top_p=0.9"], "algo.tis_cap", "top-p"),
])
def test_dapo_and_tis_config_refusals(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and allowed in str(err.value), str(err.value)


def test_dapo_and_tis_configs_load():
    cfg = load_config(None, [*GRPO, "algo.dynamic_sampling=true", "algo.overlong_buffer=2", "algo.mask_truncated=true",
                             "algo.tis_cap=2"])
    assert cfg.algo.dynamic_sampling and cfg.algo.overlong_buffer == 2 and cfg.algo.tis_cap == 2.0


@pytest.mark.slow
def test_actor_update_with_equal_engine_logprobs_is_plain_grpo(tiny_model_dir):
    """The real DeepSpeed actor: TIS weights from engine log-probs equal to the actor's change
    nothing (bit for bit); capped weights of 0.5 change the update."""
    from dataclasses import replace

    from test_actor_update import _actor, _experience

    def update(weights):
        actor = _actor(tiny_model_dir, ["train.micro_batch_size=8", "train.actor_lr=100", "train.adam_eps=1000",
                                        "algo.kl_coef=0"])
        before = torch.cat([p.detach().flatten().clone() for p in actor.engine.module.parameters()])
        actor.train(replace(_experience(), tis_weights=weights), iteration=0)
        return torch.cat([p.detach().flatten() for p in actor.engine.module.parameters()]) - before

    experience = _experience()
    mask = experience.sequences.action_mask
    equal = tis_weights(experience.old_logprobs, experience.old_logprobs, mask, cap=2.0).weights
    plain, with_tis = update(None), update(equal)
    assert float(plain.abs().max()) > 1e-6
    torch.testing.assert_close(with_tis, plain, rtol=0, atol=0)
    halved = update(tis_weights(experience.old_logprobs, experience.old_logprobs + math.log(2.0), mask, cap=2.0).weights)
    assert not torch.allclose(halved, plain, atol=1e-7)
    torch.testing.assert_close(halved, 0.5 * plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))
