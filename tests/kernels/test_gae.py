"""GAE kernels (serial loop, opt-in scan) vs the Python-loop reference."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo import ops
from hybrid_ppo_kernels._utils import HAS_TRITON
from hybrid_ppo_kernels.experimental.gae_scan import gae_torch_chunked, gae_triton_scan
from hybrid_ppo_kernels.gae import gae_torch, gae_triton

# Natively on a GPU box; on CPU under triton's interpreter (tests/kernels/conftest.py sets it up).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Both sides read the same (possibly bf16) values and run the same fp32 recurrence; only the
# scan's reassociation differs, so one fp32 tolerance serves every input dtype.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
GAMMA, LAM = 0.99, 0.95


def _make(shape, dtype, padding, seed=0):
    """rewards, values [B, T] in ``dtype`` and a bool mask with the given padding layout."""
    g = torch.Generator().manual_seed(seed)
    B, T = shape
    rewards = torch.randn(B, T, generator=g).to(dtype)
    values = torch.randn(B, T, generator=g).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if B > 1:
        lengths[0] = T  # a full row
        lengths[-1] = 0  # a row of all padding
    t = torch.arange(T)
    if padding == "right":
        mask = t[None, :] < lengths[:, None]
    elif padding == "left":
        mask = t[None, :] >= (T - lengths)[:, None]
    elif padding == "holes":  # gaps inside the response (multi-turn observations): skipped
        mask = torch.rand(B, T, generator=g) < 0.7
    else:
        raise ValueError(padding)
    return rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE)


def _check_once(shape, dtype, atol=None, rtol=None, *, padding="right", variant="loop", mask_dtype=torch.bool):
    tol = TOL[dtype] if atol is None else dict(atol=atol, rtol=rtol)
    rewards, values, mask = _make(shape, dtype, padding)
    mask = mask.to(mask_dtype)
    adv, ret = KERNELS[variant](rewards, values, mask, GAMMA, LAM)
    adv_ref, ret_ref = gae_torch(rewards, values, mask, GAMMA, LAM)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == shape
    torch.testing.assert_close(adv, adv_ref, **tol)
    torch.testing.assert_close(ret, ret_ref, **tol)
    off = ~mask.bool()
    assert (adv[off] == 0).all() and (ret[off] == 0).all()


SHAPES = [(4, 37), (1, 1), (1, 50), (3, 300), (70, 20)]  # odd T, T=1, one row, >1 scan chunk, >1 program
KERNELS = {"loop": gae_triton, "scan": gae_triton_scan}  # the shipped kernel, and the experimental one
VARIANTS = list(KERNELS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gae_shapes(shape, dtype, variant):
    _check_once(shape, dtype, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padding", ["left", "right", "holes"])
def test_gae_padding(padding, variant):
    _check_once((6, 45), torch.float32, padding=padding, variant=variant)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32], ids=str)
def test_gae_mask_dtypes(mask_dtype):
    _check_once((5, 17), torch.float32, mask_dtype=mask_dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gae_strided_inputs(variant):
    """Values sliced off a wider critic output ([B, T + 1] -> [:, :-1]) are read in place."""
    rewards, values_full, mask = _make((4, 31), torch.float32, "left")
    values = torch.cat([values_full, values_full[:, :1]], dim=1)[:, :-1]
    assert not values.is_contiguous()
    adv, ret = KERNELS[variant](rewards, values, mask, GAMMA, LAM)
    adv_ref, ret_ref = gae_torch(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close((adv, ret), (adv_ref, ret_ref), **TOL[torch.float32])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_gae_matches_openrlhf_loop(padding):
    """On one contiguous response span per row, the reference equals OpenRLHF's loop over masked inputs."""
    rewards, values, mask = _make((5, 23), torch.float32, padding)
    m = mask.float()
    r, v = rewards * m, values * m  # OpenRLHF: values = action_mask * values, same for rewards
    last, adv = 0.0, []
    for t in reversed(range(r.shape[1])):
        next_v = v[:, t + 1] if t < r.shape[1] - 1 else 0.0
        last = r[:, t] + GAMMA * next_v - v[:, t] + GAMMA * LAM * last
        adv.append(last)
    adv_openrlhf = torch.stack(adv[::-1], dim=1)
    adv_ref, ret_ref = gae_torch(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(adv_ref, adv_openrlhf * m, **TOL[torch.float32])
    torch.testing.assert_close(ret_ref, (adv_openrlhf + v) * m, **TOL[torch.float32])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.0), (0.0, 0.5)])
def test_gae_extreme_coefficients(gamma, lam):
    rewards, values, mask = _make((3, 40), torch.float32, "right")
    for variant in VARIANTS:
        out = KERNELS[variant](rewards, values, mask, gamma, lam)
        torch.testing.assert_close(out, gae_torch(rewards, values, mask, gamma, lam), **TOL[torch.float32])


@pytest.mark.parametrize("padding", ["left", "right", "holes"])
@pytest.mark.parametrize("gamma,lam", [(GAMMA, LAM), (1.0, 1.0), (0.0, 0.5)])
def test_gae_torch_chunked_matches_loop(gamma, lam, padding):
    """The vectorised benchmark baseline equals the Python loop (T spans several chunks)."""
    rewards, values, mask = _make((5, 300), torch.float32, padding)
    out = gae_torch_chunked(rewards, values, mask, gamma, lam, chunk=64)
    torch.testing.assert_close(out, gae_torch(rewards, values, mask, gamma, lam), **TOL[torch.float32])


def test_ops_gae_triton_backend():
    rewards, values, mask = _make((4, 12), torch.float32, "left")
    out = ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="triton")
    ref = ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="torch")
    torch.testing.assert_close(tuple(out), tuple(ref), **TOL[torch.float32])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padding", ["left", "right", "holes"])
def test_gae_realistic_gpu(variant, padding):
    """Training-sized batch natively on the GPU (the scan's correctness there is the open question)."""
    _check_once((256, 4096), torch.float32, padding=padding, variant=variant)
