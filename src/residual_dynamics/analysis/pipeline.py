"""All of the analysis, in order: validate -> collect -> extract -> test -> figures, report, Parquet, W&B."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from residual_dynamics.analysis import figures as figs
from residual_dynamics.analysis import stats
from residual_dynamics.analysis.collect import Collection, collect, parquet_safe
from residual_dynamics.analysis.extract import Extracted, extract, resolve_metric
from residual_dynamics.analysis.report import fmt, print_verdict, write_report
from residual_dynamics.analysis.spec import AnalyzeConfig, Hypothesis, validate, validate_root
from residual_dynamics.analysis.wandb_run import has_credentials, log_analysis, resolve_mode
from residual_dynamics.errors import ConfigError, DataError

log = logging.getLogger(__name__)
PROFILE_DEFAULT = "resid_norm/resid_post"


@dataclass
class AnalysisResult:
    hypothesis: Hypothesis
    verdict: pd.DataFrame
    per_run: pd.DataFrame
    collection: Collection
    extracted: Extracted
    out_dir: Path
    report: Path
    parquet: Path
    figures: dict[str, Path] = field(default_factory=dict)
    wandb_dir: Optional[Path] = None
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the tests on an extracted frame


def _row(hyp: Hypothesis, *, effect: str, estimate, low, high, p, n_runs, n_seeds, verdict, at=None, **extra):
    return {"hypothesis": hyp.name, "test": hyp.test, "x": hyp.x or " x ".join(hyp.factors), "y": hyp.y_label,
            "at": at or hyp.at.label(), "effect": effect, "estimate": estimate, "ci_low": low, "ci_high": high,
            "p": p, "p_adj": p, "n_runs": int(n_runs), "n_seeds": int(n_seeds), "verdict": verdict, **extra}


def run_test(hyp: Hypothesis, per_run: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The hypothesis test on ``per_run`` (columns x or the factors, unit, y[, step]). Returns the verdict
    table and the raw results (fits, cells, differences) for figures and the report."""
    if hyp.test == "compare":
        res = stats.compare(per_run, hyp.factors, sign=hyp.sign or 0, baseline=hyp.baseline, alpha=hyp.alpha,
                            confidence=hyp.confidence, n_resamples=hyp.n_resamples,
                            permutations=hyp.permutations, rng=hyp.rng_seed)
        rows = []
        for d in res["differences"].to_dict("records"):
            row = _row(hyp, effect=f"{d['factor']}: {fmt(d['level'])} − {fmt(d['baseline'])} | {d['context']}",
                       estimate=d["estimate"], low=d["ci_low"], high=d["ci_high"], p=d["p"],
                       n_runs=d["n_a"] + d["n_b"], n_seeds=d["n_seeds"], verdict=d["verdict"],
                       paired=bool(d["paired"]), min_p=d["min_p"])
            row["p_adj"] = d["p_adj"]
            rows.append(row)
        return pd.DataFrame(rows), res
    if hyp.at.kind == "curve":
        rows, results = [], {}
        for step, frame in per_run.groupby("step"):
            if frame["x"].nunique() < 2 or len(frame) < 3:
                continue
            res = _single(hyp, frame)
            results[int(step)] = res
            rows.append(_verdict_row(hyp, frame, res, at=f"step={int(step)}", step=int(step),
                                     tokens=frame["tokens"].median() if "tokens" in frame else np.nan))
        table = pd.DataFrame(rows)
        if table.empty:
            raise DataError("at=curve: no step has two x values or more across the runs")
        finite = table["p"].notna()
        if finite.any():
            from scipy.stats import false_discovery_control

            table.loc[finite, "p_adj"] = false_discovery_control(table.loc[finite, "p"].to_numpy(float))
        table["verdict"] = [stats.verdict(r["_sign_stat"], r["p_adj"], hyp.alpha, hyp.sign) if hyp.sign else r["verdict"]
                            for r in table.to_dict("records")]
        return table.drop(columns=["_sign_stat"]), {"per_step": results}
    res = _single(hyp, per_run)
    return pd.DataFrame([_verdict_row(hyp, per_run, res)]).drop(columns=["_sign_stat"]), res


