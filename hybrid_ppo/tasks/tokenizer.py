"""The built-in tokenizer: a word-level vocabulary over the max-digit task, built in code.

No download and no training: every word the task can produce (the prompt keyword, `=`, the ten
digits) gets one id, after the special tokens. The tokenizer splits on whitespace, adds `<bos>` in
front of every encoded text, and decodes by joining words with single spaces, so
`decode(encode(text), skip_special_tokens=True) == " ".join(text.split())` for in-vocabulary text.

Padding is on the left, as generation needs: every prompt in a batch then ends at the same column
and the response starts right after it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
TASK_WORDS: tuple[str, ...] = ("max", "=")
"""Words of the max-digit prompt besides digits; see `hybrid_ppo.tasks.max_digit`."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer: ids 0-3 are `<pad> <bos> <eos> <unk>`, then digits 0-9, then `max`, `=`."""
    words = SPECIAL_TOKENS + DIGITS + TASK_WORDS
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
