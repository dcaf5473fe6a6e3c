"""A tiny Llama, built in code: the default actor of `hybrid-ppo train` on CPU.

Hidden 64 with 2 heads gives head_dim 32, the smallest size vLLM's CPU attention backend accepts
(FACTS.md: hidden 64 with 4 heads fails there). About 110k parameters, fp32.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

HIDDEN_SIZE = 64
NUM_HEADS = 2  # head_dim 32
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 192
MAX_POSITIONS = 64


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The architecture, with vocabulary and special ids taken from `tokenizer`."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama; the same `seed` gives the same weights on any machine."""
    config = tiny_llama_config(tokenizer)
    # Initialise under a private generator state so the caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()
