"""SCORE_ACTOR and TRAIN_ACTOR on GRPO-shaped batches (groups of samples_per_prompt responses to one
prompt): padded [B, P+R] micro-batches, packed ones (train.packing), and packed with each prompt
once (train.share_prompt_prefix, algo/prefix_sharing.py).

    python scripts/bench_prefix_sharing.py [--samples 4 8] [--ratio 3] [--json PATH]

The model is built in code, random-init, in fp32: by default SmolLM2-135M's shape (Llama, 30 layers,
hidden 576, 9 heads / 3 KV heads, its real vocabulary of 49,152, tied embeddings; --layers etc. cut
it). Each configuration has --prompts prompts of about --ratio x the response median tokens
(+-25 %, left-padded), each with `samples` responses of lognormal length (median --response, sigma
0.5, capped at 3x, right-padded). All three layouts run the same micro-batches (--groups-per-micro
whole groups each) through the roles' own functions (`roles.forward.response_logprobs` with the fused
LM head, `algo.ppo.policy_loss` with the exact loss weights; scripts/bench_packing.py's `run_path`), on
a plain module (no DeepSpeed).

"Real tokens/s" is the batch's real (non-pad) tokens, as the unshared layout counts them, over the
seconds: the same numerator for all three layouts, so the ratios are speed-ups. The distinct-token
fraction is what the shared layout actually runs. Prints a table and writes JSON (--json, default
runs/bench_prefix_sharing.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_packing import run_path  # noqa: E402  (the same SCORE / TRAIN passes as the packing benchmark)

from hybrid_ppo.algo.experience import Sequences  # noqa: E402

LAYOUTS = (("padded", False, False), ("packed", True, False), ("shared", True, True))


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         tie_word_embeddings=True, max_position_embeddings=8192, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()


def grouped_batch(prompts: int, samples: int, ratio: float, response: float, vocab: int,
                  seed: int = 0) -> tuple[Sequences, torch.Tensor, int]:
    """`prompts` groups of `samples` responses (see the module docstring); random advantages; the
    longest response."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = (ratio * response * (0.75 + 0.5 * torch.rand(prompts, generator=gen))).round().clamp(min=1).long()
    prompt_lengths = prompt_lengths.repeat_interleave(samples)
    rows = prompts * samples
    lengths = (response * torch.exp(0.5 * torch.randn(rows, generator=gen))).round().clamp(1, 3 * response).long()
    P, R = int(prompt_lengths.max()), int(lengths.max())
    prompt_mask = (torch.arange(P)[None] >= P - prompt_lengths[:, None]).long()
    action = (torch.arange(R)[None] < lengths[:, None]).long()
    prompt_ids = torch.randint(1, vocab, (prompts, P), generator=gen).repeat_interleave(samples, 0)
    tokens = torch.cat([prompt_ids * prompt_mask, torch.randint(1, vocab, (rows, R), generator=gen) * action], 1)
    advantages = torch.randn(rows, R, generator=gen) * action
    return Sequences(tokens, torch.cat([prompt_mask, action], 1), action), advantages, R


