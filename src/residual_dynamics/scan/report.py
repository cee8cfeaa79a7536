"""What the scan writes: the attribution table (CSV and Parquet), results.jsonl rows, the clusters, the
PNG figure and the W&B run (line plots of the top components, the table and the figure).

Files in the run directory (every one written atomically: a temporary file, then a rename):

* ``scan.csv`` / ``scan.parquet``: one row per (component, coefficient): ``component, kind, layer, head,
  neuron, cluster, coefficient, attribution``.
* ``clusters.csv``: one row per component: ``component, kind, layer, head, neuron, cluster, range``
  (cluster -1: flat).
* ``results.jsonl``: the results-file schema (``step, probe, name, layer, head, value`` plus run
  metadata) with ``probe = "scan"``: ``scan/attribution/<kind>`` rows (with ``coefficient``, ``component``
  and ``neuron``), ``scan/logit_diff`` per coefficient, and one ``scan/cluster/<kind>`` row per
  component (value = its cluster).
* ``figures/scan.png``: attribution vs coefficient, one line per component (the ``top_k`` largest by
  range in colour and labelled, the rest grey), the total logit difference in black; and the mean
  normalised profile of each cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from residual_dynamics.reporting.results import RESULTS_FILE, ResultsFile
from residual_dynamics.scan.cluster import Clusters
from residual_dynamics.scan.core import ScanResult


def table(result: ScanResult, clusters: Optional[Clusters] = None):
    """The attribution table as a pandas DataFrame (one row per component and coefficient)."""
    import pandas as pd

    n = len(result.coefficients)
    labels = clusters.labels if clusters is not None else np.full(len(result.components), -1)
    columns = {
        "component": np.repeat([c.name for c in result.components], n),
        "kind": np.repeat([c.kind for c in result.components], n),
        "layer": pd.array(np.repeat([c.layer for c in result.components], n), dtype="Int64"),
        "head": pd.array(np.repeat([c.head for c in result.components], n), dtype="Int64"),
        "neuron": pd.array(np.repeat([c.neuron for c in result.components], n), dtype="Int64"),
        "cluster": np.repeat(labels, n),
        "coefficient": np.tile(result.coefficients.numpy(), len(result.components)),
        "attribution": result.attribution.numpy().reshape(-1),
    }
    return pd.DataFrame(columns)


def cluster_table(result: ScanResult, clusters: Clusters):
    import pandas as pd

    return pd.DataFrame({
        "component": [c.name for c in result.components],
        "kind": [c.kind for c in result.components],
        "layer": pd.array([c.layer for c in result.components], dtype="Int64"),
        "head": pd.array([c.head for c in result.components], dtype="Int64"),
        "neuron": pd.array([c.neuron for c in result.components], dtype="Int64"),
        "cluster": clusters.labels,
        "range": clusters.ranges,
    })


def result_rows(result: ScanResult, clusters: Clusters, step: int, meta: Mapping[str, Any]) -> list[dict]:
    """results.jsonl rows (see the module doc)."""
    rows = []
    coefficients = result.coefficients.tolist()
    for index, component in enumerate(result.components):
        base = {"step": int(step), "probe": "scan", "layer": component.layer, "head": component.head, **meta,
                "component": component.name, "neuron": component.neuron}
        for coefficient, value in zip(coefficients, result.attribution[index].tolist()):
            rows.append({**base, "name": f"scan/attribution/{component.kind}", "value": float(value),
                         "coefficient": coefficient})
        rows.append({**base, "name": f"scan/cluster/{component.kind}", "value": int(clusters.labels[index])})
    for coefficient, value in zip(coefficients, result.logit_diff.tolist()):
        rows.append({"step": int(step), "probe": "scan", "name": "scan/logit_diff", "layer": None, "head": None,
                     "value": float(value), "coefficient": coefficient, **meta})
    return rows


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_tables(result: ScanResult, clusters: Clusters, run_dir: Path, step: int,
                 meta: Mapping[str, Any]) -> dict[str, Path]:
    """scan.csv, scan.parquet, clusters.csv and the results.jsonl rows; returns the paths."""
    frame = table(result, clusters)
    out = {
        "csv": _atomic(run_dir / "scan.csv", lambda tmp: frame.to_csv(tmp, index=False)),
        "parquet": _atomic(run_dir / "scan.parquet", lambda tmp: frame.to_parquet(tmp, index=False)),
        "clusters": _atomic(run_dir / "clusters.csv",
                            lambda tmp: cluster_table(result, clusters).to_csv(tmp, index=False)),
    }
    results = ResultsFile(run_dir / RESULTS_FILE)
    results.append(result_rows(result, clusters, step, meta))
    out["results"] = results.path
    return out


def top_components(result: ScanResult, k: int) -> list[int]:
    """Indices of the ``k`` components with the largest range (max - min over coefficients)."""
    ranges = (result.attribution.max(1).values - result.attribution.min(1).values).numpy()
    return [int(i) for i in np.argsort(-ranges, kind="stable")[:k] if ranges[i] > 0]


def figure(result: ScanResult, clusters: Clusters, path: Path, top_k: int = 8, title: str = "") -> Path:
    """The scan figure (see the module doc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = result.coefficients.numpy()
    attribution = result.attribution.numpy()
    top = top_components(result, top_k)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for index in range(len(result.components)):
        if index not in top:
            ax.plot(x, attribution[index], color="0.75", lw=0.6, alpha=0.6, zorder=1)
    colors = plt.cm.tab10(np.arange(len(top)) % 10)
    for color, index in zip(colors, top):
        label = result.components[index].name
        cluster = int(clusters.labels[index])
        ax.plot(x, attribution[index], color=color, lw=1.6, zorder=3,
                label=f"{label} (cluster {cluster})" if cluster >= 0 else f"{label} (flat)")
        ax.annotate(label, (x[-1], attribution[index, -1]), xytext=(3, 0), textcoords="offset points",
                    fontsize=7, color=color, va="center")
    ax.plot(x, result.logit_diff.numpy(), color="k", lw=2.2, zorder=4, label="total logit difference")
    ax.axhline(0.0, color="k", lw=0.5, ls=":")
    ax.axvline(0.0, color="k", lw=0.5, ls=":")
    ax.set_xlabel(f"injection coefficient (resid_pre of layer {result.layer})")
    ax.set_ylabel("attribution to the logit difference")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "Injection-coefficient scan", fontsize=10)
    for cluster in range(clusters.n_clusters):
        members = clusters.members(cluster)
        names = ", ".join(result.components[i].name for i in members[:4]) + (" ..." if len(members) > 4 else "")
        ax2.plot(x, clusters.centers[cluster], lw=1.8, label=f"{cluster}: {len(members)} ({names})")
    flat = int((clusters.labels < 0).sum())
    ax2.set_xlabel("injection coefficient")
    ax2.set_ylabel("mean normalised profile")
    ax2.set_title(f"clusters of the profiles ({flat} flat components not shown)", fontsize=10)
    ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def log_wandb(run, result: ScanResult, clusters: Clusters, png: Path, top_k: int, step: int) -> None:
    """The W&B payload: a line plot of the top components and the total, the attribution table (the top
    components; the full table is scan.parquet), the clusters table and the figure."""
    import wandb

    x = result.coefficients.tolist()
    top = top_components(result, top_k)
    ys = [result.attribution[i].tolist() for i in top] + [result.logit_diff.tolist()]
    keys = [result.components[i].name for i in top] + ["total logit difference"]
    rows = [[result.components[i].name, c, a] for i in top for c, a in zip(x, result.attribution[i].tolist())]
    run.log({
        "scan/attribution_vs_coefficient": wandb.plot.line_series(
            xs=x, ys=ys, keys=keys, title="attribution vs injection coefficient", xname="injection coefficient"),
        "scan/attribution": wandb.Table(columns=["component", "coefficient", "attribution"], data=rows),
        "scan/clusters": wandb.Table(
            columns=["component", "kind", "layer", "head", "cluster", "range"],
            data=[[c.name, c.kind, c.layer, c.head, int(label), float(r)]
                  for c, label, r in zip(result.components, clusters.labels, clusters.ranges)]),
        "scan/figure": wandb.Image(str(png)),
        "trainer/global_step": step,
    })
    run.summary["scan/n_clusters"] = clusters.n_clusters
    run.summary["scan/max_abs_sum_error"] = float((result.total - result.logit_diff).abs().max())
