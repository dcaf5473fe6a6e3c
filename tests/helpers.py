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
