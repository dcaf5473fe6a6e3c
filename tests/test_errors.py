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
