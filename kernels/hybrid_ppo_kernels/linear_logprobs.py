"""Token log-probs (and entropy) straight from hidden states and the LM-head weight: no ``[N, V]`` logits.

File order as in ``logprobs.py``: (Triton kernel: not written yet) -> chunking helpers ->
``torch.autograd.Function`` -> PyTorch reference.

Notation, per row n (one response position): ``h_n [H]`` its hidden state, ``W [V, H]`` the LM head,
``b [V]`` its optional bias, ``tau`` the temperature, ``z = (W h_n + b) / tau``, ``lse = logsumexp(z)``,
``p = softmax(z)``, ``y`` the label.

* log-prob  ``lp = z_y - lse``
* entropy   ``H  = -sum_v p_v log p_v``
* gradients ``d lp / d z_v = 1[v == y] - p_v``,   ``d H / d z_v = -p_v (log p_v + H)``;
  with ``g_z = g_lp * d lp/dz + g_H * d H/dz``:  ``grad_h = g_z W / tau``,  ``grad_W = g_z^T h / tau``,
  ``grad_b = sum_n g_z / tau``.

The chunked path runs over N in chunks of ``chunk_size`` rows: per chunk it builds that chunk's
``[chunk, V]`` fp32 logits, reduces them to ``lp``, ``H`` and ``lse``, and drops them. Backward
recomputes each chunk's logits from the saved ``h``, ``W`` and ``lse``. So the extra memory is a few
``[chunk, V]`` fp32 buffers (plus, for a non-fp32 head, one fp32 copy of ``W`` and the fp32 ``grad_W``
accumulator, both ``[V, H]``): bounded by the chunk, whatever N is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CHUNK_BYTES = 64 << 20
"""Default budget for one chunk's fp32 logits (``chunk * V * 4`` bytes); a few such buffers live at once."""


# ---------------------------------------------------------------------------------------------------
# Chunking helpers
# ---------------------------------------------------------------------------------------------------
def default_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's fp32 logits fit in ``budget_bytes`` (at least 1 row)."""
    return max(1, budget_bytes // (4 * vocab))


def _chunk_logits(h: Tensor, w32: Tensor, b32: Optional[Tensor], inv_tau: float) -> Tensor:
    """``z = (h W^T + b) / tau`` for one chunk, fp32 ``[chunk, V]``."""
    z = h.float() @ w32.T
    if b32 is not None:
        z += b32
    return z.mul_(inv_tau)


def _fp32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.float()  # no copy when already fp32


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------
class LinearLogProbsFunction(torch.autograd.Function):
    """``(logprobs [N], entropy [N])`` fp32 of ``hidden [N, H] @ weight[V, H].T (+ bias) / tau``,
    differentiable w.r.t. hidden, weight and bias, computed ``chunk_size`` rows at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        labels: Tensor,
        temperature: float,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        inv_tau = 1.0 / temperature
        w32, b32 = weight.float(), _fp32(bias)
        labels = labels.to(torch.int64)
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(lp)
        lse = torch.empty_like(lp)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], w32, b32, inv_tau)  # [c, V]
            c_lse = torch.logsumexp(z, dim=-1)  # [c]
            lp[rows] = z.gather(-1, labels[rows, None]).squeeze(-1) - c_lse
            log_p = z.sub_(c_lse[:, None])  # in place: z is not needed again
            # clamp: a -inf logit has p = 0 and must add 0, not 0 * -inf = nan
            entropy[rows] = -(log_p.exp() * log_p.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
            lse[rows] = c_lse
            del z, log_p
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return lp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_lp: Optional[Tensor], grad_entropy: Optional[Tensor]
    ):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_lp is None and grad_entropy is None:
            return None, None, None, None, None, None
        inv_tau, chunk = 1.0 / ctx.temperature, ctx.chunk_size
        w32, b32 = weight.float(), _fp32(bias)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            log_p = _chunk_logits(h, w32, b32, inv_tau).sub_(lse[rows, None])  # [c, V], recomputed
            p = log_p.exp()
            if grad_entropy is not None:  # d H / d z = -p (log p + H), built in log_p's buffer
                g_z = log_p.clamp_(min=torch.finfo(torch.float32).min).add_(entropy[rows, None]).mul_(p)
                g_z.mul_(-grad_entropy[rows].float()[:, None])
            else:
                g_z = log_p.zero_()
            if grad_lp is not None:  # d lp / d z = onehot(y) - p
                g = grad_lp[rows].float()[:, None]
                g_z.sub_(p.mul_(g))
                g_z.scatter_add_(-1, labels[rows, None], g)
            del log_p, p
            g_z.mul_(inv_tau)  # d z / d (h W^T + b) = 1 / tau
            if grad_h is not None:
                grad_h[rows] = (g_z @ w32).to(hidden.dtype)
            if grad_w32 is not None:
                grad_w32.addmm_(g_z.T, h.float())
            if grad_b32 is not None:
                grad_b32 += g_z.sum(0)
            del g_z
        grad_w = None if grad_w32 is None else grad_w32.to(weight.dtype)
        grad_b = None if grad_b32 is None else grad_b32.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_logprobs_chunked(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Chunked PyTorch path: fp32 ``(logprobs [N], entropy [N])`` of ``hidden [N, H]`` under the head
    ``weight [V, H]`` (+ ``bias [V]``) at ``temperature``; no ``[N, V]`` tensor is ever allocated."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return LinearLogProbsFunction.apply(hidden, weight, bias, labels, float(temperature), int(chunk))


# ---------------------------------------------------------------------------------------------------
# PyTorch reference (the oracle in tests)
# ---------------------------------------------------------------------------------------------------
def linear_logprobs_torch(
    hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Reference, in fp32, materialising the ``[N, V]`` logits::

        log_p   = torch.log_softmax((hidden.float() @ weight.float().T + bias) / temperature, -1)
        logprobs = log_p.gather(-1, labels[:, None]).squeeze(-1)
        entropy  = -(log_p.exp() * log_p).sum(-1)
    """
    z = hidden.float() @ weight.float().T
    if bias is not None:
        z = z + bias.float()
    log_p = torch.log_softmax(z / temperature, dim=-1)
    lp = log_p.gather(-1, labels[:, None].to(torch.int64)).squeeze(-1)
    entropy = -(log_p.exp() * log_p.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    return lp, entropy
