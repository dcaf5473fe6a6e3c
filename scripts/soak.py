#!/usr/bin/env python
"""A long run, measured: does anything grow per iteration?

    python scripts/soak.py [CONFIG] [--iterations 300] [--save-every 25] [--set key=value ...]

Runs `hybrid-ppo train CONFIG` (default: the default job) with checkpoints on and, every time
`metrics.jsonl` gains an iteration, samples every process of the run's tree (the driver, Ray's
own processes and every role actor): RSS, open file descriptors, threads; the `/dev/shm` bytes
those processes map or hold open; the run directory's size (checkpoints apart); and on a GPU each
process's device memory (NVML). Sampling is from outside (this process polls the file), so the
run itself is not slowed or changed.

Writes `soak.json` and `soak.png` (one panel per quantity over iterations) next to the run and
prints a table: value after warm-up, at the end, and growth per 100 iterations from a least-squares
line through the post-warm-up samples. Bounds (a row that breaks one is marked GROWS):
  RSS                 < 1 % of its post-warm-up value per 100 iterations
  fds, threads        < 1 per 100 iterations
  /dev/shm (ours)     < 1 MiB per 100 iterations
  checkpoints/        < 1 MiB per 100 iterations once `train.keep_checkpoints` exist
  run dir w/o ckpts   logs only: reported with bytes per iteration, not bounded
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
RAY_ROLE = re.compile(r"ray::(\w+)")
"""A Ray actor's process title is `ray::ClassName.method` (or `ray::ClassName` when idle)."""

BOUNDS = {"rss_mib": ("relative", 0.01), "fds": ("absolute", 1.0), "threads": ("absolute", 1.0),
          "shm_ours_mib": ("absolute", 1.0), "checkpoints_mib": ("absolute", 1.0)}


def label(proc: psutil.Process, driver_pid: int) -> str:
    """A stable name for a process: the driver, a Ray actor's role class, or Ray's own program."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    joined = " ".join(cmd)
    match = RAY_ROLE.search(joined)
    if match:
        return match.group(1)
    for arg in cmd:
        base = os.path.basename(arg)
        if base.endswith(".py") or base in ("raylet", "gcs_server"):
            return base.removesuffix(".py")
    return os.path.basename(cmd[0]) if cmd else proc.name()


def shm_bytes(pids: list[int]) -> int:
    """Bytes of /dev/shm files that these processes map or hold open, each file once."""
    files: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line}
            paths |= {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                      if _link(pid, fd).startswith("/dev/shm/")}
        except (OSError, IndexError):
            continue
        for path in paths:
            path = path.removesuffix(" (deleted)")
            try:
                files[path] = os.stat(path).st_size
            except OSError:
                files.setdefault(path, 0)  # unlinked but still mapped: counted in RSS, not here
    return sum(files.values())


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # a checkpoint pruned meanwhile
                pass
    return total


class DeviceMemory:
    """Per-process GPU memory from NVML; nothing on a machine without one."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library or no driver (FACTS: NVMLError_LibraryNotFound on CPU)
            self.nvml, self.handles = None, []

    def by_pid(self) -> dict[int, int]:
        used: dict[int, int] = defaultdict(int)
        for handle in self.handles:
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used[p.pid] += p.usedGpuMemory or 0
        return used


def sample(driver: psutil.Process, run_dir: Path, device: DeviceMemory) -> dict:
    procs = [driver, *driver.children(recursive=True)]
    gpu = device.by_pid()
    per_process = {}
    for proc in procs:
        try:
            with proc.oneshot():
                name = f"{label(proc, driver.pid)}[{proc.pid}]"
                per_process[name] = {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
                                     "threads": proc.num_threads(), "gpu_mib": gpu.get(proc.pid, 0) / 2**20}
        except psutil.Error:
            continue
    checkpoints = dir_bytes(run_dir / "checkpoints")
    return {"processes": per_process, "shm_ours_mib": shm_bytes([p.pid for p in procs]) / 2**20,
            "shm_total_mib": psutil.disk_usage("/dev/shm").used / 2**20,
            "checkpoints_mib": checkpoints / 2**20, "logs_mib": (dir_bytes(run_dir) - checkpoints) / 2**20,
            "load_1min": os.getloadavg()[0]}


