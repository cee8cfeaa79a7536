"""PNG figures drawn from results-file rows, so they can be redrawn from ``results.jsonl`` at any time.

- ``norm_vs_layer``: mean residual norm (resid_post) against layer, one line per step (log y axis; a
  straight line is exponential growth).
- ``layer_step_heatmap``: the same norms as a layer x step image.
- ``growth_curve``: a single model's norms against layer with its fitted growth factor (pretrained runs).
- ``head_norms``: per-head W_OV Frobenius norms against layer.
- ``ablation_heatmap``: the sublayer-ablation loss increase as layer x step images (attention, MLP).
- ``logit_lens_heatmap``: the logit lens's KL to the final distribution and loss as layer x step images.
Every function writes atomically (temp file + rename) and returns the path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESID_NAME = "resid_norm/resid_post"


def _series(rows: Iterable[Mapping], name: str) -> dict[int, dict[int, float]]:
    """{step: {layer: value}} for per-layer rows called ``name``."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["name"] == name and row["layer"] is not None and row["head"] is None and row["value"] is not None:
            out[int(row["step"])][int(row["layer"])] = float(row["value"])
    return dict(out)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


_save = save_figure


def norm_vs_layer(rows: Iterable[Mapping], path, title: str = "") -> Optional[Path]:
    series = _series(rows, RESID_NAME)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(series)
    colors = plt.cm.viridis(np.linspace(0, 1, len(steps)))
    for color, step in zip(colors, steps):
        layers = sorted(series[step])
        ax.plot(layers, [series[step][l] for l in layers], marker="o", ms=3, color=color, label=f"step {step}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("mean L2 norm (position 0 excluded)")
    ax.set_title(title or "Residual stream norm vs layer")
    if len(steps) <= 12:
        ax.legend(fontsize=7)
    else:
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(steps[0], steps[-1]))
        fig.colorbar(sm, ax=ax, label="step")
    return _save(fig, path)


def layer_step_heatmap(rows: Iterable[Mapping], path, title: str = "") -> Optional[Path]:
    series = _series(rows, RESID_NAME)
    if not series:
        return None
    steps = sorted(series)
    n_layers = 1 + max(max(s) for s in series.values())
    grid = np.full((n_layers, len(steps)), np.nan)
    for j, step in enumerate(steps):
        for layer, value in series[step].items():
            grid[layer, j] = np.log10(value)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(steps) + 2), 0.3 * n_layers + 2))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
    ax.set_xlabel("step")
    ax.set_yticks(range(n_layers))
    ax.set_ylabel("layer")
    ax.set_title(title or "log10 residual norm (resid_post)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def growth_curve(rows: Iterable[Mapping], path, title: str = "") -> Optional[Path]:
    rows = list(rows)
    series = _series(rows, RESID_NAME)
    if not series:
        return None
    step = max(series)
    layers = sorted(series[step])
    norms = np.array([series[step][l] for l in layers])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, norms, "o-", label="resid_post")
    for name, style in (("resid_norm/attn_out", "s--"), ("resid_norm/mlp_out", "^--")):
        other = _series(rows, name).get(step)
        if other:
            ax.plot(sorted(other), [other[l] for l in sorted(other)], style, ms=3, label=name.split("/")[1])
    growth = [r["value"] for r in rows if r["name"] == "growth_rate" and r["step"] == step and r["value"]]
    if growth:
        g = float(growth[0])  # the probe's fitted factor; draw it through the geometric mean of the points
        x = np.array(layers, dtype=float)
        fit = np.exp(np.log(norms).mean() + np.log(g) * (x - x.mean()))
        ax.plot(layers, fit, ":", color="k", label=f"fit: x{g:.3f} per layer")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean L2 norm (position 0 excluded)")
    ax.set_title(title or "Residual stream norm growth")
    ax.legend(fontsize=8)
    return _save(fig, path)


