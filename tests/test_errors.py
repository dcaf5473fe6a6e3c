"""The error boundary's wording: the user's own error, one line, where to look, how to go on."""

from __future__ import annotations

from pathlib import Path

from hybrid_ppo.errors import one_line
from hybrid_ppo.executor import RoleError
from hybrid_ppo.launch import RunFailed
from hybrid_ppo.placement import PlacementError
from hybrid_ppo.roles.reward import RewardError
from hybrid_ppo.stopping import Interrupted

RUN = Path("/runs/r1")
CHECKPOINT = RUN / "checkpoints" / "iter_000004"


def failed_run(cause: BaseException, checkpoint: Path | None = CHECKPOINT) -> RunFailed:
    try:
        raise RunFailed(RUN, checkpoint) from cause
    except RunFailed as err:
        return err


def test_a_rank_error_shows_the_users_own_error_with_where_and_how_to_continue():
    role_error = RoleError("reward", 1, "score", RewardError("reward model returned a non-finite score for sample 3"))
    role_error.phase = "score_reward"
    message, code = one_line(failed_run(role_error))
    assert message == ("reward model returned a non-finite score for sample 3 (role 'reward' rank 1, phase "
                       f"score_reward); traceback in {RUN}/train.log; `hybrid-ppo resume {RUN}` continues from "
                       "iter_000004")
    assert code == 1


def test_a_dead_role_names_role_rank_and_phase():
    dead = RoleError("critic", 0, "train", RuntimeError("ActorDiedError: ...\nlong text"), died=True)
    dead.phase = "train_critic"
    message, _ = one_line(failed_run(dead, checkpoint=None))
    assert message.startswith("role 'critic' rank 0 in phase train_critic: the process died during train()")
    assert message.endswith("no checkpoint to resume from (set train.save_every > 0)")


def test_a_stop_is_no_failure_and_exits_with_the_signal_code():
    message, code = one_line(failed_run(Interrupted(15, 5, CHECKPOINT)))
    assert message == f"stopped by SIGTERM after iteration 5; `hybrid-ppo resume {RUN}` continues from iter_000004"
    assert code == 143


def test_multi_line_messages_become_one_line_and_bugs_say_so():
    message, code = one_line(PlacementError("infeasible placement plan:\n  bundle 0: 1.2 GPU\n  bundle 1: 1.2 GPU"))
    assert message == "infeasible placement plan: bundle 0: 1.2 GPU; bundle 1: 1.2 GPU" and code == 2
    message, code = one_line(KeyError("oops"))
    assert message.startswith("internal error, please report it: KeyError") and code == 1


def test_a_bug_inside_a_role_says_it_is_a_bug_and_where_its_traceback_is():
    """A plain RuntimeError (ours, or from torch/DeepSpeed) is no user error, even in a run."""
    bug = RoleError("actor", 0, "train", RuntimeError("index 7 is out of bounds"))
    bug.phase = "train_actor"
    message, code = one_line(failed_run(bug))
    assert message.startswith("internal error, please report it: RuntimeError: index 7 is out of bounds "
                              "(role 'actor' rank 0, phase train_actor); traceback in /runs/r1/train.log")
    assert code == 1
    message, _ = one_line(ValueError("shape mismatch"), traceback_file=Path("/tmp/x.traceback"))
    assert message == "internal error, please report it: ValueError: shape mismatch; traceback in /tmp/x.traceback"


def _failed_ray_constructor(remote_traceback: str) -> RoleError:
    """What a Ray role whose __init__ raised gives the driver: ActorDiedError, holding the remote
    traceback's text only (ray/exceptions.py), not the exception."""
    from ray.exceptions import ActorDiedError, RayTaskError

    died = ActorDiedError(RayTaskError("Actor.__init__", remote_traceback, RuntimeError("not kept")))
    assert died.actor_init_failed
    return RoleError("actor", 1, "__init__", died)


