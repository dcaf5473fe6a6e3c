"""hybrid_ppo.ops dispatch, argument errors, and the kernels' import name."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

from hybrid_ppo import ops

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_auto_picks_torch_on_cpu(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(ops, "logprobs_triton", no_kernel)
    monkeypatch.setattr(ops, "gae_triton", no_kernel)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    lp = ops.logprobs(logits, labels)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32
    out = ops.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5), gamma=1.0, lam=0.9)
    assert out.advantages.shape == out.returns.shape == (2, 5)


def test_auto_picks_triton_on_cuda():
    from hybrid_ppo_kernels._utils import HAS_TRITON

    assert ops.resolve_backend("auto", torch.device("cuda")) == ("triton" if HAS_TRITON else "torch")


def test_bad_backend_names_allowed_values():
    logits, labels = torch.randn(2, 5), torch.randint(0, 5, (2,))
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'.*'cuda'"):
        ops.logprobs(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        ops.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.0, lam=1.0, backend="numpy")


def test_bad_arguments():
    logits, labels = torch.randn(2, 5), torch.randint(0, 5, (2,))
    with pytest.raises(ValueError, match="disagree"):
        ops.logprobs(logits, labels[:1])
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="lam"):
        ops.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.0, lam=1.5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ops.gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2), gamma=1.0, lam=1.0)


def test_return_types():
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    assert isinstance(ops.logprobs(logits, labels), torch.Tensor)
    out = ops.logprobs(logits, labels, with_entropy=True)
    assert isinstance(out, ops.LogProbsWithEntropy)
    assert out.logprobs.shape == out.entropy.shape == (2, 3)
    assert torch.all(out.entropy >= 0) and torch.all(out.entropy <= torch.log(torch.tensor(7.0)) + 1e-5)


def test_torch_backend_gradients_flow():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    lp, ent = ops.logprobs(logits, torch.randint(0, 7, (2, 3)), with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_import_name_does_not_shadow_pypi_kernels():
    import hybrid_ppo_kernels

    assert pathlib.Path(hybrid_ppo_kernels.__file__).resolve().parent == REPO / "kernels" / "hybrid_ppo_kernels"
    spec = importlib.util.find_spec("kernels")
    # None (not installed), PyPI's package (origin outside our repo), or the bare folder as a namespace
    # package (origin None): never a regular package built from our kernels/ folder.
    if spec is not None and spec.origin is not None:
        assert REPO / "kernels" not in pathlib.Path(spec.origin).resolve().parents


def test_import_does_not_import_triton():
    """No import-time side effects: triton (and so its interpreter-mode choice) waits for a launch."""
    code = "import sys, hybrid_ppo.ops, hybrid_ppo_kernels.gae; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_torch_path_without_triton():
    """With triton unimportable, ops imports and the torch backend works (triton is Linux-x86 only)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from hybrid_ppo import ops\n"
        "from hybrid_ppo_kernels._utils import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "x, y = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))\n"
        "ops.logprobs(x, y, with_entropy=True)\n"
        "ops.gae(torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4), gamma=1.0, lam=0.9)\n"
        "assert ops.resolve_backend('auto', torch.device('cuda')) == 'torch'\n"
        "try:\n"
        "    ops.logprobs(x, y, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from hybrid_ppo_kernels._utils import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.logprobs(torch.randn(2, 5), torch.randint(0, 5, (2,)), backend="triton")
