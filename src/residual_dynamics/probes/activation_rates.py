"""MLP neuron activation rates on real tokens and on random inputs, and MLP output norms on random inputs.

Definition (write-up "Residual stream norms grow exponentially over the forward pass", sections
"Analyzing the MLP weights" and Appendix 3): the *activation rate* of layer ``l`` is the fraction of MLP hidden
pre-activations (``blocks.{l}.mlp.hook_pre``) that are > 0,

    rate[l] = #{(b, p, i) : pre[l][b, p, i] > 0} / (#real positions * d_mlp),

measured

* on real tokens, over the positions that enter every statistic (position 0 and padding excluded), and
* on random, layer-independent inputs: ``n_random`` Gaussian vectors of size d_model, each shifted and
  scaled to mean 0 and variance 1 (the write-up's "we draw input vectors from a Normal distribution, and
  normalize them to mean 0 and variance 1. We feed these vectors into the MLP"), pushed through the MLP
  sublayer *including its norm*, ``mlp(ln2(x))``. The same inputs feed every layer.

On the random inputs the probe also reports the mean L2 norm of the MLP output, ``mean_x ||mlp(ln2(x))||``,
the write-up's test of whether the MLP weights alone make outputs grow with depth.

Gated MLPs (SwiGLU / GeGLU): ``mlp.hook_pre`` is the *gate* pre-activation, and the rates are reported
as ``mlp_gate_rate/...`` instead of ``mlp_act_rate/...`` so they are not mistaken for the rate of a plain
MLP's neurons. Attention-only models have no MLP: the probe does not apply (:func:`unsupported`; called
directly it raises ``ProbeUnsupported``, and ``run_probes`` returns an ``Unsupported`` result saying so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import Record, check_int, check_max_memory, position_mask, raise_if_unsupported
from residual_dynamics.probes.forward import ActivationPass, run_activation_passes


@dataclass
class Options:
    """The keyword options of :func:`activation_rates` (the ``probes.activation_rates`` config section).

    n_random:   number of normalized Gaussian inputs (>= 1).
    seed:       seed of their private generator.
    max_memory: memory budget of the token forward (e.g. "2GB"): sets its batch rows per chunk
                (:func:`residual_dynamics.probes.forward.plan_rows`); null = ``probes.max_memory``.
    """

    n_random: int = 256
    seed: int = 0
    max_memory: Optional[str] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_int(self.n_random, "n_random", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        check_max_memory(self.max_memory)


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`activation_rates` cannot run on ``arch``, or None."""
    if not arch.has_mlp:
        return "activation_rates: no MLP sublayers (attention-only model): no activation rates"
    if not arch.has("mlp_pre"):
        return f"activation_rates: the bridge has no MLP pre-activation hooks {arch.missing('mlp_pre')}"
    return None


@dataclass
class ActivationRates:
    """Result of :func:`activation_rates`. Tensors are float32 on the host, [n_layers] each.

    token_rate:      fraction of mlp.hook_pre entries > 0 on real tokens.
    random_rate:     the same on the normalized Gaussian inputs.
    random_out_norm: mean L2 norm of ``mlp(ln2(x))`` on those inputs.
    gated:           True when hook_pre is a gate pre-activation (record names say ``mlp_gate_rate``).
    n_positions:     number of real (prompt, position) pairs behind ``token_rate``.
    n_random:        number of random inputs.
    """

    token_rate: torch.Tensor
    random_rate: torch.Tensor
    random_out_norm: torch.Tensor
    gated: bool
    n_positions: int
    n_random: int

    @property
    def rate_name(self) -> str:
        return "mlp_gate_rate" if self.gated else "mlp_act_rate"

    def records(self) -> list[Record]:
        series = {
            f"{self.rate_name}/tokens": self.token_rate,
            f"{self.rate_name}/random": self.random_rate,
            "mlp_out_norm/random": self.random_out_norm,
        }
        return [
            Record(name, float(value), layer=layer)
            for name, per_layer in series.items()
            for layer, value in enumerate(per_layer.tolist())
        ]


