"""Weight sync, actor rank i -> engine worker on GPU i through shared memory (the CPU transport of
the same protocol CUDA IPC uses), under real Ray with 2 fake GPUs, real DeepSpeed and the HF engine.

The engines' greedy tokens after a sync are compared with greedy tokens from the actor's own
weights (its HF checkpoint, written by `Actor.save`), so a bucket lost, cut wrong or loaded into
the wrong parameter shows up as different tokens.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.config import ConfigError, load_config
from hybrid_ppo.rollout.engine import SamplingParams
from hybrid_ppo.rollout.hf_engine import HFEngine
from hybrid_ppo.rollout.sync_driver import choose_transport, sync_weights
from hybrid_ppo.rollout.weight_sync import (BucketHandle, BucketStager, OpenedBuffers, WeightSyncError, bucket_plan, layer_key,
                                            opened_bucket, probe_opened, probe_tensor, staging_mappings)
from hybrid_ppo.rollout.worker import RolloutWorker

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
TEXTS = ("max 1 2 3 4 =", "max 9 1 =", "max 5 =", "max 3 1 4 1 5 9 2 6 =")
BUCKET_BYTES = 150 << 10  # the tiny Llama (~430 KiB fp32) in several buckets, not a multiple of it


# -- the plan and the transport, no Ray ------------------------------------------------------------
def test_buckets_hold_whole_layers_in_order():
    names = ["model.embed_tokens.weight",
             *(f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                                  "mlp.gate_proj.weight", "mlp.up_proj.weight")),
             "model.norm.weight", "lm_head.weight"]
    sizes = [400] + [100] * 12 + [10, 400]
    plan = bucket_plan(names, sizes, bucket_bytes=850)
    assert [i for bucket in plan for i in bucket] == list(range(len(names)))  # everything, once, in order
    for bucket in plan:
        keys = [layer_key(names[i]) for i in bucket]
        assert all(keys.count(k) == sum(layer_key(n) == k for n in names) for k in set(keys))  # no layer split
        assert sum(sizes[i] for i in bucket) <= 850
    big = bucket_plan(names, sizes, bucket_bytes=250)  # a layer (400) over the limit goes alone, whole
    assert [len(b) for b in big if "layers.0" in names[b[0]]] == [4]


def test_shared_memory_round_trip_casts_and_cleans_up():
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7))]
    stager = BucketStager(torch.device("cpu"), torch.bfloat16, capacity_numel=32, slots=2)
    handles = [stager.stage(k, named) for k in range(2)]
    assert handles[0].buffer != handles[1].buffer  # two slots, two buffers
    assert staging_mappings()[os.getpid()] == {handles[0].buffer, handles[1].buffer}
    with opened_bucket(handles[1]) as opened:
        for (name, tensor), (got_name, got) in zip(named, opened):
            assert got_name == name and got.dtype == torch.bfloat16
            assert torch.equal(got, tensor.to(torch.bfloat16))
    del opened, got  # views keep a mapping alive
    stager.close()
    assert os.getpid() not in staging_mappings()
    with pytest.raises(FileNotFoundError, match="staging buffer .* is gone"):
        with opened_bucket(handles[0]):
            pass
    reused = os.memfd_create("not-a-staging-buffer")  # takes the closed buffer's descriptor number
    try:
        assert handles[0].location.endswith(f"/fd/{reused}")
        with pytest.raises(FileNotFoundError, match="staging buffer .* is gone"):
            with opened_bucket(handles[0]):
                pass
    finally:
        os.close(reused)


def test_engine_opens_a_buffer_once_and_reads_every_bucket_staged_in_it():
    stager = BucketStager(torch.device("cpu"), torch.float32, capacity_numel=64, slots=1)
    opened = OpenedBuffers()
    try:
        for k, size in enumerate((40, 64, 7)):  # the buffer's bytes change under one mapping
            named = [("w", torch.randn(size))]
            with opened.bucket(stager.stage(k, named)) as got:
                assert torch.equal(got[0][1], named[0][1])
        assert len(opened._flat) == 1
        del got
        opened.close()
        buffer = stager.stage(0, named).buffer
        assert Path("/proc/self/maps").read_text().count(buffer) == 1  # the stager's mapping; the engine's is gone
    finally:
        stager.close()


@pytest.mark.parametrize(("buckets", "slots"), [(5, 1), (5, 2), (1, 2)])
def test_every_slot_handle_made_is_opened_once_per_sync(buckets, slots):
    """CUDA IPC counts opens: a handle the engine never opens keeps its buffer from being freed
    (`BucketStager._slot_location`). So the stager makes one per slot it uses, sends it with every
    bucket staged there, and the engine opens each once: the counts must match. The CPU transport
    runs the same code; only what a location is differs."""
    stager = BucketStager(torch.device("cpu"), torch.float32, capacity_numel=16, slots=slots)
    opened = OpenedBuffers()
    try:
        handles = []
        for k in range(buckets):
            handle = stager.stage(k, [("w", torch.full((16,), float(k)))])
            handles.append(handle)
            with opened.bucket(handle) as got:
                assert torch.equal(got[0][1], torch.full((16,), float(k)))
        assert stager.shared_handles == opened.opened == min(buckets, slots)
        assert len({h.location for h in handles}) == min(buckets, slots)  # the same bytes, bucket after bucket
        del got
        opened.close()
    finally:
        stager.close()


def test_a_probe_opens_when_the_transport_works_and_says_why_when_not():
    stager = BucketStager(torch.device("cpu"), torch.float32, 16, 1)
    try:
        assert probe_opened(stager.stage(0, [("probe", probe_tensor())])) is None
        assert probe_opened(stager.stage(0, [("probe", probe_tensor() + 1)])) == "the probe bucket read back different values"
        gone = stager.stage(0, [("probe", probe_tensor())])
    finally:
        stager.close()
    assert probe_opened(gone).startswith("FileNotFoundError: bucket 1 (probe .. probe, 0.0 MiB): staging buffer")


@pytest.mark.gpu
def test_the_host_transport_on_cuda_stages_in_host_memory_and_loads_to_the_device():
    """`rollout.weight_sync_transport=host`: the CPU path's code, with device tensors on both ends."""
    stager = BucketStager(torch.device("cuda"), torch.bfloat16, 4096, 1, on_host=True)
    try:
        named = [("a", torch.randn(64, 32, device="cuda"))]
        handle = stager.stage(0, named)
        assert handle.transport == "shm" and stager.kept_between_syncs
        with opened_bucket(handle, torch.device("cuda", 0)) as got:
            assert torch.equal(got[0][1].to("cuda"), named[0][1].to(torch.bfloat16))
        del got
    finally:
        stager.close()


