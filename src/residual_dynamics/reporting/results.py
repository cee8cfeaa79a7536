"""The one schema shared by training and pretrained runs: metric keys, W&B tables and the local results file.

A probe result flattens into ``Record`` rows (``probes.common``). From a row:
- the W&B key is ``<name>[/L<layer:02d>[H<head:02d>]]``, e.g. ``resid_norm/resid_post/L03``, ``W_OV/L02H05``,
  ``growth_rate``, ``horizon/k_eff``. Its first component is the probe *family* (``resid_norm``, ``W_OV``,
  ``horizon``, ``cleanup``, ``mlp_act_rate``, ...; :data:`FAMILY_PREFIXES`), so each family is its own section
  of the W&B workspace;
- the results-file row is ``{"step", "probe", "name", "layer", "head", "value"}`` plus run metadata, one
  JSON object per line in ``<run_dir>/results.jsonl``. The results file keeps every record.

Only some records become W&B scalar keys: ``logger.detail`` (:func:`scalar_detail`) selects them, so that a
workspace stays readable and a large model stays far below W&B's guidance of 10,000 distinct metrics per
project. At the default ``layer``, a GPT-2-XL-shaped model (48 layers x 25 heads) with every default probe
logs 89 distinct W&B keys (67 scalars, 21 tables, the step), against 13,669 with every record as a key
(``head``). Every record that is not model-level (per layer, per
head, per clean-up node) also goes, at every detail, into one W&B table per family and probe step
(:func:`tables`), drawn as a value-vs-layer line chart under ``<family>/vs_layer``.

Analysis then works offline on trained and pretrained runs alike, e.g.
``pandas.read_json("results.jsonl", lines=True)``; :func:`parse_metric_key` turns a W&B key back into
(probe, name, layer, head).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from residual_dynamics.probes.common import Record
from residual_dynamics.reporting.logger import DETAILS

RESULTS_FILE = "results.jsonl"

# The probe (registry name) that logs a family, by the family's prefix, so that variants (resid_norm_centered,
# W_OV_folded, W_OV_tlproc, mlp_gate_rate, ...) follow their base family. Globs "<prefix>*" of these get a
# define_metric against trainer/global_step.
FAMILY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("resid_norm", "residual_norms"), ("growth_rate", "residual_norms"),
    ("W_", "weight_norms"), ("b_", "weight_norms"), ("ln", "weight_norms"),
    ("mlp_", "activation_rates"),
    ("horizon", "layer_horizon"),
    ("cleanup", "cleanup"),
    ("ablation", "sublayer_ablation"),
    ("logit_lens", "logit_lens"),
)
# per-layer records kept as scalar keys from logger.detail=layer on: the headline per-layer curves
LAYER_CURVES = ("resid_norm/resid_post",)
# name endings of model-level records that belong to one node (clean-up's embedding / positional writers)
NODE_SUFFIXES = ("/embed", "/pos")
CHART = "vs_layer"  # <family>/vs_layer: the family's table and its line chart (history key <...>_table)
TABLE_COLUMNS = ["name", "layer", "head", "value", "series"]

_SUFFIX = re.compile(r"^(?:L(\d+)(?:H(\d+))?|H(\d+))$")


def family(name: str) -> str:
    """The probe family of a record name or key: its first component (``resid_norm/resid_post`` -> ``resid_norm``)."""
    return name.split("/", 1)[0]


def probe_of(family_name: str) -> Optional[str]:
    """The probe that logs ``family_name`` (``W_OV_tlproc`` -> ``weight_norms``), or None for other keys
    (``train``, ``trainer``, ``probe_figures``)."""
    return next((probe for prefix, probe in FAMILY_PREFIXES if family_name.startswith(prefix)), None)


def metric_key(record: Record) -> str:
    """``<name>[/L<layer:02d>[H<head:02d>]]`` (``/H<head:02d>`` for a head without a layer)."""
    key = record.name
    if record.layer is not None:
        key += f"/L{record.layer:02d}"
        if record.head is not None:
            key += f"H{record.head:02d}"
    elif record.head is not None:
        key += f"/H{record.head:02d}"
    return key


def parse_metric_key(key: str) -> Optional[tuple[str, str, Optional[int], Optional[int]]]:
    """A W&B key -> (probe, name, layer, head), or None when it is no probe scalar (``train/loss``,
    ``trainer/global_step``, ``<family>/vs_layer_table``, ``probe_figures/...``): the inverse of
    :func:`metric_key` on the families of :data:`FAMILY_PREFIXES`."""
    parts = key.split("/")
    probe = probe_of(parts[0])
    if probe is None or (len(parts) > 1 and parts[1].startswith(CHART)):
        return None
    layer = head = None
    match = _SUFFIX.match(parts[-1]) if len(parts) > 1 else None
    if match:
        parts = parts[:-1]
        if match.group(3) is not None:
            head = int(match.group(3))
        else:
            layer = int(match.group(1))
            head = int(match.group(2)) if match.group(2) is not None else None
    return probe, "/".join(parts), layer, head


def scalar_detail(record: Record) -> str:
    """The least ``logger.detail`` at which ``record`` is a W&B scalar key:

    - ``summary``: model-level records (no layer, no head, not one node's), e.g. ``growth_rate``,
      ``horizon/k_eff``, ``cleanup/n_cleaned``;
    - ``layer``: the headline per-layer curves of :data:`LAYER_CURVES` (the residual norm after each layer);
    - ``head``: every other record (per-layer, per-head and per-node detail)."""
    if record.layer is None and record.head is None and not record.name.endswith(NODE_SUFFIXES):
        return "summary"
    if record.head is None and record.name in LAYER_CURVES:
        return "layer"
    return "head"


def _check_detail(detail: str) -> int:
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    return DETAILS.index(detail)


def scalars(results: Mapping[str, Any], detail: str = "layer") -> dict[str, float]:
    """W&B scalars of a {probe name: result} mapping at ``detail`` (summary | layer | head, see
    :func:`scalar_detail`). Non-finite values are kept (W&B shows NaN gaps)."""
    level = _check_detail(detail)
    out: dict[str, float] = {}
    for result in results.values():
        for record in result.records():
            if DETAILS.index(scalar_detail(record)) <= level:
                out[metric_key(record)] = float(record.value)
    return out


def _series(record: Record) -> str:
    """The line a record belongs to in its family's value-vs-layer chart: the name below the family and
    the head, e.g. ``resid_post``, ``H03``, ``writer_score/mlp``, ``writer_score H03``; the family itself
    for a per-layer total such as ``W_Q`` (all heads of a layer)."""
    rest = record.name.partition("/")[2]
    head = f"H{record.head:02d}" if record.head is not None else ""
    return " ".join(part for part in (rest, head) if part) or family(record.name)


def tables(results: Mapping[str, Any]) -> dict[str, list[list]]:
    """{family: rows of :data:`TABLE_COLUMNS`} of every record that is not model-level (per layer, per
    head, per node), whatever the detail; a non-finite value is None, as in the results file. Families
    with only model-level records have no table."""
    out: dict[str, list[list]] = {}
    for result in results.values():
        for record in result.records():
            if scalar_detail(record) == "summary":
                continue
            value = float(record.value)
            out.setdefault(family(record.name), []).append(
                [record.name, record.layer, record.head, value if math.isfinite(value) else None, _series(record)])
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
    last line, and the first append of a session first cuts such a line off.

    Resuming never deletes a row before it has been recomputed. A file opened with ``resume_after=S``
    (the checkpoint step) keeps the earlier session's rows of steps after ``S``; each append at step ``t``
    replaces, in one atomic rewrite, the earlier rows of the steps in ``(S, t]`` -- the steps this session
    has now trained through again -- and keeps the rest. A resume that fails or is interrupted at any point
    therefore leaves every step with rows (the earlier ones or the recomputed ones), and no step is
    recorded twice. :meth:`finish_resume` (at the end of a completed run) drops the earlier rows this
    session did not reach (e.g. after a shorter ``trainer.max_steps``)."""

    def __init__(self, path: str | os.PathLike, resume_after: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stale_after = resume_after  # rows of later steps are an earlier session's, not yet recomputed
        self._tail_checked = False

    def append(self, new_rows: Iterable[Mapping[str, Any]]) -> None:
        new_rows = list(new_rows)
        if not new_rows:
            return
        if not self._tail_checked:
            self._cut_torn_tail()
            self._tail_checked = True
        if self._stale_after is not None:
            self._replace_stale(max(int(row["step"]) for row in new_rows), new_rows)
            return
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in new_rows)
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

    def finish_resume(self) -> None:
        """Drop the earlier session's rows after the last step this session recorded (call it only once
        training completed)."""
        if self._stale_after is not None:
            self._rewrite([row for row in self.read() if row["step"] <= self._stale_after])
            self._stale_after = None

    def truncate_from(self, step: int) -> None:
        """Atomically rewrite the file without rows of ``step`` or later."""
        self._rewrite([row for row in self.read() if row["step"] < step])

    def _replace_stale(self, upto: int, new_rows: list[Mapping[str, Any]]) -> None:
        old = self.read()
        kept = [row for row in old if not self._stale_after < row["step"] <= upto]
        later = [row for row in kept if row["step"] > upto]
        self._rewrite([row for row in kept if row["step"] <= upto] + new_rows + later)
        self._stale_after = upto if later else None  # nothing earlier left to replace: plain appends

    def _rewrite(self, rows: Iterable[Mapping[str, Any]]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _cut_torn_tail(self) -> None:
        """A crash mid-append can leave a last line without its newline; appending after it would glue the
        next row to it. Cut it off (it was never a complete row)."""
        if not self.path.exists() or not self.path.stat().st_size:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