def head_norms(rows: Iterable[Mapping], path, name: str = "W_OV", title: str = "") -> Optional[Path]:
    per_head: dict[int, dict[int, float]] = defaultdict(dict)
    last = None
    rows = list(rows)
    for row in rows:
        if row["name"] == name and row["head"] is not None and row["value"] is not None:
            last = row["step"] if last is None else max(last, row["step"])
    if last is None:
        return None
    for row in rows:
        if row["name"] == name and row["head"] is not None and row["step"] == last and row["value"] is not None:
            per_head[int(row["head"])][int(row["layer"])] = float(row["value"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for values in per_head.values():
        layers = sorted(values)
        ax.plot(layers, [values[l] for l in layers], color="grey", alpha=0.6, lw=1)
    layers = sorted({l for v in per_head.values() for l in v})
    mean = [np.mean([v[l] for v in per_head.values() if l in v]) for l in layers]
    ax.plot(layers, mean, "o-", color="C3", label="mean over heads")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"||{name}||_F per head")
    ax.set_title(title or f"{name} Frobenius norm per head")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _grid(series: Mapping[int, Mapping[int, float]], steps: list[int], n_layers: int) -> np.ndarray:
    """[n_layers, len(steps)] array of ``series[step][layer]`` (NaN where missing)."""
    grid = np.full((n_layers, len(steps)), np.nan)
    for j, step in enumerate(steps):
        for layer, value in series.get(step, {}).items():
            grid[layer, j] = value
    return grid


def _heatmaps(panels: list[tuple[str, dict[int, dict[int, float]], str, Optional[float]]], path, title: str,
              shared_scale: bool = False):
    """Side-by-side layer x step images, one per (panel title, {step: {layer: value}}, colormap, vmin);
    ``shared_scale``: one colour scale for all panels (values in the same unit, to compare)."""
    steps = sorted({step for _, series, _, _ in panels for step in series})
    values = [v for _, series, _, _ in panels for per_step in series.values() for v in per_step.values()]
    vmax = max(values) if shared_scale and values else None
    n_layers = 1 + max(layer for _, series, _, _ in panels for values in series.values() for layer in values)
    width = max(4.0, 0.35 * len(steps) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.3 * n_layers + 2.6), squeeze=False,
                             layout="constrained")
    for ax, (name, series, cmap, vmin) in zip(axes[0], panels):
        if shared_scale and values:
            vmin = min(values) if vmin is None else vmin
        im = ax.imshow(_grid(series, steps, n_layers), aspect="auto", origin="lower", cmap=cmap, vmin=vmin,
                       vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
        ax.set_xlabel("step")
        ax.set_yticks(range(n_layers))
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def ablation_heatmap(rows: Iterable[Mapping], path, title: str = "") -> Optional[Path]:
    """Loss increase (nats) when each sublayer is ablated, layer x step, one panel per sublayer kind
    (``ablation/<mode>/attn`` and ``ablation/<mode>/mlp`` records of the sublayer_ablation probe)."""
    rows = list(rows)
    names = sorted({row["name"] for row in rows if row["name"].startswith("ablation/")
                    and row["name"].rsplit("/", 1)[-1] in ("attn", "mlp")})
    panels = [(f"{name.split('/')[2]}: loss increase ({name.split('/')[1]}-ablated)", _series(rows, name),
               "viridis", None) for name in names]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        return None
    return _heatmaps(panels, path, title or "Sublayer ablation: loss increase (nats) by layer and step",
                     shared_scale=True)


def logit_lens_heatmap(rows: Iterable[Mapping], path, title: str = "") -> Optional[Path]:
    """KL(final || lens) and loss of each layer's decoded resid_post, layer x step (logit_lens records)."""
    rows = list(rows)
    panels = [("KL to the final distribution (nats)", _series(rows, "logit_lens/kl"), "magma_r", 0.0),
              ("next-token loss of the lens (nats)", _series(rows, "logit_lens/loss"), "magma_r", None)]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        return None
    return _heatmaps(panels, path, title or "Logit lens by layer and step")
