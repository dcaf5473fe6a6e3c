"""The placement plan: pure config -> slots, checked to fit before Ray starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hybrid_ppo.config import load_config
from hybrid_ppo.placement import PlacementError, PlacementPlan, Slot, check_plan, make_plan

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
EIGHT_GPUS_WITH_RM = ["placement.num_gpus=8", "model.reward_model=/models/rm", "model.reward_fn=null",
                      "train.micro_batch_size=4"]  # 32 / (4 * 8 ranks) = 1 micro batch per rank


def test_eight_gpus_with_reward_model_fill_every_bundle_exactly():
    plan = make_plan(load_config(None, EIGHT_GPUS_WITH_RM))
    assert plan.num_bundles == 8
    assert plan.roles == ("actor", "critic", "reference", "reward", "rollout")
    for b in range(8):
        here = sorted((s.role, s.rank, s.gpu) for s in plan.slots if s.bundle == b)
        assert here == [(role, b, 0.2) for role in ("actor", "critic", "reference", "reward", "rollout")]
    assert plan.bundle_gpu_sums() == pytest.approx([1.0] * 8)  # 5 x 0.2 = 1.0000000000000002 passes
    for role in plan.roles:
        assert [(s.rank, s.bundle) for s in plan.for_role(role)] == [(i, i) for i in range(8)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_is_feasible(path):
    cfg = load_config(path)
    plan = make_plan(cfg)
    assert plan.num_bundles == cfg.placement.num_gpus
    assert ("reward" in plan.roles) == (cfg.model.reward_model is not None)


def test_rule_reward_has_no_reward_slot():
    plan = make_plan(load_config(None, []))  # tiny-cpu: 2 GPUs, rule reward
    assert plan.roles == ("actor", "critic", "reference", "rollout")
    assert plan.bundle_gpu_sums() == pytest.approx([0.8, 0.8])


def test_overfull_bundle_is_refused_with_the_per_bundle_sums():
    cfg = load_config(None, ["placement.gpu_per_role=0.3"])
    with pytest.raises(PlacementError) as info:
        make_plan(cfg)
    message = str(info.value)
    for b in (0, 1):
        assert f"bundle {b}: actor 0.3 + critic 0.3 + reference 0.3 + rollout 0.3 = 1.2 > 1" in message
    assert "placement.gpu_per_role=0.3" in message


def test_cpu_over_the_bundle_is_refused():
    cfg = load_config(None, ["placement.cpu_per_role=0.2", "placement.cpu_per_bundle=0.5"])
    with pytest.raises(PlacementError, match=r"bundle 0: .* = 0\.8 > 0\.5 CPU"):
        make_plan(cfg)


def test_tensor_parallel_two_on_eight_gpus_gives_four_engines():
    cfg = load_config(None, [*EIGHT_GPUS_WITH_RM, "rollout.tensor_parallel_size=2"])
    plan = make_plan(cfg)
    assert cfg.num_engines == 4
    engines = plan.engines()
    assert [[s.bundle for s in workers] for workers in engines] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert len(plan.for_role("rollout")) == 8  # one rollout slot per GPU


@pytest.mark.parametrize("break_plan, expected", [
    (lambda p: replace(p, slots=p.slots[1:]), r"role 'actor': ranks \[1\], expected exactly 0..1"),
    (lambda p: replace(p, slots=tuple(replace(s, bundle=0) for s in p.slots)), r"ranks share bundles \[0, 0\]"),
    (lambda p: replace(p, slots=p.slots + (Slot("reward", 0, 0, 0.1, 0.01),)), r"role 'reward' has slots"),
    (lambda p: replace(p, slots=p.slots + (Slot("critic", 2, 5, 0.1, 0.01),)), r"bundle 5 outside 0..1"),
    (lambda p: replace(p, tensor_parallel_size=2), r"plan TP 2 != rollout.tensor_parallel_size 1"),
])
def test_check_plan_names_what_is_wrong(break_plan, expected):
    cfg = load_config(None, [])
    broken: PlacementPlan = break_plan(make_plan(cfg))
    with pytest.raises(PlacementError, match=expected):
        check_plan(broken, cfg)


def test_describe_shows_fractions_and_sums():
    text = make_plan(load_config(None, EIGHT_GPUS_WITH_RM)).describe()
    lines = text.splitlines()
    assert "8 bundles" in lines[0]
    assert lines[1].split() == ["bundle", "actor", "critic", "reference", "reward", "rollout", "GPU", "sum",
                                "CPU", "sum"]
    assert lines[2].split() == ["0", "0.2", "0.2", "0.2", "0.2", "0.2", "1", "0.25"]
    assert len(lines) == 2 + 8


def test_importing_placement_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, hybrid_ppo.placement, hybrid_ppo.executor, hybrid_ppo.executor.ray; "
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
