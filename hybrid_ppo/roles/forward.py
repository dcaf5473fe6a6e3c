"""How a role's model runs on a batch of sequences: the response positions' logits or log-probs,
on the padded `[B, P+R]` rectangle or packed (algo/packing.py: real tokens only, one row), with each
group's prompt once where `shared` (algo/prefix_sharing.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybrid_ppo.algo.experience import Sequences, position_ids
from hybrid_ppo.algo.packing import PackedBatch, equal_bins, pack, real_lengths, token_bins
from hybrid_ppo.algo.prefix_sharing import equal_unit_bins, group_units, pack_shared, unit_lengths
from hybrid_ppo.config import ConfigError


def response_logits(model: nn.Module, seq: Sequences) -> Tensor:
    """[B, R, V] logits of the distributions that produced each response token.

    Position P-1+t predicts response token t. Only those R positions go through the LM head
    (transformers' `logits_to_keep` takes the indices), so no [B, P+R, V] tensor ever exists: with
    a 150k vocabulary the prompt's logits would dwarf everything else in a micro-batch."""
    keep = torch.arange(seq.prompt_len - 1, seq.tokens.shape[1] - 1, device=seq.tokens.device)
    out = model(input_ids=seq.tokens, attention_mask=seq.attention_mask, position_ids=position_ids(seq.attention_mask),
                logits_to_keep=keep)
    return out.logits


def packed_response_logits(model: nn.Module, packed: PackedBatch, keep_batch_dim: bool = False):
    """[N, V] logits at the packed positions that predict the N real response tokens ([1, N, V], or
    whatever lm_head returned, with `keep_batch_dim`). Plain packing passes no attention mask and no
    cache: that is when transformers reads the restarting position_ids as sequence boundaries; a
    shared prefix passes its own 4-D mask (roles/shared_mask.py)."""
    from hybrid_ppo.roles.shared_mask import packed_inputs

    out = model(**packed_inputs(model, packed), logits_to_keep=packed.predict_index)
    return out.logits if keep_batch_dim else out.logits[0]


def packed_hidden(body: nn.Module, packed: PackedBatch) -> Tensor:
    """[T, H] a transformer body's final hidden states over a packed row (see packed_response_logits)."""
    from hybrid_ppo.roles.shared_mask import packed_inputs

    return body(**packed_inputs(body, packed)).last_hidden_state[0]


def pack_layout(seq: Sequences, shared: bool = False) -> PackedBatch:
    """`seq` packed, each group's prompt once where `shared`."""
    return pack_shared(seq) if shared else pack(seq)


def response_logprobs(model: nn.Module, seq: Sequences, temperature: float, with_entropy: bool = False,
                      inplace_backward: bool = False, fused: bool = False, packed: bool = False, shared: bool = False):
    """log pi(a_t | s_t) at the rollout temperature for every response token, through the one
    door to the kernels (which scale by the temperature without a [B, R, V] copy). `fused`: no
    [B, R, V] logits at all (roles/lm_head.py, whose `lm_head_path` says when that is possible).
    `packed`: the sequences' real tokens in one row, each group's prompt once where `shared`; the
    result is in the same [B, R] layout (0 on padding)."""
    from hybrid_ppo import ops

    if packed:
        batch = pack_layout(seq, shared)
        if fused:
            from hybrid_ppo.roles.lm_head import fused_packed_logprobs

            out = fused_packed_logprobs(model, batch, temperature, with_entropy)
        else:
            out = ops.logprobs(packed_response_logits(model, batch), batch.targets, temperature=temperature,
                               with_entropy=with_entropy, inplace_backward=inplace_backward)
        return type(out)(*(batch.unpack(t) for t in out)) if with_entropy else batch.unpack(out)
    if fused:
        from hybrid_ppo.roles.lm_head import fused_response_logprobs

        return fused_response_logprobs(model, seq, temperature, with_entropy)

    return ops.logprobs(response_logits(model, seq), seq.responses, temperature=temperature,
                        with_entropy=with_entropy, inplace_backward=inplace_backward)


def to_device(seq: Sequences, device: torch.device) -> Sequences:
    return Sequences(seq.tokens.to(device), seq.attention_mask.to(device), seq.action_mask.to(device))


def model_body(model: nn.Module) -> nn.Module:
    """The transformer body of a role's model: a causal LM's or classifier's base model, the value
    model's backbone, or the model itself when it is a body."""
    if hasattr(model, "backbone"):
        return model.backbone
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


PROBE_LENGTHS = (5, 7)
"""The two sequences `check_packing` packs into one row."""


@torch.no_grad()
def check_packing(model: nn.Module, role: str) -> None:
    """Refuse train.packing for a model and attention implementation whose attention crosses the
    sequences of a packed row: one row of two sequences must give each the hidden states it gets
    alone. Run once at start (collective under ZeRO-3, like any forward)."""
    body = model_body(model)
    param = next(body.parameters())
    vocab = int(getattr(body.config, "vocab_size", 100))
    ids = [torch.arange(n, device=param.device) * 7 % min(vocab, 97) + 1 for n in PROBE_LENGTHS]
    alone = [body(input_ids=t[None], position_ids=torch.arange(len(t), device=param.device)[None],
                  use_cache=False).last_hidden_state[0] for t in ids]
    row = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(n, device=param.device) for n in PROBE_LENGTHS])[None]
    together = body(input_ids=row, position_ids=positions, use_cache=False).last_hidden_state[0]
    want = torch.cat(alone)
    tolerance = (1e-3 if want.dtype == torch.float32 else 5e-2) * float(want.abs().max().clamp(min=1.0))
    if float((together - want).abs().max()) > tolerance:
        attn = getattr(body.config, "_attn_implementation", None)
        raise ConfigError("train.packing", True,
                          f"false for the {role}: {type(model).__name__} with attn_implementation={attn!r} lets "
                          "attention cross the sequences of a packed row in this transformers version")


