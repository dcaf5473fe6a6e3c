"""The attention mask of a prefix-shared packed row (algo/prefix_sharing.py), in the form the model's
attention implementation takes, and the start-up check that it really does.

transformers hands a 4-D `attention_mask` to the attention function as it is (masking_utils: "if
the mask is already 4D, simply return as-is"), so each implementation gets its own form:

* ``sdpa``: a bool `[1, 1, T, T]` (True: attend), which torch's SDPA reads as it is; a dense T x T mask.
* ``eager``: the same as an additive float mask (0 or the dtype's minimum) in the model's dtype.
* ``flex_attention``: a `BlockMask` from the groups and branches (`mask_mod`), never T x T: the GPU
  path (fused by torch.compile on CUDA; on CPU torch runs it unfused).

Anything else (flash-attention's varlen kernels read only position_ids) cannot take such a mask
and is refused by name; `check_prefix_sharing` also proves, with one probe, that the model's
outputs under the mask are the unshared ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.packing import PackedBatch, pack
from hybrid_ppo.algo.prefix_sharing import pack_shared, visible
from hybrid_ppo.config import ConfigError

MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take an arbitrary 4-D mask."""

KEY = "train.share_prompt_prefix"
log = logging.getLogger(__name__)


def attention_implementation(model: nn.Module) -> str | None:
    """The attn_implementation a role's model (an HF model, a value model, a DeepSpeed engine) runs."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None)


def shared_attention_mask(model: nn.Module, packed: PackedBatch) -> Any:
    """The mask of `packed`'s groups and branches for `model`'s attention implementation."""
    segments, branches = packed.segments, packed.branches
    attn = attention_implementation(model)
    if attn == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(batch, head, q, kv):
            same_branch = (branches[kv] == 0) | (branches[kv] == branches[q])
            return (q >= kv) & (segments[q] == segments[kv]) & same_branch

        T = segments.shape[0]
        return create_block_mask(mask_mod, None, None, T, T, device=segments.device)
    allowed = visible(segments, branches)[None, None]  # [1, 1, T, T]
    if attn == "sdpa":
        return allowed
    if attn == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ConfigError(KEY, True, f"false, or an attn_implementation in {list(MASK_IMPLEMENTATIONS)}: "
                      f"{type(getattr(model, 'module', model)).__name__} runs attn_implementation={attn!r}, which "
                      "cannot take the 4-D mask a shared prompt needs")


PROBE_PROMPT, PROBE_RESPONSES = 4, (3, 2)
"""The group `check_prefix_sharing` packs: one prompt, two responses of different lengths."""


@torch.no_grad()
def check_prefix_sharing(model: nn.Module, role: str) -> None:
    """Refuse train.share_prompt_prefix for a model whose outputs under the shared layout are not the
    unshared ones: one group of a prompt and two responses must give every token the hidden state
    it gets in plain packing. Run once at start (collective under ZeRO-3, like any forward)."""
    from hybrid_ppo.roles.forward import model_body, packed_hidden

    body = model_body(getattr(model, "module", model))
    device = next(body.parameters()).device
    vocab = min(int(getattr(body.config, "vocab_size", 100)), 97)
    P, R = PROBE_PROMPT, max(PROBE_RESPONSES)
    tokens = (torch.arange(2 * (P + R), device=device).view(2, P + R) * 7 % vocab + 1)
    tokens[1, :P] = tokens[0, :P]  # one prompt, two responses
    action = (torch.arange(R, device=device)[None] < torch.tensor(PROBE_RESPONSES, device=device)[:, None]).long()
    seq = Sequences(tokens * torch.cat([torch.ones_like(tokens[:, :P]), action], 1),
                    torch.cat([torch.ones_like(tokens[:, :P]), action], 1), action)
    shared, plain = pack_shared(seq), pack(seq)
    got = packed_hidden(body, shared)
    want = packed_hidden(body, plain)
    got = torch.cat([got[shared.predict_index], got[shared.last_index]])
    want = torch.cat([want[plain.predict_index], want[plain.last_index]])
    tolerance = (1e-3 if want.dtype == torch.float32 else 5e-2) * float(want.abs().max().clamp(min=1.0))
    if float((got - want).abs().max()) > tolerance:
        raise ConfigError(KEY, True, f"false for the {role}: {type(model).__name__} with attn_implementation="
                          f"{attention_implementation(model)!r} does not keep the responses of a shared prompt apart "
                          "in this transformers version")


def packed_inputs(model: nn.Module, packed: PackedBatch) -> dict[str, Tensor]:
    """The keyword arguments of a forward over a packed row: no cache (a cache, even an empty one,
    switches transformers' position_ids boundary detection off), and the shared-prefix mask where
    the row has one."""
    inputs = dict(input_ids=packed.tokens, position_ids=packed.position_ids, use_cache=False)
    if packed.segments is not None:
        inputs["attention_mask"] = shared_attention_mask(model, packed)
    return inputs


def resolve_prefix_sharing(train, model: nn.Module, role: str, rank: int = 0) -> bool:
    """Whether this role lays groups out prompt-once (`train.prefix_sharing`, and its model passes
    `check_prefix_sharing`). Set explicitly, a model that fails is refused; left null, the role falls
    back to plain packing. Logged once, by rank 0."""
    if not train.prefix_sharing:
        return False
    try:
        check_prefix_sharing(model, role)  # refuses too an implementation that takes no 4-D mask
    except ConfigError as err:
        if train.share_prompt_prefix:
            raise
        if rank == 0:
            log.info("%s: prompts not shared across a group's responses (%s)", role, err)
        return False
    if rank == 0:
        log.info("%s: each prompt packed once for its %d responses (train.share_prompt_prefix, attn_implementation=%s)",
                 role, train.samples_per_prompt, attention_implementation(model))
    return True
