"""The verdict table (console and Markdown) and ``report.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

VERDICT_COLUMNS = ["hypothesis", "effect", "estimate", "CI", "p", "p_adj", "n runs", "n seeds", "verdict"]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def display_table(verdict: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as strings, with the columns people read."""
    rows = []
    for r in verdict.to_dict("records"):
        rows.append({
            "hypothesis": r["hypothesis"] + (f" @ {r['at']}" if r.get("at") not in (None, "final") else ""),
            "effect": r["effect"],
            "estimate": fmt(r["estimate"]),
            "CI": f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
            "p": fmt_p(r["p"]),
            "p_adj": fmt_p(r.get("p_adj")),
            "n runs": str(r["n_runs"]),
            "n seeds": str(r["n_seeds"]),
            "verdict": r["verdict"],
        })
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def markdown_table(frame: pd.DataFrame, max_rows: Optional[int] = None) -> str:
    if frame.empty:
        return "_(none)_\n"
    shown = frame if max_rows is None else frame.head(max_rows)

    def cell(v):
        text = fmt(v) if not isinstance(v, str) else v
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, shown.columns)) + " |",
             "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False, name=None)]
    if max_rows is not None and len(frame) > max_rows:
        lines.append(f"\n_... {len(frame) - max_rows} more rows in the Parquet / CSV files._")
    return "\n".join(lines) + "\n"


def print_verdict(verdict: pd.DataFrame, title: str = "verdict") -> None:
    from rich.console import Console
    from rich.table import Table

    shown = display_table(verdict)
    t = Table(title=title, show_lines=False)
    for column in shown.columns:
        t.add_column(column, overflow="fold", justify="right" if column in ("estimate", "p", "p_adj", "n runs",
                                                                          "n seeds") else "left")
    styles = {"supported": "green", "contradicted": "red"}
    for row in shown.itertuples(index=False, name=None):
        t.add_row(*row, style=styles.get(row[-1]))
    Console(width=max(120, Console().width)).print(t)


def write_report(path: Path, *, hyp, spec_yaml: str, verdict: pd.DataFrame, per_run: pd.DataFrame,
                 runs: pd.DataFrame, excluded: Sequence[tuple[str, str]], figures: Mapping[str, Path],
                 inputs: Sequence[str], details: Mapping[str, Any], files: Mapping[str, Path],
                 extra_tables: Mapping[str, pd.DataFrame] = (), wandb_dir: Optional[Path] = None,
                 notes: Iterable[str] = ()) -> Path:
    out: list[str] = []
    verdicts = sorted(set(verdict["verdict"]))
    headline = verdicts[0] if len(verdicts) == 1 else ", ".join(f"{(verdict['verdict'] == v).sum()} {v}"
                                                                 for v in verdicts)
    out.append(f"# {hyp.name}: {headline}\n")
    if hyp.description:
        out.append(hyp.description.strip() + "\n")
    out.append(f"- test: **{hyp.test}**; y = `{hyp.y_label}` at `{hyp.at.label()}`; "
               + (f"x = `{hyp.x}`" if hyp.x else f"factors = {', '.join(f'`{f}`' for f in hyp.factors)}")
               + f"; replicate unit `{hyp.unit}`; alpha = {hyp.alpha}; {hyp.confidence:.0%} CIs")
    out.append(f"- inputs: {', '.join(f'`{i}`' for i in inputs)}")
    status_counts = runs["status"].value_counts().to_dict()
    out.append(f"- runs found: {len(runs)} ({', '.join(f'{n} {s}' for s, n in status_counts.items())}); "
               f"analysed: {per_run['run'].nunique()}\n")
    out.append("## Verdict\n")
    out.append(markdown_table(display_table(verdict)))
    for line in details.get("lines", []):
        out.append(f"- {line}")
    out.append("")
    for title, frame in dict(extra_tables).items():
        out.append(f"## {title}\n")
        out.append(markdown_table(frame, max_rows=60))
    out.append("## Figures\n")
    for name, fig in figures.items():
        rel = Path(fig).relative_to(path.parent) if Path(fig).is_relative_to(path.parent) else Path(fig)
        out.append(f"### {name.replace('_', ' ')}\n\n![{name}]({rel.as_posix()})\n")
    out.append("## Runs analysed\n")
    out.append(markdown_table(per_run, max_rows=80))
    out.append("## Runs not analysed\n")
    if excluded:
        out.append(markdown_table(pd.DataFrame(excluded, columns=["run", "why"])))
    else:
        out.append("None: every run found was complete and analysed.\n")
    out.append("## Method\n")
    out.append(_method(hyp))
    for note in notes:
        out.append(f"- {note}")
    out.append("\n## Hypothesis spec\n\n```yaml\n" + spec_yaml.strip() + "\n```\n")
    out.append("## Files\n")
    for name, file in files.items():
        out.append(f"- {name}: `{file}`")
    if wandb_dir is not None:
        out.append(f"- W&B analysis run: `{wandb_dir}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _method(hyp) -> str:
    common = (f"- Bootstrap: scipy.stats.bootstrap (BCa, {hyp.n_resamples} resamples), resampling runs within "
              "each x value (stratified) after rescaling each stratum's deviations from its mean by "
              "sqrt(n/(n-1)) (Davison & Hinkley 1997, sec. 3.2), so the bootstrap variance of a mean of n "
              "seeds is s²/n rather than (n-1)/n·s²/n. With few seeds per x the CI is still somewhat narrow: "
              "in simulations (tests/test_analysis.py) a 95% CI covers the true slope ~87% of the time with "
              "3 seeds x 4 x values, ~91% with 5, ~94% with 8.\n"
              f"- Permutation p-values: scipy.stats.permutation_test, {hyp.permutations} resamples (exact when "
              "fewer arrangements exist), two-sided.\n"
              "- inconclusive means no effect was detected at this alpha; it is not evidence of no effect.\n")
    if hyp.test == "trend":
        sign = "+" if hyp.sign > 0 else "-"
        return (f"- trend: Spearman's rho of y with x; the p-value permutes y across x (``pairings``) with rho "
                f"as the statistic. Verdict: supported if p < {hyp.alpha} and rho has the expected sign "
                f"({sign}), contradicted if p < {hyp.alpha} and the opposite sign, else inconclusive.\n"
                f"- effect: OLS slope of y on {'log x' if hyp.log_x else 'x'} (scipy.stats.linregress) with the "
                "bootstrap CI; the Theil-Sen slope (scipy.stats.theilslopes) is a robust cross-check.\n" + common)
    if hyp.test == "scaling":
        law = "y = a·x^b (OLS of log y on log x)" if hyp.model == "power" else "y = a·e^(b·x) (OLS of log y on x)"
        return (f"- scaling: {law}; b with its bootstrap CI, R² and residuals of log y; p permutes log y "
                "across x (``pairings``, the correlation of the fitted coordinates).\n"
                + (f"- verdict: supported if p < {hyp.alpha} and b has the expected sign, contradicted if the "
                   "opposite sign, else inconclusive.\n" if hyp.sign else "") + common)
    return ("- compare: per-cell means with bootstrap CIs; for each factor, each level minus the baseline level "
            "within every combination of the other factors, and pooled over them (matched on the other "
            "factors and the unit). Paired by unit (seed) where both cells hold the same units: the CI "
            "bootstraps the paired differences and the permutation flips signs within pairs (``samples``); "
            "otherwise two independent samples (``independent``).\n"
            f"- p_adj: Benjamini-Hochberg (scipy.stats.false_discovery_control) across the comparisons; the "
            f"verdict uses p_adj < {hyp.alpha}.\n" + common)