def iterations_logged(path: Path, offset: int) -> tuple[list[int], int]:
    """Iterations whose training line (it has `time/step`) appeared since `offset`."""
    if not path.exists():
        return [], offset
    with open(path) as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[:chunk.rfind("\n") + 1]
    found = [r["iteration"] for r in map(json.loads, complete.splitlines()) if "time/step" in r]
    return found, offset + len(complete)


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def series(samples: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Quantity name -> (iterations, values); per-process quantities per process."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for s in samples:
        for proc, values in s["processes"].items():
            for key, value in values.items():
                out[f"{proc} {key}"][0].append(s["iteration"])
                out[f"{proc} {key}"][1].append(value)
        for key in ("shm_ours_mib", "shm_total_mib", "checkpoints_mib", "logs_mib"):
            out[key][0].append(s["iteration"])
            out[key][1].append(s[key])
    return out


def summarize(samples: list[dict], warmup: int, checkpoints_full: int = 0) -> list[dict]:
    """`checkpoints_full`: the iteration after which `train.keep_checkpoints` exist; the
    checkpoints' size is fitted from there (before, it steps up once per kept save)."""
    rows = []
    for name, (its, values) in sorted(series(samples).items()):
        start = max(warmup, checkpoints_full) if name == "checkpoints_mib" else warmup
        kept = [(i, v) for i, v in zip(its, values) if i > start]
        if len(kept) < 2 or name.endswith("gpu_mib") and not any(values):
            continue
        xs, ys = zip(*kept)
        growth = slope_per_100(list(xs), list(ys))
        quantity = name.split()[-1]
        kind, bound = BOUNDS.get(quantity, (None, None))
        limit = bound * abs(ys[0]) if kind == "relative" else bound
        rows.append({"quantity": name, "after_warmup": ys[0], "end": ys[-1], "growth_per_100": growth,
                     "bound_per_100": limit, "ok": None if limit is None else growth < limit})
    return rows


def plot(samples: list[dict], warmup: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(samples)
    panels = ["rss_mib", "fds", "threads", "gpu_mib", "shm_ours_mib", "checkpoints_mib", "logs_mib"]
    panels = [q for q in panels if any(any(v) for k, (_, v) in data.items() if k.split()[-1] == q)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), sharex=True)
    for ax, quantity in zip(axes, panels):
        for name, (its, values) in sorted(data.items()):
            if name.split()[-1] == quantity:
                ax.plot(its, values, label=name.removesuffix(f" {quantity}"), linewidth=0.8)
        ax.axvline(warmup, color="grey", linestyle=":")
        ax.set_ylabel(quantity)
        if quantity in ("rss_mib", "fds", "threads"):
            ax.legend(fontsize=5, ncol=3, loc="upper left")
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=30, help="iterations left out of the growth fit")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="the run's train.keep_checkpoints")
    parser.add_argument("--output-dir", default=str(REPO / "runs"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    name = time.strftime("soak-%Y%m%d-%H%M%S")
    run_dir = Path(args.output_dir) / name
    overrides = [f"train.iterations={args.iterations}", f"train.save_every={args.save_every}",
                 f"train.keep_checkpoints={args.keep_checkpoints}", f"logging.output_dir={args.output_dir}", f"logging.run_name={name}", *args.set]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_ppo.cli", "train", args.config, *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver, device, samples, offset = psutil.Process(proc.pid), DeviceMemory(), [], 0
    start = time.monotonic()
    while proc.poll() is None:
        found, offset = iterations_logged(run_dir / "metrics.jsonl", offset)
        if found:  # one sample per new iteration, taken now (several lines at once: the last)
            try:
                samples.append({"iteration": found[-1], "seconds": time.monotonic() - start,
                                **sample(driver, run_dir, device)})
            except psutil.NoSuchProcess:
                break
        time.sleep(0.02)
    stderr = proc.communicate()[1]
    if proc.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        print(f"soak: the run exited {proc.returncode}", file=sys.stderr)

    rows = summarize(samples, args.warmup, args.keep_checkpoints * args.save_every)
    result = {"config": args.config, "overrides": overrides, "run_dir": str(run_dir), "returncode": proc.returncode,
              "iterations_sampled": len(samples), "warmup": args.warmup, "wall_s": time.monotonic() - start,
              "load_1min_mean": sum(s["load_1min"] for s in samples) / max(1, len(samples)),
              "cpu_count": os.cpu_count(), "rows": rows, "samples": samples}
    out, picture = run_dir.with_name(name + ".soak.json"), run_dir.with_name(name + ".soak.png")
    out.write_text(json.dumps(result, indent=1))
    if samples:
        plot(samples, args.warmup, picture)

    print(f"{len(samples)} iterations sampled in {result['wall_s']:.0f} s (1-min load {result['load_1min_mean']:.1f} "
          f"on {os.cpu_count()} cores); growth fit after iteration {args.warmup}")
    print(f"{'quantity':<44} {'after warm-up':>13} {'end':>10} {'per 100 it':>11} {'bound':>9}")
    for r in rows:
        bound = "" if r["bound_per_100"] is None else f"{r['bound_per_100']:.2f}"
        flag = {True: "", False: "  GROWS", None: ""}[r["ok"]]
        print(f"{r['quantity']:<44} {r['after_warmup']:>13.2f} {r['end']:>10.2f} {r['growth_per_100']:>11.3f} "
              f"{bound:>9}{flag}")
    print(f"wrote {out} and {picture}")
    return 0 if proc.returncode == 0 and all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
