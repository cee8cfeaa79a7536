"""The tidy table -> the y of each run (and each step), as a hypothesis asks for it.

:func:`extract` checks the hypothesis against the data (the metric exists, x is a config field of the runs,
x takes two values or more, ...) with errors that list what *is* there, then reduces heads and layers,
picks the value at ``at`` (or the per-run ``statistic``) and joins x / factors / unit from the runs table.
Runs it cannot use are returned with their reason (they go to the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from residual_dynamics.analysis.collect import Collection
from residual_dynamics.analysis.spec import Hypothesis, Reduce
from residual_dynamics.errors import ConfigError, DataError

# config fields that differ between runs of one sweep but are never a factor
BOOKKEEPING = ("paths.", "run_name", "hydra.", "logger.tags", "ckpt_path")


@dataclass
class Extracted:
    """per_run: one row per run (run, x or factors, unit, y[, step, tokens for at=curve]);
    series: y of every run at every step (run, step, tokens, y, x or factors, unit), for the curves."""

    per_run: pd.DataFrame
    series: pd.DataFrame
    excluded: list[tuple[str, str]] = field(default_factory=list)
    metric: str = ""
    probe: Optional[str] = None
    per_layer: bool = False
    x_columns: tuple[str, ...] = ()


def varying_fields(runs: pd.DataFrame) -> list[str]:
    """Config fields whose value differs across ``runs`` (bookkeeping fields left out)."""
    meta = {"run", "job_type", "group", "model", "run_dir", "source", "status", "reason", "n_rows",
            "first_step", "last_step", "overrides"}
    out = []
    for column in runs.columns:
        if column in meta or column.startswith(BOOKKEEPING):
            continue
        values = runs[column].map(lambda v: repr(v) if not (isinstance(v, float) and np.isnan(v)) else "nan")
        if values.nunique() > 1:
            out.append(column)
    return out


def config_fields(runs: pd.DataFrame) -> list[str]:
    meta = {"run", "job_type", "group", "model", "run_dir", "source", "status", "reason", "n_rows",
            "first_step", "last_step", "overrides"}
    return [c for c in runs.columns if c not in meta]


def _match(value: Any, wanted: Any) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return wanted is None
    if value == wanted:
        return True
    return str(value).lower() == str(wanted).lower()


def usable_runs(collection: Collection, hyp: Hypothesis) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    runs = collection.runs
    statuses = ("ok", "incomplete") if hyp.include_incomplete else ("ok",)
    excluded = [(r.run, f"{r.status}: {r.reason}") for r in runs.itertuples() if r.status not in statuses]
    kept = runs[runs["status"].isin(statuses)]
    if kept.empty:
        listing = "; ".join(f"{run}: {why}" for run, why in excluded[:10])
        raise DataError(f"no usable runs among the {len(runs)} found ({listing}"
                        f"{' ...' if len(excluded) > 10 else ''})")
    for key, wanted in hyp.where.items():
        if key not in kept.columns:
            raise ConfigError(f"analysis.where.{key}", f"is not a config field of the runs; fields that vary "
                                                       f"across them: {', '.join(varying_fields(kept)) or 'none'}")
        mask = kept[key].map(lambda v: _match(v, wanted))
        excluded += [(run, f"where: {key}={kept.loc[i, key]!r} != {wanted!r}")
                     for i, run in kept.loc[~mask, "run"].items()]
        kept = kept[mask]
    if kept.empty:
        raise DataError(f"no runs left after analysis.where={dict(hyp.where)}")
    return kept, excluded


def resolve_metric(tidy: pd.DataFrame, y: str) -> tuple[Optional[str], str]:
    """``y`` -> (probe or None, metric name) present in ``tidy``; ConfigError listing the metrics otherwise."""
    names = sorted(tidy["name"].dropna().unique())
    pairs = tidy[["probe", "name"]].drop_duplicates()
    candidates: list[tuple[Optional[str], str]] = []
    wanted = y[len("probe/"):] if y.startswith("probe/") else y
    if wanted in names:
        candidates = [(None, wanted)]
    elif "/" in wanted:
        probe, _, name = wanted.partition("/")
        if ((pairs["probe"] == probe) & (pairs["name"] == name)).any():
            candidates = [(probe, name)]
    if not candidates:
        raise ConfigError("analysis.y", f"no metric {y!r} in the runs; metrics present: {', '.join(names)}")
    probe, name = candidates[0]
    probes = pairs.loc[pairs["name"] == name, "probe"].dropna().unique()
    if probe is None and len(probes) > 1:
        raise ConfigError("analysis.y", f"{name!r} is logged by several probes ({', '.join(probes)}): "
                                        f"write <probe>/{name}")
    return probe, name


def _reduce(frame: pd.DataFrame, keys: list[str], column: str, reduce: Reduce) -> pd.DataFrame:
    """Reduce ``frame`` over ``column`` (layer or head) within ``keys``."""
    if reduce.how == "index":
        index = reduce.index
        if index < 0:
            top = frame.groupby(keys)[column].transform("max")
            return frame[frame[column] == top + 1 + index].drop(columns=[column])
        return frame[frame[column] == index].drop(columns=[column])
    if reduce.how in ("last", "first"):
        pick = frame.groupby(keys)[column].transform("max" if reduce.how == "last" else "min")
        return frame[frame[column] == pick].drop(columns=[column])
    return frame.groupby(keys, as_index=False, dropna=False).agg(value=("value", reduce.how),
                                                                 tokens=("tokens", "first"))


def metric_series(tidy: pd.DataFrame, hyp: Hypothesis, runs: list[str]) -> tuple[pd.DataFrame, str, Optional[str], bool]:
    """y of each run at each step: columns run, step, tokens, y (heads, then layers, reduced)."""
    scoped = tidy[tidy["run"].isin(runs)]
    probe, name = resolve_metric(scoped, hyp.y)
    rows = scoped[(scoped["name"] == name) & ((scoped["probe"] == probe) if probe else True)]
    rows = rows[["run", "step", "tokens", "layer", "head", "value"]].copy()
    per_layer = rows["layer"].notna().any()
    if rows["head"].notna().any():
        rows = _reduce(rows.assign(layer=rows["layer"].fillna(-1)), ["run", "step", "layer"], "head",
                       hyp.head_reduce)
        rows["layer"] = rows["layer"].where(rows["layer"] >= 0)
        if rows.empty:
            raise ConfigError("analysis.head_reduce", f"{hyp.head_reduce.label()} selects no head of y={hyp.y}")
    if per_layer:
        if hyp.reduce is None:
            layers = sorted(int(v) for v in rows["layer"].dropna().unique())
            raise ConfigError("analysis.reduce", f"y={hyp.y} is per layer (layers {layers[0]}..{layers[-1]}): "
                                                 "set reduce to one of last, first, mean, max, min, sum or layer=<n>")
        rows = _reduce(rows, ["run", "step"], "layer", hyp.reduce)
        if rows.empty:
            raise ConfigError("analysis.reduce", f"{hyp.reduce.label()} selects no layer of y={hyp.y}")
    elif hyp.reduce is not None:
        raise ConfigError("analysis.reduce", f"y={hyp.y} is not per layer (one value per step): set reduce: null")
    rows = rows.drop(columns=["layer", "head"], errors="ignore").rename(columns={"value": "y"})
    rows = rows.groupby(["run", "step"], as_index=False).agg(tokens=("tokens", "first"), y=("y", "mean"))
    return rows.sort_values(["run", "step"]).reset_index(drop=True), name, probe, bool(per_layer)


def _per_run_value(series: pd.DataFrame, hyp: Hypothesis, max_steps: dict[str, Any]) -> tuple[pd.DataFrame, list]:
    """One y per run (per run and step for at=curve), and the runs without one, with the reason."""
    excluded = []
    finite = series.dropna(subset=["y"])
    for run in sorted(set(series["run"]) - set(finite["run"])):
        excluded.append((run, f"y={hyp.y} is not finite at any step"))
    frame = finite.sort_values(["run", "step"])
    groups = frame.groupby("run", sort=False)
    at = hyp.at
    if hyp.statistic:
        stat = hyp.statistic
        last_step = groups["step"].max()
        if stat.startswith("arg"):
            col = "step" if stat.endswith("step") else "tokens"
            pick = groups["y"].idxmax() if stat.startswith("argmax") else groups["y"].idxmin()
            values = frame.loc[pick.values, ["run", col]].rename(columns={col: "y"})
        else:
            values = groups["y"].agg(stat).rename("y").reset_index()
        out = values.assign(step=values["run"].map(last_step).astype(int))
    elif at.kind == "final":
        out = frame.loc[groups["step"].idxmax().values, ["run", "y", "step"]]
    elif at.kind == "step":
        out = frame.loc[frame["step"] == int(at.value), ["run", "y", "step"]].drop_duplicates("run")
        for run, steps in groups["step"]:
            if run not in set(out["run"]):
                excluded.append((run, f"no probe at step {int(at.value)} (steps {steps.tolist()})"))
    elif at.kind == "tokens":
        reach = groups["tokens"].max()
        short = reach[~(reach >= at.value)].index
        excluded += [(run, f"never reached {at.value:g} tokens") for run in short]
        early = frame[(frame["tokens"] <= at.value) & ~frame["run"].isin(short)]
        out = early.loc[early.groupby("run")["tokens"].idxmax().values, ["run", "y", "step"]]
    elif at.kind == "last_fraction":
        last = groups["step"].max()
        horizon = frame["run"].map(lambda r: max_steps.get(r)).astype(float)
        horizon = horizon.fillna(frame["run"].map(last).astype(float))
        window = frame[frame["step"] >= (1 - at.value) * horizon]
        missing = set(frame["run"]) - set(window["run"])
        excluded += [(run, f"no probe in the last {at.value:g} of training") for run in sorted(missing)]
        out = window.groupby("run", as_index=False).agg(y=("y", "mean"), step=("step", "max"))
    else:  # curve
        out = frame[["run", "y", "step", "tokens"]]
    out = out.reset_index(drop=True)
    out["y"] = out["y"].astype(float)
    out["step"] = out["step"].astype(int)
    return out, excluded


def extract(collection: Collection, hyp: Hypothesis) -> Extracted:
    runs, excluded = usable_runs(collection, hyp)
    columns = [hyp.x] if hyp.needs_x else list(hyp.factors)
    fields = config_fields(runs)
    for i, column in enumerate(columns):
        if column not in runs.columns:
            where = "analysis.x" if hyp.needs_x else f"analysis.factors[{i}]"
            vary = varying_fields(runs)
            raise ConfigError(where, f"{column!r} is not a config field of the runs; fields that vary across "
                                     f"them: {', '.join(vary) or 'none'}"
                                     + ("" if vary else f" (fields: {', '.join(fields[:30])} ...)"))
    if hyp.unit not in runs.columns:
        raise ConfigError("analysis.unit", f"{hyp.unit!r} is not a config field of the runs; fields that vary "
                                           f"across them: {', '.join(varying_fields(runs)) or 'none'}")
    series, name, probe, per_layer = metric_series(collection.tidy, hyp, runs["run"].tolist())
    missing = set(runs["run"]) - set(series["run"])
    excluded += [(run, f"no {hyp.y} rows") for run in sorted(missing)]
    max_steps = dict(zip(runs["run"], runs.get("trainer.max_steps", pd.Series([None] * len(runs)))))
    values, more = _per_run_value(series, hyp, max_steps)
    excluded += more
    if values.empty:
        raise DataError(f"no run has a value of {hyp.y} at {hyp.at.label()}: "
                        + "; ".join(f"{r}: {w}" for r, w in excluded[:10]))
    info = runs[["run", *columns, *([hyp.unit] if hyp.unit not in columns else [])]].copy()
    info["unit"] = info[hyp.unit].where(info[hyp.unit].notna(), info["run"])
    per_run = values.merge(info, on="run", how="inner")
    series = series.merge(info, on="run", how="inner")
    for column in columns:
        absent = per_run[column].isna()
        excluded += [(run, f"no {column} in its config") for run in per_run.loc[absent, "run"]]
        per_run = per_run[~absent]
        series = series[series[column].notna()]
    if hyp.needs_x:
        x = pd.to_numeric(per_run[hyp.x], errors="coerce")
        if x.isna().any() or per_run[hyp.x].map(lambda v: isinstance(v, bool)).any():
            raise ConfigError("analysis.x", f"{hyp.x} is not numeric (values: "
                                            f"{sorted(map(str, per_run[hyp.x].unique()))}): use test=compare "
                                            "with it as a factor")
        per_run = per_run.assign(x=x.astype(float))
        series = series.assign(x=pd.to_numeric(series[hyp.x], errors="coerce").astype(float))
        distinct = sorted(per_run["x"].unique())
        if len(distinct) < 2:
            what = "a trend" if hyp.test == "trend" else "a scaling law"
            raise ConfigError("analysis.x", f"{hyp.x} has one value ({distinct[0]:g}) across the {len(per_run)} "
                                            f"runs: a sweep with one x value cannot show {what}; vary "
                                            f"{hyp.x} (fields that vary: {', '.join(varying_fields(runs)) or 'none'})")
    else:
        for i, column in enumerate(columns):
            levels = per_run[column].unique()
            if len(levels) < 2:
                raise ConfigError(f"analysis.factors[{i}]", f"{column} has one level ({levels[0]!r}) across the "
                                                            f"{len(per_run)} runs: nothing to compare")
    if per_run.empty:
        raise DataError("no runs left to analyse: " + "; ".join(f"{r}: {w}" for r, w in excluded[:10]))
    return Extracted(per_run=per_run.reset_index(drop=True), series=series.reset_index(drop=True),
                     excluded=excluded, metric=name, probe=probe, per_layer=per_layer, x_columns=tuple(columns))
