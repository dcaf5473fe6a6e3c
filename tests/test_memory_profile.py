"""`hybrid-ppo profile`: 3 iterations of the tiny job (local executor), its report and picture."""

from __future__ import annotations

import json
import struct

from pathlib import Path

import pytest

from hybrid_ppo.cli import main
from hybrid_ppo.memory.plot import DPI, FIGURE_INCHES
from hybrid_ppo.memory.report import STATE_TOLERANCE


CACHE = Path(__file__).resolve().parent.parent / ".cache"  # the warmed-up tiny model, shared between runs


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_profile_three_iterations(tmp_path, capsys):
    assert main(["profile", "placement.executor=local", "warmup.steps=20", "data.eval_size=16",
                 "logging.tensorboard=false", f"logging.cache_dir={CACHE}", f"logging.output_dir={tmp_path}",
                 "logging.run_name=p"]) == 0
    run = tmp_path / "p"
    assert "planner vs measured" in capsys.readouterr().out

    report = json.loads((run / "memory_report.json").read_text())
    assert report["iterations"] == 3 and report["measured"]["iteration"] == 2  # the third, counted from 0
    assert report["figures"].startswith("CPU run")
    rows = {(r["role"], r["state"], r["component"]): r for r in report["states"]}
    # Every state the planner sizes was measured, and agrees within 2 % (CPU: exact sizes).
    for key in [("actor", "weights", "lp_params"), ("actor", "train_state", "hp_params"),
                ("actor", "train_state", "optim_states"), ("critic", "weights", "lp_params"),
                ("critic", "train_state", "optim_states"), ("reference", "weights", "params"),
                ("rollout", "weights", "weights")]:
        row = rows[key]
        assert row["measured"] > 0 and abs(row["error"]) <= STATE_TOLERANCE, row
    assert report["states_within_2_percent"]
    assert report["planner"]["verdict"].startswith("fits")

    assert _png_size(run / "memory_timeline.png") == (FIGURE_INCHES[0] * DPI, FIGURE_INCHES[1] * DPI)
    assert "planner vs measured" in (run / "memory_report.txt").read_text()


@pytest.mark.gpu
def test_counted_bytes_are_what_an_offload_frees_on_the_device():
    import torch

    from hybrid_ppo.memory.plan import State
    from hybrid_ppo.memory.residency import ModuleResidency

    weights = frozenset({State.WEIGHTS})
    residency = ModuleResidency(torch.nn.Linear(1024, 1024).cuda(), torch.device("cuda"))
    counted = residency.state_bytes(weights)["weights"]["params"]
    before = torch.cuda.memory_allocated()
    residency.offload(weights)
    torch.cuda.synchronize()
    assert counted == (1024 * 1024 + 1024) * 4 == before - torch.cuda.memory_allocated()
