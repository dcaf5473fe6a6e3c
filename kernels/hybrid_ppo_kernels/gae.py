"""Generalized advantage estimation (GAE) over a padded batch ``[B, T]``, in fp32.

File order: Triton kernels -> Python launcher -> PyTorch references (GAE has no gradient, so there is
no ``torch.autograd.Function``).

The recurrence, run backwards over the response tokens of each row (``mask == 1``)::

    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
    R_t     = A_t + V_t

``V_next`` / ``A_next`` are those of the next response token, and 0 past the last one. Padding may sit
on either side; masked positions output 0 and pass the carry through unchanged, so a masked gap in the
middle of a row (e.g. tool output in a multi-turn rollout) is skipped, as verl does. On rows whose
response is one contiguous span this equals OpenRLHF's / TRL's loop over ``values * mask``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._utils import lazy_jit, next_power_of_2, require_triton

if TYPE_CHECKING:  # bound at first launch by LazyJit; triton is never imported at import time
    import triton.language as tl

# Rows per program in the serial kernel: one warp of lanes, each lane one row.
LOOP_BLOCK_B = 32


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@lazy_jit
def _gae_loop_kernel(
    rewards_ptr,  # [B, T] any float dtype
    values_ptr,  # [B, T] any float dtype
    mask_ptr,  # [B, T] any numeric dtype (bool passed as uint8); nonzero = response token
    adv_ptr,  # [B, T] fp32 out, contiguous
    ret_ptr,  # [B, T] fp32 out, contiguous
    B,
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    gamma,
    gamma_lam,
    BLOCK_B: tl.constexpr,
):
    """GAE as in ``gae_torch`` (the Python loop), one lane per row, a serial loop over t = T-1 .. 0.

    Algorithm: each program owns BLOCK_B rows and carries ``(V_next, A_next)`` in registers; the loads
    of step t-1 are issued before step t is computed, to overlap memory latency with the serial chain.
    Memory: reads r, V, mask once, writes A and R once (strided by T across lanes; latency-bound).
    """
    # 1. Rows of this program; int64 offsets (row * stride may exceed int32).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    r_row = rewards_ptr + rows64 * stride_rb
    v_row = values_ptr + rows64 * stride_vb
    m_row = mask_ptr + rows64 * stride_mb
    out_off = rows64 * T

    # 2. Prefetch step T-1.
    t = T - 1
    r = tl.load(r_row + t * stride_rt, mask=row_ok, other=0.0).to(tl.float32)
    v = tl.load(v_row + t * stride_vt, mask=row_ok, other=0.0).to(tl.float32)
    m = tl.load(m_row + t * stride_mt, mask=row_ok, other=0).to(tl.float32)
    next_v = tl.zeros([BLOCK_B], dtype=tl.float32)
    next_a = tl.zeros([BLOCK_B], dtype=tl.float32)

    # 3. Serial reverse loop.
    for i in range(0, T):
        t = T - 1 - i
        # 3a. Issue the loads of step t-1 now (at t == 0 it re-reads step 0, unused).
        t_prev = tl.maximum(t - 1, 0)
        r_prev = tl.load(r_row + t_prev * stride_rt, mask=row_ok, other=0.0).to(tl.float32)
        v_prev = tl.load(v_row + t_prev * stride_vt, mask=row_ok, other=0.0).to(tl.float32)
        m_prev = tl.load(m_row + t_prev * stride_mt, mask=row_ok, other=0).to(tl.float32)
        # 3b. One step of the recurrence; masked positions output 0 and keep the carry.
        keep = m != 0.0
        a = r + gamma * next_v - v + gamma_lam * next_a
        tl.store(adv_ptr + out_off + t, tl.where(keep, a, 0.0), mask=row_ok)
        tl.store(ret_ptr + out_off + t, tl.where(keep, a + v, 0.0), mask=row_ok)
        next_v = tl.where(keep, v, next_v)
        next_a = tl.where(keep, a, next_a)
        r = r_prev
        v = v_prev
        m = m_prev


# ---------------------------------------------------------------------------------------------------
# Python launcher
# ---------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_args(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> dict:
    """The fp32 outputs and the keyword arguments every GAE kernel takes."""
    B, T = rewards.shape
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; triton loads uint8 cleanly
    return dict(
        rewards_ptr=rewards,
        values_ptr=values,
        mask_ptr=mask,
        adv_ptr=torch.empty((B, T), dtype=torch.float32, device=rewards.device),
        ret_ptr=torch.empty((B, T), dtype=torch.float32, device=rewards.device),
        B=B,
        T=T,
        stride_rb=rewards.stride(0),
        stride_rt=rewards.stride(1),
        stride_vb=values.stride(0),
        stride_vt=values.stride(1),
        stride_mb=mask.stride(0),
        stride_mt=mask.stride(1),
        gamma=float(gamma),
        gamma_lam=float(gamma * lam),
    )


def gae_triton(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """One launch for the whole batch. Returns fp32 ``(advantages, returns)``, each ``[B, T]``."""
    require_triton(rewards.device)
    args = kernel_args(rewards, values, mask, gamma, lam)
    B, T = rewards.shape
    if B and T:
        block_b = min(LOOP_BLOCK_B, next_power_of_2(B))
        _gae_loop_kernel[(_cdiv(B, block_b),)](**args, BLOCK_B=block_b, num_warps=1)
    return args["adv_ptr"], args["ret_ptr"]


# ---------------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------------
def gae_torch(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Reference GAE: the Python loop over t that OpenRLHF / verl / TRL run (the oracle).

    For t = T-1 .. 0, on response tokens only (``mask[:, t] == 1``)::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t

    ``V_next`` / ``A_next`` are ``V`` / ``A`` at the next response token of the row, 0 past the last
    one. Masked positions get ``A = R = 0`` and leave the carry unchanged. Returns fp32
    ``(advantages, returns)``, each ``[B, T]``.
    """
    r, v, keep = rewards.float(), values.float(), mask.bool()  # [B, T]
    B, T = r.shape
    adv = torch.zeros((B, T), dtype=torch.float32, device=r.device)
    next_v = torch.zeros(B, dtype=torch.float32, device=r.device)
    next_a = torch.zeros(B, dtype=torch.float32, device=r.device)
    for t in reversed(range(T)):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(keep[:, t], a, 0.0)
        next_v = torch.where(keep[:, t], v[:, t], next_v)
        next_a = torch.where(keep[:, t], a, next_a)
    returns = torch.where(keep, adv + v, 0.0)
    return adv, returns
