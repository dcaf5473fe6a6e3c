"""Where the memory goes, phase by phase: a table built from a run's memory_timeline.jsonl.

Every residency move records each rank's memory before and after it. A role that does not move
in a phase keeps what it had after its last move, so carrying the last reading of every
(role, rank) forward gives the memory of every role in every phase. The table shows one
iteration (the last complete one by default): per phase, each role's reading (the largest over
its ranks, i.e. its worst GPU) and the per-GPU total (roles on GPU i are the rank-i ranks; roles
that share one process, as under the local executor, share one reading and count once).

Which reading: `device_allocated_gib` (torch tensors on the GPU) when the run had a GPU,
otherwise `host_rss_gib`, the whole process's resident memory, which on a CPU run includes each
process's ~0.5 GiB of libraries and is only a coarse picture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_ppo.memory.plan import Phase

DEVICE_FIELD, HOST_FIELD = "device_allocated_gib", "host_rss_gib"
GIB_FIELDS_NOTE = {
    DEVICE_FIELD: "GPU run: state bytes counted from the tensors; torch allocated/reserved and NVML used "
                  "before and after every move",
    HOST_FIELD: "CPU run: state bytes counted from the tensors (exact); process RSS only, which offloading "
                "to host memory does not change; no device readings",
}


@dataclass
class PhaseMemory:
    roles: dict[str, float]  # role -> GiB on its fullest GPU (max over ranks)
    gpu_total: float  # max over GPUs of the sum over the roles on it
    move_seconds: float  # time spent moving states on entering the phase


@dataclass
class MemoryReport:
    field: str
    iteration: int
    phases: dict[str, PhaseMemory] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"field": self.field, "iteration": self.iteration,
                "phases": {p: vars(m) for p, m in self.phases.items()}}

    def table(self) -> str:
        roles = sorted({r for m in self.phases.values() for r in m.roles})
        header = f"{'phase':<16}" + "".join(f"{r:>11}" for r in roles) + f"{'per GPU':>11}{'moves s':>10}"
        lines = [f"memory by phase, iteration {self.iteration} ({self.field}, GiB)", header]
        for phase, m in self.phases.items():
            cells = "".join(f"{m.roles[r]:>11.3f}" if r in m.roles else f"{'-':>11}" for r in roles)
            lines.append(f"{phase:<16}{cells}{m.gpu_total:>11.3f}{m.move_seconds:>10.3f}")
        return "\n".join(lines)


def load_timeline(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "memory_timeline.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a hybrid-ppo run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def memory_report(records: list[dict], iteration: int | None = None) -> MemoryReport:
    """The per-phase table of `iteration` (default: the last one that trained the actor)."""
    if not records:
        raise ValueError("the memory timeline is empty")
    if iteration is None:
        trained = [r["iteration"] for r in records if r["phase"] == Phase.TRAIN_ACTOR.value]
        if not trained:
            raise ValueError("no iteration in the memory timeline reached train_actor")
        iteration = max(trained)
    name = DEVICE_FIELD if any(r["after"].get(DEVICE_FIELD) is not None
                               for rec in records for r in rec["ranks"]) else HOST_FIELD
    current: dict[tuple[str, int], tuple[float, int | None, int]] = {}  # (role, rank) -> (GiB, pid, when)
    entered: dict[str, PhaseMemory] = {}  # phase -> memory after its moves, in `iteration`
    for when, record in enumerate(records):
        if record["iteration"] > iteration:
            break
        for rank, reading in enumerate(record["ranks"]):
            if reading["after"].get(name) is not None:
                current[(record["role"], rank)] = (reading["after"][name], reading.get("pid"), when)
        if record["iteration"] == iteration:
            before = entered.get(record["phase"])
            entered[record["phase"]] = _snapshot(current, (before.move_seconds if before else 0.0) + record["seconds"])
    report = MemoryReport(name, iteration)
    last: PhaseMemory | None = None
    for phase in Phase:  # a phase without moves holds what the phase before it held
        last = entered.get(phase.value) or (last and PhaseMemory(last.roles, last.gpu_total, 0.0))
        if last is not None:
            report.phases[phase.value] = last
    return report


def _snapshot(current: dict[tuple[str, int], tuple[float, int | None, int]], move_seconds: float) -> PhaseMemory:
    roles: dict[str, float] = {}
    latest: dict[tuple[int, object], tuple[int, float]] = {}  # (GPU, process) -> its newest (when, GiB)
    for (role, rank), (gib, pid, when) in current.items():
        roles[role] = max(roles.get(role, 0.0), gib)
        key = (rank, pid if pid is not None else role)  # a shared process counts once
        latest[key] = max(latest.get(key, (-1, 0.0)), (when, gib))
    per_gpu: dict[int, float] = {}
    for (rank, _), (_, gib) in latest.items():
        per_gpu[rank] = per_gpu.get(rank, 0.0) + gib
    return PhaseMemory(roles, max(per_gpu.values(), default=0.0), move_seconds)


STATE_TOLERANCE = 0.02
"""Planner vs measured state bytes: sizes are exact arithmetic, so 2 % covers only padding."""


def measured_state_bytes(records: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """role -> state -> component -> bytes on one rank: the largest any move counted (lazily built
    states such as Adam's moments are 0 before the first step)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for record in records:
        for reading in record["ranks"]:
            for state, components in (reading.get("bytes") or {}).items():
                slot = out.setdefault(record["role"], {}).setdefault(state, {})
                for name, nbytes in components.items():
                    slot[name] = max(slot.get(name, 0), nbytes)
    return out


@dataclass(frozen=True)
class StateComparison:
    role: str
    state: str
    component: str
    planned: int | None
    measured: int | None

    @property
    def error(self) -> float | None:
        """(measured - planned) / planned; None where one side is missing or both are 0."""
        if self.planned is None or self.measured is None or (self.planned == 0 and self.measured == 0):
            return None if self.planned is None or self.measured is None else 0.0
        return (self.measured - self.planned) / self.planned if self.planned else float("inf")

    @property
    def within_tolerance(self) -> bool:
        return self.error is not None and abs(self.error) <= STATE_TOLERANCE


def compare_states(planned: dict[str, dict[str, dict[str, int]]],
                   measured: dict[str, dict[str, dict[str, int]]]) -> list[StateComparison]:
    """One row per (role, state, component) that either side knows. A component the run never
    held (ZeRO-2 gradients between steps are freed, not moved) is measured as 0."""
    rows = []
    for role in sorted(set(planned) | set(measured)):
        states = set(planned.get(role, {})) | set(measured.get(role, {}))
        for state in sorted(states):
            p, m = planned.get(role, {}).get(state), measured.get(role, {}).get(state)
            for component in sorted(set(p or {}) | set(m or {})):
                rows.append(StateComparison(role, state, component, None if p is None else p.get(component),
                                            None if m is None else m.get(component)))
    return rows


def comparison_table(rows: list[StateComparison]) -> str:
    lines = ["planner vs measured, per rank (bytes of each state, counted from the tensors)",
             f"{'role':<10}{'state':<13}{'component':<24}{'planned':>14}{'measured':>14}{'error':>9}"]
    for r in rows:
        show = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
        err = "-" if r.error is None else f"{100 * r.error:+.2f}%"
        lines.append(f"{r.role:<10}{r.state:<13}{r.component:<24}{show(r.planned):>14}{show(r.measured):>14}{err:>9}")
    return "\n".join(lines)


PEAK_FIELD = "device_peak_gib"


def phase_peaks(records: list[dict]) -> dict[str, float]:
    """Per phase, the per-GPU peak of torch-allocated memory (GPU runs; {} without readings).

    Each move resets its process's peak counter, so the peak a process reports before a move is
    the peak since its previous move: it belongs to the phase of that previous move (the actor's
    training peak shows up before SYNC's offload, in the window opened by TRAIN_ACTOR's reload).
    Processes on one GPU (role rank i of every role) are summed: an upper bound, since their
    peaks need not coincide; under the local executor one process is the whole GPU."""
    opened: dict[tuple[int, object], str] = {}  # (GPU, process) -> phase of its last move
    peaks: dict[str, dict[tuple[int, object], float]] = {}
    for record in records:
        for gpu, reading in enumerate(record["ranks"]):
            process = (gpu, reading.get("pid", record["role"]))
            peak = reading.get("before", {}).get(PEAK_FIELD)
            if peak is not None and process in opened:
                window = peaks.setdefault(opened[process], {})
                window[process] = max(window.get(process, 0.0), peak)
            opened[process] = record["phase"]
    out = {}
    for phase, per_process in peaks.items():
        per_gpu: dict[int, float] = {}
        for (gpu, _), gib in per_process.items():
            per_gpu[gpu] = per_gpu.get(gpu, 0.0) + gib
        out[phase] = max(per_gpu.values())
    return out
