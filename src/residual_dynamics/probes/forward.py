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

Memory: the forward runs over chunks of batch rows, the most whose working set (:func:`pass_bytes_per_row`)
fits within :data:`~residual_dynamics.probes.common.PLANNED_SHARE` of the smallest ``max_memory`` of the
passes (:func:`plan_rows`). Before each chunk the runner tells every pass which rows come next
(``ActivationPass.begin_rows``); the passes add their sums over the chunks and divide once in
``finalize``, so any chunking gives the same numbers up to float rounding of the sums (one chunk: the
very same operations as an unchunked forward). A budget too small for one row gives every pass a
:class:`~residual_dynamics.probes.common.Unsupported` note instead of a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from residual_dynamics.probes.arch import Arch, hook_name
from residual_dynamics.probes.common import PLANNED_SHARE, does_not_fit, memory_budget

# Hook points entered right after the last block, in order of preference: the forward is stopped there.
STOP_HOOKS = (hook_name("ln_final_in"), hook_name("unembed_in"))

Hook = tuple[str, Callable[[torch.Tensor, Any], Optional[torch.Tensor]]]


@dataclass
class ActivationPass:
    """What one probe needs from a shared forward.

    hooks:      (hook name, hook function) pairs, read-only (they return None), registered for the forward.
    finalize:   called once after the last chunk; returns the probe's result dataclass.
    name:       the probe, for error messages and notes.
    begin_rows: called with ``slice(start, stop)`` before the forward over those batch rows (the hooks
                then see activations of these rows only); None for a pass that needs no row offsets.
    max_memory: the probe's memory budget (bytes or e.g. "2GB"; None = ``DEFAULT_MAX_MEMORY``); the forward
                is chunked within the smallest budget of the passes it serves.
    """

    hooks: list[Hook]
    finalize: Callable[[], Any]
    name: str = ""
    begin_rows: Optional[Callable[[slice], None]] = None
    max_memory: Optional[str] = None


def pattern_release_hooks(bridge, arch: Optional[Arch] = None) -> list[Hook]:
    """Hooks that stop a bridge from keeping every layer's attention pattern through a forward.

    TransformerLens' ``JointQKVAttentionBridge`` (the attention of GPT-2, GPT-NeoX / Pythia, GPT-J, ...)
    stores the pattern it computed in ``self._pattern`` (``generalized_components/joint_qkv_attention.py``,
    ``_process_output``) and nothing reads it back, so a forward ends holding n_layers x [batch, heads,
    pos, pos] floats: 0.8 GB for GPT-2 medium and 2.5 GB for XL at 32 x 128 tokens, more than the rest of
    the forward. A read-only hook on each layer's ``hook_attn_out`` (entered right after the pattern is
    stored) drops it; the forward's numbers are unchanged (hook_pattern still fires, and a probe that
    records patterns keeps its own reference). Models without that attribute get no-op hooks."""
    arch = Arch.of(bridge) if arch is None else arch
    if not arch.has("attn_out"):
        return []

    def release(attention):
        def hook_fn(activation, hook) -> None:
            if isinstance(getattr(attention, "_pattern", None), torch.Tensor):
                attention._pattern = None

        return hook_fn

    return [(arch.hook("attn_out", layer), release(bridge.blocks[layer].attn)) for layer in range(arch.n_layers)]


def drop_kept_patterns(bridge) -> None:
    """Drop the attention patterns a bridge's attention components kept from their last forward (see
    :func:`pattern_release_hooks`), e.g. after a forward that a probe did not hook."""
    for module in bridge.modules():
        if isinstance(getattr(module, "_pattern", None), torch.Tensor):
            module._pattern = None


def stop_hook_name(bridge) -> Optional[str]:
    """The hook point entered right after the last block (``ln_final.hook_in``, else ``unembed.hook_in``),
    or None when the bridge has neither (the forward then runs to the end)."""
    hook_names = bridge.hook_dict
    return next((name for name in STOP_HOOKS if name in hook_names), None)


