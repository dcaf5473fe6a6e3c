"""Token log-probabilities (and entropy) from logits, in one pass over the vocabulary.

File order: Triton kernels -> Python launchers -> ``torch.autograd.Function`` -> PyTorch reference.

Notation, per row (one token position): ``x`` the ``V`` logits, ``tau`` the temperature, ``z = x / tau``,
``lse = logsumexp(z)``, ``p = softmax(z)``, ``y`` the label.

* log-prob  ``lp = z_y - lse``
* entropy   ``H  = -sum_v p_v log p_v = lse - sum_v p_v z_v``
* gradients ``d lp / d x_v = (1[v == y] - p_v) / tau``,
            ``d H  / d x_v = -p_v (z_v - lse + H) / tau``   (``z_v - lse = log p_v``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ._utils import lazy_jit, next_power_of_2, require_triton

if TYPE_CHECKING:  # bound at first launch by LazyJit; triton is never imported at import time
    import triton.language as tl

# One program per row loops over V in blocks of MAX_BLOCK_V (bf16: 8 KiB per load, 16 elements per
# thread at 8 warps). A starting point, not yet tuned on a GPU: measure with scripts/bench_kernels.py.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@lazy_jit
def _logprobs_fwd_kernel(
    logits_ptr,  # [B, T, V] fp32/bf16/fp16, unit stride on V
    stride_lb,
    stride_lt,
    labels_ptr,  # [N] int64, N = B * T
    logprobs_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out
    max_ptr,  # [N] fp32 out, row max of z, kept for backward
    logsum_ptr,  # [N] fp32 out, log sum exp(z - max), kept for backward
    T,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """``lp, H = log_softmax(x / tau).gather(-1, y), -(softmax * log_softmax).sum(-1)``, one row per program.

    Algorithm: online softmax over V in blocks. It keeps the running max ``m``, ``s = sum exp(z - m)``
    and the shifted first moment ``w = sum exp(z - m) * (z - m)``; when ``m`` grows, both rescale by
    ``exp(m_old - m_new)`` (and ``w`` also absorbs ``s * (m_old - m_new)``). At the end
    ``lp = (z_y - m) - log s`` and ``H = log s - w / s``; keeping ``w`` shifted avoids cancelling large
    logits. Memory: reads each logit once (+1 element for the label logit), writes 4 fp32 per row.
    """
    # 1. Locate the row; int64 because row * stride overflows int32 at N * V > 2^31.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt

    # 2. The label logit. Labels outside [0, V) are never read out of bounds (their result is undefined).
    label = tl.load(labels_ptr + row)
    label_ok = (label >= 0) & (label < V)
    z_label = tl.load(row_ptr + label, mask=label_ok, other=0.0).to(tl.float32) * inv_temperature

    # 3. One pass over V: running max m, sum-exp s, shifted moment w (all fp32 scalars).
    m = -3.0e38  # finite "minus infinity": keeps (m_old - m_new) finite on the first block
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # cast: no bf16 math
        z = z * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        d = z - m_new  # [BLOCK_V], <= 0; -inf on padding lanes
        e = tl.exp(d)
        # Padding lanes and -inf logits have e = 0, d = -inf: clamp d so they add 0, not 0 * -inf.
        w = alpha * (w + s * (m - m_new)) + tl.sum(e * tl.maximum(d, -3.0e38), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    # 4. Finish and store. (z_y - m) - log s, not z_y - lse: lse ~ 1e4 would cost ~1e-3 of rounding.
    log_s = tl.log(s)
    tl.store(logprobs_ptr + row, (z_label - m) - log_s)
    tl.store(entropy_ptr + row, log_s - w / s)
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)


@lazy_jit
def _logprobs_bwd_kernel(
    logits_ptr,  # [B, T, V] as in forward
    stride_lb,
    stride_lt,
    grad_ptr,  # [B, T, V] out, logits dtype; may alias logits_ptr (in-place backward)
    stride_gb,
    stride_gt,
    labels_ptr,  # [N] int64
    max_ptr,  # [N] fp32 from forward
    logsum_ptr,  # [N] fp32 from forward
    entropy_ptr,  # [N] fp32 from forward
    grad_logprobs_ptr,  # [N] fp32 upstream gradient of lp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of H
    T,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """``dx = (g_lp * (onehot(y) - p) - g_H * p * (log p + H)) / tau``, ``log p = (x / tau - max) - logsum``.

    Algorithm: one row per program; recomputes ``p`` from the saved row statistics block by block, so no
    ``[N, V]`` probability tensor exists. Memory: reads each logit once, writes each gradient once,
    into the logits buffer itself when ``grad_ptr == logits_ptr`` (each element is read before the same
    program overwrites it, so aliasing is safe).
    """
    # 1. Locate the row and load the per-row scalars.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    x_row = logits_ptr + b * stride_lb + t * stride_lt
    g_row = grad_ptr + b * stride_gb + t * stride_gt
    label = tl.load(labels_ptr + row)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_lp = tl.load(grad_logprobs_ptr + row)
    g_h = tl.load(grad_entropy_ptr + row)

    # 2. Stream over V: recompute p, combine both upstream gradients, write in the logits dtype.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        valid = cols < V
        # padding lanes load -inf, so p = 0 there (never stored, but no overflow either)
        z = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        log_p = (z - m) - log_s
        p = tl.exp(log_p)
        # p * (log p + H) with log p clamped: 0 where p == 0 (padding, -inf logits), not 0 * -inf.
        d_entropy = p * (tl.maximum(log_p, -3.0e38) + entropy)
        dz = tl.where(cols == label, g_lp, 0.0) - g_lp * p - g_h * d_entropy
        tl.store(g_row + cols, (dz * inv_temperature).to(grad_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------
# Python launchers
# ---------------------------------------------------------------------------------------------------
def _as_rows(logits: Tensor) -> Tensor:
    """View ``[..., V]`` as ``[B, T, V]`` with unit stride on V; a view whenever strides allow.

    A slice such as ``logits[:, P - 1:-1]`` of a ``[B, T, V]`` tensor stays a view (two row strides are
    passed to the kernels). Only layouts that cannot be described by two row strides are copied.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, logits.shape[-2], logits.shape[-1])
    except RuntimeError:  # leading dims not mergeable without a copy
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _block_v(V: int) -> int:
    return min(MAX_BLOCK_V, next_power_of_2(V))


