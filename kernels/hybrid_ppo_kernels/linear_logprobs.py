"""Token log-probs (and entropy) straight from hidden states and the LM-head weight: no ``[N, V]`` logits.

File order as in ``logprobs.py``: Triton kernels -> Python launchers -> ``torch.autograd.Function``s
(Triton, then the chunked PyTorch path that CPUs run) -> PyTorch reference.

Notation, per row n (one response position): ``h_n [H]`` its hidden state, ``W [V, H]`` the LM head,
``b [V]`` its optional bias, ``tau`` the temperature, ``z = (W h_n + b) / tau``, ``lse = logsumexp(z)``,
``p = softmax(z)``, ``y`` the label.

* log-prob  ``lp = z_y - lse``
* entropy   ``H  = -sum_v p_v log p_v``
* gradients ``d lp / d z_v = 1[v == y] - p_v``,   ``d H / d z_v = -p_v (log p_v + H)``;
  with ``g_z = g_lp * d lp/dz + g_H * d H/dz``:  ``grad_h = g_z W / tau``,  ``grad_W = g_z^T h / tau``,
  ``grad_b = sum_n g_z / tau``.

Triton path. Forward: one program per block of rows tiles over V, computes each ``[BLOCK_N, BLOCK_V]``
tile of ``z`` with ``tl.dot`` over H and folds it into an online log-sum-exp (running max, sum-exp and
the shifted first moment that entropy needs) and the label logit; only four fp32 scalars per row are
written, so forward needs no chunking. Backward, ``chunk_size`` rows at a time: a kernel recomputes the
tile logits from the saved ``h``, ``W`` and ``lse`` and writes ``g_z / tau`` into one ``[chunk, V]``
buffer, then two matmuls give that chunk's ``grad_h`` and its share of the fp32 ``grad_W``.

Chunked PyTorch path (the CPU path): the same over N in chunks: per chunk it builds that chunk's
``[chunk, V]`` fp32 logits, reduces them to ``lp``, ``H`` and ``lse``, and drops them; backward
recomputes them.

Memory, both paths: a few ``[chunk, V]`` fp32 buffers, the fp32 ``grad_W`` accumulator ``[V, H]``, and,
for a non-fp32 head, an fp32 copy of at most ``WEIGHT_SLAB_BYTES`` of ``W`` at a time (never the whole
head): bounded by the chunk, whatever N is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import Tensor

from ._utils import device_fn, lazy_jit, require_triton

if TYPE_CHECKING:  # bound at first launch by LazyJit; triton is never imported at import time
    import triton.language as tl

CHUNK_BYTES = 64 << 20
"""Default budget for one chunk's fp32 logits (``chunk * V * 4`` bytes); a few such buffers live at once."""
CUDA_CHUNK_BYTES = 512 << 20
"""The Triton path's budget on CUDA: bigger chunks, because each chunk's ``grad_W += g_z^T h`` reads and
writes the whole fp32 ``[V, H]`` accumulator (at V=151,936, H=896: 149 chunks of 64 MiB at N=16k would
move ~240 GB; 18 chunks of 512 MiB ~30 GB). Not yet tuned on a GPU."""
WEIGHT_SLAB_BYTES = 32 << 20
"""Budget for the fp32 copy of a slab of a 16-bit head's rows, cast just before its matmul."""

