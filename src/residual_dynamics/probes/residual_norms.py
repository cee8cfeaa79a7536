"""Residual-stream norms per layer and their exponential growth rate.

Definition (write-up "Residual stream norms grow exponentially over the forward pass", sections "Plots
showing exponential norm and variance growth" and "Theories for the source of the growth"): for every layer ``l``
and hook ``h`` in {resid_pre, resid_mid, resid_post, attn_out, mlp_out}

    norm_h[l] = mean over real positions (b, p) of ||x_h[l][b, p, :]||_2

where "real" excludes position 0 (BOS / attention sink, which the write-up drops from its averages) and
padding. The growth of the stream is then summarised on ``resid_post`` in three ways:

* ``ratio[l] = norm[l] / norm[l-1]`` -- the factor by which block ``l`` grows the stream; ``norm[-1]``
  is the embedding stream (``resid_pre`` of layer 0), so ``ratio[0]`` is block 0's factor.
* a least-squares fit ``log norm[l] = c + s * l`` over a layer range ``a..b`` (inclusive), reported as the
  log-slope ``s``, its standard error and the per-layer factor ``exp(s)`` (the write-up's "~1.045 per
  layer from layer 5 to 41 in GPT2-XL", shown as an orange line in its plots);
* the write-up's two-point estimate ``(norm[b] / norm[a]) ** (1 / (b - a))``.

For plotting the BOS and padding "U-shapes" the probe also keeps the per-position ``resid_post`` norms of
one prompt, *all* positions included (position 0 and padding too).

Centring (``centered=True``). The write-up measured with TransformerLens' default weight processing,
whose ``center_writing_weights`` makes every vector written to the residual stream (embeddings, every
W_O, b_O, W_out, b_out) mean-zero over d_model, so the stream it sees is the mean-centred one,
``C(x) = x - mean_d(x) 1`` (equal to the processed model's stream exactly: centring is linear). The
option adds, under distinct keys,

    centered_norm_h[l] = mean over real positions of ||x_h[l][b, p, :] - mean_d(x_h[l][b, p, :])||_2

as ``resid_norm_centered/<hook>``, and the same three growth summaries of the centred resid_post as
``growth_rate_centered`` (``/log_slope``, ``/log_slope_se``, ``/two_point``). The raw stream stays the
default and keeps its keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import (
    Record,
    check_bool,
    check_int,
    check_layer_pair,
    check_max_memory,
    position_mask,
    raise_if_unsupported,
)
from residual_dynamics.probes.forward import ActivationPass, run_activation_passes

# Hook kinds measured, in the order they are reported. ``resid_mid`` / ``mlp_out`` are absent on
# attention-only models (and ``resid_mid`` on parallel-block models); missing kinds are skipped.
HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass
class Options:
    """The keyword options of :func:`residual_norms` (the ``probes.residual_norms`` config section).

    fit_layers:   inclusive layer range [a, b] of the log-linear fit; null = all layers.
    two_point:    layers [a, b] of the two-point estimate; null = the ends of ``fit_layers``.
    prompt_index: the prompt whose per-position norms are kept.
    centered:     also report the norms of the mean-centred stream (``resid_norm_centered/...``).
    max_memory:   memory budget of the forward (e.g. "2GB"): sets its batch rows per chunk
                  (:func:`residual_dynamics.probes.forward.plan_rows`); null = ``probes.max_memory``.
    """

    fit_layers: Optional[List[int]] = None
    two_point: Optional[List[int]] = None
    prompt_index: int = 0
    centered: bool = False
    max_memory: Optional[str] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_layer_pair(self.fit_layers, "fit_layers", arch.n_layers)
        check_layer_pair(self.two_point, "two_point", arch.n_layers)
        check_int(self.prompt_index, "prompt_index", minimum=0)
        check_bool(self.centered, "centered")
        check_max_memory(self.max_memory)


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`residual_norms` cannot run on ``arch``, or None."""
    missing = arch.missing("resid_pre", "resid_post")
    if missing:
        return f"residual_norms: the bridge has no hook points {missing}"
    return None


