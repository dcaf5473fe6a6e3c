#!/usr/bin/env python
"""A random-weight Hugging Face model directory from a config-only one, with an in-code tokenizer.

    python scripts/make_random_model.py configs/models/qwen2.5-0.5b OUT_DIR [--dtype bf16] [--device cuda]
    python scripts/make_random_model.py configs/models/qwen2.5-0.5b OUT_DIR --config-only   # no weights

The architecture and its sizes (vocabulary included) are the real ones; the tokenizer is the builtin
task's (ids 0-3 are pad, bos, eos, unk), and the config's bos/eos/pad ids are set to it, because the
roles need a pad id and generation must be able to stop. For memory profiles, not for quality:
the weights are random.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def make(src: Path, out: Path, dtype: str, device: str, config_only: bool) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = AutoConfig.from_pretrained(src)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{src}: vocabulary {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    partial = out.with_name(out.name + ".partial")  # a reader never sees half a model directory
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(partial)
    if config_only:
        config.save_pretrained(partial)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPES[dtype]))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(partial)
    partial.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a directory with config.json (e.g. configs/models/qwen2.5-0.5b)")
    parser.add_argument("out", type=Path, help="the model directory to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    parser.add_argument("--config-only", action="store_true", help="config + tokenizer, no weights")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists")
    print(f"wrote {make(args.src, args.out, args.dtype, args.device, args.config_only)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
