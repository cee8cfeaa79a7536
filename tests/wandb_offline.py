"""Read a W&B offline run (``run-<id>.wandb``) back, so tests can assert what was really logged (the
transaction-log format is read by :mod:`residual_dynamics.reporting.wandb_log`)."""

from __future__ import annotations

import json
from pathlib import Path

from residual_dynamics.reporting import wandb_log


def records(path: Path):
    assert wandb_log.is_transaction_log(path), f"{path} is not a W&B transaction log"
    yield from wandb_log.records(path)


def run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    assert files, f"no run-*.wandb in {run_dir}"
    return files[0]


def offline_runs(root: Path) -> list[Path]:
    """Every offline run directory below ``root``."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())


def history(run_dir: Path) -> list[dict]:
    """The logged history rows, each {key: decoded JSON value}."""
    out = []
    for record in records(run_file(run_dir)):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out.append(row)
    return out


def run_info(run_dir: Path) -> dict:
    """The run record's config (decoded), group, job_type and tags."""
    info = {"config": {}, "group": None, "job_type": None, "tags": []}
    for record in records(run_file(run_dir)):
        if record.WhichOneof("record_type") == "run":
            info.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags))
            for item in record.run.config.update:
                info["config"][item.key] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                info["config"][item.key] = json.loads(item.value_json)
    return info
