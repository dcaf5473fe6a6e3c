"""Supervised warm-up of a built-in model on deliberately noisy labels.

Why noisy. PPO can only reinforce answers the policy already samples. A randomly initialised
model never writes a well-formed answer, so it needs a supervised start; but a start trained on
clean labels would already be right and leave PPO nothing to show. So each warm-up label is the
correct answer with probability `teacher_accuracy` and otherwise the answer of a weak annotator
(`max_digit.heuristic_label`: the first digit). The model learns both the format (`<digit> EOS`)
and the right feature, but ranks the annotator's answer first: greedy decoding is mostly wrong,
while sampling still finds the right answer often enough for a rule reward to teach it.

Plain torch: AdamW, cross-entropy on the answer tokens (the digit and EOS) only, a short linear
learning-rate ramp, deterministic given the seed.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hybrid_ppo.config import WarmupConfig
from hybrid_ppo.tasks import max_digit
from hybrid_ppo.tasks.base import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt and padding)
LOG_EVERY = 50
RAMP_FRACTION = 0.1
"""Share of the steps over which the learning rate ramps linearly from 0 to `lr`."""


def noisy_labels(examples: list[Example], teacher_accuracy: float, seed: int) -> list[Example]:
    """Each label kept with probability `teacher_accuracy`, else replaced by the heuristic's."""
    rng = random.Random(f"warmup-labels/{seed}")
    return [
        ex if rng.random() < teacher_accuracy else Example(ex.prompt, max_digit.heuristic_label(ex.prompt))
        for ex in examples
    ]


def encode_sft_batch(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> dict[str, torch.Tensor]:
    """`<bos> prompt answer <eos>`, right-padded; labels are IGNORE_INDEX except on `answer <eos>`.

    Padding goes on the right so that every real token keeps the position it has at generation
    time (`<bos>` at 0); the padding itself is masked out of attention and loss.
    """
    rows, label_rows = [], []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt)["input_ids"]
        answer_ids = tokenizer(ex.label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def warm_up(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: WarmupConfig, seed: int
) -> PreTrainedModel:
    """Train `model` in place for `cfg.steps` AdamW steps on noisy max-digit labels; returns it in eval mode."""
    if cfg.steps == 0:
        return model.eval()
    examples = max_digit.make_examples("train", cfg.steps * cfg.batch_size, seed)
    examples = noisy_labels(examples, cfg.teacher_accuracy, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ramp_steps = max(1, math.ceil(RAMP_FRACTION * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / ramp_steps))
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(cfg.steps):
        batch = encode_sft_batch(tokenizer, examples[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item()  # a sync point; negligible on CPU
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps:
            window = (step % LOG_EVERY) + 1
            logger.info("warmup step %d/%d  loss %.4f  (%.1fs)", step + 1, cfg.steps, running / window,
                        time.perf_counter() - start)
            running = 0.0
    return model.eval()