def test_a_failed_ray_constructor_is_a_user_error_only_if_its_class_is_one():
    user = _failed_ray_constructor("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                   "hybrid_ppo.config.ConfigError: config key 'model.actor': no config.json in /m")
    assert one_line(user)[0] == "config key 'model.actor': no config.json in /m (role 'actor' rank 1)"
    assert "raised ConfigError: config key" in str(user)
    bug = _failed_ray_constructor("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                  "AttributeError: 'NoneType' object has no attribute 'shape'")
    message, code = one_line(bug)
    assert message == ("internal error, please report it: AttributeError: 'NoneType' object has no attribute "
                       "'shape' (role 'actor' rank 1)") and code == 1
    unknown = _failed_ray_constructor("Traceback:\nsomepkg.NoSuchError: gone")
    assert one_line(unknown)[0].startswith("internal error, please report it: NoSuchError: gone")


def test_out_of_memory_in_a_role_is_the_users_to_act_on_and_says_how():
    import torch

    oom = RoleError("actor", 0, "train", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"))
    oom.phase = "train_actor"
    message, code = one_line(failed_run(oom))
    assert message.startswith("out of memory: lower train.micro_batch_size (or rollout.gpu_memory_utilization "
                              "for the engine); `hybrid-ppo plan CONFIG` estimates every phase: CUDA out of memory. "
                              "Tried to allocate 4.00 GiB (role 'actor' rank 0, phase train_actor)")
    assert "internal error" not in message and code == 1


def test_a_role_killed_by_rays_memory_monitor_is_one_line_that_says_out_of_memory():
    import ray.exceptions

    # What Ray raised when the node ran low during a run on this box (its memory table cut short).
    essay = ("2 worker(s) were killed due to the node running low on memory.\n"
             "Memory on the node (IP: 192.0.2.2) was 23.29GB used / 23.54GB limit (0.989225)\n"
             "OOM kill reason: Memory usage 24208052224B exceeded threshold\nObject store memory usage: [\n- objects: 0]")
    oom = RoleError("actor", 0, "__init__", ray.exceptions.OutOfMemoryError(essay))
    message, code = one_line(failed_run(oom))
    assert message.startswith("out of memory: lower train.micro_batch_size")
    assert "2 worker(s) were killed due to the node running low on memory. (role 'actor' rank 0)" in message
    assert "\n" not in message and "Object store" not in message and "internal error" not in message


def test_every_error_raised_for_the_user_shares_one_base():
    from hybrid_ppo.checkpoint import CheckpointError
    from hybrid_ppo.config import ConfigError
    from hybrid_ppo.data import DataError
    from hybrid_ppo.errors import HybridPPOError
    from hybrid_ppo.roles.trained import TrainingDiverged
    from hybrid_ppo.rollout.weight_sync import WeightSyncError
    from hybrid_ppo.special_tokens import SpecialTokenError, TokenizerMismatchError

    for cls in (CheckpointError, ConfigError, DataError, PlacementError, RewardError, RoleError, RunFailed,
                Interrupted, TrainingDiverged, WeightSyncError, SpecialTokenError, TokenizerMismatchError):
        assert issubclass(cls, HybridPPOError), cls


def test_a_reward_module_with_a_syntax_error_names_the_file_and_line(tmp_path, monkeypatch):
    from hybrid_ppo.roles.reward import load_reward_fn

    (tmp_path / "broken_rewards.py").write_text("def score(prompts, responses, labels):\n    return [1.0 for\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_reward_fn("broken_rewards:score")
    except Exception as err:  # noqa: BLE001  # the boundary's view of it is what is tested
        message, code = one_line(err)
    else:
        raise AssertionError("a module that does not parse was loaded")
    assert message.startswith(f"model.reward_fn 'broken_rewards:score': syntax error in "
                              f"{tmp_path / 'broken_rewards.py'}:2"), message
    assert code == 1


def test_a_model_directory_without_config_json_names_the_key_and_what_is_missing(tmp_path):
    from hybrid_ppo.config import load_config
    from hybrid_ppo.launch import resolve_model

    (tmp_path / "tokenizer.json").write_text("{}")
    try:
        resolve_model("model.actor", str(tmp_path), load_config(None, []))
    except Exception as err:  # noqa: BLE001
        message, code = one_line(err)
    else:
        raise AssertionError("a directory without config.json was accepted as a model")
    assert message.startswith(f"model.actor = {str(tmp_path)!r} has no config.json"), message
    assert code == 1


def test_a_bug_before_the_run_prints_one_line_and_writes_its_traceback(tmp_path, monkeypatch, capsys):
    from hybrid_ppo import cli

    def buggy(path, overrides):
        raise RuntimeError("deliberate bug")

    monkeypatch.setattr(cli, "load_config", buggy)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert cli.main(["plan"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("hybrid-ppo: internal error, please report it: RuntimeError: deliberate bug; traceback in ")
    written = Path(err.strip().rsplit("traceback in ", 1)[1])
    assert written.parent == tmp_path and "deliberate bug" in written.read_text() and "Traceback" in written.read_text()
