"""Suite-wide settings: a JIT-op cache shared by every test (DeepSpeed builds its CPU ops once per
machine, not once per test), offline Hugging Face, `gpu` tests skipped cleanly without CUDA, and
the stock-chat-model checkpoints of `model_fixtures.py`, each built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# One cache per venv: an op's build files name the venv's torch headers, so .venv and .venv-vllm
# sharing a cache would rebuild each other's ops (and a build killed midway leaves a lock behind).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions" / Path(sys.prefix).name))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`chat_checkpoint("qwen2.5")` -> a local HF directory shaped like that family's stock
    instruct model (see `model_fixtures.FAMILIES`), built on first use and shared by the session."""
    from model_fixtures import FAMILIES, build_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in FAMILIES:
            raise KeyError(f"no fixture family {name!r}; known: {sorted(FAMILIES)}")
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The builtin tiny Llama (random init, seed 0) with its tokenizer, as a local HF directory."""
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_tiny_llama(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