@dataclass
class ResidualNorms:
    """Result of :func:`residual_norms`. All tensors are float32 on the host.

    norms:            hook kind -> [n_layers] mean L2 norm over real positions (kinds the model lacks
                      are absent from the dict).
    ratio:            [n_layers] resid_post growth factor of each block, ``norm[l] / norm[l-1]`` with
                      ``norm[-1]`` = the resid_pre norm of layer 0.
    log_slope:        scalar, slope of the least-squares fit of log(resid_post norm) against layer.
    log_slope_se:     scalar, its standard error (NaN when the fit range has only two layers).
    growth_rate:      scalar, ``exp(log_slope)``, the fitted per-layer growth factor.
    two_point:        scalar, ``(norm[b] / norm[a]) ** (1 / (b - a))`` on resid_post.
    fit_layers:       inclusive layer range (a, b) of the fit.
    two_point_layers: the layers (a, b) of the two-point estimate.
                      A one-layer model has no range: both are None and the four scalars NaN.
    position_norms:   [n_layers, pos] resid_post norm of prompt ``prompt_index`` at every position,
                      including position 0 and padding.
    prompt_index:     which prompt of the batch ``position_norms`` belongs to.
    n_positions:      number of (prompt, position) pairs the means are over.
    centered:         with ``centered=True``: a :class:`CenteredNorms` of the mean-centred stream, else None.
    """

    norms: dict[str, torch.Tensor]
    ratio: torch.Tensor
    log_slope: torch.Tensor
    log_slope_se: torch.Tensor
    growth_rate: torch.Tensor
    two_point: torch.Tensor
    fit_layers: Optional[tuple[int, int]]
    two_point_layers: Optional[tuple[int, int]]
    position_norms: torch.Tensor
    prompt_index: int
    n_positions: int
    centered: Optional["CenteredNorms"] = None

    def records(self) -> list[Record]:
        rows = [
            Record(f"resid_norm/{kind}", float(value), layer=layer)
            for kind, per_layer in self.norms.items()
            for layer, value in enumerate(per_layer.tolist())
        ]
        rows += [
            Record("resid_norm/ratio", float(value), layer=layer) for layer, value in enumerate(self.ratio.tolist())
        ]
        rows += [
            Record("growth_rate", float(self.growth_rate)),
            Record("growth_rate/log_slope", float(self.log_slope)),
            Record("growth_rate/log_slope_se", float(self.log_slope_se)),
            Record("growth_rate/two_point", float(self.two_point)),
        ]
        if self.centered is not None:
            rows += self.centered.records()
        return rows


@dataclass
class CenteredNorms:
    """The norms of the mean-centred stream (``centered=True``; see the module doc), float32 on the host.

    norms:  hook kind -> [n_layers] mean L2 norm of ``x - mean_d(x)`` over real positions.
    log_slope, log_slope_se, growth_rate, two_point: the growth summaries of the centred resid_post, over
            the same layer ranges as the raw ones.
    """

    norms: dict[str, torch.Tensor]
    log_slope: torch.Tensor
    log_slope_se: torch.Tensor
    growth_rate: torch.Tensor
    two_point: torch.Tensor

    def records(self) -> list[Record]:
        rows = [
            Record(f"resid_norm_centered/{kind}", float(value), layer=layer)
            for kind, per_layer in self.norms.items()
            for layer, value in enumerate(per_layer.tolist())
        ]
        rows += [
            Record("growth_rate_centered", float(self.growth_rate)),
            Record("growth_rate_centered/log_slope", float(self.log_slope)),
            Record("growth_rate_centered/log_slope_se", float(self.log_slope_se)),
            Record("growth_rate_centered/two_point", float(self.two_point)),
        ]
        return rows


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _layer_range(
    value: Optional[Sequence[int]], default: Optional[tuple[int, int]], count: int, what: str
) -> Optional[tuple[int, int]]:
    """``value`` checked to be two layers a < b of the model, or ``default`` when it is None."""
    if value is None:
        return default
    a, b = int(value[0]), int(value[1])
    if not 0 <= a < b < count:
        raise ValueError(f"{what} must be two layers 0 <= a < b < n_layers={count}, got {value!r}")
    return a, b


