"""Analyse a sweep when it ends: a Hydra callback naming its hypothesis.

In a sweep file (``sweeps/<name>.yaml``)::

    hydra:
      callbacks:
        analyze:
          _target_: residual_dynamics.analysis.callback.AnalyzeOnMultirunEnd
          hypothesis: heads_vs_growth          # conf/analysis/heads_vs_growth.yaml (or a path to a YAML file)
          overrides: [analysis.alpha=0.01]     # optional, dotlist overrides of conf/analyze.yaml

When the multirun finishes, the analysis runs on the sweep directory (``hydra.sweep.dir``) exactly as
``python -m residual_dynamics.analyze analysis=<hypothesis> inputs=[<sweep dir>]`` would, and the last lines
printed are the verdict table and where the report is. A failed analysis (bad spec, no usable runs) is
reported and logged; it does not turn the finished sweep into an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from residual_dynamics.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class AnalyzeOnMultirunEnd(Callback):
    def __init__(self, hypothesis: str, overrides: Sequence[str] = (), output_dir: Optional[str] = None,
                 raise_errors: bool = False, **fields: Any):
        self.hypothesis = str(hypothesis)
        self.overrides = [str(o) for o in (overrides or ())]
        self.output_dir = output_dir
        self.raise_errors = raise_errors
        self.fields = dict(fields)
        self.result = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from residual_dynamics.analysis import pipeline
        from residual_dynamics.analysis.spec import load_config

        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"\nAnalysing the sweep {sweep_dir} for hypothesis {self.hypothesis} ...", flush=True)
        try:
            fields = dict(self.fields)
            if self.output_dir:
                fields["output_dir"] = str(self.output_dir)
            group = config.get("logger", {}).get("group") if isinstance(config.get("logger"), DictConfig) else None
            cfg = load_config(self.hypothesis, inputs=[str(sweep_dir)], overrides=self.overrides, **fields)
            if cfg.wandb.group is None and group:
                cfg.wandb.group = str(group)
            self.result = pipeline.run(cfg)
        except (ConfigError, DataError) as exc:
            log.error("analysis %s of %s failed: %s", self.hypothesis, sweep_dir, exc)
            print(f"analysis {self.hypothesis} failed: {exc}", flush=True)
            if self.raise_errors:
                raise
