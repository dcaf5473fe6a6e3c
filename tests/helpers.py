"""Small helpers the tests share (fixtures that build checkpoints live in conftest.py)."""

from __future__ import annotations

from torch import Tensor, nn

from hybrid_ppo.config import Config, load_config

IN_PROCESS = ("placement.executor=local", "placement.num_gpus=1")
"""Every role in the test's own process on one (fake) GPU: no Ray, the quickest real job."""


def tiny_cfg(*overrides: str) -> Config:
    """The default tiny job's config, run in process, with `overrides` (dotted `key=value`)."""
    return load_config(None, [*IN_PROCESS, *overrides])


def model_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """A model's parameters as the (HF name, full tensor) pairs an engine's load_weights takes,
    copied so the model may change after."""
    return [(name, param.detach().clone()) for name, param in model.named_parameters()]


def ragged_sequences(gen: "torch.Generator") -> "Sequences":
    """8 prompts of 3 tokens and responses of 1 to 4 tokens (right-padded to 4), drawn from `gen`:
    micro-batches of 2 hold unequal token counts."""
    import torch

    from hybrid_ppo.algo.experience import Sequences

    prompt = torch.randint(4, 14, (8, 3), generator=gen)
    response = torch.randint(4, 14, (8, 4), generator=gen)
    lengths = torch.tensor([1, 4, 2, 4, 1, 3, 4, 2])
    action = (torch.arange(4)[None, :] < lengths[:, None]).long()
    tokens = torch.cat([prompt, torch.where(action.bool(), response, 0)], 1)
    return Sequences(tokens, torch.cat([torch.ones_like(prompt), action], 1), action)


def grouped_sequences(vocab: int, gen: "torch.Generator", prompt_lengths=(5, 2, 7), samples: int = 3,
                      max_response: int = 5) -> "Sequences":
    """Groups of `samples` responses (1 to `max_response` tokens, right-padded; some end early) to
    prompts of `prompt_lengths` real tokens (left-padded to the longest), rows g*samples.. of group g:
    the layout GRPO's rollouts have."""
    import torch

    from hybrid_ppo.algo.experience import Sequences

    P, R, B = max(prompt_lengths), max_response, len(prompt_lengths) * samples
    prompt_mask = torch.tensor([[int(c >= P - p) for c in range(P)] for p in prompt_lengths for _ in range(samples)])
    prompts = torch.randint(1, vocab, (len(prompt_lengths), P), generator=gen).repeat_interleave(samples, 0)
    lengths = torch.randint(1, R + 1, (B,), generator=gen)
    lengths[0] = R  # one response as long as the block
    action = (torch.arange(R)[None, :] < lengths[:, None]).long()
    responses = torch.randint(1, vocab, (B, R), generator=gen)
    tokens = torch.cat([prompts * prompt_mask, responses * action], 1)
    return Sequences(tokens, torch.cat([prompt_mask, action], 1), action)
