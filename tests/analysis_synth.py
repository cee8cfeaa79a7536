"""Synthetic runs for the analysis tests, in the format real runs write (results.jsonl + .hydra/config.yaml),
with effects planted in them: a known slope, a known power-law exponent, a known cell difference, or none."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import yaml

from residual_dynamics.analysis.collect import RunData

STEPS = (0, 1, 2, 4, 50, 100)
MAX_STEPS = 100
BATCH, SEQ = 8, 32

BASE_CONFIG: dict[str, Any] = {
    "model": {"name": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": None, "n_ctx": 128,
              "normalization_type": "LN", "act_fn": "gelu"},
    "optim": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.95], "weight_decay": 0.1, "decay_norm_params": False},
    "data": {"name": "embedded", "seq_len": SEQ, "batch_size": BATCH, "val_batches": 2},
    "tokenizer": {"name": "bpe", "vocab_size": 512},
    "trainer": {"accelerator": "cpu", "max_steps": MAX_STEPS, "val_every": 100, "ckpt_every": 100},
    "logger": {"kind": "wandb", "project": "residual-dynamics", "entity": None, "mode": "auto",
               "group": "synthetic", "job_type": "train", "tags": []},
    "probes": {"batch_size": 8, "seq_len": "${data.seq_len}",
               "schedule": {"log_spaced_until": 8, "every": 50, "at_end": True}},
    "seed": 0,
    "run_name": "${now:%Y-%m-%d_%H-%M-%S}",
    "ckpt_path": None,
    "paths": {"output_root": "outputs", "cache_dir": "/tmp/cache", "run_dir": "${hydra:runtime.output_dir}"},
}


def make_config(**fields: Any) -> dict:
    """BASE_CONFIG with dotted fields set: make_config(**{"model.n_heads": 2, "seed": 1})."""
    config = copy.deepcopy(BASE_CONFIG)
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def make_rows(final: Mapping[str, float], *, n_layers: int = 2, n_heads: int = 2, steps: Sequence[int] = STEPS,
              run: str = "synthetic", noise: Optional[Callable[[], float]] = None) -> list[dict]:
    """Rows of every step: the scalar metrics in ``final`` ramp linearly from 1.0 at step 0 to their final value;
    a per-layer resid_norm/resid_post and per-head W_OV come along (so per-layer / per-head paths are exercised)."""
    rows = []
    top = max(steps)
    for step in steps:
        frac = step / top if top else 1.0
        for name, value in final.items():
            probe = "layer_horizon" if name.startswith("horizon") else "residual_norms"
            v = value if step == top else 1.0 + (value - 1.0) * frac + (noise() if noise else 0.0)
            rows.append({"step": step, "probe": probe, "name": name, "layer": None, "head": None, "value": float(v),
                         "run": run, "model": "tiny"})
        for layer in range(n_layers):
            rows.append({"step": step, "probe": "residual_norms", "name": "resid_norm/resid_post", "layer": layer,
                         "head": None, "value": float(1.0 + layer * (1 + frac)), "run": run, "model": "tiny"})
            for head in range(n_heads):
                rows.append({"step": step, "probe": "weight_norms", "name": "W_OV", "layer": layer, "head": head,
                             "value": float(0.5 + 0.1 * head + 0.01 * step), "run": run, "model": "tiny"})
    return rows


def write_run(run_dir: Path, config: Optional[dict], rows: Optional[Iterable[dict]], *, torn: bool = False) -> Path:
    """A run directory as training writes it. ``config=None``: no .hydra/config.yaml; ``rows=None``: no
    results.jsonl; ``torn``: a half-written last line (a crash)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        overrides = [f"seed={config.get('seed')}", f"model.n_heads={config['model'].get('n_heads')}"]
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if rows is not None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        if torn:
            text += '{"head": null, "layer": 0, "name": "resid_n'
        (run_dir / "results.jsonl").write_text(text)
    return run_dir


def job_dir(sweep: Path, num: int, overrides: Mapping[str, Any]) -> Path:
    return sweep / (f"{num}_" + ",".join(f"{k}={v}" for k, v in overrides.items()))


def trend_values(rng, xs: Sequence[float], seeds: Sequence[int], slope: float, noise: float,
                 intercept: float = 1.0) -> list[tuple[float, int, float]]:
    return [(x, s, intercept + slope * x + rng.normal(0, noise)) for x in xs for s in seeds]


