"""residual-dynamics: train small transformers and probe their residual stream.

Package map: ``model`` (plain PyTorch transformer), ``convert`` (to a TransformerLens bridge),
``optim``, ``data``, ``lit`` (Lightning modules), ``probes`` (one module per probe),
``callbacks`` (ProbeCallback), ``logging`` helpers (W&B, results file, figures),
``train`` and ``probe`` (Hydra entry points).
"""

__version__ = "0.1.0"
