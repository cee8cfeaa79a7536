"""``python -m residual_dynamics.analyze analysis=<hypothesis> 'inputs=[<run or multirun dir>, ...]'``.

Collects the runs below the inputs (training runs, multirun jobs, pretrained runs; several sweeps at once),
tests the hypothesis ``conf/analysis/<hypothesis>.yaml`` and writes, to ``<first input>/analysis/<name>/``
(or ``output_dir=...``): ``report.md`` with its PNG figures, ``tidy.parquet`` (one row per measurement),
``runs.parquet``, ``per_run.csv``, ``verdict.csv``, and one W&B run with ``job_type=analysis`` in the runs'
group (offline without credentials). ``source=wandb`` reads the W&B runs instead: from the API when online
(``wandb.entity``, ``wandb.project``, ``wandb.group``), else from the offline run directories below the inputs.

Examples::

    python -m residual_dynamics.analyze analysis=heads_vs_growth 'inputs=[outputs/multirun/2026-01-02_03-04-05]'
    python -m residual_dynamics.analyze analysis=norm_x_decay 'inputs=[sweepA,sweepB]' analysis.alpha=0.01
    python -m residual_dynamics.analyze analysis=heads_vs_growth analysis.at=curve inputs=[...]
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from residual_dynamics.analysis import spec as _spec  # registers the analyze_schema structured config
from residual_dynamics.errors import ConfigError, DataError

log = logging.getLogger("residual_dynamics.analyze")
# an absolute path: hydra resolves it the same way whether this runs as __main__ or is imported
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def run(cfg: DictConfig):
    """Run the analysis of an already composed ``analyze`` config. Returns the AnalysisResult."""
    from residual_dynamics.analysis import pipeline

    if OmegaConf.is_missing(cfg.analysis, "name") or OmegaConf.is_missing(cfg.analysis, "test"):
        known = sorted(p.stem for p in (Path(CONF_DIR) / "analysis").glob("*.yaml"))
        raise ConfigError("analysis", f"no hypothesis chosen: add analysis=<name> (one of {', '.join(known)})")
    try:
        typed = OmegaConf.to_object(cfg)
    except Exception as exc:
        raise ConfigError(str(getattr(exc, "full_key", "analysis")), str(exc).splitlines()[0]) from None
    return pipeline.run(typed)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    _spec.register()
    main()
