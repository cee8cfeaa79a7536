"""The analysis figures (matplotlib, Agg), each written as a PNG and returned as its path.

* :func:`xy_fit`        -- y against x: every run's point, the per-x mean with its CI, the fit with its
  bootstrap band (log axes for a power law, log y for an exponential, log x for a trend on log x);
* :func:`residuals`     -- the scaling fit's residuals against x;
* :func:`curves`        -- y over training (against step or tokens): mean and CI across seeds, one colour
  per x (or per cell of the factors);
* :func:`layer_profile` -- a per-layer metric at the final step, mean across seeds, one line per x / cell;
* :func:`cells`, :func:`differences` -- compare: cell means with CIs, level differences with CIs;
* :func:`effect_over_steps` -- at=curve: the effect (slope / exponent) at every step with its CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from residual_dynamics.analysis import stats  # noqa: E402
from residual_dynamics.reporting.figures import save_figure as _save  # noqa: E402

FIG_RESAMPLES = 999  # bootstrap resamples behind the bands of the curves / profiles (display only)


def _colours(levels: Sequence[Any]) -> dict[Any, Any]:
    cmap = plt.get_cmap("viridis" if len(levels) > 10 else "tab10")
    n = max(len(levels) - 1, 1)
    return {lv: cmap(i / n if len(levels) > 10 else i) for i, lv in enumerate(levels)}


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) else str(value)


def _jitter(x: np.ndarray, log: bool, rng) -> np.ndarray:
    spread = np.ptp(np.log(x)) if log else np.ptp(x)
    width = 0.012 * (spread or 1.0)
    noise = rng.uniform(-width, width, size=len(x))
    return x * np.exp(noise) if log else x + noise


def xy_fit(per_run: pd.DataFrame, result: dict, *, x_label: str, y_label: str, title: str, kind: str,
           path: Path, confidence: float = 0.95) -> Path:
    """``kind``: trend | trend_log | power | exp."""
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = per_run["x"].to_numpy(float)
    y = per_run["y"].to_numpy(float)
    log_x = kind in ("trend_log", "power")
    ax.scatter(_jitter(x, log_x, rng), y, s=18, alpha=0.6, color="tab:blue", label="runs", zorder=3)
    for level, group in per_run.groupby("x"):
        mean, low, high = stats.mean_ci(group["y"], confidence=confidence, n_resamples=FIG_RESAMPLES)
        err = None if not np.isfinite(low) else [[mean - low], [high - mean]]
        ax.errorbar([level], [mean], yerr=err, fmt="s", color="black", ms=5, capsize=3, zorder=4,
                    label=f"mean, {confidence:.0%} CI" if level == per_run["x"].min() else None)
    fit = result["fit"]
    lo_x, hi_x = x.min(), x.max()
    if result.get("extrapolate_to") is not None:
        lo_x, hi_x = min(lo_x, result["extrapolate_to"]), max(hi_x, result["extrapolate_to"])
    grid = np.geomspace(lo_x, hi_x, 100) if log_x else np.linspace(lo_x, hi_x, 100)
    gt = np.log(grid) if log_x else grid

    def back(v):
        return np.exp(v) if kind in ("power", "exp") else v

    line = back(fit.intercept + fit.slope * gt)
    label = {"trend": f"OLS slope {fit.slope:.3g}", "trend_log": f"OLS slope {fit.slope:.3g} per log x",
             "power": f"y = {np.exp(fit.intercept):.3g} x^{fit.slope:.3g}",
             "exp": f"y = {np.exp(fit.intercept):.3g} e^({fit.slope:.3g} x)"}[kind]
    ax.plot(grid, line, color="tab:red", label=label, zorder=2)
    if fit.boot_slope.size:
        bands = back(fit.boot_intercept[:, None] + fit.boot_slope[:, None] * gt[None, :])
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        low, high = np.nanpercentile(bands, q, axis=0)
        ax.fill_between(grid, low, high, color="tab:red", alpha=0.15, label=f"{confidence:.0%} bootstrap band")
    if result.get("prediction") is not None:
        p = result["prediction"]
        ax.errorbar([result["extrapolate_to"]], [p], yerr=[[p - result["prediction_low"]],
                                                           [result["prediction_high"] - p]],
                    fmt="D", color="tab:red", capsize=3, label="extrapolation")
    if log_x:
        ax.set_xscale("log")
        ticks = sorted(set(np.unique(x)) | ({result["extrapolate_to"]} if result.get("extrapolate_to") else set()))
        if len(ticks) <= 12:
            ax.set_xticks(ticks, [_fmt(t) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if kind in ("power", "exp") and np.all(y > 0):
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def residuals(per_run: pd.DataFrame, result: dict, *, x_label: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.axhline(0, color="grey", lw=1)
    ax.scatter(per_run["x"], result["residuals"], s=18, color="tab:blue")
    if result["model"] == "power":
        ax.set_xscale("log")
        ticks = sorted(per_run["x"].unique())
        if len(ticks) <= 12:
            ax.set_xticks(ticks, [_fmt(t) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(x_label)
    ax.set_ylabel("residual of log y")
    ax.set_title(f"scaling fit residuals (R² = {result['r2']:.3f})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _band(frame: pd.DataFrame, by: str, value: str, confidence: float) -> pd.DataFrame:
    rows = []
    for key, group in frame.groupby(by):
        mean, low, high = stats.mean_ci(group[value], confidence=confidence, n_resamples=FIG_RESAMPLES)
        rows.append({by: key, "mean": mean, "low": low, "high": high, "n": len(group)})
    return pd.DataFrame(rows)


def curves(series: pd.DataFrame, *, colour_by: str, colour_label: str, y_label: str, against: str, path: Path,
           confidence: float = 0.95, title: str = "") -> Optional[Path]:
    """``series``: run, step, tokens, y and the ``colour_by`` column; ``against``: step | tokens."""
    frame = series.dropna(subset=[against, "y"])
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    levels = sorted(frame[colour_by].unique(), key=lambda v: (str(type(v)), v))
    colours = _colours(levels)
    for level in levels:
        band = _band(frame[frame[colour_by] == level], against, "y", confidence)
        colour = colours[level]
        ax.plot(band[against], band["mean"], color=colour, marker=".", label=f"{colour_label}={_fmt(level)}")
        ok = band["low"].notna()
        ax.fill_between(band.loc[ok, against], band.loc[ok, "low"], band.loc[ok, "high"], color=colour, alpha=0.18)
    ax.set_xlabel("training step" if against == "step" else "tokens seen")
    ax.set_ylabel(y_label)
    if frame[against].min() > 0 or (frame[against] > 0).sum() > 2:
        ax.set_xscale("symlog", linthresh=max(float(frame.loc[frame[against] > 0, against].min()), 1.0))
    ax.set_title(title or f"{y_label} over training (mean, {confidence:.0%} CI across seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_profile(rows: pd.DataFrame, *, colour_by: str, colour_label: str, metric: str, path: Path,
                  confidence: float = 0.95) -> Optional[Path]:
    """``rows``: run, layer, value (the final step of each run, heads already reduced) and ``colour_by``."""
    frame = rows.dropna(subset=["layer", "value"])
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    levels = sorted(frame[colour_by].unique(), key=lambda v: (str(type(v)), v))
    colours = _colours(levels)
    for level in levels:
        band = _band(frame[frame[colour_by] == level].astype({"layer": int}), "layer", "value", confidence)
        ax.plot(band["layer"], band["mean"], marker="o", color=colours[level], label=f"{colour_label}={_fmt(level)}")
        ok = band["low"].notna()
        ax.fill_between(band.loc[ok, "layer"], band.loc[ok, "low"], band.loc[ok, "high"], color=colours[level],
                        alpha=0.18)
    if (frame["value"] > 0).all():
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per layer at the final step (mean, {confidence:.0%} CI across seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def cells(per_run: pd.DataFrame, cell_table: pd.DataFrame, factors: Sequence[str], *, y_label: str, path: Path,
          confidence: float = 0.95) -> Path:
    labels = [", ".join(_fmt(r[f]) for f in factors) for _, r in cell_table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(labels) + 2), 4.4))
    pos = np.arange(len(labels))
    rng = np.random.default_rng(0)
    for i, (_, cell) in enumerate(cell_table.iterrows()):
        mask = np.ones(len(per_run), dtype=bool)
        for f in factors:
            mask &= (per_run[f] == cell[f]).to_numpy()
        ys = per_run.loc[mask, "y"].to_numpy(float)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, s=14, color="tab:blue", alpha=0.6, zorder=3)
        if np.isfinite(cell["ci_low"]):
            ax.errorbar([i], [cell["mean"]], yerr=[[cell["mean"] - cell["ci_low"]], [cell["ci_high"] - cell["mean"]]],
                        fmt="s", color="black", capsize=3, zorder=4)
        else:
            ax.plot([i], [cell["mean"]], "s", color="black")
    ax.set_xticks(pos, labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(" × ".join(factors))
    ax.set_ylabel(y_label)
    ax.set_title(f"cell means, {confidence:.0%} CI (dots: runs)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def differences(diffs: pd.DataFrame, *, y_label: str, path: Path, confidence: float = 0.95) -> Optional[Path]:
    if diffs.empty:
        return None
    labels = [f"{r.factor}: {_fmt(r.level)} − {_fmt(r.baseline)} | {r.context}" for r in diffs.itertuples()]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(labels) + 1.5))
    pos = np.arange(len(labels))[::-1]
    est = diffs["estimate"].to_numpy(float)
    low = diffs["ci_low"].to_numpy(float)
    high = diffs["ci_high"].to_numpy(float)
    ok = np.isfinite(low)
    colours = ["tab:red" if v == "supported" else "tab:purple" if v == "contradicted" else "tab:grey"
               for v in diffs.get("verdict", ["inconclusive"] * len(diffs))]
    ax.axvline(0, color="black", lw=1)
    for p, e, lo, hi, c, good in zip(pos, est, low, high, colours, ok):
        if good:
            ax.errorbar([e], [p], xerr=[[e - lo], [hi - e]], fmt="o", color=c, capsize=3)
        else:
            ax.plot([e], [p], "o", color=c)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_xlabel(f"difference in {y_label} ({confidence:.0%} CI; red: p_adj < alpha)")
    ax.set_title("level differences")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def effect_over_steps(table: pd.DataFrame, *, effect: str, path: Path, against: str = "step") -> Optional[Path]:
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhline(0, color="black", lw=1)
    ax.plot(table[against], table["estimate"], marker="o", color="tab:red", label=effect)
    ok = table["ci_low"].notna()
    ax.fill_between(table.loc[ok, against], table.loc[ok, "ci_low"], table.loc[ok, "ci_high"], color="tab:red",
                    alpha=0.18, label="CI")
    ax.set_xlabel(against)
    ax.set_ylabel(effect)
    if (table[against] > 0).sum() > 2:
        ax.set_xscale("symlog", linthresh=max(float(table.loc[table[against] > 0, against].min()), 1.0))
    ax.set_title(f"{effect} at every probe step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