# Tiles: a starting point (a 64 x 128 fp32 accumulator, 64-wide steps over H), not yet tuned on a GPU:
# measure with scripts/bench_kernels.py. tl.dot needs every tile dimension >= 16.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
NUM_WARPS = 8


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@device_fn
def _tile_logits(
    hidden_ptr,  # [N, H], unit stride on H
    stride_hn,
    weight_ptr,  # [V, H], unit stride on H
    stride_wv,
    bias_ptr,  # [V] (unused without HAS_BIAS)
    rows,  # [BLOCK_N] int64 row indices
    row_ok,  # [BLOCK_N] bool
    cols,  # [BLOCK_V] int64 vocab indices
    col_ok,  # [BLOCK_V] bool
    H,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``z = (h W^T + b) / tau`` for one ``[BLOCK_N, BLOCK_V]`` tile, fp32; ``-inf`` past V."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        k_ok = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_H]
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_V, BLOCK_H]
        if UPCAST:  # the interpreter has no bf16 arithmetic; bf16 values are exact in fp32
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)  # fp32 accumulation
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@lazy_jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # [N, H] fp32/bf16/fp16, unit stride on H
    stride_hn,
    weight_ptr,  # [V, H] same dtype, unit stride on H
    stride_wv,
    bias_ptr,  # [V] or a dummy
    labels_ptr,  # [N] int64
    logprobs_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out, logsumexp(z), kept for backward
    N,
    V,
    H,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``lp, H = log_softmax(z).gather(-1, y), -(softmax(z) * log_softmax(z)).sum(-1)``, ``z = (h W^T + b) / tau``,
    one block of ``BLOCK_N`` rows per program.

    Algorithm: the online softmax of ``logprobs.py``'s forward kernel, per row of the block, over
    tiles of V whose logits come from ``tl.dot`` over H: running max ``m``, ``s = sum exp(z - m)`` and
    the shifted moment ``w = sum exp(z - m) (z - m)``, rescaled when ``m`` grows; then
    ``lp = (z_y - m) - log s`` and ``H = log s - w / s``. Memory: reads ``W`` once per row block, writes
    3 fp32 per row; no tile leaves the program.
    """
    # 1. The row block; int64 indices because row * stride overflows int32 at N * H > 2^31.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)  # [BLOCK_N]

    # 2. One pass over V in tiles: running max m, sum-exp s, shifted moment w, and the label logit.
    m = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)  # finite "minus infinity": m_old - m_new stays finite
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    w = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_label = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
        col_ok = cols < V
        z = _tile_logits(hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr, rows, row_ok, cols, col_ok, H,
                         inv_temperature, HAS_BIAS, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # [BN, BV]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]  # [BLOCK_N, BLOCK_V], <= 0; -inf past V
        e = tl.exp(d)
        # Lanes past V and -inf logits have e = 0, d = -inf: clamp d so they add 0, not 0 * -inf.
        w = alpha * (w + s * (m - m_new)) + tl.sum(e * tl.maximum(d, -3.0e38), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)

    # 3. Finish and store. (z_y - m) - log s, not z_y - lse: lse ~ 1e4 would cost ~1e-3 of rounding.
    log_s = tl.log(s)
    tl.store(logprobs_ptr + rows, (z_label - m) - log_s, mask=row_ok)
    tl.store(entropy_ptr + rows, log_s - w / s, mask=row_ok)
    tl.store(lse_ptr + rows, m + log_s, mask=row_ok)


@lazy_jit
def _linear_logprobs_grad_logits_kernel(
    hidden_ptr,  # [C, H] this chunk's rows, as in forward
    stride_hn,
    weight_ptr,  # [V, H]
    stride_wv,
    bias_ptr,  # [V] or a dummy
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32 from forward
    entropy_ptr,  # [C] fp32 from forward
    grad_logprobs_ptr,  # [C] fp32 upstream gradient of lp
    grad_entropy_ptr,  # [C] fp32 upstream gradient of H
    grad_z_ptr,  # [C, V] out (fp32 or the head's dtype): d loss / d (h W^T + b)
    stride_gn,
    C,
    V,
    H,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``g = (g_lp * (onehot(y) - p) - g_H * p * (log p + H)) / tau`` for one ``[BLOCK_N, BLOCK_V]`` tile,
    ``log p = z - lse`` with ``z`` recomputed from ``h`` and ``W`` (no logits were stored).

    Memory: reads a ``[BLOCK_N, H]`` and a ``[BLOCK_V, H]`` slab, writes the tile once.
    """
    # 1. The tile and its rows' saved statistics.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
    row_ok = rows < C
    col_ok = cols < V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)

    # 2. Recompute the tile's logits and probabilities.
    z = _tile_logits(hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr, rows, row_ok, cols, col_ok, H,
                     inv_temperature, HAS_BIAS, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # [BN, BV]
    log_p = z - lse[:, None]
    p = tl.exp(log_p)  # 0 past V

    # 3. Both upstream gradients; p * (log p + H) with log p clamped: 0 where p == 0, not 0 * -inf.
    d_entropy = p * (tl.maximum(log_p, -3.0e38) + entropy[:, None])
    g = tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p - g_h[:, None] * d_entropy
    out = grad_z_ptr + rows[:, None] * stride_gn + cols[None, :]
    tl.store(out, (g * inv_temperature).to(grad_z_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Python launchers (and the helpers both paths share)
# ---------------------------------------------------------------------------------------------------
def default_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's fp32 logits fit in ``budget_bytes`` (at least 1 row)."""
    return max(1, budget_bytes // (4 * vocab))


def fused_working_bytes(n: int, vocab: int, hidden: int, weight_bytes: int, train: bool,
                        chunk_size: Optional[int] = None) -> int:
    """Peak extra bytes of one Triton pass (CUDA) over ``n`` rows, what the memory planner charges:
    forward writes 3 fp32 per row (``lp``, ``entropy``, ``lse``) and holds no tile outside the kernel;
    backward adds one ``[chunk, V]`` gradient buffer (the head's dtype, see ``grad_logits_dtype``), the
    fp32 ``grad_W`` accumulator ``[V, H]`` and its cast to the head's dtype, and a chunk's fp32 ``grad_h``."""
    rows = 3 * 4 * n
    if not train or n == 0:
        return rows
    chunk = min(n, chunk_size or default_chunk_size(vocab, CUDA_CHUNK_BYTES))
    return rows + chunk * vocab * min(weight_bytes, 4) + vocab * hidden * (4 + weight_bytes) + chunk * hidden * 4


def _weight_slabs(weight: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, W[rows] in fp32)`` covering the head: the whole head uncopied when it is fp32, else slabs
    of ``WEIGHT_SLAB_BYTES`` cast one at a time (an fp32 copy of a 151,936 x 896 head is 544 MB)."""
    v, h = weight.shape
    if weight.dtype == torch.float32:
        yield slice(0, v), weight
        return
    step = max(1, WEIGHT_SLAB_BYTES // (4 * h))
    for start in range(0, v, step):
        rows = slice(start, start + step)
        yield rows, weight[rows].float()


def _accumulate(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b``, in place when the dtypes allow (no ``out``-sized temporary)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _chunk_grads(g_z: Tensor, h: Tensor, weight: Tensor, grad_w32: Optional[Tensor], grad_b32: Optional[Tensor],
                 need_h: bool) -> Optional[Tensor]:
    """One chunk's share of the gradients from ``g_z = d loss / d (h W^T + b)`` ``[c, V]``: returns its fp32
    ``grad_h = g_z W`` ``[c, H]`` (None unless ``need_h``), adds ``g_z^T h`` to ``grad_w32`` and
    ``sum_n g_z`` to ``grad_b32``. An fp32 ``g_z`` meets fp32 slabs of ``W``; a 16-bit one (CUDA, see
    ``grad_logits_dtype``) meets ``W`` itself, on the tensor cores, with the products summed in fp32."""
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    if g_z.dtype == torch.float32:
        slabs, h_ = _weight_slabs(weight), h.float()
    else:
        slabs, h_ = iter([(slice(0, weight.shape[0]), weight)]), h.to(g_z.dtype)
    for cols, w in slabs:
        g = g_z[:, cols]  # [c, S]
        if grad_h is not None:
            _accumulate(grad_h, g, w.to(g.dtype))
        if grad_w32 is not None:
            _accumulate(grad_w32[cols], g.T, h_)
    if grad_b32 is not None:
        grad_b32 += g_z.sum(0, dtype=torch.float32)
    return grad_h


def grad_logits_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """dtype of the Triton backward's ``[chunk, V]`` gradient buffer: the head's own on CUDA for a 16-bit
    head (its two matmuls then run on the tensor cores; the materialized path also keeps its logits'
    gradient in that dtype), fp32 otherwise (and so under the interpreter, where tests compare with the
    fp32 reference)."""
    if hidden.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16) and hidden.dtype == weight.dtype:
        return weight.dtype
    return torch.float32


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_args(hidden: Tensor, weight: Tensor, blocks: Optional[tuple[int, int, int]]) -> dict:
    """The constexprs both kernels share. UPCAST: the interpreter has no bf16 arithmetic, and mixed
    dtypes cannot meet in one ``tl.dot``. "ieee": fp32 operands are multiplied in full fp32, not TF32."""
    from ._utils import interpreter_enabled

    upcast = interpreter_enabled() or hidden.dtype != weight.dtype
    fp32 = torch.float32 in (hidden.dtype, weight.dtype)
    bn, bv, bh = blocks or (BLOCK_N, BLOCK_V, BLOCK_H)
    return dict(UPCAST=upcast, INPUT_PRECISION="ieee" if fp32 else "tf32", BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
                num_warps=NUM_WARPS)


def linear_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
                        blocks: Optional[tuple[int, int, int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel on ``hidden [N, H]``. Returns fp32 ``(logprobs, entropy, lse)``, each ``[N]``.
    ``blocks``: ``(BLOCK_N, BLOCK_V, BLOCK_H)``, each a power of two >= 16 (default: the module's)."""
    require_triton(hidden.device)
    hidden, weight = _unit_stride(hidden), _unit_stride(weight)
    (n, h), v = hidden.shape, weight.shape[0]
    lp, entropy, lse = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if n == 0:
        return lp, entropy, lse
    args = _dot_args(hidden, weight, blocks)
    _linear_logprobs_fwd_kernel[(triton_cdiv(n, args["BLOCK_N"]),)](
        hidden_ptr=hidden,
        stride_hn=hidden.stride(0),
        weight_ptr=weight,
        stride_wv=weight.stride(0),
        bias_ptr=bias if bias is not None else weight,  # a dummy pointer when HAS_BIAS is False
        labels_ptr=labels.to(torch.int64).contiguous(),
        logprobs_ptr=lp,
        entropy_ptr=entropy,
        lse_ptr=lse,
        N=n,
        V=v,
        H=h,
        inv_temperature=1.0 / temperature,
        HAS_BIAS=bias is not None,
        **args,
    )
    return lp, entropy, lse


def linear_logprobs_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                        entropy: Tensor, grad_lp: Tensor, grad_entropy: Tensor, temperature: float, chunk_size: int,
                        needs: tuple[bool, bool, bool], blocks: Optional[tuple[int, int, int]] = None):
    """Launch the backward, ``chunk_size`` rows at a time. Returns ``(grad_h, grad_W, grad_b)`` in the
    inputs' dtypes (None where ``needs`` says no); ``grad_W`` and ``grad_b`` are summed in fp32."""
    require_triton(hidden.device)
    hidden, weight = _unit_stride(hidden), _unit_stride(weight)
    (n, h), v = hidden.shape, weight.shape[0]
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b32 = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
    args = _dot_args(hidden, weight, blocks)
    labels = labels.to(torch.int64).contiguous()
    # upstream grads arrive expanded (stride 0) from .sum()/.mean(): make them [N] dense fp32
    grad_lp, grad_entropy = (g.float().contiguous() for g in (grad_lp, grad_entropy))
    buffer = torch.empty(min(chunk_size, n), v, dtype=grad_logits_dtype(hidden, weight), device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        c = min(chunk_size, n - start)
        g_z = buffer[:c]  # [c, V]
        _linear_logprobs_grad_logits_kernel[(triton_cdiv(c, args["BLOCK_N"]), triton_cdiv(v, args["BLOCK_V"]))](
            hidden_ptr=hidden[rows],
            stride_hn=hidden.stride(0),
            weight_ptr=weight,
            stride_wv=weight.stride(0),
            bias_ptr=bias if bias is not None else weight,
            labels_ptr=labels[rows],
            lse_ptr=lse[rows],
            entropy_ptr=entropy[rows],
            grad_logprobs_ptr=grad_lp[rows],
            grad_entropy_ptr=grad_entropy[rows],
            grad_z_ptr=g_z,
            stride_gn=g_z.stride(0),
            C=c,
            V=v,
            H=h,
            inv_temperature=1.0 / temperature,
            HAS_BIAS=bias is not None,
            **args,
        )
        chunk_grad_h = _chunk_grads(g_z, hidden[rows], weight, grad_w32, grad_b32, need_h)
        if grad_h is not None:
            grad_h[rows] = chunk_grad_h
    return (grad_h, None if grad_w32 is None else grad_w32.to(weight.dtype),
            None if grad_b32 is None else grad_b32.to(bias.dtype))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# autograd: the Triton path
# ---------------------------------------------------------------------------------------------------
class LinearLogProbsTritonFunction(torch.autograd.Function):
    """``(logprobs [N], entropy [N])`` fp32 of ``hidden [N, H] @ weight[V, H].T (+ bias) / tau`` through the
    Triton kernels; differentiable w.r.t. hidden, weight and bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        labels: Tensor,
        temperature: float,
        chunk_size: int,
        blocks: Optional[tuple[int, int, int]],
    ) -> tuple[Tensor, Tensor]:
        lp, entropy, lse = linear_logprobs_fwd(hidden, weight, bias, labels, temperature, blocks)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.blocks = temperature, chunk_size, blocks
        ctx.set_materialize_grads(False)
        return lp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_lp: Optional[Tensor], grad_entropy: Optional[Tensor]
    ):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_lp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        zeros = torch.zeros_like(entropy)  # [N]: an unused output contributes nothing
        grads = linear_logprobs_bwd(hidden, weight, bias, labels, lse, entropy,
                                    grad_lp if grad_lp is not None else zeros,
                                    grad_entropy if grad_entropy is not None else zeros,
                                    ctx.temperature, ctx.chunk_size, tuple(ctx.needs_input_grad[:3]), ctx.blocks)
        return (*grads, None, None, None, None)


def linear_logprobs_triton(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    blocks: Optional[tuple[int, int, int]] = None,
) -> tuple[Tensor, Tensor]:
    """Triton path: fp32 ``(logprobs [N], entropy [N])`` of ``hidden [N, H]`` under ``weight [V, H]``
    (+ ``bias [V]``); backward holds one ``[chunk_size, V]`` gradient buffer (default: ``CUDA_CHUNK_BYTES``
    of fp32 on CUDA, ``CHUNK_BYTES`` under the interpreter)."""
    budget = CUDA_CHUNK_BYTES if hidden.device.type == "cuda" else CHUNK_BYTES
    chunk = chunk_size or default_chunk_size(weight.shape[0], budget)
    return LinearLogProbsTritonFunction.apply(hidden, weight, bias, labels, float(temperature), int(chunk), blocks)


# ---------------------------------------------------------------------------------------------------
# autograd: the chunked PyTorch path (CPU)
# ---------------------------------------------------------------------------------------------------
def _chunk_logits(h: Tensor, weight: Tensor, b32: Optional[Tensor], inv_tau: float) -> Tensor:
    """``z = (h W^T + b) / tau`` for one chunk, fp32 ``[chunk, V]``, casting a 16-bit head slab by slab."""
    h32 = h.float()
    if weight.dtype == torch.float32:
        z = h32 @ weight.T
    else:
        z = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
        for cols, w32 in _weight_slabs(weight):
            z[:, cols] = h32 @ w32.T
    if b32 is not None:
        z += b32
    return z.mul_(inv_tau)


def _fp32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.float()  # no copy when already fp32


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
        b32 = _fp32(bias)
        labels = labels.to(torch.int64)
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(lp)
        lse = torch.empty_like(lp)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, b32, inv_tau)  # [c, V]
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
        b32 = _fp32(bias)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            log_p = _chunk_logits(h, weight, b32, inv_tau).sub_(lse[rows, None])  # [c, V], recomputed
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
            chunk_grad_h = _chunk_grads(g_z, h, weight, grad_w32, grad_b32, need_h)
            if grad_h is not None:
                grad_h[rows] = chunk_grad_h
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
