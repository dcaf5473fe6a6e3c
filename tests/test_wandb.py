"""logging.wandb_project: an offline wandb run holds the same iteration metrics as metrics.jsonl,
and the samples table; a project without the package is a config error before anything starts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers import tiny_cfg

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
HEADER = b":W&B"


def wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a `.wandb` file: wandb's 7-byte file header, then LevelDB's log format
    (32 KiB blocks of [crc32 (4), length (2), type (1), data] chunks; a record may span blocks)."""
    data = path.read_bytes()
    assert data.startswith(HEADER), f"{path} is not a wandb transaction log"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is zero padding
            offset += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        chunk = data[offset + 7: offset + 7 + length]
        offset += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            records.append(pending)
    return records


def history_rows(run_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for raw in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_iteration_metrics_and_samples(tmp_path, monkeypatch):
    from hybrid_ppo.launch import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("train.iterations=2", "warmup.steps=20", "data.eval_size=16", "logging.tensorboard=false",
                   f"logging.output_dir={tmp_path}", "logging.run_name=wb", "logging.wandb_project=hppo-test",
                   "logging.wandb_tags=[ci]")
    result = train(cfg)

    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = history_rows(result.run_dir)
    by_iteration = {row["iteration"]: row for row in rows if "reward/mean" in row}
    assert sorted(by_iteration) == [1, 2]
    for line in logged:
        if "reward/mean" in line:
            assert by_iteration[line["iteration"]]["reward/mean"] == pytest.approx(line["reward/mean"], rel=1e-12)
    tables = [row for row in rows if row.get("samples/_type") == "table-file"]  # nested keys, joined by "/"
    assert [row["iteration"] for row in tables] == [1, 2]
    assert all(row["samples/nrows"] == cfg.logging.samples_per_iteration for row in tables)


def test_a_wandb_project_without_the_package_fails_before_the_run(tmp_path, monkeypatch):
    import importlib.util

    from hybrid_ppo.config import ConfigError
    from hybrid_ppo.launch import train

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    cfg = tiny_cfg(f"logging.output_dir={tmp_path}", "logging.run_name=wb", "logging.wandb_project=p")
    with pytest.raises(ConfigError, match="wandb package"):
        train(cfg)
    assert not (tmp_path / "wb").exists()