def logprobs_fwd(logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel. Returns flat fp32 ``(logprobs, entropy, row_max, log_sum)``, each ``[N]``."""
    require_triton(logits.device)
    rows = _as_rows(logits)  # [B, T, V]
    B, T, V = rows.shape
    n = B * T
    labels_flat = labels.reshape(-1).to(torch.int64).contiguous()  # [N]
    lp, entropy, row_max, log_sum = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4))
    if n == 0:
        return lp, entropy, row_max, log_sum
    _logprobs_fwd_kernel[(n,)](
        logits_ptr=rows,
        stride_lb=rows.stride(0),
        stride_lt=rows.stride(1),
        labels_ptr=labels_flat,
        logprobs_ptr=lp,
        entropy_ptr=entropy,
        max_ptr=row_max,
        logsum_ptr=log_sum,
        T=T,
        V=V,
        inv_temperature=1.0 / temperature,
        BLOCK_V=_block_v(V),
        num_warps=NUM_WARPS,
    )
    return lp, entropy, row_max, log_sum


def logprobs_bwd(
    logits: Tensor,
    labels: Tensor,
    row_max: Tensor,
    log_sum: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor,
    temperature: float,
    inplace: bool,
) -> Tensor:
    """Launch the backward kernel. Returns ``d loss / d logits`` shaped like ``logits``.

    With ``inplace=True`` the gradient overwrites the logits buffer (see ``LogProbsFunction``).
    """
    require_triton(logits.device)
    rows = _as_rows(logits)  # [B, T, V]
    B, T, V = rows.shape
    n = B * T
    grad = rows if inplace else torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    if n > 0:
        _logprobs_bwd_kernel[(n,)](
            logits_ptr=rows,
            stride_lb=rows.stride(0),
            stride_lt=rows.stride(1),
            grad_ptr=grad,
            stride_gb=grad.stride(0),
            stride_gt=grad.stride(1),
            labels_ptr=labels.reshape(-1).to(torch.int64).contiguous(),
            max_ptr=row_max,
            logsum_ptr=log_sum,
            entropy_ptr=entropy,
            # upstream grads arrive expanded (stride 0) from .sum()/.mean(): make them [N] dense fp32
            grad_logprobs_ptr=grad_logprobs.reshape(-1).float().contiguous(),
            grad_entropy_ptr=grad_entropy.reshape(-1).float().contiguous(),
            T=T,
            V=V,
            inv_temperature=1.0 / temperature,
            BLOCK_V=_block_v(V),
            num_warps=NUM_WARPS,
        )
    return grad.reshape(logits.shape)


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------
class LogProbsFunction(torch.autograd.Function):
    """``(logprobs, entropy)`` of ``logits [..., V]`` at ``labels [...]``, differentiable w.r.t. logits.

    ``inplace_backward=True`` writes the gradient into the logits buffer instead of allocating a new
    ``[..., V]`` tensor. Safe only when nothing reads those logits after this backward: no other
    autograd node saved them (e.g. they also feed another loss), and the caller does not reuse them.
    Triton writes through a raw pointer, so autograd's version counter cannot catch misuse.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        temperature: float,
        inplace_backward: bool,
    ) -> tuple[Tensor, Tensor]:
        lp, entropy, row_max, log_sum = logprobs_fwd(logits, labels, temperature)
        ctx.save_for_backward(logits, labels, row_max, log_sum, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)
        return lp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_lp: Optional[Tensor], grad_entropy: Optional[Tensor]
    ) -> tuple[Optional[Tensor], None, None, None]:
        logits, labels, row_max, log_sum, entropy = ctx.saved_tensors
        if grad_lp is None and grad_entropy is None:
            return None, None, None, None
        zeros = torch.zeros_like(entropy)  # [N]: an unused output contributes nothing
        grad_logits = logprobs_bwd(
            logits,
            labels,
            row_max,
            log_sum,
            entropy,
            grad_lp if grad_lp is not None else zeros,
            grad_entropy if grad_entropy is not None else zeros,
            ctx.temperature,
            ctx.inplace_backward,
        )
        return grad_logits, None, None, None


