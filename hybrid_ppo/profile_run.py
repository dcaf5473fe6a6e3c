"""`hybrid-ppo profile`: run a few PPO iterations and put the measured memory beside the plan.

It trains through `launch.train` (the same run as `hybrid-ppo train`, with `train.iterations`
set to N), then writes into the run directory:

* `memory_report.json`: the per-phase table of the last iteration (`report.memory_report`), the
  planner's estimate for the same config, and per role and state the planned bytes beside the
  measured ones (counted from the tensors each move touched) with the error. With a GPU it also
  holds each phase's peak of torch-allocated memory (`report.phase_peaks`) beside the planner's
  per-GPU total.
* `memory_report.txt`: the same as tables (also printed).
* `memory_timeline.png`: memory per role over time, stacked, with the phases as bands.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from hybrid_ppo.config import Config
from hybrid_ppo.errors import InputError
from hybrid_ppo.memory.plot import plot_timeline
from hybrid_ppo.memory.report import (GIB_FIELDS_NOTE, compare_states, comparison_table, load_timeline,
                                      measured_state_bytes, memory_report, phase_peaks)


@dataclass(frozen=True)
class ProfileResult:
    run_dir: Path
    json_path: Path
    png_path: Path
    table: str


def profile(cfg: Config, iterations: int = 3) -> ProfileResult:
    """Train `iterations` PPO iterations of `cfg`, then write the report and the picture."""
    from hybrid_ppo.launch import train

    if iterations < 1:
        raise InputError(f"profile: iterations must be >= 1, got {iterations}")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=iterations))
    return write_profile(train(cfg).run_dir, cfg)


def write_profile(run_dir: Path, cfg: Config) -> ProfileResult:
    """Report on a finished run directory (its memory_timeline.jsonl), planned against measured."""
    from hybrid_ppo.memory.estimate import estimate

    records = load_timeline(run_dir)
    report = memory_report(records)
    roles = list(dict.fromkeys(rec["role"] for rec in records))
    plan = estimate(cfg, [r for r in _placement_roles(cfg) if r in roles])
    rows = compare_states(plan.states, measured_state_bytes(records))
    peaks = _peak_comparison(phase_peaks(records), plan) or None
    data = {"iterations": cfg.train.iterations, "figures": GIB_FIELDS_NOTE[report.field],
            "measured": report.as_dict(), "planner": plan.as_dict(),
            "states": [{**dataclasses.asdict(r), "error": r.error} for r in rows],
            "states_within_2_percent": all(r.within_tolerance for r in rows
                                           if r.planned is not None and r.measured is not None),
            "peak_per_phase_gib": peaks}
    json_path = run_dir / "memory_report.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    tables = [report.table(), "", comparison_table(rows), "", plan.table()]
    if peaks:
        tables += ["", _peak_table(peaks)]
    table = "\n".join(tables)
    (run_dir / "memory_report.txt").write_text(table + "\n")
    png = plot_timeline(records, run_dir / "memory_timeline.png", f"memory per role: {run_dir.name}")
    return ProfileResult(run_dir, json_path, png, table)


def _placement_roles(cfg: Config) -> tuple[str, ...]:
    from hybrid_ppo.placement import roles_for

    return roles_for(cfg)


def _peak_comparison(measured: dict[str, float], plan) -> dict[str, dict[str, float]]:
    """Per phase: the measured per-GPU peak of torch-allocated memory against the planner's total
    less the CUDA contexts and communicators, which torch's allocator does not see."""
    out = {}
    for phase, peak in measured.items():
        if phase not in plan.phases:
            continue
        planned = sum(v for terms in plan.phases[phase].roles.values() for k, v in terms.items()
                      if k not in ("cuda_context", "nccl")) / (1 << 30)
        out[phase] = {"measured": peak, "planned": planned, "error": (peak - planned) / planned if planned else None}
    return out


def _peak_table(peaks: dict[str, dict[str, float]]) -> str:
    lines = ["per-phase peak of torch-allocated GiB per GPU: measured vs planned (contexts excluded)",
             f"{'phase':<16}{'measured':>10}{'planned':>10}{'error':>9}"]
    for phase, p in peaks.items():
        err = "-" if p["error"] is None else f"{100 * p['error']:+.1f}%"
        lines.append(f"{phase:<16}{p['measured']:>10.3f}{p['planned']:>10.3f}{err:>9}")
    return "\n".join(lines)
