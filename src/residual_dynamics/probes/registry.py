"""Which probes exist, and running them with their options.

:data:`PROBES` is a literal table: for every probe its function, its ``Options`` dataclass (the keyword
options of the function, with their defaults; the ``probes.<name>`` config section is that dataclass plus
``enabled`` / ``early``, see ``residual_dynamics.spec``), its pass builder if it only reads activations of
one forward, and the function that says why an architecture is unsupported.

* :func:`check_options` checks a probe's options against an :class:`~residual_dynamics.probes.arch.Arch`
  (``Arch.from_model_config`` for a model to be trained: no model is built and no probe runs).
* :func:`run_probes` runs probes on a bridge. The callback (trained models) and the pretrained CLI both
  call it, so both produce the same results and the same metric keys. A probe whose spec says the
  architecture is unsupported does not run: its result is :class:`Unsupported` with the reason.

Probes that only read activations of one forward over the tokens (those with a ``pass_builder``:
``residual_norms``, ``activation_rates``) share ONE hooked forward that stops after the last block
(:func:`residual_dynamics.probes.forward.run_activation_passes`); the others run one by one, as called
on their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes import activation_rates as activation_rates_mod
from residual_dynamics.probes import cleanup as cleanup_mod
from residual_dynamics.probes import layer_horizon as layer_horizon_mod
from residual_dynamics.probes import logit_lens as logit_lens_mod
from residual_dynamics.probes import residual_norms as residual_norms_mod
from residual_dynamics.probes import sublayer_ablation as sublayer_ablation_mod
from residual_dynamics.probes import weight_norms as weight_norms_mod
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import Unsupported
from residual_dynamics.probes.forward import drop_kept_patterns, run_activation_passes


@dataclass(frozen=True)
class ProbeSpec:
    """One probe.

    fn:           ``fn(bridge, tokens, *, attention_mask=None, arch=None, **options) -> result``.
    Options:      the dataclass of its keyword options (fields = keyword arguments of ``fn``), with
                  ``check(arch)`` raising ConfigError(<option>, message).
    pass_builder: for activation-only probes, ``pass_builder(bridge, tokens, *, attention_mask=None,
                  arch=None, **options) -> ActivationPass`` (fused into one forward); else None.
    unsupported:  ``unsupported(arch) -> Optional[str]``: why the probe cannot run on ``arch``, or None.
                  The probe function raises ProbeUnsupported with the same reason when called directly.
    """

    fn: Callable[..., Any]
    Options: type
    pass_builder: Optional[Callable[..., Any]] = None
    unsupported: Callable[[Arch], Optional[str]] = lambda arch: None


PROBES: dict[str, ProbeSpec] = {
    "residual_norms": ProbeSpec(residual_norms_mod.residual_norms, residual_norms_mod.Options,
                                pass_builder=residual_norms_mod.residual_norms_pass,
                                unsupported=residual_norms_mod.unsupported),
    "weight_norms": ProbeSpec(weight_norms_mod.weight_norms, weight_norms_mod.Options,
                              unsupported=weight_norms_mod.unsupported),
    "activation_rates": ProbeSpec(activation_rates_mod.activation_rates, activation_rates_mod.Options,
                                  pass_builder=activation_rates_mod.activation_rates_pass,
                                  unsupported=activation_rates_mod.unsupported),
    "layer_horizon": ProbeSpec(layer_horizon_mod.layer_horizon, layer_horizon_mod.Options,
                               unsupported=layer_horizon_mod.unsupported),
    "cleanup": ProbeSpec(cleanup_mod.cleanup, cleanup_mod.Options, unsupported=cleanup_mod.unsupported),
    "sublayer_ablation": ProbeSpec(sublayer_ablation_mod.sublayer_ablation, sublayer_ablation_mod.Options,
                                   unsupported=sublayer_ablation_mod.unsupported),
    "logit_lens": ProbeSpec(logit_lens_mod.logit_lens, logit_lens_mod.Options, unsupported=logit_lens_mod.unsupported),
}

PROBE_NAMES = tuple(PROBES)


def _spec(name: str) -> ProbeSpec:
    if name not in PROBES:
        raise ConfigError(f"probes.{name}", f"unknown probe; probes: {list(PROBE_NAMES)}")
    return PROBES[name]


def _kwargs(name: str, options) -> dict[str, Any]:
    """The keyword options of probe ``name`` from its Options (a subclass, e.g. a config section with
    ``enabled`` / ``early``, gives only the probe's own fields)."""
    spec = _spec(name)
    if not isinstance(options, spec.Options):
        raise TypeError(f"run_probes: the options of {name} must be a {spec.Options.__module__}.Options, "
                        f"got {type(options).__name__} (build one with PROBES[{name!r}].Options(**values))")
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(spec.Options)}


def check_options(name: str, options, arch: Arch) -> None:
    """``options.check(arch)``, with the field of a ConfigError prefixed ``probes.<name>.``. No probe runs."""
    spec = _spec(name)
    if not isinstance(options, spec.Options):
        raise ConfigError(f"probes.{name}", f"expected {spec.Options.__qualname__} options, got {options!r}")
    try:
        options.check(arch)
    except ConfigError as error:
        message = str(error)
        prefix = f"{error.field}: "
        message = message[len(prefix):] if message.startswith(prefix) else message
        raise ConfigError(f"probes.{name}.{error.field}", message) from None


def run_probes(bridge, tokens: torch.Tensor, probes: Mapping[str, Any],
               attention_mask: Optional[torch.Tensor] = None, arch: Optional[Arch] = None) -> dict[str, Any]:
    """Run each probe of ``probes`` ({name: its Options}) and return {name: result}, in the order of
    ``probes``.

    ``arch`` (default ``Arch.of(bridge)``, built once) goes to every probe, ``attention_mask`` too (weight
    norms ignore it). The options are checked first (:func:`check_options`, ConfigError). A probe whose
    spec says the architecture is unsupported does not run and gets an :class:`Unsupported` result with
    the reason instead of failing the run. The probes with a pass builder run in one shared forward (see
    the module doc); their results equal those of calling each probe function on its own. Attention
    patterns the bridge kept from an earlier forward are dropped first (``drop_kept_patterns``)."""
    arch = Arch.of(bridge) if arch is None else arch
    drop_kept_patterns(bridge)
    kwargs = {name: _kwargs(name, options) for name, options in probes.items()}
    for name, options in probes.items():
        check_options(name, options, arch)
    reasons = {name: PROBES[name].unsupported(arch) for name in probes}

    runnable = [name for name in probes if reasons[name] is None]
    fused = [name for name in runnable if PROBES[name].pass_builder is not None]
    passes = [PROBES[name].pass_builder(bridge, tokens, attention_mask=attention_mask, arch=arch, **kwargs[name])
              for name in fused]
    results = dict(zip(fused, run_activation_passes(bridge, tokens, passes, attention_mask=attention_mask,
                                                         arch=arch)))
    out = {}
    for name in probes:
        if reasons[name] is not None:
            out[name] = Unsupported(note=reasons[name])
        elif name in results:
            out[name] = results[name]
        else:
            out[name] = PROBES[name].fn(bridge, tokens, attention_mask=attention_mask, arch=arch, **kwargs[name])
    return out
