"""The injection-coefficient scan on a TransformerLens bridge: steering vector, injection, decomposition
of the final residual stream and its attribution to a logit difference.

Source: the reader comments on "Residual stream norms grow exponentially over the forward pass", which
describe an "injection coefficient scan" for activation additions (ActAdd / AVEC):

  1. "Repeat your input tokens say, 128 times."
  2. "Apply the activation vector at 128 different steps between a coefficient of -10 and 10 to each of
     your input tokens when doing your AVEC forward pass."
  3. "Decompose the resulting residual stream to whatever granularity you like (use decompose_resid or
     get_full_resid_decomposition with/without expand neurons)."
  4. "Dot product the outputs with your logit direction of choice (I use a logit diff ...)."
  5. "Plot the resulting attribution vs injection coefficient per component."
  6. "If you like, cluster the profiles ..." (:mod:`residual_dynamics.scan.cluster`).

Definitions. ``x`` is the prompt ([T] tokens), ``v`` the steering vector ([n, d_model]) and ``c_1..c_N``
the coefficients. Copy i of the batch is ``x`` with ``c_i v`` added to ``blocks.{layer}.hook_resid_pre``:
row j of ``v`` at position j (``positions="front"``, ActAdd) or the single row at every position
(``positions="all"``). At the scored position ``p`` the final residual stream of copy i splits exactly into

    r_i = embed + pos_embed + sum_{l,h} z_{l,h} W_O[l,h] + sum_l mlp_l + bias + injection

with ``z_{l,h} W_O[l,h]`` each head's output without b_O (``attn.hook_z`` and the bridge's W_O, query
heads under GQA), ``mlp_l`` each MLP's output (``hook_mlp_out``; with ``neurons=True`` split into its
neurons ``post_{l,k} W_out[l,k]``, ``mlp.hook_post``), ``bias`` the sum of every b_O (and, with neurons,
every b_out), and ``injection = c_i v[p]`` (0 where nothing was added at p).

Logit direction: ``u = W_U[:, t1] - W_U[:, t2]``. The final norm is linearised at copy i's frozen scale
``s_i`` (``ln_final.hook_scale``; 1 without a final norm), as TransformerLens' ``apply_ln_to_stack``
does: ``LN(r) = g * C(r) / s_i + beta`` with ``g`` the gain (``1 + w`` for offset norms) and ``C`` the
mean-centring of LayerNorm (identity for RMSNorm). The attribution of component ``a`` is

    attr_i(a) = (g * C(a) / s_i) . u = a . w_i,    w_i = apply_ln_to_stack(g * u) = C(g * u) / s_i

(centring is a symmetric projection), and two constants complete the sum: ``ln_final_bias = beta . u``
and ``unembed_bias = b_U[t1] - b_U[t2]``. Given the frozen scale the map is linear, so the attributions
of all components sum to the logit difference ``logits_i[t1] - logits_i[t2]`` at p exactly (up to
rounding); :attr:`ScanResult.logit_diff` is the model's own.

Cost and memory: one forward per chunk of copies (all N copies by default, ``max_batch`` rows at most),
stopped at the unembedding; the hooks keep only position p of what they read, so memory is
O(N * layers * (n_heads * d_head + d_model + d_mlp)) beside the forward itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import ProbeUnsupported

POSITIONS = ("front", "all")

# component kinds, in the order they are listed
KINDS = ("embed", "pos_embed", "head", "mlp", "neuron", "bias", "injection", "ln_final_bias", "unembed_bias")


@dataclass(frozen=True)
class Component:
    """One term of the final residual stream (or a constant of the logit difference).

    name:   ``embed``, ``pos_embed``, ``L{l}H{h}``, ``L{l}MLP``, ``L{l}N{k}`` (neuron k), ``bias``,
            ``injection``, ``ln_final_bias``, ``unembed_bias``.
    kind:   one of :data:`KINDS`.
    layer, head, neuron: where it sits (None where it does not apply).
    """

    name: str
    kind: str
    layer: Optional[int] = None
    head: Optional[int] = None
    neuron: Optional[int] = None


@dataclass
class ScanResult:
    """Attribution of every component to the logit difference, per coefficient (host, float64).

    components:   the components, in the order of ``attribution``'s rows.
    coefficients: [N] the injection coefficients.
    attribution:  [n_components, N].
    logit_diff:   [N] the model's own ``logits[t1] - logits[t2]`` at the scored position.
    scale:        [N] the frozen final-norm scale s_i (1 without a final norm).
    layer, position, positions, logit_tokens: what was scanned (position is >= 0).
    """

    components: list[Component]
    coefficients: torch.Tensor
    attribution: torch.Tensor
    logit_diff: torch.Tensor
    scale: torch.Tensor
    layer: int
    position: int
    positions: str
    logit_tokens: tuple[int, int]

    @property
    def total(self) -> torch.Tensor:
        """[N] sum of all attributions (equals ``logit_diff`` up to rounding)."""
        return self.attribution.sum(0)

    def index(self, name: str) -> int:
        return [component.name for component in self.components].index(name)

    def of(self, name: str) -> torch.Tensor:
        """[N] the attribution profile of component ``name``."""
        return self.attribution[self.index(name)]


def unsupported(arch: Arch, neurons: bool = False) -> Optional[str]:
    """Why the scan cannot decompose this architecture's residual stream, or None."""
    kinds = ["embed", "resid_pre", "z", "ln_final_in", "unembed_in"] + (["pos_embed"] if arch.has_pos_embed else [])
    kinds += ["mlp_out"] if arch.has_mlp else []
    missing = arch.missing(*kinds)
    if missing:
        return f"scan: the bridge has no hook points {missing}"
    return None


