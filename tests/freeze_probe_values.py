"""Regenerate tests/fixtures/probe_values_frozen.json -- run ONCE, on the code before the typed-spec
redesign (commit 7804258), so that tests/test_probe_values_frozen.py can check that the redesign changed no
probe number. Do not rerun it to make that test pass.

    python tests/freeze_probe_values.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "probe_values_frozen.json"

# The fixed model: our Transformer, 3 layers, LN, perturbed gains and biases, seed 1234.
MODEL = dict(n_layers=3, d_model=32, n_heads=4, d_mlp=64, n_ctx=16, d_vocab=64, act_fn="gelu",
             normalization_type="LN")
OPTION_VALUES = {
    "residual_norms": {"fit_layers": None},
    "weight_norms": {"fold_ln": True},
    "activation_rates": {"n_random": 64},
    "layer_horizon": {"ks": [1, 2, 4], "mode": "clean", "tolerance": 0.05},
    "cleanup": {"threshold": 0.3},
}


def probe_options(values=OPTION_VALUES) -> dict:
    """{probe: its Options} from {probe: {option: value}} (run_probes takes Options instances)."""
    from residual_dynamics.probes.registry import PROBES

    return {name: PROBES[name].Options(**options) for name, options in values.items()}


OPTIONS = probe_options()


def fixed_model():
    from residual_dynamics.training.model import ModelConfig, Transformer

    torch.manual_seed(1234)
    model = Transformer(ModelConfig(**MODEL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # gains and biases away from 1 / 0 so that folding matters
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def fixed_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, MODEL["d_vocab"], (4, 16), generator=g)


def records_of(results) -> list[dict]:
    out = []
    for probe, result in results.items():
        for r in result.records():
            out.append({"probe": probe, "name": r.name, "layer": r.layer, "head": r.head, "value": float(r.value)})
    return out


if __name__ == "__main__":
    from residual_dynamics.training.convert import to_transformer_lens
    from residual_dynamics.probes.registry import run_probes

    bridge = to_transformer_lens(fixed_model())
    rows = records_of(run_probes(bridge, fixed_tokens(), OPTIONS))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({"model": MODEL, "options": OPTION_VALUES, "records": rows}, indent=0) + "\n")
    print(f"{len(rows)} values frozen into {FIXTURE}")
