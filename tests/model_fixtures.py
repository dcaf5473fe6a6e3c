"""Tiny random-init checkpoints shaped like the stock chat models people train, built in code.

Each family copies what its real `config.json`, `generation_config.json` and tokenizer get wrong
for a naive trainer, and cuts only the widths:

| family   | vocab (config / tokenizer) | EOS ids (config; generation config) | pad          | quirks |
|----------|-----------------------------|-------------------------------------|--------------|--------|
| llama3   | 128256 / 128256             | [128001, 128008, 128009]; same      | none at all  | GQA, template adds BOS, tokenizer adds BOS too |
| qwen2.5  | 151936 / 151665             | 151645; [151645, 151643]            | tokenizer only (151643) | tied embeddings, padded vocab |
| qwen3    | 151936 / 151669             | 151645; [151645, 151643]            | tokenizer only (151643) | tied, head_dim 32 != 64 / 4 heads, GQA |
| mistral  | 32768 / 32768               | 2; 2                                | none at all  | [INST] template adds BOS, tokenizer adds BOS too |

The special tokens sit at their real ids. The tokenizer is a byte-level BPE trained here on a
small corpus (a few hundred merges); the ids between it and the special tokens are filler
entries that no text ever encodes to, as Llama-3's reserved tokens are. Widths: hidden 64,
head_dim 32 (the smallest vLLM's CPU attention accepts, FACTS.md), 2 layers.

`build_family(name, path)` writes a complete local HF directory (weights, config, generation
config, tokenizer with chat template); tests get them through the session fixtures in
`conftest.py`, so each is built once per test session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

HIDDEN, LAYERS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 128, 256
BPE_SIZE = 600  # byte alphabet (256) + merges

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the largest digit in 3 7 1 9? The answer is 9.",
    "You are a helpful assistant. Answer the question briefly.", "max 1 2 3 4 = 4", "Hello! How can I help you today?",
    "Reinforcement learning from human feedback trains a policy against a reward model.",
    "Paris is the capital of France. Two plus two is four.", "def add(a, b):\n    return a + b\n",
] * 4

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # transformers config class name
    vocab_size: int  # config.json (embedding rows)
    tokenizer_length: int  # len(tokenizer): fewer than vocab_size where the embedding rows are padded
    specials: dict[int, str]  # real id -> token
    bos: str | None
    eos: str
    pad: str | None  # the tokenizer's pad token
    config_eos: int | list[int]
    generation_eos: int | list[int]
    bos_id: int | None
    chat_template: str
    tokenizer_adds_bos: bool
    tie_embeddings: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bpe_offset: int = 0  # first id of the BPE vocabulary (Mistral puts control tokens first)
    extra_config: dict = field(default_factory=dict)

    @property
    def eos_ids(self) -> list[int]:
        ids = [self.generation_eos] if isinstance(self.generation_eos, int) else list(self.generation_eos)
        ids += [self.config_eos] if isinstance(self.config_eos, int) else list(self.config_eos)
        return list(dict.fromkeys(ids))


def _llama3_specials() -> dict[int, str]:
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
             128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
    return {i: named.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)}


QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                 **{151646 + i: f"<|qwen_special_{i}|>" for i in range(19)}}  # 151665 = Qwen2.5's length

FAMILIES: dict[str, Family] = {
    "llama3": Family("llama3", "LlamaConfig", 128256, 128256, _llama3_specials(), bos="<|begin_of_text|>",
                     eos="<|eot_id|>",
                     pad=None, config_eos=[128001, 128008, 128009], generation_eos=[128001, 128008, 128009],
                     bos_id=128000, chat_template=LLAMA3_TEMPLATE, tokenizer_adds_bos=True, tie_embeddings=False,
                     num_heads=2, num_kv_heads=1, head_dim=32, extra_config={"rope_theta": 500000.0}),
    "qwen2.5": Family("qwen2.5", "Qwen2Config", 151936, 151665, QWEN_SPECIALS, bos=None, eos="<|im_end|>",
                      pad="<|endoftext|>", config_eos=151645, generation_eos=[151645, 151643], bos_id=151643,
                      chat_template=CHATML_TEMPLATE, tokenizer_adds_bos=False, tie_embeddings=True,
                      num_heads=2, num_kv_heads=1, head_dim=32),
    "qwen3": Family("qwen3", "Qwen3Config", 151936, 151669,
                    {**QWEN_SPECIALS, **{151665 + i: f"<|qwen3_special_{i}|>" for i in range(4)}},
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", config_eos=151645,
                    generation_eos=[151645, 151643], bos_id=151643, chat_template=CHATML_TEMPLATE,
                    tokenizer_adds_bos=False, tie_embeddings=True, num_heads=4, num_kv_heads=2, head_dim=32),
    "mistral": Family("mistral", "MistralConfig", 32768, 32768,
                      {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]"}, bos="<s>", eos="</s>", pad=None,
                      config_eos=2, generation_eos=2, bos_id=1, chat_template=MISTRAL_TEMPLATE,
                      tokenizer_adds_bos=True, tie_embeddings=False, num_heads=2, num_kv_heads=1, head_dim=32,
                      bpe_offset=5, extra_config={"sliding_window": None}),
}


def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on CORPUS: its vocab (ids from 0) and merges."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _letters(number: int) -> str:
    """12 -> 'am': filler names without digits, so a random policy's filler text never looks
    like a digit answer to a rule reward."""
    out = ""
    while True:
        number, digit = divmod(number, 26)
        out = "abcdefghijklmnopqrstuvwxyz"[digit] + out
        if number == 0:
            return out


def build_tokenizer(family: Family):
    """A PreTrainedTokenizerFast with the family's special tokens at their real ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bpe_vocab, merges = _trained_bpe()
    vocab = {token: family.bpe_offset + i for token, i in bpe_vocab.items()}
    vocab.update({token: i for i, token in family.specials.items()})
    used = set(vocab.values())
    # Filler entries no text encodes to: they hold the real ids of the special tokens in place.
    vocab.update({f"<|filler_{_letters(i)}|>": i for i in range(family.tokenizer_length) if i not in used})
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials.values()])
    if family.tokenizer_adds_bos:  # as Llama-3's and Mistral's tokenizers do: encode() prepends BOS
        bos_id = vocab[family.bos]
        core.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A $B", special_tokens=[(family.bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad, unk_token=None, clean_up_tokenization_spaces=False,
                                        model_max_length=MAX_POSITIONS)
    tokenizer.chat_template = family.chat_template
    assert len(tokenizer) == family.tokenizer_length, (len(tokenizer), family.tokenizer_length)
    return tokenizer


