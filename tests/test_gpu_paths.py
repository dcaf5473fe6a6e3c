"""GPU-only paths of the roles, for a CUDA machine (skipped cleanly without one):

* the actor's loss path: Triton log-probs with the in-place backward inside a real model's
  backward gives the same gradients as the torch reference;
* residency moves free device memory for real (on CPU they can only move host memory).
"""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.memory.plan import State
from hybrid_ppo.memory.residency import ModuleResidency

pytestmark = pytest.mark.gpu


def _tiny_model(device: str):
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    return build_tiny_llama(build_tokenizer(), seed=0).to(device)


def _sequences(device: str) -> Sequences:
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (8, 12), device=device)
    attention = torch.ones_like(tokens)
    attention[0, :3] = 0  # a left-padded prompt
    return Sequences(tokens, attention, torch.ones(8, 4, dtype=torch.long, device=device))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inplace_triton_backward_matches_torch_inside_a_model(temperature):
    from hybrid_ppo import ops
    from hybrid_ppo.roles.forward import response_logits

    model, seq = _tiny_model("cuda"), _sequences("cuda")
    grads = {}
    for backend, inplace in (("torch", False), ("triton", True)):
        model.zero_grad()
        lp, ent = ops.logprobs(response_logits(model, seq), seq.responses, temperature=temperature,
                               with_entropy=True, backend=backend, inplace_backward=inplace)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_module_offload_frees_device_memory():
    model = torch.nn.Linear(4096, 4096, device="cuda")
    residency = ModuleResidency(model, torch.device("cuda"))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    residency.offload(frozenset({State.WEIGHTS}))
    torch.cuda.empty_cache()
    freed = before - torch.cuda.memory_allocated()
    assert freed >= 4096 * 4096 * 4  # the weight matrix left the device
    residency.reload(frozenset({State.WEIGHTS}))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() >= before - 1024
