"""Executors under real Ray with 2 fake GPUs: every rank lands on its bundle with its fraction."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

import pytest
import ray

from hybrid_ppo.config import load_config
from hybrid_ppo.executor import DistInfo, LocalExecutor, RoleError, make_executor
from hybrid_ppo.placement import PlacementError, create_placement_groups, make_plan
from hybrid_ppo.executor.ray import WORKER_OUTPUT_LOGGER, RayExecutor, forwarded_env, rank_specs

ROLES = ("actor", "critic", "reference", "reward", "rollout")
WITH_RM = ["model.reward_model=/models/rm", "model.reward_fn=null"]  # 5 roles x 0.2 fill each GPU


class Probe:
    """A stand-in role: reports, from inside its process, where Ray put it."""

    def __init__(self, cfg, dist: DistInfo, tag: str = ""):
        self.dist, self.tag, self.starts = dist, tag, 0

    def started(self) -> None:  # the executor's call once every rank is built
        self.starts += 1

    def where(self) -> dict:
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        ctx = ray.get_runtime_context() if in_actor else None
        return {
            "dist": self.dist,
            "tag": self.tag,
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids() if ctx else None,
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "resources": ctx.get_assigned_resources() if ctx else None,
            "pg": ctx.get_placement_group_id() if ctx else None,
            "hf_offline": os.environ.get("HF_HUB_OFFLINE"),
            "starts": self.starts,
        }

    def shout(self, text: str) -> None:
        print(f"{text} from rank {self.dist.rank}", flush=True)

    def shard_sum(self, shard: list[int], scale: int = 1) -> tuple[int, int]:
        return self.dist.rank, scale * sum(shard)

    def fail_on(self, rank: int) -> int:
        if self.dist.rank == rank:
            raise ValueError(f"boom from rank {rank}")
        return self.dist.rank


class BrokenProbe(Probe):
    def __init__(self, cfg, dist: DistInfo):
        raise RuntimeError("cannot load weights")


@pytest.fixture(scope="module")
def cache_dir():
    path = tempfile.mkdtemp(prefix="hppo", dir="/tmp")  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def executor(cache_dir):
    assert not ray.is_initialized()
    # Ray workers cannot import this test module; ship its classes by value (real roles are importable).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, [*WITH_RM, f"logging.cache_dir={cache_dir}"])
    ex = RayExecutor(cfg).start()  # ray.init(num_gpus=2, num_cpus=2): fake GPUs on this CPU box
    try:
        yield ex
    finally:
        ex.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old
        assert not ray.is_initialized()


def test_constructor_error_names_role_and_rank(executor):
    # First in the file, while the bundles still have room: dead actors free their fractions.
    expected = r"(?s)role 'actor' rank \d: __init__\(\) raised .*RuntimeError: cannot load weights"
    with pytest.raises(RoleError, match=expected):
        executor.spawn("actor", BrokenProbe)


@pytest.fixture(scope="module")
def groups(executor):
    spawned = {role: executor.spawn(role, Probe, role, wait=False) for role in ROLES}  # all start at once
    for group in spawned.values():
        group.wait_ready()
    return spawned


def test_ray_starts_self_contained(executor, cache_dir):
    assert executor.owns_ray
    assert ray.cluster_resources()["GPU"] == 2
    assert ray.get_runtime_context().get_temp_dir().startswith(cache_dir)


def test_every_rank_on_its_bundle_with_its_fraction(executor, groups):
    [pg] = executor.placement_groups  # one node: one group
    pg_id = pg.id.hex()
    table = ray.util.placement_group_table(pg)
    assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2
    pids = set()
    for role, group in groups.items():
        assert group.world_size == 2
        for rank, where in enumerate(group.call("where")):
            assert where["tag"] == role
            assert where["dist"].rank == rank and where["dist"].world_size == 2
            assert where["dist"].bundles == (rank,)
            assert where["gpu_ids"] == [rank]
            assert where["cuda_visible"] == str(rank)
            assert where["pg"] == pg_id
            assert where["hf_offline"] == "1"
            assert where["starts"] == 1  # started() once, after every rank was built
            assert where["resources"]["GPU"] == pytest.approx(0.2)
            assert where["resources"]["CPU"] == pytest.approx(0.05)
            pids.add(where["pid"])
    assert len(pids) == 2 * len(ROLES) and os.getpid() not in pids
    ports = {group.call_rank(0, "where")["dist"].master_port for group in groups.values()}
    assert len(ports) == len(ROLES)  # one torch.distributed group (and port) per role


def test_what_a_role_prints_goes_to_the_log_not_the_terminal(groups, capfd):
    """logging.verbose=false (the default): train.log gets the role processes' lines, not the terminal."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(WORKER_OUTPUT_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        groups["critic"].call("shout", "hello")
        deadline = time.monotonic() + 30  # Ray forwards worker output asynchronously
        while time.monotonic() < deadline and len([r for r in records if "hello from rank" in r.getMessage()]) < 2:
            time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if "hello from rank" in r.getMessage()]
    # Ray prefixes each line with the worker's pid, so the ranks arrive in no fixed order.
    assert sorted(line.rsplit("hello from ", 1)[1] for line in lines) == ["rank 0", "rank 1"], lines
    assert all(line.startswith("(Probe pid=") and "\x1b" not in line for line in lines), lines
    out, err = capfd.readouterr()
    assert "hello from rank" not in out + err


