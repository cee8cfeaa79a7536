"""The analysis W&B run: ``job_type=analysis`` in the sweep's group, holding the verdict table and the per-run
summary as ``wandb.Table`` and the figures as ``wandb.Image``.

Mode ``auto`` is online only with credentials (``WANDB_API_KEY`` or a ``wandb login`` in ~/.netrc) and
offline otherwise, so nothing ever waits at a login prompt; ``WANDB_MODE`` in the environment wins.
Offline runs land in ``<output dir>/wandb/offline-run-*`` (upload later with ``wandb sync``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from residual_dynamics.errors import ConfigError
from residual_dynamics.reporting.logger import has_wandb_credentials as has_credentials  # noqa: F401 (used by pipeline)
from residual_dynamics.reporting.logger import resolve_wandb_mode

def resolve_mode(mode: str = "auto") -> str:
    """online / offline / disabled from ``wandb.mode`` and ``WANDB_MODE``, by the training runs' rule
    (:func:`residual_dynamics.reporting.logger.resolve_wandb_mode`); errors name ``wandb.mode``."""
    try:
        return resolve_wandb_mode(mode)
    except ConfigError as error:
        if error.field != "logger.mode":
            raise
        raise ConfigError("wandb.mode", str(error)[len("logger.mode: "):]) from None


def _plain(value: Any) -> Any:
    """A table cell W&B can serialise: Python scalars, NaN -> None."""
    if value is None:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (int, str)):
        return value
    return str(value)


def table(frame: pd.DataFrame):
    import wandb

    columns = [str(c) for c in frame.columns]
    data = [[_plain(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return wandb.Table(columns=columns, data=data)


def log_analysis(*, name: str, out_dir: Path, verdict: pd.DataFrame, summary: pd.DataFrame,
                 figures: Mapping[str, Path], config: Mapping[str, Any], project: str, entity: Optional[str],
                 group: Optional[str], mode: str, headline: Mapping[str, Any]) -> Optional[Path]:
    """Write the analysis run; returns its local run directory (``.../wandb/offline-run-*`` offline)."""
    resolved = resolve_mode(mode)
    if resolved == "disabled":
        return None
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, entity=entity, group=group, job_type="analysis", name=f"analysis-{name}",
                     dir=str(out_dir), mode=resolved, config=dict(config), tags=["analysis", name],
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        payload: dict[str, Any] = {"analysis/verdict": table(verdict), "analysis/summary": table(summary)}
        for key, path in figures.items():
            payload[f"analysis_figures/{key}"] = wandb.Image(str(path))
        run.log(payload)
        for key, value in headline.items():
            run.summary[f"analysis/{key}"] = _plain(value)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
