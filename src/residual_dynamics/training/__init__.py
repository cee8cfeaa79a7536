"""Training: the plain-PyTorch model (``model``), its TransformerLens bridge (``convert``), the optimizer
(``optim``), the LightningModule (``lit``), the probe callback (``callbacks``) and the entry point
(``train``: ``python -m residual_dynamics.train``)."""
