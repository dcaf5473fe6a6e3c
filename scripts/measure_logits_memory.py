#!/usr/bin/env python
"""Peak host memory of one actor training micro-batch: logits over every position vs the response only.

    python scripts/measure_logits_memory.py [--out logits_memory.json]

Each variant runs in a fresh process (so the high-water mark is its own) on a Llama with a 32,000
vocabulary: forward, log-probs of the response tokens, backward. `full` is what the actor did before
(logits for all P + R positions, then the slice); `response` is `roles.forward.response_logprobs`
(the LM head sees the R response positions only). Peak = ru_maxrss after the step minus RSS before it.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB, HIDDEN, LAYERS, BATCH, PROMPT, RESPONSE = 32_000, 256, 2, 8, 448, 64


def _one(variant: str) -> dict:
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_ppo import ops
    from hybrid_ppo.algo.experience import Sequences, position_ids
    from hybrid_ppo.roles.forward import response_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, VOCAB, (BATCH, PROMPT + RESPONSE))
    mask = torch.ones_like(tokens)
    seq = Sequences(tokens, mask, torch.ones(BATCH, RESPONSE, dtype=torch.long))
    before = psutil.Process().memory_info().rss
    if variant == "full":
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids(mask)).logits
        logprobs = ops.logprobs(logits[:, PROMPT - 1:-1], seq.responses)
    else:
        logprobs = response_logprobs(model, seq, temperature=1.0)
    logprobs.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": variant, "peak_mib": peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="logits_memory.json")
    parser.add_argument("--variant", choices=["full", "response"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_one(args.variant)))
        return 0
    rows = []
    for variant in ("full", "response"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shape = {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "batch": BATCH, "prompt": PROMPT, "response": RESPONSE}
    print(f"one actor micro-batch on CPU, fp32: B={BATCH}, P={PROMPT}, R={RESPONSE}, V={VOCAB}")
    print(f"{'logits for':<12}{'peak MiB':>10}")
    for row in rows:
        print(f"{row['variant']:<12}{row['peak_mib']:>10.0f}")
    with open(args.out, "w") as f:
        json.dump({"shape": shape, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
