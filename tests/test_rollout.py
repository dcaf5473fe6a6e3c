"""The HF rollout engine behind the vLLM-shaped protocol, bucketed weight sync, and rule rewards."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from hybrid_ppo.memory.plan import State
from hybrid_ppo.memory.residency import EngineResidency
from hybrid_ppo.roles.reward import RewardError, RuleReward, load_reward_fn
from hybrid_ppo.rollout.engine import SamplingParams, left_pad, logprob_diff_max, response_mask
from hybrid_ppo.rollout.hf_engine import HFEngine
from helpers import model_weights


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    model.save_pretrained(path)
    return model, tokenizer, str(path)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 0, 0]])
    assert response_mask(ids, eos_ids=[2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_logprob_diff_max_looks_at_sampled_tokens_only():
    engine = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.1, -0.1]])
    actor = torch.tensor([[-1.1, -2.0, 0.0], [-0.5, -0.4, -0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert logprob_diff_max(engine, actor, mask) == pytest.approx(0.3)
    assert logprob_diff_max(engine, actor, torch.zeros_like(mask)) == 0.0


def test_engine_logprobs_are_the_models_own_at_the_sampling_temperature(model_and_tokenizer):
    model, tokenizer, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    prompts = [tokenizer("max 1 2 3 4 =")["input_ids"], tokenizer("max 9 =")["input_ids"]]
    sampling = SamplingParams(max_new_tokens=4, temperature=0.7, seed=0)
    out = engine.generate(prompts, sampling)
    for row, prompt in enumerate(prompts):
        n = int(out.response_mask[row].sum())
        ids = torch.tensor([prompt + out.response_ids[row, :n].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1] / sampling.temperature
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(out.logprobs[row, :n], expected, atol=1e-5, rtol=1e-5)
        assert (out.logprobs[row, n:] == 0).all()


def test_engine_needs_weights_from_the_actor(model_and_tokenizer):
    model, tokenizer, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    prompts = [tokenizer("max 1 2 3 4 =")["input_ids"], tokenizer("max 9 1 =")["input_ids"]]
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0)
    with pytest.raises(RuntimeError, match="sync from the actor"):
        engine.generate(prompts, greedy)
    engine.load_weights(model_weights(model))
    out = engine.generate(prompts, greedy)
    assert out.response_ids.shape == (2, 3) and out.response_mask.shape == (2, 3)
    # the engine's greedy tokens are the source model's greedy tokens
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    kept = out.response_mask.bool()
    assert torch.equal(out.response_ids[kept], expected[:, :out.response_ids.shape[1]][kept])


def test_a_seed_decides_the_sample_and_leaves_the_global_rng_alone(model_and_tokenizer):
    model, tokenizer, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    prompts = [tokenizer("max 1 2 3 4 =")["input_ids"]] * 16

    def sample(seed):
        return engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=seed)).response_ids

    torch.manual_seed(5)
    first = sample(11)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(sample(11), first) and torch.equal(torch.rand(1), after)  # seeded inside a fork
    assert not torch.equal(sample(12), first)


def test_sleep_levels(model_and_tokenizer):
    model, tokenizer, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    prompts = [tokenizer("max 3 1 4 1 =")["input_ids"]]
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
    before = engine.generate(prompts, greedy).response_ids

    engine.sleep(1)  # weights to the host
    assert all(p.numel() == 0 for p in engine.model.parameters())
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, greedy)
    engine.wake_up(["weights", "kv_cache"])
    assert torch.equal(engine.generate(prompts, greedy).response_ids, before)

    engine.sleep(2)  # weights discarded: waking them is not enough, a sync must refill them
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate(prompts, greedy)
    engine.load_weights(model_weights(model))
    assert torch.equal(engine.generate(prompts, greedy).response_ids, before)
    with pytest.raises(ValueError, match="unknown wake_up tag"):
        engine.wake_up(["optimizer"])


def test_engine_rejects_foreign_weights(model_and_tokenizer):
    _, _, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("not.a.weight", torch.zeros(1))])
    name, tensor = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(name, torch.zeros(tensor.shape[0] + 1))])


def test_engine_residency_drops_kv_alone_through_a_level1_sleep(model_and_tokenizer):
    model, _, path = model_and_tokenizer
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    residency = EngineResidency(engine, sleep_level=2)
    residency.offload(frozenset({State.KV_CACHE}))
    assert residency.resident == {State.WEIGHTS} and engine.awake == {"weights"}
    assert all(p.numel() > 0 for p in engine.model.parameters())  # weights survived
    with pytest.raises(RuntimeError, match="already offloaded"):
        residency.offload(frozenset({State.KV_CACHE}))


def test_rule_reward_checks_what_the_function_returns(monkeypatch):
    module = types.ModuleType("fake_rewards")
    module.raises = lambda p, r, l: 1 / 0
    module.short = lambda p, r, l: [1.0] * (len(r) - 1)
    module.nan = lambda p, r, l: [1.0, math.nan]
    module.text = lambda p, r, l: [1.0, "1"]
    module.good = lambda p, r, l: [float(len(x)) for x in r]
    monkeypatch.setitem(sys.modules, "fake_rewards", module)
    prompts, responses = ["a", "b"], ["x", "yy"]
    assert RuleReward("fake_rewards:good")(prompts, responses, None).tolist() == [1.0, 2.0]
    with pytest.raises(RewardError, match="raised ZeroDivisionError"):
        RuleReward("fake_rewards:raises")(prompts, responses, None)
    with pytest.raises(RewardError, match="returned 1 scores for 2 responses"):
        RuleReward("fake_rewards:short")(prompts, responses, None)
    with pytest.raises(RewardError, match="nan for sample 1 .*'yy'"):
        RuleReward("fake_rewards:nan")(prompts, responses, None)
    with pytest.raises(RewardError, match="'1' for sample 1"):
        RuleReward("fake_rewards:text")(prompts, responses, None)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_reward_fn("no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward_fn("fake_rewards:missing")
