"""The tests, on arrays of one value per run; every statistic comes from scipy.stats (or numpy's least squares).

* :func:`trend`   -- Spearman rho (``spearmanr``), the OLS slope of y on x or log x (``linregress``) with a
  bootstrap CI that resamples replicates within each x (``bootstrap`` with one sample per x value: scipy
  resamples each sample on its own, i.e. a stratified bootstrap), the Theil-Sen slope (``theilslopes``),
  and a permutation p-value of rho permuting y across x (``permutation_test``, ``pairings``).
* :func:`scaling` -- y = a x^b (log-log OLS) or y = a e^(b x) (log-linear OLS): b with its stratified
  bootstrap CI, R^2, residuals, a permutation p of b, and optionally y at a new x with its CI.
* :func:`compare` -- categorical factors: per-cell means with bootstrap CIs, and for each factor every level
  minus the baseline level within each combination of the other factors (and pooled): the difference with
  its CI, paired by unit (seed) where the units match (then the permutation flips signs within pairs), and
  Benjamini-Hochberg adjusted p-values (``false_discovery_control``) across the comparisons.

Verdicts at level alpha: ``supported`` (p < alpha, effect of the expected sign), ``contradicted``
(p < alpha, the opposite sign), ``inconclusive`` (p >= alpha: no effect detected -- not evidence of none).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

VERDICTS = ("supported", "contradicted", "inconclusive")


class FitError(ValueError):
    """The data cannot be fitted by the model asked for (e.g. a power law with y <= 0)."""


@dataclass
class Fit:
    """A line fitted in (possibly transformed) coordinates, with its bootstrap distribution for bands."""

    slope: float
    intercept: float
    boot_slope: np.ndarray = field(default_factory=lambda: np.empty(0))
    boot_intercept: np.ndarray = field(default_factory=lambda: np.empty(0))


def verdict(estimate: float, p: float, alpha: float, sign: Optional[int]) -> str:
    if not (np.isfinite(p) and np.isfinite(estimate)) or p >= alpha or estimate == 0:
        return "inconclusive"
    if not sign:
        return "supported"
    return "supported" if np.sign(estimate) == sign else "contradicted"


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        for category in (RuntimeWarning, stats.DegenerateDataWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message=".*constant.*")
        yield


def rescaled(sample: np.ndarray) -> np.ndarray:
    """``sample`` with its deviations from its mean scaled by sqrt(n / (n - 1)).

    Resampling n values with replacement gives a mean whose variance is (n - 1)/n * s^2/n, too small with
    the few replicates (seeds) of a sweep (2/3 of it with 3 seeds, and CIs that cover ~80% instead of 95%).
    Resampling the rescaled values gives s^2/n (the adjusted stratified bootstrap of Davison & Hinkley,
    Bootstrap Methods and their Application, 1997, sec. 3.2). The statistic itself is computed on the
    data as they are; means are unchanged by the rescaling."""
    sample = np.asarray(sample, dtype=float)
    n = len(sample)
    if n < 2:
        return sample
    mean = sample.mean()
    return mean + (sample - mean) * math.sqrt(n / (n - 1))


def _polyfit(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS of every row of Y (..., n) on x (n,) -> slopes, intercepts with Y's batch shape (numpy lstsq)."""
    batch = Y.shape[:-1]
    coef = np.polyfit(x, Y.reshape(-1, Y.shape[-1]).T, 1)
    return coef[0].reshape(batch), coef[1].reshape(batch)


