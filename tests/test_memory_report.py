"""The per-phase memory table, from a hand-built timeline whose numbers are easy to follow."""

from __future__ import annotations

import json

import pytest

from hybrid_ppo.memory.report import load_timeline, memory_report


def _move(iteration, phase, role, direction, gib_per_rank, seconds=0.5):
    ranks = [{"seconds": seconds, "before": {}, "after": {"host_rss_gib": 9.0, "device_allocated_gib": g}}
             for g in gib_per_rank]
    return {"iteration": iteration, "phase": phase, "role": role, "direction": direction, "states": [],
            "seconds": seconds, "ranks": ranks}


# Two GPUs. Startup leaves every role offloaded (0 GiB). Iteration 1: the engine wakes for
# generate (rank 1 holds a larger KV cache), sleeps for scoring, the actor comes in for training.
TIMELINE = [
    _move(0, "startup", "actor", "offload", [0.0, 0.0]),
    _move(0, "startup", "rollout", "offload", [0.0, 0.0]),
    _move(1, "generate", "rollout", "reload", [10.0, 12.0]),
    _move(1, "score_actor", "rollout", "offload", [0.0, 0.0]),
    _move(1, "score_actor", "actor", "reload", [4.0, 4.0]),
    _move(1, "train_actor", "actor", "reload", [16.0, 17.0], seconds=2.0),
    _move(1, "sync", "actor", "offload", [4.0, 4.0]),
    _move(1, "sync", "rollout", "reload", [3.0, 3.0]),
    _move(2, "generate", "rollout", "reload", [99.0, 99.0]),  # a later, incomplete iteration
]


def test_roles_carry_their_memory_between_moves():
    report = memory_report(TIMELINE)
    assert report.iteration == 1 and report.field == "device_allocated_gib"
    phases = report.phases
    assert phases["generate"].roles == {"actor": 0.0, "rollout": 12.0} and phases["generate"].gpu_total == 12.0
    assert phases["score_actor"].roles == {"actor": 4.0, "rollout": 0.0}
    # nothing moves in score_reference .. train_critic: they hold what score_actor left
    for phase in ("score_reference", "score_critic", "score_reward", "advantage", "train_critic"):
        assert phases[phase].roles == phases["score_actor"].roles and phases[phase].move_seconds == 0.0
    assert phases["train_actor"].roles["actor"] == 17.0 and phases["train_actor"].move_seconds == 2.0
    assert phases["sync"].gpu_total == 7.0 and phases["sync"].move_seconds == 1.0  # 4 + 3 on each GPU


def test_host_memory_when_there_is_no_device_reading():
    cpu = json.loads(json.dumps(TIMELINE))
    for record in cpu:
        for rank in record["ranks"]:
            rank["after"]["device_allocated_gib"] = None
    report = memory_report(cpu)
    assert report.field == "host_rss_gib" and report.phases["generate"].roles["rollout"] == 9.0


def test_roles_in_one_process_count_once():
    shared = json.loads(json.dumps(TIMELINE))
    for record in shared:
        for rank in record["ranks"]:
            rank["pid"] = 4242  # the local executor: one process, readings are process-wide
    # the process's newest reading (after the rollout reload), once: not actor 4 + rollout 3
    assert memory_report(shared).phases["sync"].gpu_total == 3.0


def test_table_and_errors(tmp_path):
    table = memory_report(TIMELINE).table()
    assert "iteration 1 (device_allocated_gib, GiB)" in table and "train_actor" in table
    with pytest.raises(ValueError, match="reached train_actor"):
        memory_report(TIMELINE[:3])
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_timeline(tmp_path)


def _peaks(iteration, phase, role, pids, peaks):
    ranks = [{"before": {"device_peak_gib": p}, "after": {}, "pid": pid} for pid, p in zip(pids, peaks)]
    return {"iteration": iteration, "phase": phase, "role": role, "direction": "-", "states": [], "seconds": 0.0,
            "ranks": ranks}


def test_phase_peaks_belong_to_the_window_each_move_opened():
    from hybrid_ppo.memory.report import phase_peaks

    # Two GPUs; the actor's processes are 10 and 11, the engine's 20 and 21. Each reading is the
    # process's peak since its previous move.
    timeline = [
        _peaks(0, "startup", "actor", [10, 11], [9.0, 9.0]),  # no window open yet: ignored
        _peaks(0, "startup", "rollout", [20, 21], [1.0, 1.0]),
        _peaks(1, "generate", "rollout", [20, 21], [0.5, 0.5]),  # closes the engine's startup window
        _peaks(1, "score_actor", "rollout", [20, 21], [30.0, 32.0]),  # closes generate
        _peaks(1, "score_actor", "actor", [10, 11], [3.0, 3.0]),  # closes the actor's startup window
        _peaks(1, "train_actor", "actor", [10, 11], [12.0, 11.0]),  # closes score_actor
        _peaks(1, "sync", "actor", [10, 11], [40.0, 41.0]),  # closes train_actor
        _peaks(1, "sync", "rollout", [20, 21], [0.2, 0.2]),  # closes the engine's score_actor window
    ]
    assert phase_peaks(timeline) == {"startup": 3.5, "generate": 32.0, "score_actor": 12.2, "train_actor": 41.0}
    assert phase_peaks(TIMELINE) == {}  # no peak readings (a CPU run)
