"""The vLLM engine on the stock-chat-model fixtures (`model_fixtures.py`): after a sync, greedy
tokens equal HF's (tied embeddings and padded vocab rows synced right), and generation stops at
every EOS id of the family.

Runs where vLLM is installed (the vLLM venv of `.ci/run`) and is skipped elsewhere. One LLM per
family, built once for the module; each family's tests run back to back.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

from hybrid_ppo.config import load_config  # noqa: E402
from hybrid_ppo.rollout.engine import SamplingParams  # noqa: E402
from hybrid_ppo.rollout.hf_engine import HFEngine  # noqa: E402
from hybrid_ppo.rollout.vllm_engine import VLLMEngine  # noqa: E402
from model_fixtures import FAMILIES, force_next_token  # noqa: E402
from helpers import model_weights  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
CHAT = [{"role": "user", "content": "What is the largest digit in 3 7 1 9?"}]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, chat_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = request.param
    path = chat_checkpoint(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"], tokenizer("Hello world")["input_ids"]]
    engine = VLLMEngine(load_config(None, ["rollout.enforce_eager=true"]), str(path))
    yield name, path, engine, AutoModelForCausalLM.from_pretrained(path), tokenizer, prompts
    del engine


def _both(path, engine, model, prompts, sampling=GREEDY):
    engine.load_weights(model_weights(model))
    hf = HFEngine(str(path), torch.float32, torch.device("cpu"))
    hf.load_weights(model_weights(model))
    return engine.generate(prompts, sampling), hf.generate(prompts, sampling)


def test_greedy_tokens_equal_hf_after_a_sync(family):
    name, path, engine, model, _, prompts = family
    ours, theirs = _both(path, engine, model, prompts)
    assert torch.equal(ours.response_ids, theirs.response_ids), name
    assert torch.equal(ours.response_mask, theirs.response_mask)


def test_generation_stops_at_every_eos_id(family):
    name, path, engine, model, _, prompts = family
    for stop in FAMILIES[name].eos_ids:
        forced = model.__class__(model.config)
        forced.load_state_dict(model.state_dict())
        force_next_token(forced, stop)
        ours, theirs = _both(path, engine, forced, prompts)
        assert ours.response_ids[:, 0].tolist() == [stop] * len(prompts), (name, stop)
        assert ours.response_mask.sum(-1).tolist() == [1] * len(prompts)
        assert (ours.response_ids[:, 1:] == engine.special.pad_id).all()
        assert torch.equal(ours.response_ids, theirs.response_ids)


def test_padded_vocab_rows_are_synced_and_sampled(family):
    """Qwen's rows past the tokenizer: the engine must sample them exactly as HF does."""
    name, path, engine, model, tokenizer, prompts = family
    if FAMILIES[name].vocab_size == len(tokenizer):
        pytest.skip(f"{name} has no padded vocab rows")
    forced = model.__class__(model.config)
    forced.load_state_dict(model.state_dict())
    past = len(tokenizer) + 11
    force_next_token(forced, past)
    ours, theirs = _both(path, engine, forced, prompts)
    assert (ours.response_ids == past).all() and torch.equal(ours.response_ids, theirs.response_ids)
