"""GAE as a chunked affine scan: an alternative to the serial-loop kernel of ``gae.py``, not used
by the training loop until it is proven faster and correct on a GPU (tests/kernels/test_gae.py
checks it against ``gae.gae_torch`` under the interpreter; scripts/bench_kernels.py times it).

File order: Triton kernel -> Python launcher -> the vectorised torch variant (a benchmark baseline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._utils import device_fn, lazy_jit, next_power_of_2, require_triton
from ..gae import _cdiv, kernel_args

if TYPE_CHECKING:  # bound at first launch by LazyJit; triton is never imported at import time
    import triton.language as tl

# The scan kernel works on [SCAN_BLOCK_B, SCAN_BLOCK_T] tiles.
SCAN_BLOCK_B = 4
SCAN_BLOCK_T = 128


@device_fn
def _affine_combine(c1, d1, c2, d2):
    """Compose x -> c1 x + d1 (applied first) with x -> c2 x + d2 (applied second)."""
    return c1 * c2, c2 * d1 + d2


@lazy_jit
def _gae_scan_kernel(
    rewards_ptr,  # [B, T] any float dtype
    values_ptr,  # [B, T]
    mask_ptr,  # [B, T] nonzero = response token
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
    BLOCK_T: tl.constexpr,
):
    """GAE as in ``gae_torch``, as two affine scans per ``[BLOCK_B, BLOCK_T]`` chunk, chunks right to left.

    Both carries are affine in their successor: ``W_t = (1 - m_t) W_{t+1} + m_t V_t`` (the next response
    value, so ``V_next(t) = W_{t+1}``) and ``A_t = c_t A_{t+1} + m_t delta_t`` with
    ``c_t = gamma*lam`` on response tokens, 1 on padding. Lanes are loaded in *descending* time
    (lane j <-> t = hi - 1 - j), so a forward ``tl.associative_scan`` composes the maps in reverse time:
    ``reverse=True`` (Triton issue #4362) is never used. The chunk's carries pass to the next chunk.
    Memory: reads r, mask and V (V and mask twice: also shifted by one step), writes A and R once.
    """
    # 1. Tile coordinates.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    is_last_lane = (lanes == BLOCK_T - 1)[None, :]  # [1, BLOCK_T]
    carry_w = tl.zeros([BLOCK_B], dtype=tl.float32)  # W at the step after the chunk's shifted lanes
    carry_a = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the step after the chunk

    for c in range(0, tl.cdiv(T, BLOCK_T)):
        # 2. Load the chunk in descending time, and V / mask one step later (for V_next).
        t = T - c * BLOCK_T - 1 - lanes  # [BLOCK_T]
        ok = row_ok[:, None] & (t >= 0)[None, :]  # [BLOCK_B, BLOCK_T]
        ok_next = row_ok[:, None] & (t + 1 < T)[None, :]
        r = tl.load(rewards_ptr + rows64[:, None] * stride_rb + t[None, :] * stride_rt, mask=ok, other=0.0)
        v = tl.load(values_ptr + rows64[:, None] * stride_vb + t[None, :] * stride_vt, mask=ok, other=0.0)
        m = tl.load(mask_ptr + rows64[:, None] * stride_mb + t[None, :] * stride_mt, mask=ok, other=0)
        v1 = tl.load(values_ptr + rows64[:, None] * stride_vb + (t + 1)[None, :] * stride_vt, mask=ok_next, other=0.0)
        m1 = tl.load(mask_ptr + rows64[:, None] * stride_mb + (t + 1)[None, :] * stride_mt, mask=ok_next, other=0)
        r = r.to(tl.float32)
        v = v.to(tl.float32)
        keep = m.to(tl.float32) != 0.0
        keep1 = m1.to(tl.float32) != 0.0
        v1 = v1.to(tl.float32)

        # 3. V_next(t) = W_{t+1}: scan of x -> (1 - m) x + m V over the shifted lanes.
        cw, dw = tl.associative_scan(
            (tl.where(keep1, 0.0, 1.0), tl.where(keep1, v1, 0.0)), axis=1, combine_fn=_affine_combine
        )
        next_v = cw * carry_w[:, None] + dw  # [BLOCK_B, BLOCK_T]

        # 4. A_t: scan of x -> c x + m delta.
        delta = r + gamma * next_v - v
        ca, da = tl.associative_scan(
            (tl.where(keep, gamma_lam, 1.0), tl.where(keep, delta, 0.0)), axis=1, combine_fn=_affine_combine
        )
        a = ca * carry_a[:, None] + da  # [BLOCK_B, BLOCK_T]

        # 5. Store, and hand the earliest lane's values to the next chunk as carries.
        out = rows64[:, None] * T + t[None, :]
        tl.store(adv_ptr + out, tl.where(keep, a, 0.0), mask=ok)
        tl.store(ret_ptr + out, tl.where(keep, a + v, 0.0), mask=ok)
        carry_w = tl.sum(tl.where(is_last_lane, next_v, 0.0), axis=1)
        carry_a = tl.sum(tl.where(is_last_lane, a, 0.0), axis=1)


def gae_triton_scan(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """``gae.gae_triton``'s result from the scan kernel: fp32 ``(advantages, returns)``, each ``[B, T]``."""
    require_triton(rewards.device)
    args = kernel_args(rewards, values, mask, gamma, lam)
    B, T = rewards.shape
    if B and T:
        block_b = min(SCAN_BLOCK_B, next_power_of_2(B))
        block_t = min(SCAN_BLOCK_T, max(16, next_power_of_2(T)))
        _gae_scan_kernel[(_cdiv(B, block_b),)](**args, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=4)
    return args["adv_ptr"], args["ret_ptr"]


def gae_torch_chunked(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, chunk: int = 128
) -> tuple[Tensor, Tensor]:
    """Same result as ``gae.gae_torch``, vectorised: T / chunk steps of batched matmuls (benchmark baseline).

    1. ``V_next``: the value at the next response token, found with a reverse ``cummin`` over indices.
    2. ``delta_t = m_t (r_t + gamma V_next - V_t)``.
    3. Within a chunk, with ``k_t`` the number of response tokens before t in the chunk and ``K`` their
       total, ``A_t = sum_{s >= t} (gamma lam)^(k_s - k_t) delta_s + (gamma lam)^(K - k_t) A_carry``,
       where ``A_carry`` is A at the chunk's first position of the chunk to the right. Powers, never
       divisions, so ``gamma * lam`` near 0 or long T cannot overflow.
    """
    r, v, keep = rewards.float(), values.float(), mask.bool()  # [B, T]
    B, T = r.shape
    dev = r.device
    gl = gamma * lam
    # 1. Index of the first response token at or after t (T if none), shifted by one for V_next.
    t_idx = torch.arange(T, device=dev).expand(B, T)
    pos = torch.where(keep, t_idx, torch.full_like(t_idx, T))
    first_at_or_after = pos.flip(1).cummin(1).values.flip(1)  # [B, T]
    next_idx = torch.cat([first_at_or_after[:, 1:], torch.full((B, 1), T, device=dev)], dim=1)
    v_pad = torch.cat([v, torch.zeros(B, 1, device=dev)], dim=1)  # V "past the end" is 0
    next_v = v_pad.gather(1, next_idx)
    # 2. TD errors on response tokens.
    delta = torch.where(keep, r + gamma * next_v - v, 0.0)  # [B, T]
    # 3. Chunks right to left; the carry is A at the first position of the chunk to the right.
    adv = torch.empty_like(delta)
    carry = torch.zeros(B, device=dev)
    for hi in range(T, 0, -chunk):
        lo = max(hi - chunk, 0)
        m_c = keep[:, lo:hi].float()  # [B, C]
        k = torch.cumsum(m_c, 1) - m_c  # response tokens before t within the chunk
        expo = k[:, None, :] - k[:, :, None]  # [B, C(t), C(s)]: k_s - k_t
        upper = torch.ones(hi - lo, hi - lo, device=dev, dtype=torch.bool).triu()
        weights = torch.where(upper, torch.pow(gl, expo.clamp(min=0)), 0.0)
        total = m_c.sum(1, keepdim=True)  # [B, 1]
        a = torch.bmm(weights, delta[:, lo:hi, None]).squeeze(-1) + torch.pow(gl, total - k) * carry[:, None]
        adv[:, lo:hi] = a
        carry = a[:, 0]
    adv = torch.where(keep, adv, 0.0)
    return adv, torch.where(keep, adv + v, 0.0)