def stop_forward_hook(activation: torch.Tensor, hook) -> None:
    """A hook that ends the forward here (TransformerLens' StopAtLayerException; the bridge catches it)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(activation)


# Working set of the stopped forward per token, in float32 elements, measured on random-weight GPT-2
# medium and XL (benchmarks/bench_scale.py --pass-only, resident memory with glibc's default allocator):
# the residual stream and its sublayer outputs, the hooks' upcast copies and norms, the MLP hidden layer
# with the activation function's temporaries and the hooks' masks, and per head the attention scores,
# mask and pattern (eager attention, as the bridge loads Hugging Face models).
_PASS_RESIDUALS, _PASS_HIDDEN, _PASS_SCORES = 16, 8, 6


def pass_bytes_per_row(arch: Arch, *, seq: int, element_size: int = 4) -> int:
    """An upper estimate of the memory of the stopped forward (no logits) per batch row of ``seq`` tokens,
    hooks included: ``element_size * (seq * (16 d_model + 8 d_mlp) + 6 n_heads seq^2)``."""
    per_token = _PASS_RESIDUALS * arch.d_model + _PASS_HIDDEN * (arch.d_mlp or 0)
    return element_size * (seq * per_token + _PASS_SCORES * arch.n_heads * seq * seq)


def plan_rows(arch: Arch, *, batch: int, seq: int, budget: int) -> tuple[int, int]:
    """(batch rows per forward within ``PLANNED_SHARE`` of ``budget`` bytes, at most ``batch``; 0 when not
    even one row fits; the estimated bytes of one row, :func:`pass_bytes_per_row`)."""
    per_row = pass_bytes_per_row(arch, seq=seq)
    return min(batch, int(PLANNED_SHARE * budget) // per_row), per_row


def run_activation_passes(
    bridge,
    tokens: torch.Tensor,
    passes: Sequence[ActivationPass],
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
    rows: Optional[int] = None,
) -> list[Any]:
    """Run the hooks of all ``passes`` in one forward over ``tokens`` that stops after the last block, then
    return ``[p.finalize() for p in passes]``.

    The forward runs over chunks of ``rows`` batch rows; ``rows=None`` plans them within the smallest
    ``max_memory`` of the passes (:func:`plan_rows`), and when not even one row fits every pass gets an
    :class:`~residual_dynamics.probes.common.Unsupported` note instead (no forward runs). No forward runs
    when no pass has a hook. Raises RuntimeError if a registered hook never fired in a chunk (its
    accumulator would be incomplete), e.g. if the stop hook came before a hooked activation.
    """
    hooks = [hook for activation_pass in passes for hook in activation_pass.hooks]
    batch = tokens.shape[0]
    arch = Arch.of(bridge) if arch is None and hooks else arch
    if rows is None and hooks:
        budget = min(memory_budget(activation_pass.max_memory) for activation_pass in passes)
        rows, per_row = plan_rows(arch, batch=batch, seq=tokens.shape[1], budget=budget)
        if rows < 1:
            return [does_not_fit(activation_pass.name, int(per_row / PLANNED_SHARE), budget,
                                 "raise probes.max_memory or use shorter prompts") for activation_pass in passes]
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    with torch.no_grad():
        for start in range(0, batch, rows or batch) if hooks else ():
            chunk = slice(start, min(batch, start + (rows or batch)))
            for activation_pass in passes:
                if activation_pass.begin_rows is not None:
                    activation_pass.begin_rows(chunk)
            _forward(bridge, tokens[chunk], hooks, None if attention_mask is None else attention_mask[chunk], arch)
        return [activation_pass.finalize() for activation_pass in passes]


def _forward(bridge, tokens: torch.Tensor, hooks: list[Hook], attention_mask: Optional[torch.Tensor],
             arch: Arch) -> None:
    """One hooked forward over ``tokens`` that stops after the last block; every hook must fire. The
    bridge keeps no attention pattern (:func:`pattern_release_hooks`)."""
    fired: set[int] = set()

    def tracked(index: int, function: Callable) -> Callable:
        def hook_fn(activation, hook):
            fired.add(index)
            return function(activation, hook)

        return hook_fn

    fwd_hooks = [(name, tracked(i, function)) for i, (name, function) in enumerate(hooks)]
    fwd_hooks += pattern_release_hooks(bridge, arch)
    stop_at = stop_hook_name(bridge)
    if stop_at is not None:
        fwd_hooks.append((stop_at, stop_forward_hook))
    forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    try:
        bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None, **forward_kwargs)
    except StopAtLayerException:  # TransformerLens catches it already; kept for bridges that would not
        pass
    missing = sorted({hooks[i][0] for i in range(len(hooks)) if i not in fired})
    if missing:
        raise RuntimeError(f"hooks never fired in the probe forward (stopped at {stop_at}): {missing}")