def bench_one(model, args, samples: int, ratio: float) -> dict:
    seq, advantages, _ = grouped_batch(args.prompts, samples, ratio, args.response, args.vocab)
    rows_per_micro = args.groups_per_micro * samples
    micro_rows = [torch.arange(s, min(s + rows_per_micro, len(seq))) for s in range(0, len(seq), rows_per_micro)]
    if args.warm_up:  # first-call costs (allocator, kernels) out of the timings: once per process
        for _, packed, shared in LAYOUTS:
            run_path(model, seq, advantages, micro_rows[:1], packed, shared)
        args.warm_up = False
    results = {name: run_path(model, seq, advantages, micro_rows, packed, shared) for name, packed, shared in LAYOUTS}
    real, mask = int(seq.attention_mask.sum()), seq.action_mask.bool()
    base, shared = results["packed"], results["shared"]
    report = {"samples_per_prompt": samples, "prompt_response_ratio": ratio, "rows": len(seq),
              "real_tokens": real, "distinct_tokens": shared["processed_tokens"],
              "distinct_fraction": shared["processed_tokens"] / real, "micro_batches": len(micro_rows)}
    for name, out in results.items():
        report.update({f"score_s_{name}": out["score_s"], f"train_s_{name}": out["train_s"],
                       f"score_tokens_per_s_{name}": real / out["score_s"],
                       f"train_tokens_per_s_{name}": real / out["train_s"],
                       f"tokens_processed_{name}": out["processed_tokens"]})
    report["score_speedup_shared_over_packed"] = base["score_s"] / shared["score_s"]
    report["train_speedup_shared_over_packed"] = base["train_s"] / shared["train_s"]
    report["logprob_max_abs_diff"] = max(float((results[n]["old_logprobs"][mask] - shared["old_logprobs"][mask]).abs().max())
                                         for n in ("padded", "packed"))
    report["loss_abs_diff"] = abs(base["loss"] - shared["loss"])
    report["grad_max_abs_diff_over_max"] = float((base["grad"] - shared["grad"]).abs().max()) / float(base["grad"].abs().max())
    print(f"samples_per_prompt {samples}, P:R {ratio:g}: train real tokens/s padded "
          f"{report['train_tokens_per_s_padded']:.0f}, packed {report['train_tokens_per_s_packed']:.0f}, shared "
          f"{report['train_tokens_per_s_shared']:.0f}", flush=True)  # progress: a run takes minutes
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8], help="samples_per_prompt values")
    parser.add_argument("--ratio", type=float, nargs="+", default=[3.0], help="prompt:response length ratios")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (groups) in the batch")
    parser.add_argument("--response", type=float, default=16.0, help="median response length (tokens)")
    parser.add_argument("--groups-per-micro", type=int, default=1, help="whole groups per micro-batch")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_prefix_sharing.json"))
    args = parser.parse_args(argv)
    args.warm_up = True
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    runs = [bench_one(model, args, n, ratio) for ratio in args.ratio for n in args.samples]
    report = {"model": {k: getattr(args, k) for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")},
              "prompts": args.prompts, "response_median": args.response, "groups_per_micro": args.groups_per_micro,
              "threads": torch.get_num_threads(), "runs": runs}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


def print_table(report: dict) -> None:
    m = report["model"]
    print(f"model: Llama V={m['vocab']}, H={m['hidden']}, {m['layers']} layers; {report['prompts']} prompts, response "
          f"median {report['response_median']:g} tokens, {report['groups_per_micro']} group(s) per micro-batch, "
          f"{report['threads']} threads; real tokens/s (higher is better)")
    print(f"{'n':>3}{'P:R':>5}{'real':>7}{'distinct':>10}{'':>2}" + "".join(f"{'score ' + n:>14}" for n, _, _ in LAYOUTS)
          + "".join(f"{'train ' + n:>14}" for n, _, _ in LAYOUTS) + f"{'score x':>9}{'train x':>9}{'max |dlp|':>11}")
    for r in report["runs"]:
        print(f"{r['samples_per_prompt']:>3}{r['prompt_response_ratio']:>5g}{r['real_tokens']:>7}"
              f"{r['distinct_fraction']:>10.1%}{'':>2}"
              + "".join(f"{r[f'score_tokens_per_s_{n}']:>14.0f}" for n, _, _ in LAYOUTS)
              + "".join(f"{r[f'train_tokens_per_s_{n}']:>14.0f}" for n, _, _ in LAYOUTS)
              + f"{r['score_speedup_shared_over_packed']:>8.2f}x{r['train_speedup_shared_over_packed']:>8.2f}x"
              f"{r['logprob_max_abs_diff']:>11.1e}")


if __name__ == "__main__":
    main()