def logprobs_triton(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Triton path: fp32 ``(logprobs [...], entropy [...])``, both differentiable w.r.t. ``logits``."""
    return LogProbsFunction.apply(logits, labels, float(temperature), bool(inplace_backward))


# ---------------------------------------------------------------------------------------------------
# PyTorch reference (the oracle in tests, and the CPU path)
# ---------------------------------------------------------------------------------------------------
def logprobs_torch(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """Reference log-probs and entropy, computed in fp32.

    With ``z = logits.float() / temperature`` over the last dim (size V)::

        logprobs[...] = z[..., y] - log(sum_v exp(z[..., v]))          # y = labels[...]
        entropy[...]  = -sum_v p[..., v] * log p[..., v],  p = softmax(z)

    i.e. ``torch.log_softmax(z, -1).gather(-1, labels[..., None]).squeeze(-1)``. It materialises
    ``[..., V]`` fp32 temporaries, which is what the Triton kernels avoid. Returns
    ``(logprobs, entropy)``; ``entropy`` is None unless ``with_entropy``.
    """
    z = logits.float() / temperature  # [..., V] fp32
    log_p = torch.log_softmax(z, dim=-1)
    lp = log_p.gather(-1, labels.unsqueeze(-1).to(torch.int64)).squeeze(-1)
    entropy = None
    if with_entropy:  # clamp: a -inf logit has p = 0 and must add 0, not 0 * -inf = nan
        entropy = -(log_p.exp() * log_p.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    return lp, entropy
