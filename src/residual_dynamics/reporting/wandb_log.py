"""Reading a W&B transaction log (``run-<id>.wandb``) back: what an offline run really holds.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by 32 KiB blocks of LevelDB-log
records (crc32c:4, length:2, type:1, payload), types FULL=1, FIRST=2, MIDDLE=3, LAST=4; each reassembled
payload is a ``wandb_internal_pb2.Record`` protobuf. A torn or damaged record (a killed run) ends what can
be read. Used by the W&B resume (what a killed session wrote), the analysis (offline runs) and the tests.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7
MAGIC = b":W&B"


def is_transaction_log(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of the transaction log at ``path`` (nothing for a file that is not one)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        return
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + length > len(data):  # a torn last record
            return
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # noqa: BLE001 - a damaged record ends what can be read
                return
            yield record
            pending = b""
