"""SCORE_ACTOR and TRAIN_ACTOR on one long-tailed rollout batch: the padded [B, P+R] path against
packed micro-batches under a token budget (train.packing, train.max_tokens_per_micro_batch).

    python scripts/bench_packing.py [--median 200] [--max-len 2048] [--json PATH]

The model is built in code: Qwen2.5's vocabulary (151,936, tied embeddings) with small widths that a
2-core CPU runs. Response lengths are lognormal (median --median, sigma --sigma), capped at
--max-len; prompts 16-64 tokens, left-padded. Both paths run the roles' own functions
(`roles.forward.response_logprobs` with the fused LM head, `algo.ppo.policy_loss` with the exact
mini-batch weights of `algo.loss_norm`), on a plain module (no DeepSpeed: the passes, not the
optimizer). The padded path splits the batch into --micro-batch rows; the packed path bins the same
sequences under a budget (default: the real tokens of one padded micro-batch on average, at least
the longest sequence).

Memory per micro-batch is what autograd saves for backward (every tensor a saved_tensors_hook sees,
counted once by storage, the parameters left out): the part of a training pass that grows with tokens. Prints a table and
writes JSON (--json, default runs/bench_packing.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.algo.loss_norm import mini_batch_norms
from hybrid_ppo.algo.packing import real_lengths, token_bins
from hybrid_ppo.algo.ppo import policy_loss
from hybrid_ppo.algo.prefix_sharing import pack_shared
from hybrid_ppo.roles.forward import response_logprobs

VOCAB = 151_936


def build_model(hidden: int, layers: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=4096, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).float()


def rollout_batch(rows: int, median: float, sigma: float, max_len: int, seed: int = 0) -> tuple[Sequences, torch.Tensor]:
    """Left-padded prompts of 16-64 tokens, lognormal responses; and random advantages."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, generator=gen)
    responses = (median * torch.exp(sigma * normal)).round().clamp(1, max_len).long()
    prompts = torch.randint(16, 65, (rows,), generator=gen)
    P, R = int(prompts.max()), int(responses.max())
    prompt_mask = (torch.arange(P)[None] >= P - prompts[:, None]).long()
    action = (torch.arange(R)[None] < responses[:, None]).long()
    attention = torch.cat([prompt_mask, action], 1)
    tokens = torch.where(attention.bool(), torch.randint(1, VOCAB, (rows, P + R), generator=gen), 0)
    advantages = torch.randn(rows, R, generator=gen) * action
    return Sequences(tokens, attention, action), advantages


