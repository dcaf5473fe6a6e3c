"""The one door to the kernels: token log-probs (+ entropy) and GAE.

Each op picks a backend:

* ``"auto"``   - Triton for CUDA tensors (when triton is installed), the PyTorch reference otherwise.
* ``"triton"`` - force the kernel. On CPU tensors this works only under ``TRITON_INTERPRET=1``.
* ``"torch"``  - force the PyTorch reference (``hybrid_ppo_kernels.*.*_torch``).

Importing this module touches neither CUDA nor triton's compiler; without triton installed the
``"torch"`` path (and ``"auto"`` on CPU) still works.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Union, overload

import torch
from torch import Tensor

from hybrid_ppo_kernels._utils import HAS_TRITON
from hybrid_ppo_kernels.gae import gae_torch, gae_triton
from hybrid_ppo_kernels.linear_logprobs import linear_logprobs_chunked, linear_logprobs_triton
from hybrid_ppo_kernels.logprobs import logprobs_torch, logprobs_triton

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

__all__ = ["BACKENDS", "Backend", "GAEOutput", "LOGIT_TRANSFORMS", "LogProbsWithEntropy", "gae", "linear_logprobs",
           "logit_transforms", "logprobs", "resolve_backend"]

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""HF config attributes of heads whose logits are not just `h @ W.T + b` (Gemma 2, Cohere, Granite)."""


def logit_transforms(config: object) -> list[str]:
    """``attr=value`` for each logit transform an HF model config sets: what `linear_logprobs` cannot
    apply, so such a head must materialize its logits (empty: the fused op can replace the head)."""
    return [f"{a}={getattr(config, a)}" for a in LOGIT_TRANSFORMS if getattr(config, a, None) is not None]


class LogProbsWithEntropy(NamedTuple):
    """``logprobs(..., with_entropy=True)``: both fp32, shaped like ``labels``."""

    logprobs: Tensor  # [...] log p(label) under softmax(logits / temperature)
    entropy: Tensor  # [...] entropy of softmax(logits / temperature)


class GAEOutput(NamedTuple):
    """``gae(...)``: both fp32 ``[B, T]``, 0 where ``mask == 0``."""

    advantages: Tensor  # [B, T] A_t
    returns: Tensor  # [B, T] A_t + V_t (the critic's target)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return backend


@overload
def logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = ...,
    with_entropy: Literal[False] = ...,
    backend: str = ...,
    inplace_backward: bool = ...,
) -> Tensor: ...


@overload
def logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = ...,
    with_entropy: Literal[True],
    backend: str = ...,
    inplace_backward: bool = ...,
) -> LogProbsWithEntropy: ...


def logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Union[Tensor, LogProbsWithEntropy]:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, optionally with entropy.

    Args:
        logits: ``[..., V]`` fp32 / bf16 / fp16. May be a non-contiguous slice in its leading dims,
            e.g. ``logits[:, P - 1:-1]`` of a ``[B, T, V]`` tensor (no copy is made for that case).
        labels: ``[...]`` integer token ids in ``[0, V)``.
        temperature: divides the logits before the softmax; must be > 0.
        with_entropy: also return the entropy of the same distribution.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).
        inplace_backward: Triton backend only (ignored by torch). The backward pass writes the gradient
            into the ``logits`` buffer instead of a new ``[..., V]`` tensor. Safe only when nothing uses
            those logits after this op's backward: no other autograd op saved them and the caller does
            not read them again. Misuse is silent (triton writes around autograd's version counter).

    Returns:
        ``with_entropy=False``: the fp32 log-probs ``[...]``. ``with_entropy=True``: a
        :class:`LogProbsWithEntropy` ``(logprobs, entropy)``, both fp32 ``[...]``. Both outputs are
        differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits [..., V] and labels [...] disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    if resolve_backend(backend, logits.device) == "triton":
        lp, entropy = logprobs_triton(logits, labels, temperature, inplace_backward)
    else:
        lp, entropy = logprobs_torch(logits, labels, temperature, with_entropy=with_entropy)
    if with_entropy:
        assert entropy is not None
        return LogProbsWithEntropy(lp, entropy)
    return lp


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Union[Tensor, LogProbsWithEntropy]:
    """``logprobs(hidden @ weight.T + bias, labels, ...)`` without ever building the ``[..., V]`` logits.

    The LM head and the log-prob op fused: the rows are processed ``chunk_size`` at a time (default: as
    many as fit 64 MiB of fp32 logits), and backward recomputes each chunk's logits, so the extra memory
    is bounded by a chunk whatever the number of tokens (see ``hybrid_ppo_kernels.linear_logprobs``).

    ``"auto"`` runs the Triton kernels on CUDA and the chunked PyTorch path elsewhere; ``"triton"``
    forces the kernels (on CPU only under ``TRITON_INTERPRET=1``), ``"torch"`` the chunked path.

    Args:
        hidden: ``[..., H]`` float, the final hidden states (after the model's last norm).
        weight: ``[V, H]`` the LM head (``model.get_output_embeddings().weight``; may be tied to the
            input embedding, autograd then adds both gradients into the one parameter).
        labels: ``[...]`` integer token ids in ``[0, V)``.
        temperature, with_entropy: as in :func:`logprobs`.
        bias: optional ``[V]`` head bias.
        chunk_size: rows per chunk (default from a 64 MiB budget).

    Returns:
        What :func:`logprobs` returns: fp32 ``[...]`` log-probs, or :class:`LogProbsWithEntropy`;
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden [..., H] and labels [...] disagree: {tuple(hidden.shape)} vs {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}; got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    fn = linear_logprobs_triton if resolve_backend(backend, hidden.device) == "triton" else linear_logprobs_chunked
    lp, entropy = fn(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature, bias, chunk_size)
    lp, entropy = lp.view(labels.shape), entropy.view(labels.shape)
    return LogProbsWithEntropy(lp, entropy) if with_entropy else lp


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float,
    backend: str = "auto",
) -> GAEOutput:
    """Generalized advantage estimation over a padded batch, in fp32 and without gradient.

    On the response tokens of each row (``mask == 1``), backwards in t::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next,     returns_t = A_t + V_t

    ``V_next`` / ``A_next`` belong to the row's next response token, and are 0 past the last one.
    Padding may sit on either side (or in gaps, which are skipped).

    Args:
        rewards, values: ``[B, T]`` float (any float dtype; computed in fp32).
        mask: ``[B, T]`` bool / int / float, nonzero on response tokens.
        gamma, lam: discount and GAE lambda, in ``[0, 1]``.
        backend: ``"auto"`` (one Triton launch on CUDA, the Python loop on CPU), ``"triton"``, ``"torch"``.

    Returns:
        :class:`GAEOutput` ``(advantages, returns)``, fp32 ``[B, T]``, 0 where ``mask == 0``.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            "rewards, values and mask must all be [B, T]; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}")

    with torch.no_grad():
        r, v, m = rewards.detach(), values.detach(), mask.detach()
        if resolve_backend(backend, r.device) == "triton":
            adv, ret = gae_triton(r, v, m, gamma, lam)
        else:
            adv, ret = gae_torch(r, v, m, gamma, lam)
    return GAEOutput(adv, ret)