def _single(hyp: Hypothesis, frame: pd.DataFrame) -> dict[str, Any]:
    x, y = frame["x"].to_numpy(float), frame["y"].to_numpy(float)
    common = dict(alpha=hyp.alpha, confidence=hyp.confidence, n_resamples=hyp.n_resamples,
                  permutations=hyp.permutations, rng=hyp.rng_seed)
    try:
        if hyp.test == "trend":
            return stats.trend(x, y, sign=hyp.sign, log_x=hyp.log_x, **common)
        return stats.scaling(x, y, model=hyp.model, sign=hyp.sign, extrapolate_to=hyp.extrapolate_to, **common)
    except stats.FitError as exc:
        bad = frame[(frame["y"] <= 0) | (frame["x"] <= 0)]["run"].tolist()
        raise DataError(f"{hyp.test}: {exc}; offending runs: {', '.join(bad[:10]) or '?'}") from None


def _verdict_row(hyp: Hypothesis, frame: pd.DataFrame, res: dict, **extra) -> dict[str, Any]:
    n_seeds = frame["unit"].nunique()
    if frame["y"].nunique() == 1:
        extra["note"] = (f"y = {fmt(float(frame['y'].iloc[0]))} in every run: nothing varies, so the test cannot "
                         "tell anything (inconclusive by construction)")
    if hyp.test == "trend":
        effect = f"slope of y per {'log ' if hyp.log_x else ''}{hyp.x}"
        return _row(hyp, effect=effect, estimate=res["slope"], low=res["ci_low"], high=res["ci_high"], p=res["p"],
                    n_runs=len(frame), n_seeds=n_seeds, verdict=res["verdict"], rho=res["rho"], r2=res["r2"],
                    theil_slope=res["theil_slope"], theil_low=res["theil_low"], theil_high=res["theil_high"],
                    _sign_stat=res["rho"], **extra)
    effect = f"exponent b ({'y = a·x^b' if hyp.model == 'power' else 'y = a·e^(b·x)'})"
    row = _row(hyp, effect=effect, estimate=res["exponent"], low=res["ci_low"], high=res["ci_high"], p=res["p"],
               n_runs=len(frame), n_seeds=n_seeds, verdict=res["verdict"], a=res["a"], r2=res["r2"],
               _sign_stat=res["exponent"], **extra)
    if "prediction" in res:
        row.update(extrapolate_to=res["extrapolate_to"], prediction=res["prediction"],
                   prediction_low=res["prediction_low"], prediction_high=res["prediction_high"])
    return row


def analyse(collection: Collection, hyp: Hypothesis) -> tuple[Extracted, pd.DataFrame, dict[str, Any]]:
    """extract + run_test: the whole statistical part, on a collection built by any route."""
    extracted = extract(collection, hyp)
    verdict, details = run_test(hyp, extracted.per_run)
    return extracted, verdict, details


# --------------------------------------------------------------------------- figures