def power_values(rng, xs: Sequence[float], seeds: Sequence[int], a: float, b: float, noise: float):
    return [(x, s, a * x ** b * float(np.exp(rng.normal(0, noise)))) for x in xs for s in seeds]


def write_sweep(sweep: Path, values, *, x_field: str, metric: str, extra: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """One job directory per (x, seed, y) of ``values``; y is ``metric`` at the final step."""
    dirs = []
    for num, (x, seed, y) in enumerate(values):
        x = int(x) if float(x).is_integer() else x
        fields = {x_field: x, "seed": seed, **(extra or {})}
        run_dir = job_dir(sweep, num, {x_field: x, "seed": seed})
        n_layers = fields.get("model.n_layers", 2)
        rows = make_rows({metric: y}, n_layers=n_layers, run=sweep.name)
        dirs.append(write_run(run_dir, make_config(**fields), rows))
    return dirs


def rundata(values, *, x_field: str, metric: str, sweep: str = "mem") -> list[RunData]:
    """The same runs as :func:`write_sweep`, in memory (for the coverage loops): RunData as the files route
    reads them, handed to the same builder."""
    out = []
    for num, (x, seed, y) in enumerate(values):
        x = int(x) if float(x).is_integer() else x
        config = make_config(**{x_field: x, "seed": seed})
        run_dir = f"/mem/{sweep}/{num}_{x_field}={x},seed={seed}"
        rows = make_rows({metric: y}, n_layers=config["model"]["n_layers"], run=sweep, steps=(0, MAX_STEPS))
        out.append(RunData(run=f"{sweep}/{num}", run_dir=run_dir, source="files", config=config, rows=rows))
    return out


def wandb_key(row: Mapping[str, Any]) -> str:
    """The W&B key of a results row: ``<name>[/L<layer:02d>[H<head:02d>]]`` (its first component is the probe
    family); ``legacy=True`` rows of older runs had a ``probe/`` prefix."""
    key = row["name"]
    if row["layer"] is not None:
        key += f"/L{row['layer']:02d}"
        if row["head"] is not None:
            key += f"H{row['head']:02d}"
    elif row["head"] is not None:
        key += f"/H{row['head']:02d}"
    return key


TABLE_COLUMNS = ["name", "layer", "head", "value", "series"]


def history_rows(rows: Iterable[Mapping[str, Any]], *, tables: bool = False) -> tuple[list[dict], dict[str, dict]]:
    """Results rows -> (W&B history rows, one per step keyed by trainer/global_step; table files).

    ``tables=False``: every record is a scalar key. ``tables=True``: as training logs at logger.detail=summary,
    model-level records are scalars and per-layer / per-head ones go to one ``<family>/vs_layer_table`` per
    family and step (a table-file reference in the row, its JSON in the returned files)."""
    by_step: dict[int, dict] = {}
    files: dict[str, dict] = {}
    for row in rows:
        entry = by_step.setdefault(row["step"], {"trainer/global_step": row["step"]})
        if tables and (row["layer"] is not None or row["head"] is not None):
            family = row["name"].split("/")[0]
            path = f"media/table/{family}/vs_layer_table_{row['step']}.table.json"
            entry[f"{family}/vs_layer_table"] = {"_type": "table-file", "path": path}
            files.setdefault(path, {"columns": TABLE_COLUMNS, "data": []})["data"].append(
                [row["name"], row["layer"], row["head"], row["value"], ""])
        else:
            entry[wandb_key(row)] = row["value"]
    return [by_step[s] for s in sorted(by_step)], files


class FakeFile:
    def __init__(self, path: str, content: dict):
        self.path, self.content = path, content

    def download(self, root: str = ".", replace: bool = False, exist_ok: bool = False):
        target = Path(root) / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.content))
        return open(target)


class FakeApiRun:
    """The attributes of wandb.apis.public.Run that the API route reads."""

    def __init__(self, config: dict, rows: list[dict], *, name: str, group: str, job_type: str = "train",
                 state: str = "finished", tables: bool = False):
        self.config = config
        self._history, self._files = history_rows(rows, tables=tables)
        self.name = name
        self.group = group
        self.job_type = job_type
        self.state = state
        self.path = ["entity", "project", name]

    def scan_history(self):
        return iter(self._history)

    def file(self, path: str) -> FakeFile:
        return FakeFile(path, self._files[path])
