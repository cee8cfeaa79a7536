"""The probe reporter shared by training and pretrained runs: results file, W&B and figures.

The W&B mode and the ``logger`` group live in :mod:`residual_dynamics.reporting.logger`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from residual_dynamics.reporting import figures
from residual_dynamics.reporting.results import (CHART, FAMILY_PREFIXES, RESULTS_FILE, TABLE_COLUMNS, ResultsFile,
                                                 family, probe_of, rows, scalars, tables)

STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger x-axis; pretrained runs use it too
FIGURES_SECTION = "probe_figures"
WANDB_METRICS_GUIDANCE = 10_000  # W&B's guidance: fewer distinct metrics than this in a whole project

log = logging.getLogger(__name__)


class ProbeReporter:
    """Sends probe results to every sink at a step.

    - W&B (when a run is given), against ``trainer/global_step``: the scalar keys that ``detail``
      selects (``logger.detail``: summary | layer | head, see ``results.scalar_detail``), one table per
      probe family of its per-layer / per-head / per-node records drawn as a value-vs-layer line chart
      (``<family>/vs_layer``), and the PNG figures as images (``probe_figures/<name>``);
    - the local results file ``<run_dir>/results.jsonl``;
    - PNG figures in ``<run_dir>/figures/`` redrawn from the results file.
    """

    def __init__(self, run_dir: str | os.PathLike, wandb_run=None, meta: Optional[Mapping[str, Any]] = None,
                 pretrained: bool = False, detail: str = "layer"):
        self.run_dir = Path(run_dir)
        self.results = ResultsFile(self.run_dir / RESULTS_FILE)
        self.wandb_run = wandb_run
        self.meta = dict(meta or {})
        self.pretrained = pretrained
        scalars({}, detail)  # a bad detail fails here, before any probe runs
        self.detail = detail
        self._defined: set[str] = set()  # key prefixes with a define_metric
        self._keys: set[str] = set()  # distinct W&B keys logged so far
        if wandb_run is not None:
            # every probe key plots against trainer/global_step (Lightning's x-axis), also in W&B's UI
            # defaults, whatever the caller defined before (Lightning and the probe CLI define "*" too)
            wandb_run.define_metric(STEP_KEY)
            self._define([prefix for prefix, _ in FAMILY_PREFIXES] + [FIGURES_SECTION + "/"])

    def report(self, results: Mapping[str, Any], step: int, draw: bool = True,
               provenance: Optional[Mapping[str, Any]] = None,
               probe_seconds: Optional[Mapping[str, float]] = None) -> dict[str, Path]:
        """Log ``results`` at ``step``; ``draw=False`` skips the figures (cheap early-training probes).

        provenance:    fields added to every results row of this step (``weights_sha256``, the fingerprint
                       of the probed weights, see ``reporting.provenance``; ``revision``, ``commit``), and
                       ``provenance/<field>`` in the W&B summary.
        probe_seconds: {probe name: wall seconds}: a ``probe_seconds`` field of that probe's rows, and
                       ``probe_seconds/<probe>`` in W&B (history at ``step`` and summary).
        """
        meta = {**self.meta, **(provenance or {})}
        seconds = dict(probe_seconds or {})
        self.results.append([row for name, result in results.items() for row in rows(
            {name: result}, step, {**meta, **({"probe_seconds": seconds[name]} if name in seconds else {})})])
        pngs = self.draw() if draw else {}
        if self.wandb_run is not None:
            self._log_wandb(results, step, pngs)
            for key, value in (provenance or {}).items():
                self.wandb_run.summary[f"provenance/{key}"] = value
            if seconds:
                self._define(["probe_seconds/"])
                timing = {f"probe_seconds/{name}": value for name, value in seconds.items()}
                self.wandb_run.log({**timing, STEP_KEY: step})
                self.wandb_run.summary.update(timing)
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
            # usefulness in layer and time: layer x step heatmaps of the checkpoint-cadence probes
            "sublayer_ablation": None if self.pretrained else figures.ablation_heatmap(
                history, out_dir / "sublayer_ablation_heatmap.png"),
            "logit_lens": None if self.pretrained else figures.logit_lens_heatmap(
                history, out_dir / "logit_lens_heatmap.png"),
        }
        return {name: path for name, path in drawn.items() if path is not None}

    def _define(self, prefixes) -> None:
        """``define_metric("<prefix>*")`` against the global step, once per prefix."""
        for prefix in prefixes:
            if prefix not in self._defined:
                self.wandb_run.define_metric(f"{prefix}*", step_metric=STEP_KEY, step_sync=True)
                self._defined.add(prefix)

    def _log_wandb(self, results: Mapping[str, Any], step: int, pngs: Mapping[str, Path]) -> None:
        import wandb

        payload: dict[str, Any] = dict(scalars(results, self.detail))
        for name, data in tables(results).items():
            table = wandb.Table(columns=TABLE_COLUMNS, data=data)
            payload[f"{name}/{CHART}"] = wandb.plot.line(table, "layer", "value", stroke="series",
                                                          title=f"{name} vs layer (step {step})")
        for name, path in pngs.items():
            payload[f"{FIGURES_SECTION}/{name}"] = wandb.Image(str(path))
        # a family of no known probe (a new one): its keys get their own definition
        self._define({family(key) for key in payload if probe_of(family(key)) is None and family(key) != FIGURES_SECTION})
        before = len(self._keys)
        self._keys.update(payload)
        if before <= WANDB_METRICS_GUIDANCE < len(self._keys):
            log.warning("this run has logged %d distinct W&B keys (logger.detail=%s); W&B advises fewer than "
                        "%d per project: use logger.detail=layer or summary (results.jsonl keeps every record)",
                        len(self._keys), self.detail, WANDB_METRICS_GUIDANCE)
        payload[STEP_KEY] = step
        self.wandb_run.log(payload)
        for name, result in results.items():  # e.g. a probe this architecture does not support
            if getattr(result, "note", ""):
                self.wandb_run.summary[f"probe_notes/{name}"] = result.note
