"""Checkpoint directories appear whole; `latest` only ever names a complete one; resume state."""

from __future__ import annotations

import pytest
import yaml

from hybrid_ppo.checkpoint import (CHECKPOINTS, LATEST, STATE_FILE, CheckpointError, latest_checkpoint, read_state,
                                   write_checkpoint)
from hybrid_ppo.config import ConfigError, load_config
from hybrid_ppo.data import PromptBatches
from hybrid_ppo.rollout.engine import sampling_seed
from hybrid_ppo.tasks.base import Example


def _writer(payload: str):
    def write(directory):
        (directory / "actor").mkdir()
        (directory / "actor" / "shard.bin").write_text(payload)
        return {"trainer": {"iteration": 0}}
    return write


def test_checkpoints_appear_whole_and_old_ones_go_after_the_new_one(tmp_path):
    for it in (1, 2, 3):
        path = write_checkpoint(tmp_path, it, _writer(f"w{it}"), keep=2)
        assert latest_checkpoint(tmp_path) == path
        assert read_state(path)["iteration"] == it
    names = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir())
    assert names == ["iter_000002", "iter_000003", LATEST]
    assert (tmp_path / CHECKPOINTS / "iter_000003" / "actor" / "shard.bin").read_text() == "w3"


def test_a_save_that_fails_midway_leaves_latest_on_the_previous_one(tmp_path):
    good = write_checkpoint(tmp_path, 1, _writer("ok"), keep=2)

    def crash(directory):
        (directory / "actor").mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 2, crash, keep=2)
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / CHECKPOINTS / "iter_000002.tmp").is_dir()  # never read, never named by latest
    assert not (tmp_path / CHECKPOINTS / "iter_000002").exists()
    write_checkpoint(tmp_path, 2, _writer("ok2"), keep=2)  # the next save cleans the leftover up
    assert not (tmp_path / CHECKPOINTS / "iter_000002.tmp").exists()


def test_latest_naming_an_incomplete_checkpoint_is_an_error_not_a_guess(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, 1, _writer("ok"), keep=2)
    (tmp_path / CHECKPOINTS / "iter_000001" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_prompt_batches_continue_from_their_position():
    examples = [Example(f"p{i}", None) for i in range(10)]
    straight = PromptBatches(examples, 4, seed=3)
    [next(straight) for _ in range(5)]
    state = straight.state_dict()
    resumed = PromptBatches(examples, 4, seed=3)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(4)] == [next(straight) for _ in range(4)]


def test_sampling_seeds_differ_per_iteration_and_rank_and_repeat():
    seeds = {sampling_seed(0, it, rank) for it in range(50) for rank in range(8)}
    assert len(seeds) == 400
    assert sampling_seed(7, 3, 1) == sampling_seed(7, 3, 1)


def test_resume_refuses_keys_that_change_the_math(tmp_path):
    from hybrid_ppo.launch import resume_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_config(None).to_dict(), sort_keys=False))
    cfg = resume_config(tmp_path, ["train.iterations=50", "logging.save_hf_every=5", "train.save_every=3"])
    assert (cfg.train.iterations, cfg.logging.save_hf_every, cfg.train.save_every) == (50, 5, 3)
    with pytest.raises(ConfigError, match=r"'algo.kl_coef': got 0.5; allowed: no change on resume"):
        resume_config(tmp_path, ["algo.kl_coef=0.5"])
    with pytest.raises(ConfigError, match="'placement.executor'"):
        resume_config(tmp_path, ["placement.executor=local"])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_resume_refuses_a_longer_run_under_a_decaying_lr_schedule(tmp_path, schedule):
    from hybrid_ppo.launch import resume_config

    saved = load_config(None, [f"train.lr_schedule={schedule}", "train.iterations=20"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
    with pytest.raises(ConfigError, match=rf"'train.iterations': got 40; allowed: no change on resume with "
                                          rf"train.lr_schedule = {schedule} \(its decay ends at the run's 20"):
        resume_config(tmp_path, ["train.iterations=40"])
    assert resume_config(tmp_path, ["train.save_every=5"]).train.iterations == 20  # other keys still may change