def mlp_post_hook(layer: int) -> str:
    """The hook of an MLP's hidden activations (the input of W_out)."""
    return f"blocks.{layer}.mlp.hook_post"


def coefficient_range(start: float, stop: float, n: int) -> torch.Tensor:
    """``n`` coefficients evenly spaced in [start, stop] (float64)."""
    return torch.linspace(float(start), float(stop), int(n), dtype=torch.float64)


@torch.no_grad()
def resid_at(bridge, tokens: torch.Tensor, layer: int, arch: Optional[Arch] = None) -> torch.Tensor:
    """[batch, pos, d_model] ``blocks.{layer}.hook_resid_pre`` of ``tokens`` (the forward stops there)."""
    from residual_dynamics.probes.forward import ActivationPass, run_activation_passes

    arch = Arch.of(bridge) if arch is None else arch
    kept: list[torch.Tensor] = []

    def keep(x: torch.Tensor, hook) -> None:
        kept.append(x.detach().clone())

    hook = arch.hook("resid_pre", layer)
    run_activation_passes(bridge, tokens, [ActivationPass([(hook, keep)], lambda: None, "scan")])
    return kept[0]


def actadd_vector(bridge, positive: Sequence[int], negative: Sequence[int], layer: int, pad_id: int,
                  arch: Optional[Arch] = None) -> torch.Tensor:
    """ActAdd steering vector [n, d_model]: resid_pre of ``layer`` on the token ids ``positive`` minus that
    on ``negative``, the shorter padded on the right with ``pad_id`` (ActAdd pads with the space token)."""
    n = max(len(positive), len(negative))
    rows = [list(positive) + [pad_id] * (n - len(positive)), list(negative) + [pad_id] * (n - len(negative))]
    device = next(bridge.parameters()).device
    resid = resid_at(bridge, torch.tensor(rows, dtype=torch.long, device=device), layer, arch)
    return resid[0] - resid[1]


def _final_gain_and_bias(bridge) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The final norm's effective gain (``1 + w`` for offset norms) and bias, each None when absent."""
    norm = getattr(bridge, "ln_final", None)
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not isinstance(weight, torch.Tensor):
        weight = None
    elif getattr(norm, "uses_weight_offset", False):
        weight = 1.0 + weight
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _attribution_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