def normalized_gaussian_inputs(n: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """[n, d_model] float32 CPU tensor of Gaussian vectors, each shifted and scaled to mean 0 and
    (population) variance 1, so each has L2 norm sqrt(d_model). Drawn from a private generator: the
    same ``seed`` gives the same inputs on every device, and the global RNG is left alone."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_model, generator=generator, dtype=torch.float64)
    x = x - x.mean(dim=-1, keepdim=True)
    return (x / x.pow(2).mean(dim=-1, keepdim=True).sqrt()).float()


def activation_rates_pass(
    bridge,
    tokens: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    n_random: int = 256,
    seed: int = 0,
    max_memory: Optional[str] = None,
    arch: Optional[Arch] = None,
) -> ActivationPass:
    """The token-pass hooks of :func:`activation_rates` (same arguments) and a finalize step that runs the
    random-input part and builds the result, for a forward shared with other probes
    (:func:`residual_dynamics.probes.forward.run_activation_passes`). Raises ProbeUnsupported on a model
    without MLPs (:func:`unsupported`)."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"activation_rates: n_random must be an integer >= 1, got {n_random!r}")
    count = arch.n_layers
    gated = arch.gated_mlp
    pre_hooks = [arch.hook("mlp_pre", layer) for layer in range(count)]
    mask = position_mask(tokens, attention_mask)

    # (a) Real tokens: count positive pre-activations on real positions inside the hook, summed over the
    # row chunks of the forward; divided by the number of entries in finalize.
    positives: list[Optional[torch.Tensor]] = [None] * count
    widths: list[int] = [0] * count
    chunk = [slice(0, tokens.shape[0])]  # the batch rows of the current forward (set by begin_rows)

    def begin_rows(rows: slice) -> None:
        chunk[0] = rows

    def token_hook(layer: int):
        def measure(pre: torch.Tensor, hook) -> None:
            real = mask[chunk[0]].to(pre.device)
            # every positive entry, less those at excluded positions (position 0, padding): two counts of
            # a bool tensor, never an int64 copy of [rows, pos, d_mlp]
            positive = torch.count_nonzero(pre > 0) - torch.count_nonzero(pre[~real] > 0)
            positives[layer] = positive if positives[layer] is None else positives[layer] + positive
            widths[layer] = pre.shape[-1]

        return measure

    @torch.no_grad()
    def finalize() -> ActivationRates:
        # (b, c) Random inputs through ln2 then the MLP of every block, hook_pre captured the same way.
        random_rates: list[Optional[torch.Tensor]] = [None] * count

        def random_hook(layer: int):
            def measure(pre: torch.Tensor, hook) -> None:
                random_rates[layer] = torch.count_nonzero(pre > 0) / pre.numel()

            return measure

        blocks = [bridge.blocks[layer] for layer in range(count)]
        reference = next(blocks[0].mlp.parameters())
        x = normalized_gaussian_inputs(n_random, arch.d_model, seed)
        x = x.to(device=reference.device, dtype=reference.dtype)[None]  # [1, n_random, d_model]
        out_norms = []
        with bridge.hooks(fwd_hooks=[(name, random_hook(layer)) for layer, name in enumerate(pre_hooks)]):
            for block in blocks:
                out = block.mlp(block.ln2(x))
                stat_dtype = torch.promote_types(out.dtype, torch.float32)
                out_norms.append(torch.linalg.vector_norm(out, dim=-1, dtype=stat_dtype).mean())

        n_real = mask.sum()
        token_rates = [positive / (n_real.to(positive.device) * width) for positive, width in zip(positives, widths)]
        token_rate, random_rate, random_out_norm = (
            torch.stack(values).float().cpu() for values in (token_rates, random_rates, out_norms)
        )
        return ActivationRates(
            token_rate=token_rate,
            random_rate=random_rate,
            random_out_norm=random_out_norm,
            gated=gated,
            n_positions=int(mask.sum()),
            n_random=n_random,
        )

    hooks = [(name, token_hook(layer)) for layer, name in enumerate(pre_hooks)]
    return ActivationPass(hooks=hooks, finalize=finalize, name="activation_rates", begin_rows=begin_rows,
                          max_memory=max_memory)


@torch.no_grad()
def activation_rates(
    bridge,
    tokens: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    n_random: int = 256,
    seed: int = 0,
    max_memory: Optional[str] = None,
    arch: Optional[Arch] = None,
):
    """MLP activation rates on ``tokens`` and on ``n_random`` normalized Gaussian inputs (seeded by
    ``seed``), and the MLP output norms on the latter.

    tokens:         [batch, pos] token ids.
    attention_mask: optional [batch, pos], 1 = real token; passed to the forward, padding excluded.
    max_memory:     memory budget (bytes or e.g. "2GB"; default ``DEFAULT_MAX_MEMORY``): the token forward
                    runs over chunks of batch rows within it (the same counts); too small for one row ->
                    an :class:`Unsupported` with a note.
    arch:           the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if
                    not given).

    Raises ProbeUnsupported on a model without MLPs (attention-only), see :func:`unsupported`.

    The token part is one hooked forward that stops after the last block (no unembedding);
    :func:`activation_rates_pass` gives the same hooks for a forward shared with other probes
    (``run_probes`` does that).
    """
    activation_pass = activation_rates_pass(bridge, tokens, attention_mask=attention_mask, n_random=n_random, seed=seed,
                                            max_memory=max_memory, arch=arch)
    return run_activation_passes(bridge, tokens, [activation_pass], attention_mask=attention_mask, arch=arch)[0]
