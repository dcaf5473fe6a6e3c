"""Past one box: placement.num_nodes on a real two-node Ray cluster on this machine.

`ray.cluster_utils.Cluster` starts a head node and a second raylet, each with 2 fake GPUs, in one
module-scoped fixture shared by every test here. The second node gets its own IP, 127.0.0.2 (all
of 127.0.0.0/8 is this machine's loopback, so Ray and torch can bind it): a role group whose rank 0
is there must meet at 127.0.0.2, and one on the head node at the head's IP, never at the driver's
127.0.0.1. What one machine cannot show: a real network between the nodes (a firewall, an
interface gloo/NCCL would pick), and a filesystem that is *not* shared (every "node" here sees the
same disk; `check_written_files` is tested on its own for that).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import ray
import torch

from hybrid_ppo.checkpoint import CheckpointError, check_written_files
from hybrid_ppo.config import ConfigError, load_config
from hybrid_ppo.executor.ray import RayExecutor, rank_specs
from hybrid_ppo.placement import PlacementError, make_plan
from hybrid_ppo.rollout.weight_sync import BucketStager, OpenedBuffers, WeightSyncError

SECOND_NODE_IP = "127.0.0.2"
TWO_NODES = ["placement.num_nodes=2", "placement.num_gpus=2", "train.micro_batch_size=8"]  # 4 ranks: 32 / (8 x 4)


# -- without Ray ----------------------------------------------------------------------------------
def test_two_nodes_number_bundles_over_the_cluster_and_keep_tp_engines_in_one_node():
    plan = make_plan(load_config(None, [*TWO_NODES, "rollout.tensor_parallel_size=2"]))
    assert (plan.num_bundles, plan.bundles_per_node) == (4, 2)
    assert [(plan.node_of(b), plan.index_in_node(b)) for b in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [s.bundle for s in plan.for_role("actor")] == [0, 1, 2, 3]
    specs = rank_specs(plan, "rollout")  # engine 1 on node 1: vLLM indexes that node's group, we the plan
    assert specs[1].env["VLLM_RAY_BUNDLE_INDICES"] == "0,1" and specs[1].env["HYBRID_PPO_BUNDLES"] == "2,3"
    table = plan.describe().splitlines()
    assert "2 nodes x 2 bundles" in table[0] and table[1].split()[:2] == ["bundle", "node"]
    assert [row.split()[:2] for row in table[2:]] == [["0", "0"], ["1", "0"], ["2", "1"], ["3", "1"]]


@pytest.mark.parametrize("overrides, key, allowed", [
    ([*TWO_NODES, "rollout.tensor_parallel_size=4"], "rollout.tensor_parallel_size", "never straddle two nodes"),
    (["placement.num_nodes=0"], "placement.num_nodes", "an integer >= 1"),
    ([*TWO_NODES, "placement.executor=local"], "placement.num_nodes", "1 with placement.executor=local"),
])
def test_bad_multi_node_configs_are_one_line_errors(overrides, key, allowed):
    with pytest.raises(ConfigError, match=allowed) as info:
        load_config(None, overrides)
    assert info.value.key == key and "\n" not in str(info.value)


def test_two_nodes_without_a_cluster_to_join_are_refused(monkeypatch):
    if ray.is_initialized():
        pytest.skip("Ray already joined by an earlier test")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PlacementError, match="needs a running Ray cluster.*RAY_ADDRESS"):
        RayExecutor(load_config(None, TWO_NODES)).start()
    assert not ray.is_initialized()


def test_a_host_buffer_staged_in_another_pid_space_is_refused():
    """/proc/<actor pid>/fd/<fd> names the actor's buffer only on its own kernel and pid namespace."""
    stager = BucketStager(torch.device("cpu"), torch.float32, 4, 1)
    opened = OpenedBuffers()
    try:
        handle = stager.stage(0, [("w", torch.arange(4.0))])
        with opened.bucket(handle) as named:  # same host: read as ever
            assert torch.equal(named[0][1], torch.arange(4.0))
        opened.close()
        elsewhere = dataclasses.replace(handle, pid_space="another-boot/pidns:1")
        with pytest.raises(WeightSyncError, match="another host or in another pid namespace"):
            with opened.bucket(elsewhere):
                pass
    finally:
        opened.close()
        stager.close()


def test_a_checkpoint_file_the_driver_cannot_see_is_an_error(tmp_path):
    (tmp_path / "shard_0.pt").write_bytes(b"0")
    check_written_files(tmp_path, "actor", [["shard_0.pt"], ["shard_0.pt"]])  # shared: rank 1 sees rank 0's too
    with pytest.raises(CheckpointError, match="actor rank 1 wrote 1 file.*shard_1.pt.*every node shares"):
        check_written_files(tmp_path, "actor", [["shard_0.pt"], ["shard_1.pt"]])