def stratified_line_bootstrap(x: np.ndarray, y: np.ndarray, *, extra_x: Optional[float] = None,
                              n_resamples: int, confidence: float, rng) -> dict[str, Any]:
    """Bootstrap CI of the OLS (slope, intercept[, prediction at extra_x]) resampling y within each x.

    scipy.stats.bootstrap resamples each of several samples independently; one sample per x value makes
    it a stratified bootstrap. With an x value holding one run only, strata cannot be resampled and the
    (x, y) pairs are resampled together instead (``method`` says which)."""
    levels = np.unique(x)
    groups = [rescaled(y[x == v]) for v in levels]

    def fit(samples, xs):
        slope, intercept = _polyfit(xs, np.concatenate(samples, axis=-1))
        out = [slope, intercept]
        if extra_x is not None:
            out.append(intercept + slope * extra_x)
        return np.stack(out)

    def statistic(*samples, axis=-1):
        shape = np.broadcast_shapes(*[s.shape[:-1] for s in samples])
        samples = [np.broadcast_to(s, shape + s.shape[-1:]) for s in samples]
        xs = np.concatenate([np.full(s.shape[-1], v) for s, v in zip(samples, levels)])
        return fit(samples, xs)

    def pairs_statistic(xs, ys):  # one resample at a time: a resample may hold a single x value
        try:
            line = stats.linregress(xs, ys)
        except ValueError:
            return np.full(3 if extra_x is not None else 2, np.nan)
        out = [line.slope, line.intercept] + ([line.intercept + line.slope * extra_x] if extra_x is not None else [])
        return np.asarray(out, dtype=float)

    with _quiet():
        if all(len(g) >= 2 for g in groups):
            method = "stratified by x"
            res = stats.bootstrap(groups, statistic, n_resamples=n_resamples, vectorized=True,
                                  confidence_level=confidence, method="BCa", rng=rng)
        else:
            method = "pairs (an x value has one run)"
            res = stats.bootstrap((x, y), pairs_statistic, paired=True, n_resamples=n_resamples,
                                  vectorized=False, confidence_level=confidence, method="percentile", rng=rng)
    low, high = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    if not np.all(np.isfinite(low[:2])):  # BCa fails on degenerate distributions: fall back to percentile
        dist = res.bootstrap_distribution
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        low, high = np.nanpercentile(dist, q[0], axis=-1), np.nanpercentile(dist, q[1], axis=-1)
        res_dist = dist[:, np.all(np.isfinite(dist), axis=0)]
        return {"low": low, "high": high, "distribution": res_dist, "method": method}
    return {"low": low, "high": high, "distribution": res.bootstrap_distribution, "method": method}