def _draw(hyp: Hypothesis, collection: Collection, extracted: Extracted, details: dict, verdict: pd.DataFrame,
          out_dir: Path) -> dict[str, Path]:
    fig_dir = out_dir / "figures"
    drawn: dict[str, Optional[Path]] = {}
    per_run, series = extracted.per_run, extracted.series
    if hyp.needs_x:
        colour_by, colour_label = "x", hyp.x
    else:
        key = " × ".join(hyp.factors)
        label = lambda frame: frame[list(hyp.factors)].astype(str).agg(", ".join, axis=1)  # noqa: E731
        per_run = per_run.assign(**{key: label(per_run)})
        series = series.assign(**{key: label(series)}) if not series.empty else series
        colour_by, colour_label = key, key
    if hyp.needs_x and hyp.at.kind != "curve":
        kind = hyp.model if hyp.test == "scaling" else ("trend_log" if hyp.log_x else "trend")
        drawn["y_vs_x"] = figs.xy_fit(per_run, details, x_label=hyp.x, y_label=hyp.y_label, kind=kind,
                                      title=f"{hyp.name}: {verdict['verdict'].iloc[0]} (p = {fmt(verdict['p'].iloc[0])})",
                                      path=fig_dir / "y_vs_x.png", confidence=hyp.confidence)
        if hyp.test == "scaling":
            drawn["residuals"] = figs.residuals(per_run, details, x_label=hyp.x, path=fig_dir / "residuals.png")
    if hyp.at.kind == "curve":
        label = "slope" if hyp.test == "trend" else "exponent b"
        drawn["effect_vs_step"] = figs.effect_over_steps(verdict, effect=label, path=fig_dir / "effect_vs_step.png")
    if hyp.test == "compare":
        drawn["cells"] = figs.cells(per_run, details["cells"], hyp.factors, y_label=hyp.y_label,
                                    path=fig_dir / "cells.png", confidence=hyp.confidence)
        drawn["differences"] = figs.differences(details["differences"], y_label=hyp.y_label,
                                                path=fig_dir / "differences.png", confidence=hyp.confidence)
    metric_label = hyp.y if not (hyp.reduce or extracted.per_layer) else f"{hyp.y} [{hyp.reduce.label()}]"
    for against in ("step", "tokens"):
        if against == "tokens" and series["tokens"].isna().all():
            continue
        drawn[f"curve_vs_{against}"] = figs.curves(series, colour_by=colour_by, colour_label=colour_label,
                                                   y_label=metric_label, against=against,
                                                   path=fig_dir / f"curve_vs_{against}.png",
                                                   confidence=hyp.confidence)
    profile = _profile_rows(hyp, collection, extracted)
    if profile is not None:
        rows, metric = profile
        if not hyp.needs_x:
            rows = rows.assign(**{colour_by: rows[list(hyp.factors)].astype(str).agg(", ".join, axis=1)})
        drawn["layer_profile"] = figs.layer_profile(rows, colour_by=colour_by, colour_label=colour_label,
                                                    metric=metric, path=fig_dir / "layer_profile.png",
                                                    confidence=hyp.confidence)
    return {k: v for k, v in drawn.items() if v is not None}


def _profile_rows(hyp: Hypothesis, collection: Collection, extracted: Extracted):
    """Per-layer values at each analysed run's final step (heads reduced), for the profile figure."""
    metric = hyp.profile or (hyp.y if extracted.per_layer else PROFILE_DEFAULT)
    runs = extracted.per_run["run"].unique().tolist()
    tidy = collection.tidy[collection.tidy["run"].isin(runs)]
    try:
        probe, name = resolve_metric(tidy, metric)
    except ConfigError:
        if hyp.profile:
            raise
        return None
    rows = tidy[(tidy["name"] == name) & ((tidy["probe"] == probe) if probe else True) & tidy["layer"].notna()]
    if rows.empty:
        return None
    rows = rows[rows["step"] == rows.groupby("run")["step"].transform("max")]
    rows = rows.groupby(["run", "layer"], as_index=False)["value"].agg(hyp.head_reduce.how
                                                                       if hyp.head_reduce.how != "index" else "mean")
    columns = ["x"] if hyp.needs_x else list(hyp.factors)
    info = extracted.per_run.drop_duplicates("run")[["run", *columns]]
    return rows.merge(info, on="run"), name


# --------------------------------------------------------------------------- the whole thing


def default_output_dir(cfg: AnalyzeConfig, hyp: Hypothesis) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    root = Path(cfg.inputs[0]).expanduser() if cfg.inputs else Path("outputs")
    return root / "analysis" / hyp.name


