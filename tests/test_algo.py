"""PPO losses, KL estimators, whitening, token rewards and GAE against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hybrid_ppo import ops
from hybrid_ppo.algo.advantages import token_rewards, whiten
from hybrid_ppo.algo.ppo import (
    KLEstimator,
    kl_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    value_loss,
)
from reference_advantages import compute_advantages


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- masked reductions


def test_masked_mean_ignores_padding_even_nan() -> None:
    x = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3))
    assert_close(masked_mean(x, mask, dim=-1), t([1.5, 4.0]))


def test_masked_mean_of_empty_mask_is_zero() -> None:
    assert masked_mean(t([[3.0, 4.0]]), t([[0, 0]])).item() == 0.0


# ---------------------------------------------------------------- policy loss

# clip_eps = 0.2, so the ratio band is [0.8, 1.2]. Per token, loss = -min(ρA, clip(ρ)A):
#   row 0: ρ=1.5, A= 2 -> min(3.0, 1.2*2=2.4)    = 2.4   loss -2.4  clipped term binds
#          ρ=0.9, A=-1 -> min(-0.9, -0.9)        = -0.9  loss  0.9
#          ρ=0.5, A=-1 -> min(-0.5, 0.8*-1=-0.8) = -0.8  loss  0.8  clipped term binds
#   row 1: ρ=1.1, A= 1 -> min(1.1, 1.1)          = 1.1   loss -1.1
#          ρ=0.7, A= 3 -> min(2.1, 0.8*3=2.4)    = 2.1   loss -2.1  out of band, unclipped binds
#          padding
#   loss = (-2.4 + 0.9 + 0.8 - 1.1 - 2.1) / 5 = -3.9 / 5 = -0.78 ; clip_frac = 2 / 5
POLICY_RATIOS = [[1.5, 0.9, 0.5], [1.1, 0.7, 9.0]]
POLICY_ADVANTAGES = [[2.0, -1.0, -1.0], [1.0, 3.0, 100.0]]
POLICY_MASK = [[1, 1, 1], [1, 1, 0]]


def _policy_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old_logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    logprobs = (old_logprobs + t(POLICY_RATIOS).log()).requires_grad_()
    return logprobs, old_logprobs, t(POLICY_ADVANTAGES), t(POLICY_MASK)


def test_policy_loss_hand_values() -> None:
    logprobs, old_logprobs, advantages, mask = _policy_inputs()
    out = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    assert_close(out.loss, torch.tensor(-0.78))
    assert_close(out.clip_frac, torch.tensor(0.4))
    # approx_kl = mean over the 5 response tokens of ρ - 1 - log ρ
    ratios = [1.5, 0.9, 0.5, 1.1, 0.7]
    assert_close(out.approx_kl, torch.tensor(sum(r - 1 - math.log(r) for r in ratios) / 5))
    assert not out.clip_frac.requires_grad and not out.approx_kl.requires_grad


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    logprobs, old_logprobs, advantages, mask = _policy_inputs()
    policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2).loss.backward()
    # d(-ρA/5)/d log π = -ρA/5 where the unclipped term binds; 0 where clipped or padded.
    expected = t([[0.0, -(0.9 * -1.0) / 5, 0.0], [-(1.1 * 1.0) / 5, -(0.7 * 3.0) / 5, 0.0]])
    assert_close(logprobs.grad, expected)


def test_policy_loss_ignores_padded_tokens() -> None:
    logprobs, old_logprobs, advantages, mask = _policy_inputs()
    base = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    logprobs = logprobs.detach().clone()
    logprobs[1, 2], old_logprobs[1, 2], advantages[1, 2] = 30.0, -30.0, float("nan")
    other = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    for a, b in zip(base, other):
        assert_close(a.detach(), b)


def test_policy_loss_is_zero_on_policy_with_zero_mean_advantage() -> None:
    logprobs = t([[-1.0, -2.0]])
    out = policy_loss(logprobs, logprobs, t([[1.0, -1.0]]), t([[1, 1]]), clip_eps=0.2)
    assert out.loss.item() == 0.0 and out.clip_frac.item() == 0.0 and out.approx_kl.item() == 0.0


# ---------------------------------------------------------------- value loss

# clip_eps = 0.2; V_clip = V_old + clip(V - V_old, ±0.2); loss_t = 0.5 * max((V-R)², (V_clip-R)²)
#   V= 1.0 V_old=0.5  R= 2.0: (1-2)²=1,    V_clip=0.7:  (0.7-2)²=1.69   -> 1.69 clipped
#   V= 0.1 V_old=0.0  R= 0.5: (0.1-.5)²=.16, inside band: 0.16         -> 0.16
#   V= 2.0 V_old=0.0  R=-1.0: (2+1)²=9,    V_clip=0.2:  (0.2+1)²=1.44   -> 9
#   V=-1.0 V_old=0.0  R=-2.0: (-1+2)²=1,   V_clip=-0.2: (-0.2+2)²=3.24  -> 3.24 clipped
#   padding
#   clipped:   0.5 * (1.69 + 0.16 + 9 + 3.24) / 4 = 0.5 * 14.09 / 4 = 1.76125 ; clip_frac 2/4
#   unclipped: 0.5 * (1 + 0.16 + 9 + 1) / 4       = 0.5 * 11.16 / 4 = 1.395
def _value_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    values = t([[1.0, 0.1, 2.0, -1.0, 100.0]]).requires_grad_()
    old_values = t([[0.5, 0.0, 0.0, 0.0, -100.0]])
    returns = t([[2.0, 0.5, -1.0, -2.0, 7.0]])
    return values, old_values, returns, t([[1, 1, 1, 1, 0]])


def test_value_loss_clipped_hand_values() -> None:
    values, old_values, returns, mask = _value_inputs()
    out = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert_close(out.loss, torch.tensor(1.76125))
    assert_close(out.clip_frac, torch.tensor(0.5))
    out.loss.backward()
    # d/dV: 0 where the clipped error binds (V_clip is flat in V), (V - R) / 4 elsewhere.
    assert_close(values.grad, t([[0.0, (0.1 - 0.5) / 4, (2.0 + 1.0) / 4, 0.0, 0.0]]))


def test_value_loss_unclipped_hand_values() -> None:
    values, old_values, returns, mask = _value_inputs()
    out = value_loss(values, old_values, returns, mask, clip_eps=None)
    assert_close(out.loss, torch.tensor(1.395))
    assert out.clip_frac.item() == 0.0


def test_value_loss_ignores_padded_tokens() -> None:
    values, old_values, returns, mask = _value_inputs()
    base = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    values = values.detach().clone()
    values[0, 4], returns[0, 4] = float("nan"), 1e6
    other = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert_close(base.loss.detach(), other.loss)
    assert_close(base.clip_frac, other.clip_frac)


# ---------------------------------------------------------------- KL estimators

# r = logp - ref_logp = [0.5, -1.0, 0.0]
#   k1 = r                  = [0.5, -1.0, 0]
#   k2 = r²/2               = [0.125, 0.5, 0]
#   k3 = exp(-r) - 1 + r    = [e^-0.5 - 0.5, e - 2, 0] = [0.1065307, 0.7182818, 0]
KL_LOGP = [[-1.0, -2.0, -0.5]]
KL_REF = [[-1.5, -1.0, -0.5]]


@pytest.mark.parametrize(
    "estimator, expected",
    [
        (KLEstimator.K1, [[0.5, -1.0, 0.0]]),
        (KLEstimator.K2, [[0.125, 0.5, 0.0]]),
        (KLEstimator.K3, [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]]),
    ],
)
def test_kl_penalty_hand_values(estimator: KLEstimator, expected: list) -> None:
    assert_close(kl_penalty(t(KL_LOGP), t(KL_REF), estimator), t(expected))
    assert_close(kl_penalty(t(KL_LOGP), t(KL_REF), estimator.value), t(expected))


def test_kl_signs_and_zero_when_equal() -> None:
    logp, ref = torch.randn(4, 16), torch.randn(4, 16)
    assert (kl_penalty(logp, ref, "k1") < 0).any()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    for estimator in KLEstimator:
        assert (kl_penalty(logp, logp, estimator) == 0).all()


def test_k3_is_exact_at_a_known_ratio_and_clamped_at_an_extreme_one() -> None:

    from hybrid_ppo.algo.ppo import K3_LOG_RATIO_LIMIT

    # log(pi/pi_ref) = -1: k3 = r - 1 - log r with r = pi_ref/pi = e.
    assert kl_penalty(t([[-1.0]]), t([[0.0]]), "k3").item() == pytest.approx(math.e - 2, rel=1e-6)
    # -200 is clamped to -limit: the value there, not inf.
    limit = K3_LOG_RATIO_LIMIT
    assert kl_penalty(t([[-200.0]]), t([[0.0]]), "k3").item() == pytest.approx(math.expm1(limit) - limit, rel=1e-5)


def test_unknown_estimator_is_rejected() -> None:
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(t(KL_LOGP), t(KL_REF), "k4")


def test_kl_loss_is_masked_mean() -> None:
    # k1 on the first two tokens: (0.5 - 1.0) / 2
    assert_close(kl_loss(t(KL_LOGP), t(KL_REF), t([[1, 1, 0]]), "k1"), torch.tensor(-0.25))


# ---------------------------------------------------------------- whitening

# masked entries 1, 2, 3, 4, 5: mean 3, population variance (4+1+0+1+4)/5 = 2
WHITEN_X = [[1.0, 2.0, 3.0, 999.0], [4.0, 5.0, -7.0, 0.5]]
WHITEN_MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_whiten_hand_values() -> None:
    s = math.sqrt(2.0)
    out = whiten(t(WHITEN_X), t(WHITEN_MASK))
    assert_close(out, t([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]]))
    scaled = whiten(t(WHITEN_X), t(WHITEN_MASK), shift_mean=False)
    assert_close(scaled, t([[1 / s, 2 / s, 3 / s, 0.0], [4 / s, 5 / s, 0.0, 0.0]]))


def test_whiten_padding_has_no_influence() -> None:
    x = t(WHITEN_X)
    x[0, 3], x[1, 2] = 1e6, float("nan")
    assert_close(whiten(x, t(WHITEN_MASK)), whiten(t(WHITEN_X), t(WHITEN_MASK)))


def test_whiten_random_has_zero_mean_unit_std() -> None:
    g = torch.Generator().manual_seed(0)
    x = 5.0 + 3.0 * torch.randn(8, 32, generator=g)
    mask = (torch.rand(8, 32, generator=g) < 0.7).float()
    out = whiten(x, mask)
    kept = out[mask.bool()]
    assert abs(kept.mean().item()) < 1e-5
    assert abs(kept.std(unbiased=False).item() - 1.0) < 1e-5
    assert (out[~mask.bool()] == 0).all()


def test_whiten_empty_mask_gives_zeros() -> None:
    out = whiten(t([[1.0, 2.0]]), t([[0, 0]]))
    assert (out == 0).all()


# ---------------------------------------------------------------- token rewards

# kl_coef = 0.1; -0.1 * kl on every response token, sequence reward added at the last one.
#   row 0 EOS at t=2, right padding: kl [0.5, 1.0, -0.2, pad], R=1  -> [-0.05, -0.1, 0.02 + 1, 0]
#   row 1 truncated (no EOS):        kl [0, 0, 0, 1.0],        R=-1 -> [0, 0, 0, -0.1 - 1]
#   row 2 left padding:              kl [pad, pad, 0.3, 0.1],  R=2  -> [0, 0, -0.03, -0.01 + 2]
#   row 3 empty response:            R=5                            -> zeros
REWARD_MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
SEQUENCE_REWARDS = [1.0, -1.0, 2.0, 5.0]
PAD = 50.0
TOKEN_KL = [[0.5, 1.0, -0.2, PAD], [0.0, 0.0, 0.0, 1.0], [PAD, PAD, 0.3, 0.1], [PAD, PAD, PAD, PAD]]


def test_token_rewards_with_kl() -> None:
    out = token_rewards(t(SEQUENCE_REWARDS), t(TOKEN_KL), t(REWARD_MASK), kl_coef=0.1)
    expected = t(
        [
            [-0.05, -0.1, 1.02, 0.0],
            [0.0, 0.0, 0.0, -1.1],
            [0.0, 0.0, -0.03, 1.99],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert_close(out, expected)
    assert out.dtype == torch.float32


def test_token_rewards_without_kl() -> None:
    out = token_rewards(t(SEQUENCE_REWARDS), None, t(REWARD_MASK), kl_coef=0.1)
    expected = t([[0, 0, 1.0, 0], [0, 0, 0, -1.0], [0, 0, 0, 2.0], [0, 0, 0, 0]])
    assert_close(out, expected)


def test_token_rewards_bool_mask() -> None:
    mask = torch.tensor([[True, True, False]])
    out = token_rewards(t([3.0]), t([[1.0, 1.0, PAD]]), mask, kl_coef=0.5)
    assert_close(out, t([[-0.5, 2.5, 0.0]]))


# ---------------------------------------------------------------- GAE

# gamma = 0.9, lam = 0.8, so gamma * lam = 0.72. V and A past the last response token count as 0.
# delta_t = r_t + 0.9 V_{t+1} - V_t ; A_t = delta_t + 0.72 A_{t+1} ; returns = A + V
#
# row 0, right padding (EOS at t=2), r = [0, 0, 1, pad], V = [0.5, 0.4, 0.6, pad 9.0]
#   t=2: delta = 1 + 0      - 0.6 =  0.4   A = 0.4                          R = 1.0
#   t=1: delta = 0 + 0.9*.6 - 0.4 =  0.14  A = 0.14 + 0.72*0.4   = 0.428    R = 0.828
#   t=0: delta = 0 + 0.9*.4 - 0.5 = -0.14  A = -0.14 + 0.72*0.428 = 0.16816 R = 0.66816
# row 1, left padding, r = [pad, -0.1, 0, 2], V = [pad 9.0, 1.0, 1.5, 1.0]
#   t=3: delta = 2    + 0       - 1.0 =  1.0   A = 1.0                        R = 2.0
#   t=2: delta = 0    + 0.9*1.0 - 1.5 = -0.6   A = -0.6 + 0.72*1.0  = 0.12    R = 1.62
#   t=1: delta = -0.1 + 0.9*1.5 - 1.0 =  0.25  A = 0.25 + 0.72*0.12 = 0.3364  R = 1.3364
GAE_MASK = [[1, 1, 1, 0], [0, 1, 1, 1]]
GAE_REWARDS = [[0.0, 0.0, 1.0, 0.0], [0.0, -0.1, 0.0, 2.0]]
GAE_VALUES = [[0.5, 0.4, 0.6, 9.0], [9.0, 1.0, 1.5, 1.0]]
GAE_ADVANTAGES = [[0.16816, 0.428, 0.4, 0.0], [0.0, 0.3364, 0.12, 1.0]]
GAE_RETURNS = [[0.66816, 0.828, 1.0, 0.0], [0.0, 1.3364, 1.62, 2.0]]


def test_gae_torch_reference_hand_values() -> None:
    advantages, returns = ops.gae(
        t(GAE_REWARDS), t(GAE_VALUES), t(GAE_MASK), gamma=0.9, lam=0.8, backend="torch"
    )
    assert_close(advantages, t(GAE_ADVANTAGES))
    assert_close(returns, t(GAE_RETURNS))


def test_compute_advantages_end_to_end() -> None:
    # The GAE rewards above, built by token_rewards: sequence rewards [1, 2] at the last
    # response token, and -0.1 * kl with kl = 1 at row 1, t=1.
    kl = t([[0.0, 0.0, 0.0, PAD], [PAD, 1.0, 0.0, 0.0]])
    rewards = token_rewards(t([1.0, 2.0]), kl, t(GAE_MASK), kl_coef=0.1)
    assert_close(rewards, t(GAE_REWARDS))

    values, mask = t(GAE_VALUES), t(GAE_MASK)
    raw = compute_advantages(
        rewards, values, mask, gamma=0.9, lam=0.8, whiten_advantages=False, backend="torch"
    )
    assert_close(raw.advantages, t(GAE_ADVANTAGES))
    assert_close(raw.returns, t(GAE_RETURNS))

    out = compute_advantages(rewards, values, mask, gamma=0.9, lam=0.8, backend="torch")
    kept = torch.tensor([0.16816, 0.428, 0.4, 0.3364, 0.12, 1.0])
    kept = (kept - kept.mean()) / kept.std(unbiased=False)
    assert_close(out.advantages[mask.bool()], kept)
    assert (out.advantages[~mask.bool()] == 0).all()
    assert_close(out.returns, t(GAE_RETURNS))  # returns come from the unwhitened advantages
