"""PPO-ptx (InstructGPT): the actor also fits pretraining text, to fight the alignment tax.

`data.pretrain` is a JSONL file with a `text` string per line, or a local `datasets` directory
(`Dataset.save_to_disk`) with a `text` column. Every actor micro-batch adds
`algo.ptx_coef × LM loss` on the next pretraining micro-batch (`PTXBatches`), seeded per rank,
reshuffled every pass. Texts longer than the PPO sequence length are cut: this is language
modelling data, not a labelled question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid_ppo.errors import InputError

TEXT_FIELD = "text"


def read_pretrain_texts(spec: str) -> list[str]:
    """Every text of a JSONL file or a `datasets` directory; ValueError naming the file and line."""
    path = Path(spec)
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if TEXT_FIELD not in dataset.column_names:
            raise InputError(f"data.pretrain {spec}: no '{TEXT_FIELD}' column (columns: {dataset.column_names})")
        texts = [t for t in dataset[TEXT_FIELD] if isinstance(t, str) and t.strip()]
    elif path.is_file():
        texts = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    texts.append(_text_of(line, f"{path}:{number}"))
    else:
        raise InputError(f"data.pretrain {spec!r} is neither a JSONL file nor a datasets directory")
    if not texts:
        raise InputError(f"data.pretrain {spec}: no texts")
    return texts


def _text_of(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get(TEXT_FIELD), str):
        raise InputError(f"{where}: expected an object with a '{TEXT_FIELD}' string")
    return row[TEXT_FIELD]


class PTXBatches:
    """Endless right-padded micro-batches `(input_ids, attention_mask)` of tokenized texts."""

    def __init__(self, texts: list[str], tokenizer, batch_size: int, max_tokens: int, seed: int):
        self.ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
        self.batch_size, self.pad_id = batch_size, tokenizer.pad_token_id
        self._rng = random.Random(f"ptx/{seed}")
        self._order: list[int] = []

    def __next__(self) -> tuple[Tensor, Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            if not self._order:
                self._order = list(range(len(self.ids)))
                self._rng.shuffle(self._order)
            rows.append(self.ids[self._order.pop()])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask


def lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
