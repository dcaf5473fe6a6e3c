"""Log-prob / entropy kernel vs the PyTorch reference: values and gradients (both outputs)."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo import ops
from hybrid_ppo_kernels._utils import HAS_TRITON
from hybrid_ppo_kernels.logprobs import logprobs_torch

# Natively on a GPU box; on CPU under triton's interpreter (tests/kernels/conftest.py sets it up).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Kernel and reference both compute in fp32 from the same (possibly bf16) input values, so values
# agree to fp32 summation-order noise for every input dtype. Gradients are stored in the logits dtype:
# for bf16 both sides round a ~1e-7-close fp32 value to bf16, which may land one bf16 ulp apart.
VALUE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}


def _make(shape, dtype, offset=0.0, scale=3.0, pad_t=0, seed=0):
    """Logits [*shape] (a slice of a wider [B, T + pad_t, V] buffer when pad_t > 0) and edge labels."""
    g = torch.Generator().manual_seed(seed)
    *lead, V = shape
    full = list(lead)
    if pad_t:
        full[-1] += pad_t
    base = (torch.randn(*full, V, generator=g) * scale + offset).to(dtype)
    labels = torch.randint(0, V, tuple(lead), generator=g)
    flat = labels.view(-1)
    flat[0] = 0  # vocab edges
    flat[-1] = V - 1
    return base.to(DEVICE), labels.to(DEVICE)


def _check_once(shape, dtype, atol=None, rtol=None, *, temperature=1.0, offset=0.0, inplace=False, slice_t=False):
    """Forward (logprobs, entropy) and the gradient of a random mix of both vs autograd on the reference."""
    vtol = VALUE_TOL[dtype] if atol is None else dict(atol=atol, rtol=rtol)
    base, labels = _make(shape, dtype, offset=offset, pad_t=3 if slice_t else 0)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(labels.shape, generator=g).to(DEVICE)
    w_h = torch.randn(labels.shape, generator=g).to(DEVICE)

    def run(fn):
        leaf = base.detach().clone().requires_grad_(True)
        full = leaf + 0.0  # a non-leaf buffer that no autograd node saves: in-place backward is safe
        logits = full[:, 2:-1] if slice_t else full
        lp, ent = fn(logits)
        ((w_lp * lp).sum() + (w_h * ent).sum()).backward()
        return lp.detach(), ent.detach(), leaf.grad, logits

    lp, ent, grad, logits = run(
        lambda x: ops.logprobs(
            x, labels, temperature=temperature, with_entropy=True, backend="triton", inplace_backward=inplace
        )
    )
    lp_ref, ent_ref, grad_ref, _ = run(lambda x: logprobs_torch(x, labels, temperature, with_entropy=True))

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    torch.testing.assert_close(lp, lp_ref, **vtol)
    torch.testing.assert_close(ent, ent_ref, **vtol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, grad_ref, **GRAD_TOL[dtype])
    if inplace:  # the logits buffer now holds the gradient
        torch.testing.assert_close(logits.detach(), (grad[:, 2:-1] if slice_t else grad), atol=0, rtol=0)


DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [
    (2, 5, 1000),  # [B, T, V]
    (3, 2, 9001),  # V > block and not a multiple of it: 3 blocks, online rescaling
    (1, 1, 7),  # single row, tiny odd V
    (4, 33),  # [N, V]
    (1, 2, 3, 129),  # more leading dims
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logprobs_shapes(shape, dtype):
    _check_once(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_temperature(temperature, dtype):
    _check_once((2, 3, 5000), dtype, temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_logprobs_large_logits(offset, dtype):
    # exp(1e4) overflows; the online max keeps it finite. temperature 0.5 has an exact fp32 reciprocal.
    _check_once((2, 3, 5000), dtype, offset=offset)
    _check_once((1, 2, 300), dtype, offset=offset, temperature=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("slice_t", [False, True], ids=["contiguous", "slice"])
def test_logprobs_inplace_and_slices(slice_t, inplace, dtype):
    _check_once((2, 4, 4500), dtype, inplace=inplace, slice_t=slice_t)


def test_logprobs_one_output_only():
    """Gradient through logprobs alone (entropy unused) and through entropy alone."""
    base, labels = _make((3, 4, 700), torch.float32)
    for pick in (0, 1):
        grads = []
        for backend in ("triton", "torch"):
            x = base.clone().requires_grad_(True)
            out = ops.logprobs(x, labels, with_entropy=True, backend=backend)
            out[pick].sum().backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], **GRAD_TOL[torch.float32])


def test_logprobs_transposed_vocab_is_copied():
    """A non-unit stride on V is handled (by a copy) rather than misread."""
    base, labels = _make((5, 64), torch.float32)
    x = base.t().contiguous().t()  # same values, stride (1, 5)
    lp = ops.logprobs(x, labels, backend="triton")
    torch.testing.assert_close(lp, logprobs_torch(base, labels)[0], **VALUE_TOL[torch.float32])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_realistic_gpu(inplace):
    """Qwen-sized vocab, thousands of rows, bf16, natively on the GPU."""
    _check_once((2, 1024, 151_936), torch.bfloat16, inplace=inplace, slice_t=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_masked_vocab(dtype):
    """-inf logits (a masked vocabulary tail) add nothing: finite entropy, matching gradients."""
    base, labels = _make((2, 3, 600), dtype)
    base[..., 500:] = float("-inf")
    labels.clamp_(max=499)
    grads, outs = [], []
    for backend in ("triton", "torch"):
        x = base.clone().requires_grad_(True)
        lp, ent = ops.logprobs(x, labels, with_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
        outs.append((lp.detach(), ent.detach()))
        grads.append(x.grad)
    assert torch.isfinite(outs[0][1]).all()
    torch.testing.assert_close(outs[0], outs[1], **VALUE_TOL[dtype])
    torch.testing.assert_close(grads[0], grads[1], **GRAD_TOL[dtype])