def in_micro_batches(fn, seq: Sequences, micro_batch_size: int, budget: int | None = None,
                     max_over_ranks=None, shared: bool = False) -> Tensor:
    """`fn` (a scoring forward: Sequences -> [b, ...]) over micro-batches of `seq`, results in `seq`'s
    row order. Micro-batches of `micro_batch_size` rows, or, under a token `budget`, bins of at most
    that many real tokens (algo/packing.py), the same count on every rank when `max_over_ranks` is
    given (a ZeRO-3 role's forwards are collectives). `shared`: whole groups of one prompt
    together (algo/prefix_sharing.py), the budget counting each prompt once."""
    if shared:
        index = [torch.tensor(b) for b in group_bins(seq, micro_batch_size, budget, max_over_ranks)]
    elif budget is None:
        return torch.cat([fn(c) for c in seq.chunks(micro_batch_size)])
    else:
        lengths = real_lengths(seq)
        bins = (equal_bins([lengths], budget, max_over_ranks)[0] if max_over_ranks is not None
                else token_bins(lengths, budget))
        index = [torch.tensor(b) for b in bins]
    outs = [fn(seq.select(i)) for i in index]
    result = outs[0].new_empty((len(seq), *outs[0].shape[1:]))
    result[torch.cat(index)] = torch.cat(outs)
    return result


def group_bins(seq: Sequences, micro_batch_size: int, budget: int | None = None, max_over_ranks=None) -> list[list[int]]:
    """Rows of `seq` in micro-batches of whole groups (algo/prefix_sharing.py `group_units`): in group
    order, `micro_batch_size` rows each (a group cut only where a micro-batch ends), or under a token
    `budget` bins of whole units of at most that many distinct tokens, the same count on every rank
    when `max_over_ranks` is given."""
    units = group_units(seq, budget)
    if budget is None:
        order = [row for unit in units for row in unit]
        return [order[start:start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]
    if max_over_ranks is not None:
        units, unit_index = equal_unit_bins(seq, [units], budget, max_over_ranks)[0]
    else:
        unit_index = token_bins(unit_lengths(seq, units), budget)
    return [sorted(row for u in b for row in units[u]) for b in unit_index]