def log_linear_fit(values: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of ``log(values[i])`` against ``i`` and its standard error.

    The standard error is ``sqrt(RSS / (n - 2) / sum((i - mean(i))^2))``; it is NaN for n = 2 points.
    """
    y = values.double().log()
    x = torch.arange(len(y), dtype=torch.float64)
    x_centered = x - x.mean()
    sxx = float((x_centered**2).sum())
    slope = float((x_centered * (y - y.mean())).sum()) / sxx
    if len(y) <= 2:
        return slope, math.nan
    residuals = y - y.mean() - slope * x_centered
    return slope, math.sqrt(float((residuals**2).sum()) / (len(y) - 2) / sxx)


def residual_norms_pass(
    bridge,
    tokens: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    fit_layers: Optional[Sequence[int]] = None,
    two_point: Optional[Sequence[int]] = None,
    prompt_index: int = 0,
    centered: bool = False,
    max_memory: Optional[str] = None,
    arch: Optional[Arch] = None,
) -> ActivationPass:
    """The hooks and the finalize step of :func:`residual_norms` (same arguments), for a forward shared
    with other probes (:func:`residual_dynamics.probes.forward.run_activation_passes`)."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    count = arch.n_layers
    fit = _layer_range(fit_layers, (0, count - 1) if count > 1 else None, count, "fit_layers")
    ends = _layer_range(two_point, fit, count, "two_point")
    if not 0 <= prompt_index < tokens.shape[0]:
        raise ValueError(f"prompt_index={prompt_index} is outside the batch of {tokens.shape[0]} prompts")

    mask = position_mask(tokens, attention_mask)
    kinds = [kind for kind in HOOK_KINDS if arch.has(kind)]

    # Device-side accumulators, filled by the hooks (summed over the row chunks of the forward) and moved
    # to the host once at the end.
    norm_sums: dict[str, list[Optional[torch.Tensor]]] = {kind: [None] * count for kind in kinds}
    centered_sums: dict[str, list[Optional[torch.Tensor]]] = {kind: [None] * count for kind in kinds}
    position_rows: list[Optional[torch.Tensor]] = [None] * count
    chunk = [slice(0, tokens.shape[0])]  # the batch rows of the current forward (set by begin_rows)

    def begin_rows(rows: slice) -> None:
        chunk[0] = rows

    def add(sums: list[Optional[torch.Tensor]], layer: int, value: torch.Tensor) -> None:
        sums[layer] = value if sums[layer] is None else sums[layer] + value

    def make_hook(kind: str, layer: int):
        def measure(activation: torch.Tensor, hook) -> None:
            rows = chunk[0]
            # Half-precision activations are upcast; float32 and float64 ones are kept as they are.
            stat_dtype = torch.promote_types(activation.dtype, torch.float32)
            token_norms = torch.linalg.vector_norm(activation, dim=-1, dtype=stat_dtype)  # [rows, pos]
            real = mask[rows].to(token_norms.device)
            # torch.where, not a product: an inf at position 0 or in padding must not leak in as NaN.
            add(norm_sums[kind], layer, torch.where(real, token_norms, 0.0).sum())
            if centered:
                wide = activation.to(stat_dtype)
                centered_norms = torch.linalg.vector_norm(wide - wide.mean(dim=-1, keepdim=True), dim=-1)
                add(centered_sums[kind], layer, torch.where(real, centered_norms, 0.0).sum())
            if kind == "resid_post" and rows.start <= prompt_index < rows.stop:
                position_rows[layer] = token_norms[prompt_index - rows.start]

        return measure

    @torch.no_grad()
    def finalize() -> ResidualNorms:
        n_positions = int(mask.sum())
        mean_norms = (torch.stack([torch.stack(norm_sums[kind]) for kind in kinds]) / n_positions).float().cpu()
        norms = dict(zip(kinds, mean_norms))
        position_norms = torch.stack(position_rows).float().cpu()

        post = norms["resid_post"].double()
        previous = torch.cat([norms["resid_pre"][:1].double(), post[:-1]])
        slope, slope_se, two_point_rate = growth(post)
        centered_result = None
        if centered:
            centered_means = (torch.stack([torch.stack(centered_sums[kind]) for kind in kinds]) / n_positions).float().cpu()
            centered_norms = dict(zip(kinds, centered_means))
            c_slope, c_slope_se, c_two_point = growth(centered_norms["resid_post"].double())
            centered_result = CenteredNorms(
                norms=centered_norms,
                log_slope=_scalar(c_slope),
                log_slope_se=_scalar(c_slope_se),
                growth_rate=_scalar(math.exp(c_slope)),
                two_point=_scalar(c_two_point),
            )
        return ResidualNorms(
            norms=norms,
            ratio=(post / previous).float(),
            log_slope=_scalar(slope),
            log_slope_se=_scalar(slope_se),
            growth_rate=_scalar(math.exp(slope)),
            two_point=_scalar(two_point_rate),
            fit_layers=fit,
            two_point_layers=ends,
            position_norms=position_norms,
            prompt_index=prompt_index,
            n_positions=n_positions,
            centered=centered_result,
        )

    def growth(post: torch.Tensor) -> tuple[float, float, float]:
        """(log-slope, its standard error, two-point rate) of per-layer norms ``post``."""
        slope, slope_se = math.nan, math.nan
        if fit is not None:
            slope, slope_se = log_linear_fit(post[fit[0] : fit[1] + 1])
        two_point_rate = math.nan
        if ends is not None:
            a, b = ends
            two_point_rate = float(post[b] / post[a]) ** (1.0 / (b - a))
        return slope, slope_se, two_point_rate

    hooks = [(arch.hook(kind, layer), make_hook(kind, layer)) for kind in kinds for layer in range(count)]
    return ActivationPass(hooks=hooks, finalize=finalize, name="residual_norms", begin_rows=begin_rows,
                          max_memory=max_memory)


@torch.no_grad()
def residual_norms(
    bridge,
    tokens: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    fit_layers: Optional[Sequence[int]] = None,
    two_point: Optional[Sequence[int]] = None,
    prompt_index: int = 0,
    centered: bool = False,
    max_memory: Optional[str] = None,
    arch: Optional[Arch] = None,
):
    """Mean residual-stream norms per layer and hook, and the growth rate of resid_post.

    tokens:         [batch, pos] token ids (position 0 is the BOS / first token and is left out of means).
    attention_mask: optional [batch, pos], 1 = real token; padded positions are left out of means and the
                    mask is passed to the forward.
    fit_layers:     inclusive layer range (a, b) of the log-linear fit; default all layers.
    two_point:      layers (a, b) of the two-point estimate; default the ends of ``fit_layers``.
    prompt_index:   the prompt whose per-position norms are kept.
    centered:       also measure the mean-centred stream (``result.centered``; see the module doc).
    max_memory:     memory budget (bytes or e.g. "2GB"; default ``DEFAULT_MAX_MEMORY``): the forward runs
                    over chunks of batch rows within it (same numbers up to float rounding of the sums);
                    too small for one row -> an :class:`Unsupported` with a note.
    arch:           the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if
                    not given).

    Raises ProbeUnsupported when the bridge lacks the resid_pre / resid_post hooks (:func:`unsupported`).
    One hooked forward that stops after the last block (no unembedding); :func:`residual_norms_pass`
    gives the same hooks for a forward shared with other probes (``run_probes`` does that).
    """
    activation_pass = residual_norms_pass(
        bridge, tokens, attention_mask=attention_mask, fit_layers=fit_layers, two_point=two_point,
        prompt_index=prompt_index, centered=centered, max_memory=max_memory, arch=arch,
    )
    return run_activation_passes(bridge, tokens, [activation_pass], attention_mask=attention_mask, arch=arch)[0]
