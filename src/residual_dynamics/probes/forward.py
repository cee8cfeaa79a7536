"""One hooked forward shared by the probes that only read activations.

A probe that reads activations of one forward over ``tokens`` is split in two:

* a *pass builder* ``<probe>_pass(bridge, tokens, *, attention_mask=None, **options) -> ActivationPass``
  that checks the options, allocates its device-side accumulators and returns the hooks that fill them,
  plus a ``finalize()`` that turns the filled accumulators into the probe's result (moving it to the
  host once, and doing any work that needs no forward, e.g. ``activation_rates``' random inputs);
* the public probe function, which is ``run_activation_passes(bridge, tokens, [<probe>_pass(...)])[0]``.

:func:`run_activation_passes` runs the hooks of any number of passes in ONE ``bridge.run_with_hooks``
and stops the forward right after the last block: a hook on ``ln_final.hook_in`` (``unembed.hook_in``
on a bridge without it) raises TransformerLens' own ``StopAtLayerException``, so neither the final norm
nor the unembedding nor the [batch, pos, d_vocab] logits are computed. TransformerLens catches that
exception itself -- ``TransformerBridge.forward`` returns its ``layer_output``
(``transformer_lens/model_bridge/transformer_bridge.py``, ``except StopAtLayerException``), and
``BridgeCore.run_with_hooks`` catches it too (``bridge_core.py``) -- and ``run_with_hooks`` removes the
hooks it added in a ``finally``, so the bridge is left exactly as it was (checked by
``tests/test_probe_registry.py``).

The registry (``run_probes``) fuses every probe whose ``ProbeSpec`` has a ``pass_builder`` into
one such forward; a probe called on its own runs the same builder and the same runner, so the fused and
the standalone results are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from residual_dynamics.probes.arch import hook_name

# Hook points entered right after the last block, in order of preference: the forward is stopped there.
STOP_HOOKS = (hook_name("ln_final_in"), hook_name("unembed_in"))

Hook = tuple[str, Callable[[torch.Tensor, Any], Optional[torch.Tensor]]]


@dataclass
class ActivationPass:
    """What one probe needs from a shared forward.

    hooks:    (hook name, hook function) pairs, read-only (they return None), registered for the forward.
    finalize: called once after the forward; returns the probe's result dataclass.
    name:     the probe, for error messages.
    """

    hooks: list[Hook]
    finalize: Callable[[], Any]
    name: str = ""


def stop_hook_name(bridge) -> Optional[str]:
    """The hook point entered right after the last block (``ln_final.hook_in``, else ``unembed.hook_in``),
    or None when the bridge has neither (the forward then runs to the end)."""
    hook_names = bridge.hook_dict
    return next((name for name in STOP_HOOKS if name in hook_names), None)


def _stop_forward(activation: torch.Tensor, hook) -> None:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(activation)


def run_activation_passes(
    bridge,
    tokens: torch.Tensor,
    passes: Sequence[ActivationPass],
    attention_mask: Optional[torch.Tensor] = None,
) -> list[Any]:
    """Run the hooks of all ``passes`` in one forward over ``tokens`` that stops after the last block, then
    return ``[p.finalize() for p in passes]``.

    No forward runs when no pass has a hook. Raises RuntimeError if a registered hook never fired (its
    accumulator would be empty), e.g. if the stop hook came before a hooked activation.
    """
    hooks = [hook for activation_pass in passes for hook in activation_pass.hooks]
    with torch.no_grad():
        if hooks:
            fired: set[int] = set()

            def tracked(index: int, function: Callable) -> Callable:
                def hook_fn(activation, hook):
                    fired.add(index)
                    return function(activation, hook)

                return hook_fn

            fwd_hooks = [(name, tracked(i, function)) for i, (name, function) in enumerate(hooks)]
            stop_at = stop_hook_name(bridge)
            if stop_at is not None:
                fwd_hooks.append((stop_at, _stop_forward))
            forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            from transformer_lens.model_bridge.exceptions import StopAtLayerException

            try:
                bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None, **forward_kwargs)
            except StopAtLayerException:  # TransformerLens catches it already; kept for bridges that would not
                pass
            missing = sorted({hooks[i][0] for i in range(len(hooks)) if i not in fired})
            if missing:
                raise RuntimeError(f"hooks never fired in the probe forward (stopped at {stop_at}): {missing}")
        return [activation_pass.finalize() for activation_pass in passes]
