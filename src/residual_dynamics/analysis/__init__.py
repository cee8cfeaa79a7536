"""From a multirun to a verdict: collect runs into a tidy table, test a hypothesis, write a report.

* :mod:`.collect`   -- run directories (results.jsonl + .hydra/config.yaml) or W&B runs (API or offline
  files) -> one tidy :class:`pandas.DataFrame` (one row per measurement, joined with the run's config);
* :mod:`.spec`      -- the hypothesis spec (``conf/analysis/*.yaml``, a Hydra structured config) and its
  validation;
* :mod:`.extract`   -- the tidy table -> one y value per run (or per run and step) as the spec asks;
* :mod:`.stats`     -- the tests (``trend``, ``scaling``, ``compare``), all built on scipy.stats;
* :mod:`.figures`, :mod:`.report`, :mod:`.wandb_run` -- PNGs, ``report.md`` and the analysis W&B run;
* :mod:`.pipeline`  -- all of it in order (used by ``python -m residual_dynamics.analyze`` and by the
  multirun callback :class:`.callback.AnalyzeOnMultirunEnd`).
"""