def run(cfg: AnalyzeConfig, *, echo: bool = True) -> AnalysisResult:
    """Analyse ``cfg.inputs`` for ``cfg.analysis``; write the report, Parquet table, figures, W&B run."""
    hyp = validate(cfg.analysis)
    validate_root(cfg)
    wandb_mode = resolve_mode(cfg.wandb.mode) if cfg.wandb.log else "disabled"
    online_read = cfg.source == "wandb" and has_credentials() and resolve_mode(cfg.wandb.mode) == "online"
    if cfg.source == "wandb" and not online_read and not cfg.inputs:
        raise ConfigError("inputs", "source=wandb without W&B credentials reads offline runs: give the "
                                    "directories holding them, inputs=[...]")
    collection = collect(cfg.inputs, cfg.source, wandb_project=cfg.wandb.project, wandb_entity=cfg.wandb.entity,
                         wandb_group=cfg.wandb.group, online=online_read, progress=cfg.progress)
    if cfg.strict and not collection.problems.empty:
        listing = "; ".join(f"{r.run}: {r.status} ({r.reason})" for r in collection.problems.itertuples())
        raise DataError(f"strict: {len(collection.problems)} run(s) failed or are incomplete: {listing}")
    extracted, verdict, details = analyse(collection, hyp)
    out_dir = default_output_dir(cfg, hyp)
    out_dir.mkdir(parents=True, exist_ok=True)

    parquet = out_dir / "tidy.parquet"
    parquet_safe(collection.tidy).to_parquet(parquet, index=False)
    parquet_safe(collection.runs).to_parquet(out_dir / "runs.parquet", index=False)
    summary = _summary(hyp, extracted)
    summary.to_csv(out_dir / "per_run.csv", index=False)
    verdict.to_csv(out_dir / "verdict.csv", index=False)
    drawn = _draw(hyp, collection, extracted, details, verdict, out_dir) if cfg.figures else {}

    group = cfg.wandb.group or _common_group(collection, extracted)
    spec_dict = dataclasses.asdict(cfg.analysis) if dataclasses.is_dataclass(cfg.analysis) else dict(cfg.analysis)
    wandb_dir = None
    if wandb_mode != "disabled":
        headline = verdict.iloc[0][["estimate", "ci_low", "ci_high", "p", "verdict"]].to_dict()
        headline.update(n_runs=int(extracted.per_run["run"].nunique()), n_seeds=int(extracted.per_run["unit"].nunique()))
        wandb_dir = log_analysis(name=hyp.name, out_dir=out_dir, verdict=verdict, summary=summary, figures=drawn,
                                 config={"analysis": spec_dict, "inputs": list(cfg.inputs), "source": cfg.source},
                                 project=cfg.wandb.project, entity=cfg.wandb.entity, group=group,
                                 mode=cfg.wandb.mode, headline=headline)
    extra = {}
    lines = _detail_lines(hyp, verdict, details)
    if hyp.test == "compare":
        extra["Cell means"] = details["cells"]
    report = write_report(
        out_dir / "report.md", hyp=hyp, spec_yaml=OmegaConf.to_yaml(OmegaConf.create(spec_dict)),
        verdict=verdict, per_run=summary, runs=collection.runs, excluded=extracted.excluded, figures=drawn,
        inputs=[str(i) for i in cfg.inputs] or [f"W&B {cfg.wandb.entity or ''}/{cfg.wandb.project}"],
        details={"lines": lines}, extra_tables=extra, wandb_dir=wandb_dir,
        files={"tidy table (one row per measurement)": parquet, "runs table": out_dir / "runs.parquet",
               "per-run values": out_dir / "per_run.csv", "verdict table": out_dir / "verdict.csv"})
    result = AnalysisResult(hypothesis=hyp, verdict=verdict, per_run=summary, collection=collection,
                            extracted=extracted, out_dir=out_dir, report=report, parquet=parquet, figures=drawn,
                            wandb_dir=wandb_dir, details=details)
    if echo:
        print_summary(result)
    return result