def test_bundles_are_full(executor, groups):
    # 5 x 0.2 on each GPU: nothing is left for a sixth 0.2 actor in either bundle.
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-4)


def test_call_each_shards_and_results_come_in_rank_order(groups):
    shards = [([1, 2, 3],), ([10, 20],)]
    assert groups["actor"].call_each("shard_sum", shards, scale=2) == [(0, 12), (1, 60)]
    assert groups["critic"].call("shard_sum", [5]) == [(0, 5), (1, 5)]
    with pytest.raises(ValueError, match="3 argument tuples for 2 ranks"):
        groups["critic"].call_each("shard_sum", shards + [([0],)])


def test_rank_error_surfaces_with_role_and_rank(groups):
    expected = r"role 'critic' rank 1: fail_on\(\) raised ValueError: boom from rank 1"
    with pytest.raises(RoleError, match=expected) as info:
        groups["critic"].call("fail_on", 1)
    assert (info.value.role, info.value.rank, type(info.value.cause)) == ("critic", 1, ValueError)
    assert groups["critic"].call("fail_on", 7) == [0, 1]  # the actors survive a method's exception
    with pytest.raises(AttributeError, match="role 'critic' has no method 'nope'"):
        groups["critic"].call("nope")


def test_submit_lets_two_roles_run_at_once(groups):
    a, b = groups["actor"].submit("shard_sum", [1]), groups["rollout"].submit("shard_sum", [2])
    assert (a.result(), b.result()) == ([(0, 1), (1, 1)], [(0, 2), (1, 2)])


def test_unplanned_role_and_missing_gpus_are_refused(executor, groups):
    with pytest.raises(ValueError, match="role 'judge' has no slots"):
        executor.spawn("judge", Probe)
    too_big = make_plan(load_config(None, ["placement.num_gpus=4", "train.micro_batch_size=8"]))
    with pytest.raises(PlacementError, match=r"needs GPU 4, CPU 2\): the cluster has GPU 2, CPU 2 in total"):
        create_placement_groups(too_big, timeout_s=1)


def test_local_executor_runs_the_same_probe_in_process():
    cfg = load_config(None, [*WITH_RM, "placement.executor=local"])
    ex = make_executor(cfg)
    assert isinstance(ex, LocalExecutor)
    with ex:
        groups = {role: ex.spawn(role, Probe, role) for role in ROLES}
        infos = [g.call_rank(0, "where") for g in groups.values()]
        assert {w["pid"] for w in infos} == {os.getpid()}
        assert {w["starts"] for w in infos} == {1}
        assert {w["dist"] for w in infos} == {ex.dist}  # one shared world of size 1
        assert ex.dist.rank == 0 and ex.dist.world_size == 1
        assert groups["actor"].world_size == 1
        assert groups["actor"].call_each("shard_sum", [([1, 2, 3],)], scale=2) == [(0, 12)]
        with pytest.raises(RoleError, match=r"role 'critic' rank 0: fail_on\(\) raised ValueError"):
            groups["critic"].call("fail_on", 0)
        with pytest.raises(RoleError, match=r"role 'actor' rank 0: __init__\(\)"):
            ex.spawn("actor", BrokenProbe)
    with pytest.raises(ValueError, match="role 'reward' is not run by this config"):
        LocalExecutor(load_config(None, ["placement.executor=local"])).start().spawn("reward", Probe)


def test_tensor_parallel_engine_is_one_actor_on_its_first_bundle():
    plan = make_plan(load_config(None, ["placement.num_gpus=8", "train.micro_batch_size=4",
                                        "rollout.tensor_parallel_size=2"]))
    specs = rank_specs(plan, "rollout")
    assert [(s.rank, s.world_size, s.bundle, s.bundles) for s in specs] == [
        (e, 4, 2 * e, (2 * e, 2 * e + 1)) for e in range(4)]
    assert all(s.gpu == 0.0 for s in specs)  # vLLM's TP workers take the reserved fractions
    assert specs[1].env == {"VLLM_RAY_PER_WORKER_GPUS": "0.2", "VLLM_RAY_BUNDLE_INDICES": "2,3",
                            "HYBRID_PPO_BUNDLES": "2,3"}
    assert [s.gpu for s in rank_specs(plan, "actor")] == [0.2] * 8


def test_forwarded_env_keeps_caches_and_never_cuda_visible_devices():
    env = {"TORCH_EXTENSIONS_DIR": "/c/ext", "TMPDIR": "/c/tmp", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/root", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert forwarded_env(env) == {"TORCH_EXTENSIONS_DIR": "/c/ext", "TMPDIR": "/c/tmp", "HF_HUB_OFFLINE": "1",
                                  "VLLM_CPU_KVCACHE_SPACE": "1"}