def build_config(family: Family):
    import transformers

    cls = getattr(transformers, family.architecture)
    config = cls(vocab_size=family.vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                 num_hidden_layers=LAYERS, num_attention_heads=family.num_heads,
                 num_key_value_heads=family.num_kv_heads, head_dim=family.head_dim,
                 max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=family.tie_embeddings,
                 bos_token_id=family.bos_id, eos_token_id=family.config_eos, pad_token_id=None,
                 **family.extra_config)
    config.pad_token_id = None  # the stock configs ship without one
    return config


def build_family(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write the family's checkpoint (random weights) into `path`; returns `path`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    family, path = FAMILIES[name], Path(path)
    config = build_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=family.bos_id, eos_token_id=family.generation_eos,
                                               do_sample=True, temperature=0.7, top_p=0.8)
    model.save_pretrained(path)
    build_tokenizer(family).save_pretrained(path)
    return path


@torch.no_grad()
def force_next_token(model, token_id: int) -> None:
    """Rewrite `model`'s weights in place so greedy decoding emits `token_id` at every step.

    Residual dimension 0 carries a constant: every embedding row has 100 there, and no layer
    writes to it (row 0 of each o_proj and down_proj is zeroed). The final norm keeps only that
    dimension, so the last hidden state is (c, 0, ..., 0) with c > 0, and the logit of token v is
    c * lm_head[v, 0]: `token_id`'s row says 200, every other row 100. Works with tied embeddings.
    """
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed[:, 0] = 100.0
    head[:, 0] = 100.0
    head[token_id, 0] = embed[token_id, 0] = 200.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