def _permutation_p(a: np.ndarray, b: np.ndarray, permutations: int, rng) -> float:
    """Permutation p (two-sided) of the correlation of a and b, permuting b across a."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with _quiet():
        res = stats.permutation_test((a, b), lambda u, v, axis=-1: stats.pearsonr(u, v, axis=axis).statistic,
                                     permutation_type="pairings", vectorized=True, n_resamples=permutations,
                                     alternative="two-sided", rng=rng)
    return float(res.pvalue)


def trend(x: Sequence[float], y: Sequence[float], *, sign: int, alpha: float = 0.05, confidence: float = 0.95,
          log_x: bool = False, n_resamples: int = 9999, permutations: int = 9999, rng=0) -> dict[str, Any]:
    """Is y monotone in x? See the module doc. Returns a dict with rho, slope (per x or per log x unit) and
    its CI, theil_slope and its CI, p (permutation, of Spearman's rho), verdict, and the fit for figures."""
    rng = np.random.default_rng(rng)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if log_x and np.any(x <= 0):
        raise FitError("log_x needs x > 0")
    xt = np.log(x) if log_x else x
    with _quiet():
        rho = float(stats.spearmanr(x, y).statistic)
        line = stats.linregress(xt, y)
        theil = stats.theilslopes(y, xt, alpha=confidence)
    boot = stratified_line_bootstrap(xt, y, n_resamples=n_resamples, confidence=confidence, rng=rng)
    p = _permutation_p(stats.rankdata(x), stats.rankdata(y), permutations, rng)
    return {
        "rho": rho, "slope": float(line.slope), "intercept": float(line.intercept),
        "ci_low": float(boot["low"][0]), "ci_high": float(boot["high"][0]),
        "theil_slope": float(theil.slope), "theil_low": float(theil.low_slope), "theil_high": float(theil.high_slope),
        "r2": float(line.rvalue ** 2) if np.isfinite(line.rvalue) else float("nan"),
        "p": p, "verdict": verdict(rho, p, alpha, sign), "bootstrap": boot["method"],
        "fit": Fit(float(line.slope), float(line.intercept), boot["distribution"][0], boot["distribution"][1]),
        "log_x": log_x, "n": int(len(x)),
    }


def scaling(x: Sequence[float], y: Sequence[float], *, model: str = "power", sign: Optional[int] = None,
            alpha: float = 0.05, confidence: float = 0.95, extrapolate_to: Optional[float] = None,
            n_resamples: int = 9999, permutations: int = 9999, rng=0) -> dict[str, Any]:
    """Fit y = a x^b (``power``) or y = a e^(b x) (``exp``) by OLS on log y. Returns exponent b with its CI,
    a, R^2, residuals (of log y), p (permutation, of the correlation of log y with log x or x), verdict,
    and the prediction at ``extrapolate_to`` with its CI."""
    rng = np.random.default_rng(rng)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if np.any(y <= 0) or (model == "power" and np.any(x <= 0)):
        bad = "x and y" if model == "power" else "y"
        raise FitError(f"a {'power law' if model == 'power' else 'exponential'} needs {bad} > 0")
    xt = np.log(x) if model == "power" else x
    yt = np.log(y)
    with _quiet():
        line = stats.linregress(xt, yt)
    new_x = None if extrapolate_to is None else (math.log(extrapolate_to) if model == "power" else extrapolate_to)
    boot = stratified_line_bootstrap(xt, yt, extra_x=new_x, n_resamples=n_resamples, confidence=confidence, rng=rng)
    p = _permutation_p(xt, yt, permutations, rng)
    residuals = yt - (line.intercept + line.slope * xt)
    out = {
        "exponent": float(line.slope), "a": float(math.exp(line.intercept)),
        "ci_low": float(boot["low"][0]), "ci_high": float(boot["high"][0]),
        "r2": float(line.rvalue ** 2) if np.isfinite(line.rvalue) else float("nan"),
        "residuals": residuals, "p": p, "model": model, "bootstrap": boot["method"],
        "verdict": verdict(float(line.slope), p, alpha, sign) if sign else (
            "nonzero exponent" if np.isfinite(p) and p < alpha else "inconclusive"),
        "fit": Fit(float(line.slope), float(line.intercept), boot["distribution"][0], boot["distribution"][1]),
        "n": int(len(x)),
    }
    if new_x is not None:
        out["extrapolate_to"] = float(extrapolate_to)
        out["prediction"] = float(math.exp(line.intercept + line.slope * new_x))
        out["prediction_low"] = float(math.exp(boot["low"][2]))
        out["prediction_high"] = float(math.exp(boot["high"][2]))
    return out


def mean_ci(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 9999, rng=0) -> tuple[float, float, float]:
    """Mean and its bootstrap CI (NaN CI with fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(values))
    if len(values) < 2 or np.ptp(values) == 0:
        return mean, (mean if len(values) >= 2 else float("nan")), (mean if len(values) >= 2 else float("nan"))
    with _quiet():
        res = stats.bootstrap((rescaled(values),), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="BCa" if len(values) > 2 else "percentile", rng=rng)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        low, high = (float(v) for v in np.nanpercentile(res.bootstrap_distribution, q))
    return mean, low, high


def difference(b: pd.DataFrame, a: pd.DataFrame, *, confidence: float, n_resamples: int, permutations: int,
               rng) -> dict[str, Any]:
    """mean(b.y) - mean(a.y) with its bootstrap CI and permutation p; paired on ``unit`` where both cells
    hold the same units once each. ``a`` and ``b`` have columns unit, y."""
    paired = (len(a) >= 2 and a["unit"].is_unique and b["unit"].is_unique
              and set(a["unit"]) == set(b["unit"]))
    out: dict[str, Any] = {"paired": paired, "n_a": len(a), "n_b": len(b)}
    # the smallest two-sided p a permutation test can give with these replicates
    out["min_p"] = min(1.0, 2 / 2 ** len(a)) if paired else (
        min(1.0, 2 / math.comb(len(a) + len(b), len(a))) if len(a) and len(b) else float("nan"))
    if paired:
        joined = b.set_index("unit")["y"].to_frame("b").join(a.set_index("unit")["y"].rename("a"))
        d = (joined["b"] - joined["a"]).to_numpy(dtype=float)
        out["estimate"] = float(d.mean())
        out["ci_low"], out["ci_high"] = mean_ci(d, confidence=confidence, n_resamples=n_resamples, rng=rng)[1:]
        if np.ptp(d) == 0 and d[0] == 0:
            out["p"] = 1.0
        else:
            with _quiet():
                res = stats.permutation_test((joined["b"].to_numpy(float), joined["a"].to_numpy(float)),
                                             lambda u, v, axis=-1: np.mean(u - v, axis=axis),
                                             permutation_type="samples", vectorized=True,
                                             n_resamples=permutations, rng=rng)
            out["p"] = float(res.pvalue)
        return out
    ya, yb = a["y"].to_numpy(float), b["y"].to_numpy(float)
    out["estimate"] = float(yb.mean() - ya.mean()) if len(ya) and len(yb) else float("nan")
    if len(ya) < 2 or len(yb) < 2:
        out.update(ci_low=float("nan"), ci_high=float("nan"), p=float("nan"))
        return out

    def diff(u, v, axis=-1):
        return np.mean(u, axis=axis) - np.mean(v, axis=axis)

    with _quiet():
        boot = stats.bootstrap((rescaled(yb), rescaled(ya)), diff, n_resamples=n_resamples, confidence_level=confidence,
                               vectorized=True, method="BCa", rng=rng)
        perm = stats.permutation_test((yb, ya), diff, permutation_type="independent", vectorized=True,
                                      n_resamples=permutations, rng=rng)
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
        low, high = (float(v) for v in np.nanpercentile(boot.bootstrap_distribution, q))
    out.update(ci_low=low, ci_high=high, p=float(perm.pvalue))
    return out


def _levels(values: pd.Series) -> list[Any]:
    unique = list(values.drop_duplicates())
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


def compare(frame: pd.DataFrame, factors: Sequence[str], *, sign: int = 0, baseline: Mapping[str, Any] = (),
            alpha: float = 0.05, confidence: float = 0.95, n_resamples: int = 9999, permutations: int = 9999,
            rng=0) -> dict[str, Any]:
    """Per-cell means and level differences (see the module doc). ``frame`` has the factor columns, unit, y.
    Returns {"cells": DataFrame, "differences": DataFrame}."""
    rng = np.random.default_rng(rng)
    factors = list(factors)
    levels = {f: _levels(frame[f]) for f in factors}
    base = {}
    for f in factors:
        wanted = dict(baseline).get(f, levels[f][0])
        match = [lv for lv in levels[f] if lv == wanted or str(lv).lower() == str(wanted).lower()]
        if not match:
            from residual_dynamics.errors import ConfigError

            raise ConfigError(f"analysis.baseline.{f}", f"{wanted!r} is not a level of {f} "
                                                        f"(levels: {', '.join(map(str, levels[f]))})")
        base[f] = match[0]
    cells = []
    for key, group in frame.groupby(factors, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        mean, low, high = mean_ci(group["y"], confidence=confidence, n_resamples=n_resamples, rng=rng)
        cells.append({**dict(zip(factors, key)), "n": len(group), "n_units": group["unit"].nunique(),
                      "mean": mean, "ci_low": low, "ci_high": high, "sd": float(group["y"].std(ddof=1))
                      if len(group) > 1 else float("nan")})
    diffs = []
    for f in factors:
        others = [g for g in factors if g != f]
        contexts = list(product(*[levels[g] for g in others])) if others else [()]
        ref = base[f]
        for level in levels[f]:
            if level == ref:
                continue
            for context in contexts:
                mask = np.ones(len(frame), dtype=bool)
                for g, v in zip(others, context):
                    mask &= (frame[g] == v).to_numpy()
                a = frame[mask & (frame[f] == ref).to_numpy()]
                b = frame[mask & (frame[f] == level).to_numpy()]
                if a.empty or b.empty:
                    continue
                res = difference(b[["unit", "y"]], a[["unit", "y"]], confidence=confidence,
                                 n_resamples=n_resamples, permutations=permutations, rng=rng)
                label = ", ".join(f"{g}={v}" for g, v in zip(others, context)) or "all"
                diffs.append({"factor": f, "level": level, "baseline": ref, "context": label,
                              "n_seeds": len(set(a["unit"]) | set(b["unit"])), **res})
            if others:  # pooled over the other factors, matched on them and on the unit
                a = frame[frame[f] == ref].copy()
                b = frame[frame[f] == level].copy()
                key_a = a[others + ["unit"]].astype(str).agg("|".join, axis=1)
                key_b = b[others + ["unit"]].astype(str).agg("|".join, axis=1)
                res = difference(b.assign(unit=key_b.values)[["unit", "y"]], a.assign(unit=key_a.values)[["unit", "y"]],
                                 confidence=confidence, n_resamples=n_resamples, permutations=permutations, rng=rng)
                diffs.append({"factor": f, "level": level, "baseline": ref,
                              "context": f"pooled over {', '.join(others)}",
                              "n_seeds": len(set(a["unit"]) | set(b["unit"])), **res})
    differences = pd.DataFrame(diffs)
    if not differences.empty:
        p = differences["p"].to_numpy(float)
        finite = np.isfinite(p)
        adjusted = np.full_like(p, np.nan)
        if finite.any():
            adjusted[finite] = stats.false_discovery_control(p[finite], method="bh")
        differences["p_adj"] = adjusted
        differences["verdict"] = [verdict(e, q, alpha, sign) for e, q in zip(differences["estimate"], adjusted)]
    return {"cells": pd.DataFrame(cells), "differences": differences, "baseline": base}
