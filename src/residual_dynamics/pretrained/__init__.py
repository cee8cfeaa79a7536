"""Pretrained models: loading from a local directory, a GGUF file or the hub (``loading``), prompts
(``prompts``), the offline SmolLM2 fetch (``fetch_smollm2``) and the probe entry point (``cli``:
``python -m residual_dynamics.probe``)."""
