"""Probes: pure functions (bridge, tokens, options) -> result dataclass of tensors.

Each family lives in a module named after it, written against TransformerLens hook names so the same code
serves trained models (``residual_dynamics.training.convert.to_transformer_lens``) and pretrained ones
(``TransformerBridge.boot_transformers``).
"""
