"""Stock-chat-model fixtures (`model_fixtures.py`) through the HF engine and the pad/EOS resolver.

The vLLM engine runs the same families in `tests/test_vllm_engine.py` (vLLM venv)."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_ppo.rollout.engine import SamplingParams, response_mask
from hybrid_ppo.rollout.hf_engine import HFEngine
from hybrid_ppo.special_tokens import SpecialTokens, resolve_special_tokens, special_tokens_from
from model_fixtures import FAMILIES, force_next_token
from helpers import model_weights

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]


def _engine(path, model) -> HFEngine:
    engine = HFEngine(str(path), torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    return engine


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_checkpoint_has_the_real_quirks(chat_checkpoint, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, path = FAMILIES[name], chat_checkpoint(name)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    assert config.get("pad_token_id") is None and config["vocab_size"] == family.vocab_size
    assert config["eos_token_id"] == family.config_eos and generation["eos_token_id"] == family.generation_eos
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tokenizer) == family.tokenizer_length <= model.config.vocab_size
    assert (tokenizer.pad_token is None) == (family.pad is None)
    assert tokenizer.convert_tokens_to_ids(family.eos) in family.eos_ids
    for token_id, token in list(family.specials.items())[:8]:
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tied == family.tie_embeddings
    assert model.config.head_dim == family.head_dim


@pytest.mark.parametrize("name, pad_id, pad_source", [
    ("llama3", 128001, "eos"), ("qwen2.5", 151643, "tokenizer"), ("qwen3", 151643, "tokenizer"), ("mistral", 2, "eos"),
])
def test_pad_and_eos_resolve_once_from_the_checkpoint(chat_checkpoint, name, pad_id, pad_source):
    special = resolve_special_tokens(chat_checkpoint(name))
    assert special == SpecialTokens(pad_id, tuple(FAMILIES[name].eos_ids), pad_source)


def test_pad_resolution_order_tokenizer_then_config_then_eos():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    config = Obj(eos_token_id=[5, 6], pad_token_id=9)
    assert special_tokens_from(config, Obj(eos_token_id=[6, 7]), Obj(eos_token_id=5, pad_token_id=3)) == \
        SpecialTokens(3, (6, 7, 5), "tokenizer")
    assert special_tokens_from(config, None, Obj(eos_token_id=5, pad_token_id=None)) == SpecialTokens(9, (5, 6), "config")
    assert special_tokens_from(Obj(eos_token_id=4), None, None) == SpecialTokens(4, (4,), "eos")
    with pytest.raises(ValueError, match="no EOS id"):
        special_tokens_from(Obj(eos_token_id=None), None, None, where="ckpt")


def test_response_mask_ends_at_the_first_of_several_eos_ids():
    eos = [128001, 128008, 128009]
    ids = torch.tensor([[7, 128009, 128001, 0], [7, 8, 128008, 128009], [7, 8, 9, 10], [128001, 5, 6, 7]])
    assert response_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chat_template_renders_once_without_double_bos(chat_checkpoint, name):
    from transformers import AutoTokenizer

    from hybrid_ppo.data import render_prompt

    family, tokenizer = FAMILIES[name], AutoTokenizer.from_pretrained(chat_checkpoint(name))
    text = render_prompt(tokenizer, CHAT if name != "mistral" else CHAT[1:], None, "x.jsonl:1")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if family.bos is not None:
        assert ids[0] == family.bos_id and ids.count(family.bos_id) == 1
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_engine_generates_and_stops_on_every_eos_id(chat_checkpoint, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, path = FAMILIES[name], chat_checkpoint(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer("Hello world")["input_ids"], tokenizer("The quick brown fox")["input_ids"]]
    model = AutoModelForCausalLM.from_pretrained(path)
    out = _engine(path, model).generate(prompts, GREEDY)
    assert out.response_ids.shape == (2, GREEDY.max_new_tokens)
    with torch.no_grad():  # the engine's greedy tokens are the loaded model's
        expected = model.generate(torch.tensor([prompts[1]]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                  eos_token_id=family.eos_ids, pad_token_id=family.eos_ids[0])[0, len(prompts[1]):]
    assert out.response_ids[1, :len(expected)].tolist() == expected.tolist()

    for stop in family.eos_ids:
        force_next_token(model, stop)
        forced = _engine(path, model).generate(prompts, GREEDY)
        assert forced.response_ids[:, 0].tolist() == [stop, stop]
        assert forced.response_mask.tolist() == [[1] + [0] * (GREEDY.max_new_tokens - 1)] * 2


def test_a_sampled_id_past_the_tokenizer_is_a_token_without_text(chat_checkpoint):
    """Padded vocab (Qwen: 151936 rows, 151665 tokens): such an id is part of the policy, as in
    vLLM and in the actor's log-probs (all three use every row), not a stop; it decodes to ''."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = chat_checkpoint("qwen2.5")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    past = len(tokenizer) + 7
    force_next_token(model, past)
    out = _engine(path, model).generate([tokenizer("Hello")["input_ids"]], GREEDY)
    assert out.response_ids[0].tolist() == [past] * GREEDY.max_new_tokens and out.response_mask.all()
    assert tokenizer.decode(out.response_ids[0], skip_special_tokens=True) == ""


def test_decoded_responses_end_before_any_stop_token_without_special_tokens(chat_checkpoint):
    from transformers import AutoTokenizer

    from hybrid_ppo.trainer import decode_responses

    path = chat_checkpoint("llama3")
    tokenizer, special = AutoTokenizer.from_pretrained(path), resolve_special_tokens(path)
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    rows = [[*hello, 128009, 128001, 5], [*hello, header, 128008, 7, 7], [*hello, 128000, 9, 9, 9]]
    ids = torch.tensor([r[:5] + [special.pad_id] * (5 - len(r[:5])) for r in rows])
    texts = decode_responses(tokenizer, special, ids, response_mask(ids, special.eos_ids))
    assert texts[0] == texts[1] == "Hello" and texts[2].startswith("Hello") and "<|" not in texts[2]