# -- the whole protocol under Ray -------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint():
    from hybrid_ppo.tasks.tiny_model import build_tiny_llama
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    path = tempfile.mkdtemp(prefix="hppo_ws", dir="/tmp")  # short: Ray's socket paths live under it
    tokenizer = build_tokenizer()
    build_tiny_llama(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    yield path, [tokenizer(t)["input_ids"] for t in TEXTS]
    shutil.rmtree(path, ignore_errors=True)


def _config(cache: str, zero_stage: int, *extra: str):
    return load_config(None, ["placement.num_gpus=2", f"train.zero_stage={zero_stage}", f"logging.cache_dir={cache}",
                              "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=4",
                              *extra])


def _greedy_from_actor(actor, path: str, prompts, where: str) -> torch.Tensor:
    """Greedy tokens of the actor's current weights, read back from its own HF checkpoint."""
    from transformers import AutoModelForCausalLM

    actor.call("save", where)
    model = AutoModelForCausalLM.from_pretrained(where)
    engine = HFEngine(path, torch.float32, torch.device("cpu"))
    engine.load_weights((n, p.detach()) for n, p in model.named_parameters())
    return engine.generate(prompts, GREEDY).response_ids


def _engines_greedy(rollout, prompts) -> list[torch.Tensor]:
    return [g.response_ids for g in rollout.call("generate", prompts, GREEDY)]


def _train_step(actor, cfg) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (8, 10))
    seq = Sequences(tokens, torch.ones_like(tokens), torch.ones(8, 4, dtype=torch.long))
    old = torch.cat(actor.call_each("logprobs", [(s,) for s in seq.shard(2)]))
    zeros = torch.zeros_like(old)
    experience = Experience.build(seq, old_logprobs=old, ref_logprobs=old, values=zeros, rewards=zeros,
                                  advantages=torch.randn(old.shape) * 5, returns=zeros)
    actor.call_each("train", [(shard, 0) for shard in experience.shard(2)])