def _summary(hyp: Hypothesis, extracted: Extracted) -> pd.DataFrame:
    columns = ["run", *extracted.x_columns, hyp.unit if hyp.unit not in extracted.x_columns else None, "step", "y"]
    columns = [c for c in dict.fromkeys(columns) if c and c in extracted.per_run.columns]
    frame = extracted.per_run[columns + (["tokens"] if "tokens" in extracted.per_run else [])]
    order = [c for c in (*extracted.x_columns, "unit", "step") if c in extracted.per_run.columns]
    try:
        frame = frame.loc[extracted.per_run.sort_values(order, kind="stable").index]
    except TypeError:  # levels of mixed types
        pass
    return frame.rename(columns={"y": hyp.y_label}).reset_index(drop=True)


def _common_group(collection: Collection, extracted: Extracted) -> Optional[str]:
    runs = collection.runs[collection.runs["run"].isin(extracted.per_run["run"])]
    groups = [g for g in runs["group"] if isinstance(g, str) and g]
    return Counter(groups).most_common(1)[0][0] if groups else None


def _detail_lines(hyp: Hypothesis, verdict: pd.DataFrame, details: dict) -> list[str]:
    lines = []
    if "note" in verdict:
        lines += [f"**{n}**" for n in verdict["note"].dropna().unique()]
    if hyp.test == "trend" and hyp.at.kind != "curve":
        r = verdict.iloc[0]
        lines.append(f"Spearman rho = {fmt(r['rho'])} (permutation p = {fmt(r['p'])}); OLS slope {fmt(r['estimate'])} "
                     f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] ({details['bootstrap']} bootstrap), R² = {fmt(r['r2'])}; "
                     f"Theil-Sen slope {fmt(r['theil_slope'])} [{fmt(r['theil_low'])}, {fmt(r['theil_high'])}].")
    if hyp.test == "scaling" and hyp.at.kind != "curve":
        r = verdict.iloc[0]
        lines.append(f"fit: a = {fmt(r['a'])}, b = {fmt(r['estimate'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}], "
                     f"R² = {fmt(r['r2'])} (of log y); residual SD {fmt(float(np.std(details['residuals'], ddof=2)) if len(details['residuals']) > 2 else float('nan'))}.")
        if "prediction" in r and pd.notna(r.get("prediction")):
            lines.append(f"extrapolated y at x = {fmt(r['extrapolate_to'])}: {fmt(r['prediction'])} "
                         f"[{fmt(r['prediction_low'])}, {fmt(r['prediction_high'])}] (an extrapolation assumes the "
                         "law holds beyond the sweep).")
    if hyp.test == "compare" and "min_p" in verdict:
        blocked = verdict[verdict["min_p"] >= hyp.alpha]
        if len(blocked):
            lines.append(f"{len(blocked)} of the {len(verdict)} comparisons cannot reach p < {hyp.alpha} with their "
                         f"replicates at all (the smallest p a permutation test can give with n pairs is 2/2^n: "
                         f"{fmt(blocked['min_p'].min())} here); their 'inconclusive' says nothing about the effect. "
                         "More seeds, or the pooled comparisons, can.")
        paired = int(verdict["paired"].sum())
        lines.append(f"{paired} of the {len(verdict)} comparisons are paired by {hyp.unit}.")
    if hyp.at.kind == "curve":
        lines.append("one test per probe step; p_adj is Benjamini-Hochberg across the steps and the verdicts use it.")
    return lines


def print_summary(result: AnalysisResult) -> None:
    print_verdict(result.verdict, title=f"analysis {result.hypothesis.name}")
    print(f"Analysis of {result.per_run['run'].nunique()} runs "
          f"({len(result.collection.runs)} found, {len(result.extracted.excluded)} not analysed).")
    print(f"  report        : {result.report}")
    print(f"  tidy table    : {result.parquet}")
    print(f"  figures       : {result.out_dir / 'figures'}")
    if result.wandb_dir is not None:
        print(f"  W&B run       : {result.wandb_dir}")
