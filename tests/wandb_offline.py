"""Read a W&B offline run (``run-<id>.wandb``) back, so tests can assert what was really logged.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by
32 KiB blocks of LevelDB-log records (crc32c:4, length:2, type:1, payload), types FULL=1, FIRST=2,
MIDDLE=3, LAST=4; each reassembled payload is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


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
