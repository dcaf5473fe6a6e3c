"""memory_timeline.png: memory per role over a run, as a stacked area, with the phases as bands.

What is stacked is the best figure the run has: each role process's torch-allocated device memory
on its fullest GPU where there was a GPU, otherwise the bytes of the role's resident states as the
residency moves counted them (the CPU figure that offloading changes; RSS does not).
"""

from __future__ import annotations

from pathlib import Path

FIGURE_INCHES, DPI = (14, 6), 100  # a 1400 x 600 PNG
MIN_LABELLED_BAND = 0.006  # a phase band narrower than this fraction of the run gets no label


def role_series(records: list[dict]) -> tuple[list[float], dict[str, list[float]], str]:
    """Times (s from the first move) and, per role, its memory after every move, in GiB or MiB."""
    on_gpu = any(r["after"].get("device_allocated_gib") is not None for rec in records for r in rec["ranks"])
    roles = list(dict.fromkeys(rec["role"] for rec in records))
    resident: dict[str, dict[str, float]] = {role: {} for role in roles}  # role -> state -> bytes (fullest rank)
    level = {role: 0.0 for role in roles}
    times: list[float] = []
    series: dict[str, list[float]] = {role: [] for role in roles}
    start = min(r.get("wall_time", 0.0) for rec in records for r in rec["ranks"])
    for i, rec in enumerate(records):
        stamps = [r["wall_time"] for r in rec["ranks"] if "wall_time" in r]
        times.append(max(stamps) - start if stamps else float(i))
        role = rec["role"]
        if on_gpu:
            level[role] = max(r["after"]["device_allocated_gib"] or 0.0 for r in rec["ranks"]) * (1 << 30)
        else:
            for state in rec["states"]:
                size = max(sum((r.get("bytes") or {}).get(state, {}).values()) for r in rec["ranks"])
                if rec["direction"] == "reload":
                    resident[role][state] = size
                else:
                    resident[role].pop(state, None)
            level[role] = sum(resident[role].values())
        for name in roles:
            series[name].append(level[name])
    peak = max((sum(v[i] for v in series.values()) for i in range(len(times))), default=0.0)
    unit, scale = ("GiB", 1 << 30) if peak >= (1 << 30) else ("MiB", 1 << 20)
    what = "torch allocated per role (fullest GPU)" if on_gpu else "resident state bytes per role (one rank)"
    return times, {k: [x / scale for x in v] for k, v in series.items()}, f"{what}, {unit}"


def phase_bands(records: list[dict], times: list[float]) -> list[tuple[str, float, float]]:
    """(phase, start, end): a phase runs from its first move to the next phase's first move."""
    bands: list[tuple[str, float, float]] = []
    for rec, t in zip(records, times):
        name = rec["phase"]
        if not bands or bands[-1][0] != name:
            bands.append((name, t, t))
        bands[-1] = (bands[-1][0], bands[-1][1], t)
    return [(name, start, bands[i + 1][1] if i + 1 < len(bands) else end) for i, (name, start, end) in enumerate(bands)]


def plot_timeline(records: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    times, series, ylabel = role_series(records)
    fig, ax = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    try:
        # step "post": a role holds its memory from one move until the next
        ax.stackplot(times, *series.values(), labels=list(series), step="post", alpha=0.85)
        top = max((sum(v[i] for v in series.values()) for i in range(len(times))), default=1.0) or 1.0
        ax.set_ylim(0, top * 1.35)
        span = (times[-1] - times[0]) or 1.0 if times else 1.0
        for i, (name, start, end) in enumerate(phase_bands(records, times)):
            ax.axvspan(start, end, color="0.9" if i % 2 else "0.97", zorder=-1)
            if end - start >= MIN_LABELLED_BAND * span:  # narrower bands would print labels over each other
                ax.text((start + end) / 2, top * 1.33, name, rotation=90, ha="center", va="top", fontsize=7)
        ax.set_xlabel("seconds since the first move")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
