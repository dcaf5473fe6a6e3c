"""After a resume from checkpoint k, memory_timeline.jsonl keeps everything that led up to it,
iteration k's eval and save moves included, and drops what the dead attempt did after it."""

from __future__ import annotations

import json

from hybrid_ppo.metrics import MetricsWriter

# As a run logs them: label = iterations finished when the move ran (the phases of iteration k+1
# carry k; checkpoint k's save moves carry k too, after the iteration's own eval).
DEAD_ATTEMPT = [(1, "generate"), (1, "train_actor"), (2, "generate"), (2, "train_actor"), (2, "generate"),
                (2, "checkpoint_actor"), (2, "checkpoint_critic"), (2, "generate"), (2, "train_actor"), (3, "generate"),
                (3, "checkpoint_actor"), (3, "checkpoint_critic"), (3, "generate")]


def test_resume_keeps_checkpoint_k_save_moves(tmp_path):
    path = tmp_path / "memory_timeline.jsonl"
    path.write_text("".join(json.dumps({"iteration": it, "phase": ph, "n": n}) + "\n"
                            for n, (it, ph) in enumerate(DEAD_ATTEMPT)))
    MetricsWriter(tmp_path, tensorboard=False, resume_after=2).close()
    kept = [json.loads(line)["n"] for line in path.read_text().splitlines()]
    assert kept == [0, 1, 2, 3, 4, 5, 6]  # through checkpoint 2's save; not iteration 3's phases or later


def test_a_checkpoint_without_logged_save_moves_keeps_nothing_of_its_label(tmp_path):
    path = tmp_path / "memory_timeline.jsonl"
    path.write_text("".join(json.dumps({"iteration": it, "phase": ph}) + "\n"
                            for it, ph in [(0, "generate"), (1, "generate"), (1, "train_actor")]))
    MetricsWriter(tmp_path, tensorboard=False, resume_after=1).close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0]
