"""The injection-coefficient scan (``python -m residual_dynamics.scan``).

* :mod:`~residual_dynamics.scan.core`: steering vector, injection, decomposition of the final residual
  stream and the attribution of each component to a logit difference (a pure function over a bridge);
* :mod:`~residual_dynamics.scan.cluster`: clustering the attribution profiles;
* :mod:`~residual_dynamics.scan.spec`: the Hydra schema (``conf/scan.yaml``, group ``scan``) and its parsing;
* :mod:`~residual_dynamics.scan.report`: tables, results rows, figure, W&B;
* :mod:`~residual_dynamics.scan.cli`: the entry point, on pretrained models and trained checkpoints.
"""