class DiesOnSecondBucket(RolloutWorker):
    """Fault injection around the real engine: its process exits when bucket 1 arrives."""

    def load_bucket(self, handles):
        if handles[0]["index"] == 1:
            os._exit(1)
        return super().load_bucket(handles)


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "tp", "zero_stage"),
                         [("hf", 1, 2), ("hf", 1, 3), ("vllm", 1, 2), ("vllm", 1, 3), ("vllm", 2, 2)])
def test_sync_delivers_the_actors_weights_to_every_engine(checkpoint, tmp_path, zero_stage, engine, tp):
    """vLLM cases run where vLLM is installed (the vLLM venv in CI: .ci/run). With TP=2 the one
    engine's two workers each take the handle of the actor rank on their GPU."""
    from hybrid_ppo.executor.ray import RayExecutor
    from hybrid_ppo.roles.actor import Actor

    if engine == "vllm":
        pytest.importorskip("vllm")
    path, prompts = checkpoint
    cache = tempfile.mkdtemp(prefix="hppo", dir="/tmp")
    cfg = _config(cache, zero_stage, f"rollout.engine={engine}", "rollout.enforce_eager=true",
                  f"rollout.tensor_parallel_size={tp}")
    shm_before = set(os.listdir("/dev/shm"))
    executor = RayExecutor(cfg).start()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    try:
        rollout = executor.spawn("rollout", RolloutWorker, path)
        actor = executor.spawn("actor", Actor, path)

        assert choose_transport(actor, rollout, "auto", tp) == "host"  # no CUDA here: host, as the trainer decides
        with pytest.raises(ConfigError, match="weight_sync_transport.*not on CUDA"):
            choose_transport(actor, rollout, "cuda_ipc", tp)
        stats = sync_weights(actor, rollout, tp, bucket_bytes=BUCKET_BYTES, transport="host")
        assert stats.buckets >= 3 and stats.bytes_per_engine % BUCKET_BYTES != 0
        actor_pids = set(ray.get([h.__ray_call__.remote(_pid) for h in actor.members]))
        assert set(staging_mappings()) == actor_pids  # the engines closed them; the actor ranks keep them
        initial = _greedy_from_actor(actor, path, prompts, str(tmp_path / "initial"))
        for got in _engines_greedy(rollout, prompts):
            assert torch.equal(got, initial)

        _train_step(actor, cfg)
        sync_weights(actor, rollout, tp, bucket_bytes=BUCKET_BYTES, slots=2)  # double-buffered: same result
        trained = _greedy_from_actor(actor, path, prompts, str(tmp_path / "trained"))
        assert not torch.equal(trained, initial), "the training step should change the greedy tokens"
        for got in _engines_greedy(rollout, prompts):
            assert torch.equal(got, trained)

        if zero_stage == 2 and engine == "hf":  # full parameters on each rank: put the initial ones back, sync
            from transformers import AutoModelForCausalLM

            initial_state = {n: p.detach() for n, p in
                             AutoModelForCausalLM.from_pretrained(tmp_path / "initial").named_parameters()}
            _restore_all(actor, initial_state)
            sync_weights(actor, rollout, 1, bucket_bytes=BUCKET_BYTES)
            for got in _engines_greedy(rollout, prompts):
                assert torch.equal(got, initial)

            dying = executor.spawn("rollout", DiesOnSecondBucket, path)
            start = time.monotonic()
            died = r"rollout engine [01] failed on bucket 2 \(model\.layers\.0\..* of \d+: .*process died during load_bucket"
            with pytest.raises(WeightSyncError, match=died):
                sync_weights(actor, dying, 1, bucket_bytes=BUCKET_BYTES, timeout_s=60)
            assert time.monotonic() - start < 60
        assert set(staging_mappings()) == actor_pids
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        executor.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    assert staging_mappings() == {}  # gone with the processes that held them
    # Nothing named is left either: not by DeepSpeed's CPU all-reduce, not by vLLM's queues.
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def _restore(actor_instance, state: dict[str, torch.Tensor]) -> None:
    """Runs inside an actor rank (ZeRO-2: full parameters): overwrite its weights."""
    with torch.no_grad():
        for name, param in actor_instance.engine.module.named_parameters():
            param.copy_(state[name])


def _pid(_instance) -> int:
    return os.getpid()


