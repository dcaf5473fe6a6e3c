"""Held-out accuracy of HF chat checkpoints on builtin:word-math, graded as training grades it.

    python scripts/eval_math.py models/SmolLM2-135M-Instruct runs/<run>/hf/final [--n 64] [--json PATH]

Greedy responses to its eval split (problems never trained on) through each chat template, scored with
`rewards.math:accuracy` (the answer in the last `\\boxed{}`, checked by math-verify) and
`rewards.format:boxed` (a filled `\\boxed{}` at all). Prints a table and writes JSON: the
before/after numbers of a real-model run (README, "RL with verifiable rewards").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from hybrid_ppo.rewards.format import boxed
from hybrid_ppo.rewards.math import accuracy
from hybrid_ppo.tasks import word_math


def greedy_responses(model_dir: str, chats: list[list[dict]], max_new_tokens: int, batch: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    responses = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        responses += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return responses


def evaluate(model_dir: str, n: int, max_new_tokens: int, batch: int) -> dict:
    examples = word_math.make_examples("eval", n, seed=0)
    started = time.perf_counter()
    responses = greedy_responses(model_dir, [e.prompt for e in examples], max_new_tokens, batch)
    labels = [e.label for e in examples]
    correct = accuracy([""] * n, responses, labels)
    filled = boxed([""] * n, responses, labels)
    return {"model": model_dir, "n": n, "accuracy": sum(correct) / n, "boxed_rate": sum(filled) / n,
            "seconds": time.perf_counter() - started, "first_response": responses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="HF model directories")
    parser.add_argument("--n", type=int, default=64, help="held-out problems")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)

    results = [evaluate(m, args.n, args.max_new_tokens, args.batch) for m in args.models]
    table = Table(title=f"builtin:word-math, {args.n} held-out problems, greedy")
    for column in ("model", "accuracy", "filled \\boxed{}", "seconds"):
        table.add_column(column)
    for r in results:
        table.add_row(r["model"], f"{r['accuracy']:.3f}", f"{r['boxed_rate']:.3f}", f"{r['seconds']:.0f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
