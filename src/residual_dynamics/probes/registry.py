"""Which probes exist, and running the enabled ones with their configured options.

``conf/probes/<name>.yaml`` has one section per probe: ``enabled``, ``early`` (whether it also runs at the
log-spaced early training steps) and keyword options passed to the probe function as they are. The callback (trained models) and ``residual_dynamics.probe`` (pretrained
models) both call :func:`run_probes`, so both produce the same results and the same metric keys.

Probes that only read activations of one forward over the tokens (those whose module has a
``<name>_pass`` builder: ``residual_norms``, ``activation_rates``) share ONE hooked forward that stops
after the last block (:func:`residual_dynamics.probes.forward.run_activation_passes`); the others run
one by one, as called on their own.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.common import ProbeUnsupported, Unsupported


PROBE_NAMES = ("residual_norms", "weight_norms", "activation_rates", "layer_horizon", "cleanup")


def probe_function(name: str) -> Callable:
    """The probe function ``name``, found in the module of the same name (imported on first use)."""
    import importlib

    return getattr(importlib.import_module(f"residual_dynamics.probes.{name}"), name)


def pass_builder(name: str) -> Optional[Callable]:
    """The builder ``<name>_pass`` of an activation-only probe (same options as the probe function, returns
    a :class:`~residual_dynamics.probes.forward.ActivationPass`), or None for probes that run on their own."""
    import importlib

    return getattr(importlib.import_module(f"residual_dynamics.probes.{name}"), f"{name}_pass", None)


_NOT_OPTIONS = {"enabled", "early"}


def enabled_probes(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{probe name: options} of the enabled probes, validated against each function's signature."""
    out = {}
    for name in PROBE_NAMES:
        section = cfg.get(name)
        if section is None:
            continue
        for switch in _NOT_OPTIONS:
            if not isinstance(section.get(switch, False), bool):
                raise ConfigError(f"probes.{name}.{switch}", f"must be true or false, got {section.get(switch)!r}")
        if not section.get("enabled", False):
            continue
        options = {k: (list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v)
                   for k, v in dict(section).items() if k not in _NOT_OPTIONS}
        accepted = inspect.signature(probe_function(name)).parameters
        for key in options:
            if key not in accepted or key in ("bridge", "tokens", "attention_mask"):
                raise ConfigError(f"probes.{name}.{key}",
                                  f"not an option of {name}(); options: "
                                  f"{[p for p in accepted if p not in ('bridge', 'tokens', 'attention_mask')]}")
        out[name] = options
    return out


def early_probes(cfg: Mapping[str, Any]) -> set[str]:
    """The enabled probes that also run at the dense log-spaced early steps (``early: true``, the
    default); the others run only at the checkpoint cadence and at the end of training."""
    return {name for name in enabled_probes(cfg) if cfg[name].get("early", True)}


def run_probes(bridge, tokens: torch.Tensor, probes: Mapping[str, Mapping[str, Any]],
               attention_mask: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Run each probe in ``probes`` (from :func:`enabled_probes`) and return {name: result}, in the order
    of ``probes``.

    ``attention_mask`` goes to the probes that read activations (weight norms take none). A probe that
    raises :class:`ProbeUnsupported` (the architecture lacks what it needs) gets an :class:`Unsupported`
    result with the reason instead of failing the run. The probes with
    a pass builder run in one shared forward (see the module doc); their results equal those of calling
    each probe function on its own."""
    from residual_dynamics.probes.forward import run_activation_passes

    builders = {name: pass_builder(name) for name in probes}
    fused = [name for name, builder in builders.items() if builder is not None]
    passes = [builders[name](bridge, tokens, attention_mask=attention_mask, **probes[name]) for name in fused]
    results = dict(zip(fused, run_activation_passes(bridge, tokens, passes, attention_mask=attention_mask)))
    out = {}
    for name, options in probes.items():
        if name in results:
            out[name] = results[name]
            continue
        function = probe_function(name)
        if "attention_mask" in inspect.signature(function).parameters:
            options = {**options, "attention_mask": attention_mask}
        try:
            out[name] = function(bridge, tokens, **options)
        except ProbeUnsupported as reason:  # the architecture lacks what the probe needs: say so, go on
            out[name] = Unsupported(note=str(reason))
    return out