def _restore_all(actor, state) -> None:
    ray.get([h.__ray_call__.remote(_restore, state) for h in actor.members])


def _open_in_child(handle, expected, queue) -> None:
    """Runs in a second process on the same GPU: opens the CUDA IPC handle as an engine would."""
    try:
        with opened_bucket(handle) as named:
            ok = all(torch.equal(t.cpu(), expected[n]) for n, t in named)
        queue.put(ok)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put(repr(err))


@pytest.mark.gpu
def test_cuda_ipc_handle_opens_in_another_process_on_the_same_gpu():
    import torch.multiprocessing as mp

    named = [("a", torch.randn(64, 32, device="cuda")), ("b", torch.randn(7, device="cuda"))]
    stager = BucketStager(torch.device("cuda"), torch.bfloat16, capacity_numel=4096, slots=1)
    handle = stager.stage(0, named)
    assert handle.transport == "cuda_ipc" and len(handle.to_wire()["location"]) < 4096  # a handle, not data
    expected = {n: t.to(torch.bfloat16).cpu() for n, t in named}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(BucketHandle.from_wire(handle.to_wire()), expected, queue))
    child.start()
    result = queue.get(timeout=120)
    child.join(timeout=60)
    stager.close()
    assert result is True, result


def _sync_in_child(requests, replies) -> None:
    """An engine in another process: per sync, opens each staged slot once and reads every bucket."""
    torch.cuda.init()
    try:
        while (handles := requests.get(timeout=120)) is not None:
            buffers = OpenedBuffers(torch.device("cuda", 0))
            total = 0.0
            for handle in handles:
                with buffers.bucket(handle) as named:
                    total += sum(float(t.float().sum()) for _, t in named)
            buffers.close()
            replies.put((total, torch.cuda.memory_reserved()))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the test
        replies.put(repr(err))


def _one_sync(stager_args, buckets, open_buckets) -> float:
    stager = BucketStager(*stager_args)
    handles = [stager.stage(k, named) for k, named in enumerate(buckets)]
    total = open_buckets(handles)
    stager.close()  # as Actor.end_weight_sync on CUDA: freed after every sync, then ipc_collect + empty_cache
    return total


SYNCS = 50
BUCKET_NUMEL = 8 << 20  # 16 MiB of bf16 per bucket: a leak of one per sync is 800 MiB over the run


def _buckets():
    return [[("w", torch.full((BUCKET_NUMEL,), float(k + 1), device="cuda"))] for k in range(3)]


@pytest.mark.gpu
def test_fifty_syncs_in_one_process_leave_reserved_memory_flat():
    """The local executor with the HF engine: actor and engine share a process (`_open_own_buffer`)."""
    buckets, args = _buckets(), (torch.device("cuda"), torch.bfloat16, BUCKET_NUMEL, 2)

    def open_here(handles):
        buffers = OpenedBuffers(torch.device("cuda", 0))
        total = 0.0
        for handle in handles:
            with buffers.bucket(handle) as named:
                total += float(named[0][1].float().sum())
        buffers.close()
        return total

    reserved = []
    for _ in range(SYNCS):
        assert _one_sync(args, buckets, open_here) == BUCKET_NUMEL * 6
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] <= reserved[1], [r >> 20 for r in reserved]


@pytest.mark.gpu
def test_fifty_syncs_across_processes_leave_reserved_memory_flat_on_both_sides():
    import torch.multiprocessing as mp

    buckets, args = _buckets(), (torch.device("cuda"), torch.bfloat16, BUCKET_NUMEL, 2)
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_sync_in_child, args=(requests, replies))
    child.start()
    engine_reserved, actor_reserved = [], []

    def open_there(handles):
        requests.put([BucketHandle.from_wire(h.to_wire()) for h in handles])
        reply = replies.get(timeout=120)
        assert isinstance(reply, tuple), reply
        engine_reserved.append(reply[1])
        return reply[0]

    try:
        for _ in range(SYNCS):
            assert _one_sync(args, buckets, open_there) == BUCKET_NUMEL * 6
            actor_reserved.append(torch.cuda.memory_reserved())
    finally:
        requests.put(None)
        child.join(timeout=60)
    assert actor_reserved[-1] <= actor_reserved[1], [r >> 20 for r in actor_reserved]
    assert engine_reserved[-1] <= engine_reserved[1], [r >> 20 for r in engine_reserved]