@torch.no_grad()
def injection_scan(
    bridge,
    tokens: torch.Tensor,
    vector: torch.Tensor,
    *,
    layer: int,
    coefficients: torch.Tensor,
    logit_tokens: tuple[int, int],
    position: int = -1,
    positions: str = "front",
    neurons: bool = False,
    max_batch: Optional[int] = None,
    arch: Optional[Arch] = None,
) -> ScanResult:
    """The scan of the module doc.

    tokens:       [T] or [1, T] token ids of the prompt (no padding).
    vector:       [n, d_model] (or [d_model]) steering vector.
    layer:        the block whose resid_pre gets the vector, 0 <= layer < n_layers.
    coefficients: [N] injection coefficients; copy i of the batch gets ``coefficients[i] * vector``.
    logit_tokens: (t1, t2): the attribution is to ``logits[t1] - logits[t2]``.
    position:     the scored position (negative counts from the end).
    positions:    "front" (row j of the vector at position j, ActAdd) or "all" (a one-row vector at every
                  position).
    neurons:      split every MLP into its neurons.
    max_batch:    most copies per forward (default all).
    """
    arch = Arch.of(bridge) if arch is None else arch
    reason = unsupported(arch)
    if reason is not None:
        raise ProbeUnsupported(reason)
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"scan: one prompt expected, got a batch of {tokens.shape[0]}")
    n_pos = tokens.shape[1]
    vector = vector.reshape(1, -1) if vector.dim() == 1 else vector
    if vector.dim() != 2 or vector.shape[-1] != arch.d_model:
        raise ValueError(f"scan: the vector must be [n, d_model={arch.d_model}], got {tuple(vector.shape)}")
    if not 0 <= layer < arch.n_layers:
        raise ValueError(f"scan: layer must be in 0..{arch.n_layers - 1}, got {layer}")
    if positions not in POSITIONS:
        raise ValueError(f"scan: positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "front" and vector.shape[0] > n_pos:
        raise ValueError(f"scan: the vector has {vector.shape[0]} rows but the prompt only {n_pos} tokens")
    if positions == "all" and vector.shape[0] != 1:
        raise ValueError(f"scan: positions='all' adds one row everywhere; the vector has {vector.shape[0]} rows")
    p = position + n_pos if position < 0 else position
    if not 0 <= p < n_pos:
        raise ValueError(f"scan: position {position} is outside the prompt of {n_pos} tokens")
    if neurons and arch.has_mlp and any(mlp_post_hook(l) not in bridge.hook_dict for l in range(arch.n_layers)):
        raise ProbeUnsupported("scan: neurons=True needs the MLP hidden-activation hooks blocks.*.mlp.hook_post")
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
    if len(coefficients) == 0:
        raise ValueError("scan: no coefficients")

    device = next(bridge.parameters()).device
    dtype = _attribution_dtype(device)
    t1, t2 = (int(t) for t in logit_tokens)
    W_U = bridge.W_U
    u = (W_U[:, t1] - W_U[:, t2]).to(dtype)
    gain, ln_bias = _final_gain_and_bias(bridge)
    scaled_u = u if gain is None else u * gain.to(dtype)
    b_U = getattr(bridge, "b_U", None)

    # The vector placed on the positions: [T, d_model], multiplied by each copy's coefficient in the hook.
    placed = torch.zeros(n_pos, arch.d_model, dtype=vector.dtype, device=device)
    if positions == "front":
        placed[: vector.shape[0]] = vector.to(device)
    else:
        placed[:] = vector.to(device)[0]

    components = _components(arch, neurons)
    chunk = len(coefficients) if max_batch is None else max(1, int(max_batch))
    pieces, diffs, scales = [], [], []
    for start in range(0, len(coefficients), chunk):
        coefs = coefficients[start : start + chunk]
        attribution, diff, scale = _chunk(bridge, arch, tokens, placed, coefs, layer, p, neurons, scaled_u, u,
                                          ln_bias, b_U, (t1, t2), dtype)
        pieces.append(attribution)
        diffs.append(diff)
        scales.append(scale)
    return ScanResult(
        components=components,
        coefficients=coefficients,
        attribution=torch.cat(pieces, dim=1).double().cpu(),
        logit_diff=torch.cat(diffs).double().cpu(),
        scale=torch.cat(scales).double().cpu(),
        layer=layer,
        position=p,
        positions=positions,
        logit_tokens=(t1, t2),
    )


def _components(arch: Arch, neurons: bool) -> list[Component]:
    """The components in the order of the attribution rows (see the module doc)."""
    out = [Component("embed", "embed")]
    if arch.has_pos_embed:
        out.append(Component("pos_embed", "pos_embed"))
    for layer in range(arch.n_layers):
        out += [Component(f"L{layer}H{h}", "head", layer, h) for h in range(arch.n_heads)]
        if arch.has_mlp and not neurons:
            out.append(Component(f"L{layer}MLP", "mlp", layer))
        elif arch.has_mlp:
            out += [Component(f"L{layer}N{k}", "neuron", layer, None, k) for k in range(arch.d_mlp)]
    out += [Component("bias", "bias"), Component("injection", "injection"), Component("ln_final_bias", "ln_final_bias"),
            Component("unembed_bias", "unembed_bias")]
    return out


def _layer_bias(bridge, layer: int, name: str) -> Optional[torch.Tensor]:
    """``blocks[layer].attn.b_O`` / ``blocks[layer].mlp.b_out`` or None (bias-free projections)."""
    module = bridge.blocks[layer].attn if name == "b_O" else bridge.blocks[layer].mlp
    try:
        bias = getattr(module, name)
    except AttributeError:
        return None
    return bias if isinstance(bias, torch.Tensor) else None


def _chunk(bridge, arch: Arch, tokens, placed, coefs, layer, p, neurons, scaled_u, u, ln_bias, b_U, logit_tokens,
           dtype):
    """One forward over len(coefs) copies: ([n_components, C] attributions, [C] logit diffs, [C] scales)."""
    from transformer_lens.ActivationCache import ActivationCache

    copies = len(coefs)
    device = placed.device
    kept: dict[str, torch.Tensor] = {}
    coef = coefs.to(device=device, dtype=placed.dtype)

    def inject(x: torch.Tensor, hook) -> torch.Tensor:
        return x + coef[:, None, None] * placed.to(x.dtype)

    def keep(name: str, full: bool = False):
        def hook_fn(x: torch.Tensor, hook) -> None:
            value = x if full else x[:, p]
            kept[name] = value.detach().to(dtype).expand(copies, *value.shape[1:]).clone()

        return hook_fn

    def stop(x: torch.Tensor, hook) -> None:
        kept["ln_out"] = x[:, p].detach().to(dtype).clone()
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        raise StopAtLayerException(x)

    hooks = [(arch.hook("resid_pre", layer), inject), (arch.hook("embed"), keep("embed"))]
    if arch.has_pos_embed:
        hooks.append((arch.hook("pos_embed"), keep("pos_embed")))
    for l in range(arch.n_layers):
        hooks.append((arch.hook("z", l), keep(f"z{l}")))
        if arch.has_mlp:
            hooks.append((mlp_post_hook(l), keep(f"post{l}")) if neurons else (arch.hook("mlp_out", l), keep(f"mlp{l}")))
    if arch.has("ln_final_scale"):
        hooks.append((arch.hook("ln_final_scale"), keep("scale", full=True)))
    hooks.append((arch.hook("unembed_in"), stop))
    bridge.run_with_hooks(tokens.expand(copies, -1), fwd_hooks=hooks, return_type=None)
    if "ln_out" not in kept:
        raise RuntimeError("scan: the forward never reached the unembedding")

    # w_i = C(g * u) / s_i, through TransformerLens' apply_ln_to_stack at the frozen scale.
    stack = scaled_u.expand(1, copies, -1)
    if "scale" in kept:
        cache = ActivationCache({"ln_final.hook_scale": kept["scale"]}, bridge)
        w = cache.apply_ln_to_stack(stack, layer=None, pos_slice=p)[0]  # [C, d_model]
        scale = kept["scale"][:, p, 0]
    else:  # no final norm: the identity, scale 1
        w = stack[0]
        scale = torch.ones(copies, dtype=dtype, device=device)

    rows = [(kept["embed"] * w).sum(-1)]
    if arch.has_pos_embed:
        rows.append((kept["pos_embed"] * w).sum(-1))
    bias = torch.zeros(copies, dtype=dtype, device=device)
    for l in range(arch.n_layers):
        w_o = bridge.blocks[l].attn.W_O.to(dtype)  # [H, d_head, d_model]
        rows += list(torch.einsum("chd,hde,ce->hc", kept[f"z{l}"], w_o, w))
        b_O = _layer_bias(bridge, l, "b_O")
        if b_O is not None:
            bias = bias + w @ b_O.to(dtype)
        if arch.has_mlp and neurons:
            w_out = bridge.blocks[l].mlp.W_out.to(dtype)  # [d_mlp, d_model]
            rows += list((kept[f"post{l}"] * (w @ w_out.T)).T)
            b_out = _layer_bias(bridge, l, "b_out")
            if b_out is not None:
                bias = bias + w @ b_out.to(dtype)
        elif arch.has_mlp:
            rows.append((kept[f"mlp{l}"] * w).sum(-1))
    injection = coefs.to(device=device, dtype=dtype)[:, None] * placed[p].to(dtype)
    constant = lambda value: torch.full((copies,), float(value), dtype=dtype, device=device)  # noqa: E731
    ln_term = constant(0.0) if ln_bias is None else constant(ln_bias.to(dtype) @ u)
    t1, t2 = logit_tokens
    unembed_term = constant(0.0) if b_U is None else constant(b_U[t1].to(dtype) - b_U[t2].to(dtype))
    rows += [bias, (injection * w).sum(-1), ln_term, unembed_term]
    diff = kept["ln_out"] @ u + unembed_term
    return torch.stack(rows), diff, scale
