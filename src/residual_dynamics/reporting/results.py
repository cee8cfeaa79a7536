"""The one schema shared by training and pretrained runs: metric keys and the local results file.

A probe result flattens into ``Record`` rows (``probes.common``). From a row:
- the W&B key is ``probe/<name>[/L<layer:02d>[H<head:02d>]]``, e.g. ``probe/resid_norm/resid_post/L03``,
  ``probe/W_OV/L02H05``, ``probe/growth_rate``;
- the results-file row is ``{"step", "probe", "name", "layer", "head", "value"}`` plus run metadata, one
  JSON object per line in ``<run_dir>/results.jsonl``.

Analysis then works offline on trained and pretrained runs alike, e.g.
``pandas.read_json("results.jsonl", lines=True)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from residual_dynamics.probes.common import Record

RESULTS_FILE = "results.jsonl"


def metric_key(record: Record) -> str:
    key = f"probe/{record.name}"
    if record.layer is not None:
        key += f"/L{record.layer:02d}"
        if record.head is not None:
            key += f"H{record.head:02d}"
    elif record.head is not None:
        key += f"/H{record.head:02d}"
    return key


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """W&B scalars of a {probe name: result} mapping. Non-finite values are kept (W&B shows NaN gaps)."""
    out: dict[str, float] = {}
    for result in results.values():
        for record in result.records():
            out[metric_key(record)] = float(record.value)
    return out


def rows(results: Mapping[str, Any], step: int, meta: Optional[Mapping[str, Any]] = None) -> list[dict]:
    """Results-file rows of a {probe name: result} mapping at ``step``."""
    out = []
    for probe, result in results.items():
        for record in result.records():
            value = float(record.value)
            row = {
                "step": int(step),
                "probe": probe,
                "name": record.name,
                "layer": record.layer,
                "head": record.head,
                "value": value if math.isfinite(value) else None,
            }
            if meta:
                row.update(meta)
            out.append(row)
    return out


class ResultsFile:
    """Append-only JSONL file. Each append writes whole lines and fsyncs, so a crash loses at most the
    batch being written and never leaves a half-written line behind a complete one; ``read`` skips a torn
    last line. On resume, rows of steps at or after the resume step are dropped first (``truncate_from``),
    so no step is recorded twice."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, new_rows: Iterable[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in new_rows)
        if not text:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # torn last line after a crash
                    break
        return out

    def truncate_from(self, step: int) -> None:
        """Atomically rewrite the file without rows of ``step`` or later (used when resuming)."""
        kept = [row for row in self.read() if row["step"] < step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