# -- on a two-node cluster ------------------------------------------------------------------------
class Probe:
    """A stand-in role: reports, from inside its process, where Ray put it and what it was told."""

    def __init__(self, cfg, dist, tag: str = ""):
        self.dist = dist

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"dist": self.dist, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pg": ctx.get_placement_group_id(), "gpu_ids": ray.get_gpu_ids()}

    def meet(self) -> float:
        """Join the role's gloo group at the address the executor gave, and sum the ranks."""
        import torch  # here, not at unpickling: where() runs in every probe, meet() in the actor's only
        import torch.distributed as torch_dist

        torch_dist.init_process_group("gloo", init_method=self.dist.init_method, rank=self.dist.rank,
                                      world_size=self.dist.world_size, timeout=timedelta(seconds=60))
        try:
            total = torch.tensor([float(self.dist.rank)])
            torch_dist.all_reduce(total)
            return float(total)
        finally:
            torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def cluster():
    """Head node (this machine's IP) + a second node at 127.0.0.2, 2 fake GPUs and 2 CPUs each."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    root = tempfile.mkdtemp(prefix="hppo_mn", dir="/tmp")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", root)  # Cluster writes its address file in <it>/ray, not in /tmp/ray
        os.makedirs(os.path.join(root, "ray"))
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("HF_HUB_OFFLINE", "1")
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
        head = dict(num_cpus=2, num_gpus=2, temp_dir=os.path.join(root, "ray"), include_dashboard=False)
        nodes = Cluster(initialize_head=True, head_node_args=head)
        try:
            nodes.add_node(num_cpus=2, num_gpus=2, node_ip_address=SECOND_NODE_IP)
            nodes.wait_for_nodes()
            env.setenv("RAY_ADDRESS", nodes.address)  # as a user would point hybrid-ppo at a cluster
            ray.init(address=nodes.address, log_to_driver=False)
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
            shutil.rmtree(root, ignore_errors=True)


def test_the_cluster_has_two_nodes_with_distinct_ips(cluster):
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and all(n["Resources"]["GPU"] == 2 for n in alive)
    assert len({n["NodeManagerAddress"] for n in alive}) == 2
    assert SECOND_NODE_IP in {n["NodeManagerAddress"] for n in alive}


@pytest.fixture(scope="class")
def spawned(cluster):
    executor = RayExecutor(load_config(None, TWO_NODES)).start()
    try:
        groups = {role: executor.spawn(role, Probe, role, wait=False) for role in ("actor", "rollout")}
        for group in groups.values():
            group.wait_ready()
        yield executor, {role: group.call("where") for role, group in groups.items()}, groups
    finally:
        executor.shutdown()


class TestProbesOnTwoNodes:
    """Stand-in roles on the cluster; their bundles go back when the class is done."""

    def test_rank_i_of_every_role_shares_bundle_i_and_its_node(self, spawned):
        executor, where, _ = spawned
        assert len(executor.placement_groups) == 2
        for node, pg in enumerate(executor.placement_groups):
            table = ray.util.placement_group_table(pg)
            assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2
        for i in range(4):
            here = {role: (w[i]["node_id"], w[i]["pg"], w[i]["gpu_ids"]) for role, w in where.items()}
            assert len(set(map(str, here.values()))) == 1, f"rank {i}: {here}"  # same node, group and GPU: one bundle
            assert where["actor"][i]["pg"] == executor.placement_groups[i // 2].id.hex()
        nodes = [w["node_id"] for w in where["actor"]]
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]  # bundles of one node together
        assert {w["node_ip"] for w in where["actor"]} >= {SECOND_NODE_IP}

    def test_every_role_group_meets_at_its_rank_0_nodes_ip(self, spawned):
        executor, where, groups = spawned
        rendezvous = set()
        for role, ranks in where.items():
            head_ip = ranks[0]["node_ip"]
            assert head_ip != "127.0.0.1"  # the driver's loopback could not be reached from another node
            meets = {(w["dist"].master_addr, w["dist"].master_port) for w in ranks}
            assert meets == {(head_ip, ranks[0]["dist"].master_port)}, f"{role}: {meets}, rank 0 on {head_ip}"
            rendezvous |= meets
        assert len(rendezvous) == 2  # one port per group
        # A real torch.distributed group over both nodes, at that address: 0 + 1 + 2 + 3.
        assert groups["actor"].call("meet") == [6.0] * 4


@pytest.mark.slow
def test_two_ppo_iterations_over_two_nodes_checkpoint_and_resume(cluster, tmp_path):
    """The default task on 2 nodes x 2 fake GPUs: weight sync every iteration, a checkpoint that
    every rank of both nodes wrote into, and a resume that goes on from it. GRPO without a KL term,
    so no critic and no reference: 8 role processes, not 16, each built twice (train, resume);
    building them is nearly all of this test's time on a 2-core machine (~60 s per role of 4 ranks).
    The critic's and reference's colocation on two nodes is checked above, without training."""
    from hybrid_ppo.checkpoint import latest_checkpoint, read_state
    from hybrid_ppo.launch import resume, train
    from hybrid_ppo.metrics import read_metrics

    cfg = load_config(None, [*TWO_NODES, "algo.advantage_estimator=grpo", "algo.kl_coef=0",
                             "train.samples_per_prompt=2", "train.rollout_batch_size=16", "train.iterations=2",
                             "train.save_every=2", "warmup.steps=20", "data.eval_size=16", "logging.tensorboard=false", f"logging.output_dir={tmp_path}",
                             "logging.run_name=two_nodes"])
    run_dir = train(cfg).run_dir
    checkpoint = latest_checkpoint(run_dir)
    assert read_state(checkpoint)["iteration"] == 2
    assert not (checkpoint / "critic").exists()
    shards = sorted(p.name for p in (checkpoint / "actor").rglob("*optim_states.pt"))  # one per rank, 2 per node
    assert len(shards) == 4 and all(f"rank_{r}_" in shards[r] for r in range(4)), shards
    resume(run_dir, ["train.iterations=3"])
    records = read_metrics(run_dir / "metrics.jsonl")
    synced = sorted({r["iteration"] for r in records if r.get("rollout/sync_buckets", 0) > 0})
    assert synced == [1, 2, 3]  # the engines got the trained weights each iteration, resumed run included
    assert read_state(latest_checkpoint(run_dir))["iteration"] == 3