class SavedBytes:
    """Bytes autograd saves for backward while active, each storage counted once; the model's own
    parameters (saved by every matmul) are not counted: they do not grow with the tokens."""

    def __init__(self, model):
        self.seen: dict[int, int] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def run_path(model, seq: Sequences, advantages: torch.Tensor, micro_rows: list[torch.Tensor], packed: bool,
             shared: bool = False) -> dict:
    """SCORE (no-grad log-probs) and TRAIN (loss + backward) over the given micro-batches (`shared`:
    packed with each group's prompt once, algo/prefix_sharing.py)."""
    start = time.perf_counter()
    old = torch.zeros(seq.action_mask.shape)
    with torch.no_grad():
        for rows in micro_rows:
            old[rows] = response_logprobs(model, seq.select(rows), 1.0, fused=True, packed=packed, shared=shared)
    score_s = time.perf_counter() - start
    masks = [seq.action_mask[rows] for rows in micro_rows]
    norms = mini_batch_norms(masks, grad_accum=len(micro_rows), world_size=1, horizon=float(seq.action_mask.shape[1]),
                             sizes=[len(micro_rows)])
    model.zero_grad()
    memory, loss_total = [], 0.0
    start = time.perf_counter()
    for rows, norm in zip(micro_rows, norms):
        micro = seq.select(rows)
        saved = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            logprobs = response_logprobs(model, micro, 1.0, fused=True, packed=packed, shared=shared)
            # old = the scored log-probs (ratio 1): the loss is the policy gradient term, as on-policy
            out = policy_loss(logprobs, old[rows], advantages[rows], micro.action_mask.float(), 0.2, None, None,
                              "token_mean", norm)
        (out.loss / len(micro_rows)).backward()  # what DeepSpeed's division by the accumulation does
        memory.append(saved.total)
        loss_total += float(out.loss.detach()) / len(micro_rows)
    train_s = time.perf_counter() - start
    width = seq.tokens.shape[1]
    processed = (sum(len(r) * width for r in micro_rows) if not packed else int(seq.attention_mask.sum()) if not shared
                 else sum(pack_shared(seq.select(r)).tokens.shape[1] for r in micro_rows))
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
    return {"old_logprobs": old, "score_s": score_s, "train_s": train_s, "memory": memory, "loss": loss_total,
            "processed_tokens": processed, "grad": grad}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--median", type=float, default=200.0, help="median response length (tokens)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the response lengths")
    parser.add_argument("--max-len", type=int, default=2048, help="response length cap (rollout.max_new_tokens)")
    parser.add_argument("--rows", type=int, default=16, help="sequences in the rollout batch")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per padded micro-batch")
    parser.add_argument("--budget", type=int, default=None, help="tokens per packed micro-batch (default: see above)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_packing.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    seq, advantages = rollout_batch(args.rows, args.median, args.sigma, args.max_len)
    lengths = real_lengths(seq)
    real = sum(lengths)
    padded_micro = [torch.arange(s, min(s + args.micro_batch, args.rows)) for s in range(0, args.rows, args.micro_batch)]
    budget = args.budget or max(max(lengths), -(-real // len(padded_micro)))
    packed_micro = [torch.tensor(b) for b in token_bins(lengths, budget)]

    model = build_model(args.hidden, args.layers)
    results = {}
    for name, micros, packed in (("padded", padded_micro, False), ("packed", packed_micro, True)):
        results[name] = run_path(model, seq, advantages, micros, packed)

    mask = seq.action_mask.bool()
    pad, pack = results["padded"], results["packed"]
    grad_scale = float(pad["grad"].abs().max())

    def spread(memory: list[int]) -> dict:
        return {"min": min(memory), "median": statistics.median(memory), "max": max(memory)}

    report = {
        "rows": args.rows, "median": args.median, "sigma": args.sigma, "max_len": args.max_len,
        "hidden": args.hidden, "layers": args.layers, "vocab": VOCAB, "budget_tokens": budget,
        "real_tokens": real, "response_tokens": int(mask.sum()),
        "micro_batches_padded": len(padded_micro), "micro_batches_packed": len(packed_micro),
        "tokens_processed_padded": pad["processed_tokens"], "tokens_processed_packed": pack["processed_tokens"],
        "padding_fraction_padded": 1 - real / pad["processed_tokens"],
        "padding_fraction_packed": 1 - real / pack["processed_tokens"],
        "score_s_padded": pad["score_s"], "score_s_packed": pack["score_s"],
        "train_s_padded": pad["train_s"], "train_s_packed": pack["train_s"],
        "score_tokens_per_s_padded": real / pad["score_s"], "score_tokens_per_s_packed": real / pack["score_s"],
        "train_tokens_per_s_padded": real / pad["train_s"], "train_tokens_per_s_packed": real / pack["train_s"],
        "saved_bytes_per_micro_batch_padded": spread(pad["memory"]),
        "saved_bytes_per_micro_batch_packed": spread(pack["memory"]),
        "peak_memory_max_over_median_padded": max(pad["memory"]) / statistics.median(pad["memory"]),
        "peak_memory_max_over_median_packed": max(pack["memory"]) / statistics.median(pack["memory"]),
        "logprob_max_abs_diff": float((pad["old_logprobs"][mask] - pack["old_logprobs"][mask]).abs().max()),
        "loss_abs_diff": abs(pad["loss"] - pack["loss"]),
        "grad_max_abs_diff_over_max": float((pad["grad"] - pack["grad"]).abs().max()) / grad_scale,
    }
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


def print_table(r: dict) -> None:
    mib = 1 << 20
    print(f"rollout: {r['rows']} sequences, responses lognormal(median {r['median']:g}, sigma {r['sigma']:g}) "
          f"capped at {r['max_len']}; {r['real_tokens']} real tokens; model V={r['vocab']}, H={r['hidden']}, "
          f"{r['layers']} layers; budget {r['budget_tokens']} tokens")
    print(f"{'path':<8}{'micro':>6}{'processed':>11}{'padding':>9}{'score s':>9}{'train s':>9}{'train tok/s':>13}"
          f"{'saved MiB min/med/max':>26}")
    for name in ("padded", "packed"):
        m = r[f"saved_bytes_per_micro_batch_{name}"]
        print(f"{name:<8}{r[f'micro_batches_{name}']:>6}{r[f'tokens_processed_{name}']:>11}"
              f"{r[f'padding_fraction_{name}']:>9.1%}{r[f'score_s_{name}']:>9.2f}{r[f'train_s_{name}']:>9.2f}"
              f"{r[f'train_tokens_per_s_{name}']:>13.0f}"
              f"{m['min'] / mib:>10.0f}/{m['median'] / mib:.0f}/{m['max'] / mib:.0f}")
    print(f"train speed-up {r['train_tokens_per_s_packed'] / r['train_tokens_per_s_padded']:.2f}x; "
          f"peak memory max/median packed {r['peak_memory_max_over_median_packed']:.2f} "
          f"(padded {r['peak_memory_max_over_median_padded']:.2f}); log-prob max |diff| {r['logprob_max_abs_diff']:.2e}; "
          f"loss |diff| {r['loss_abs_diff']:.2e}; grad max |diff| / max |grad| {r['grad_max_abs_diff_over_max']:.2e}")


if __name__ == "__main__":
    main()
