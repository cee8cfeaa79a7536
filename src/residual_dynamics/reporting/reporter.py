"""The probe reporter shared by training and pretrained runs: results file, W&B and figures.

The W&B mode and the ``logger`` group live in :mod:`residual_dynamics.reporting.logger`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from residual_dynamics.reporting import figures
from residual_dynamics.reporting.results import RESULTS_FILE, ResultsFile, rows, scalars

STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger x-axis; pretrained runs use it too


class ProbeReporter:
    """Sends probe results to every sink at a step.

    - W&B (when a run is given): one scalar per record against ``trainer/global_step``, a table of the
      per-layer residual norms with a norm-vs-layer line plot, and the PNG figures as images;
    - the local results file ``<run_dir>/results.jsonl``;
    - PNG figures in ``<run_dir>/figures/`` redrawn from the results file.
    """

    def __init__(self, run_dir: str | os.PathLike, wandb_run=None, meta: Optional[Mapping[str, Any]] = None,
                 pretrained: bool = False):
        self.run_dir = Path(run_dir)
        self.results = ResultsFile(self.run_dir / RESULTS_FILE)
        self.wandb_run = wandb_run
        self.meta = dict(meta or {})
        self.pretrained = pretrained

    def report(self, results: Mapping[str, Any], step: int, draw: bool = True) -> dict[str, Path]:
        """Log ``results`` at ``step``; ``draw=False`` skips the figures (cheap early-training probes)."""
        self.results.append(rows(results, step, self.meta))
        pngs = self.draw() if draw else {}
        if self.wandb_run is not None:
            self._log_wandb(results, step, pngs)
        return pngs

    def draw(self) -> dict[str, Path]:
        history = self.results.read()
        out_dir = self.run_dir / "figures"
        drawn = {
            "norm_vs_layer": figures.norm_vs_layer(history, out_dir / "norm_vs_layer.png"),
            "layer_step_heatmap": None if self.pretrained else figures.layer_step_heatmap(
                history, out_dir / "layer_step_heatmap.png"),
            # a pretrained run is one point in time: its growth fit and per-head W_OV are the figures
            "growth_curve": figures.growth_curve(history, out_dir / "growth_curve.png") if self.pretrained else None,
            "W_OV": figures.head_norms(history, out_dir / "W_OV_norms.png") if self.pretrained else None,
        }
        return {name: path for name, path in drawn.items() if path is not None}

    def _log_wandb(self, results: Mapping[str, Any], step: int, pngs: Mapping[str, Path]) -> None:
        import wandb

        payload: dict[str, Any] = dict(scalars(results))
        table = _norm_table(payload)
        if table is not None:
            payload["probe_tables/resid_norm_vs_layer"] = table
            payload["probe_tables/resid_norm_vs_layer_plot"] = wandb.plot.line(
                table, "layer", "resid_post", title=f"residual norm vs layer (step {step})")
        for name, path in pngs.items():
            payload[f"probe_figures/{name}"] = wandb.Image(str(path))
        payload[STEP_KEY] = step
        self.wandb_run.log(payload)
        for name, result in results.items():  # e.g. a probe this architecture does not support
            if getattr(result, "note", ""):
                self.wandb_run.summary[f"probe_notes/{name}"] = result.note


def _norm_table(payload: Mapping[str, float]):
    """A W&B table with one row per layer and one column per residual hook, from the scalar keys."""
    import wandb

    prefix = "probe/resid_norm/"
    columns: dict[str, dict[int, float]] = {}
    for key, value in payload.items():
        if not key.startswith(prefix):
            continue
        hook, _, layer = key[len(prefix):].rpartition("/L")
        if not hook or hook == "ratio" or not layer.isdigit():
            continue
        columns.setdefault(hook, {})[int(layer)] = value
    if "resid_post" not in columns:
        return None
    hooks = sorted(columns)
    layers = sorted(columns["resid_post"])
    data = [[layer] + [columns[h].get(layer, float("nan")) for h in hooks] for layer in layers]
    return wandb.Table(columns=["layer"] + hooks, data=data)
