"""Frobenius norms of the attention and MLP weights, per layer and per head.

Definition (write-up "Residual stream norms grow exponentially over the forward pass", sections
"Analyzing the Attention weights" and Appendix 3 "Which of the MLP weights are the source of the exponential growth?",
which follows "Basic Facts about Language Model Internals" in splitting weights into *reading* weights
W_Q, W_K, W_V, W_in and *writing* weights W_O, W_out):

* ``W_OV[l, h] = ||W_V[l, g(h)] @ W_O[l, h]||_F`` -- the OV circuit of query head ``h``, where ``g(h)`` is
  the key/value head it shares under grouped-query attention (``g(h) = h // (n_heads / n_kv_heads)``, the
  ``repeat_interleave`` / HF ``repeat_kv`` grouping). It is computed from d_head x d_head factors,

      ||W_V W_O||_F^2 = trace(W_V W_O W_O^T W_V^T) = trace((W_V^T W_V) (W_O W_O^T)),

  never forming the d_model x d_model product.
* ``b_O[l] = ||b_O[l]||_2`` (absent for bias-free models); ``W_Q`` / ``W_O`` per query head, ``W_K`` /
  ``W_V`` per key/value head, each with a per-layer total ``sqrt(sum over heads of head norm^2)``
  (the Frobenius norm of the layer's stacked matrix); ``W_in``, ``W_out`` and, for gated MLPs, ``W_gate``
  per layer.
* ``ln1_gain`` / ``ln2_gain`` per layer and ``ln_final_gain``: the L2 norm of the norm layers' learned
  gain vectors, when the model has them.

The write-up measured weights with the norm gain folded into the matrix that reads the normalised stream
(its footnote 3: "we fold together the LayerNorm weights with the following W_Q, W_K, W_V or W_in
weights"). With ``fold_ln=True`` the probe reports those too, under ``<name>_folded``: ``W_Q_folded``,
``W_K_folded``, ``W_V_folded``, ``W_OV_folded`` use ``diag(ln1.w) @ W`` and ``W_in_folded`` /
``W_gate_folded`` use ``diag(ln2.w) @ W``. Only the gain is folded: unlike TransformerLens'
``fold_ln`` the reading weights are not centred, and writing weights are never centred. A model whose
norm layers have no gain (LNPre, RMSPre, no norm) gets folded values equal to the raw ones.

The write-up's numbers themselves come from TransformerLens' default weight processing (``fold_ln`` plus
``center_writing_weights``, and ``fold_value_biases``; ``HookedTransformer.from_pretrained`` /
``TransformerBridge.enable_compatibility_mode``). With ``tl_process=True`` the probe reports the norms of
those processed weights under ``<name>_tlproc``, computed here from the raw weights without touching the
model. With ``C`` the centring over d_model (``W - mean over the d_model axis``), applied only where
TransformerLens applies it -- LayerNorm-family models (LN, LNPre); RMS / RMSPre models get the gains
folded and nothing centred, models without a norm nothing at all -- and ``g`` the gain (``1 + w`` for
offset norms):

* reading weights: ``W_Q_tlproc``, ``W_K_tlproc``, ``W_V_tlproc`` = ``||C(diag(g_ln1) W)||_F``,
  ``W_in_tlproc``, ``W_gate_tlproc`` with ``g_ln2`` (``fold_ln``: gain folded, then centred);
* writing weights: ``W_O_tlproc``, ``W_out_tlproc`` = ``||C(W)||_F`` over their output axis
  (``center_writing_weights``);
* ``W_OV_tlproc[l, h] = ||W_V_tlproc[g(h)] W_O_tlproc[h]||_F``;
* ``b_O_tlproc[l] = ||C(b_O + sum_h (b_V[g(h)] + beta_ln1 W_V[g(h)]) W_O[h])||_2`` (``fold_value_biases``,
  after the LayerNorm bias ``beta_ln1`` is folded into ``b_V``); absent for bias-free attention outputs.

``tests/test_probe_weight_norms.py`` checks them against TransformerLens' own ``process_weights`` on
random GPT-2 and Llama models. The three families never share a key: raw ``W_OV``, gain-folded
``W_OV_folded``, TransformerLens-processed ``W_OV_tlproc``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import Record, check_bool, raise_if_unsupported


@dataclass
class Options:
    """The keyword options of :func:`weight_norms` (the ``probes.weight_norms`` config section).

    fold_ln:    also report the ``*_folded`` norms (norm gains folded into the reading weights).
    tl_process: also report the ``*_tlproc`` norms (TransformerLens' fold_ln + center_writing_weights +
                fold_value_biases, as the write-up measured them).
    """

    fold_ln: bool = False
    tl_process: bool = False

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_bool(self.fold_ln, "fold_ln")
        check_bool(self.tl_process, "tl_process")


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`weight_norms` cannot run on ``arch``, or None: it reads weights only, so it runs on all."""
    return None


@dataclass
class WeightNorms:
    """Result of :func:`weight_norms`. All tensors are float32 on the host.

    Per query head [n_layers, n_heads]: W_OV, W_Q, W_O.  Per key/value head [n_layers, n_kv_heads]: W_K, W_V.
    Per layer [n_layers]: b_O, W_in, W_out, W_gate, ln1_gain, ln2_gain.  Scalar: ln_final_gain.
    ``*_folded`` fields hold the same norms with the norm gain folded in (only with ``fold_ln=True``),
    ``*_tlproc`` fields those of TransformerLens-processed weights (only with ``tl_process=True``).
    A field is None when the model lacks the weight (no MLP, no gate, no output bias, no learned gain) or
    when it was not asked for.
    """

    W_OV: torch.Tensor
    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_O: Optional[torch.Tensor] = None
    W_in: Optional[torch.Tensor] = None
    W_out: Optional[torch.Tensor] = None
    W_gate: Optional[torch.Tensor] = None
    ln1_gain: Optional[torch.Tensor] = None
    ln2_gain: Optional[torch.Tensor] = None
    ln_final_gain: Optional[torch.Tensor] = None
    W_OV_folded: Optional[torch.Tensor] = None
    W_Q_folded: Optional[torch.Tensor] = None
    W_K_folded: Optional[torch.Tensor] = None
    W_V_folded: Optional[torch.Tensor] = None
    W_in_folded: Optional[torch.Tensor] = None
    W_gate_folded: Optional[torch.Tensor] = None
    W_OV_tlproc: Optional[torch.Tensor] = None
    W_Q_tlproc: Optional[torch.Tensor] = None
    W_K_tlproc: Optional[torch.Tensor] = None
    W_V_tlproc: Optional[torch.Tensor] = None
    W_O_tlproc: Optional[torch.Tensor] = None
    b_O_tlproc: Optional[torch.Tensor] = None
    W_in_tlproc: Optional[torch.Tensor] = None
    W_out_tlproc: Optional[torch.Tensor] = None
    W_gate_tlproc: Optional[torch.Tensor] = None

    def records(self) -> list[Record]:
        """Per-head fields give one row per (layer, head) plus a per-layer total, except W_OV whose
        per-layer total is not the norm of any matrix and is left out."""
        rows: list[Record] = []
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if value.dim() == 0:
                rows.append(Record(field.name, float(value)))
            elif value.dim() == 1:
                rows += [Record(field.name, float(v), layer=layer) for layer, v in enumerate(value.tolist())]
            else:
                for layer, per_head in enumerate(value.tolist()):
                    rows += [Record(field.name, float(v), layer=layer, head=head) for head, v in enumerate(per_head)]
                    if not field.name.startswith("W_OV"):
                        rows.append(Record(field.name, float(sum(v * v for v in per_head) ** 0.5), layer=layer))
        return rows


def _stat(weight: torch.Tensor) -> torch.Tensor:
    """Detached copy in at least float32, so bf16 / fp16 checkpoints are not summed in half precision."""
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32))


def _frobenius(weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Frobenius norm over the last two axes (one matrix per layer, or per layer and head)."""
    return None if weight is None else torch.linalg.matrix_norm(weight)


def _gain(norm_module) -> Optional[torch.Tensor]:
    """The learned gain vector of a normalization bridge, or None (no norm, LNPre / RMSPre)."""
    weight = getattr(norm_module, "weight", None) if norm_module is not None else None
    return None if weight is None else _stat(weight)


def _stacked_gains(blocks, name: str) -> Optional[torch.Tensor]:
    """[n_layers, d_model] gains of ``block.<name>`` for every block, or None if any block has none."""
    gains = [_gain(getattr(block, name, None)) for block in blocks]
    return None if any(g is None for g in gains) else torch.stack(gains)


@dataclass
class _LayerWeights:
    """One layer's weights, each with a leading layer axis of length 1 (the shapes of the bridge's stacked
    ``W_Q`` ... properties, for one layer): W_Q / W_O [1, H, ...], W_K / W_V [1, kv, ...], b_O [1, d_model],
    b_V [1, kv, d_head], W_in / W_gate [1, d_model, d_mlp], W_out [1, d_mlp, d_model]; None where absent."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_O: Optional[torch.Tensor]
    b_V: Optional[torch.Tensor]
    W_in: Optional[torch.Tensor]
    W_out: Optional[torch.Tensor]
    W_gate: Optional[torch.Tensor]


def _per_head(weight: torch.Tensor, n_heads: int, reading: bool) -> torch.Tensor:
    """A block's attention matrix in the per-head layout: [H, d_model, d_head] for reading weights,
    [H, d_head, d_model] for W_O. Bridges give it so; a 2-D matrix is reshaped exactly as the bridge's
    stacked ``W_Q`` ... properties reshape it (``TransformerBridge._reshape_qkv`` / ``_reshape_o``)."""
    if weight.dim() == 3:
        return weight
    d_model = weight.shape[0] if reading else weight.shape[1]
    if reading:
        return weight.reshape(n_heads, d_model, -1)
    return weight.reshape(n_heads, -1, d_model)


def _layer_weights(block, arch: Arch) -> _LayerWeights:
    """The weights of one block as float32+ host-or-device copies (only this layer's: the probe never
    holds more than one layer's matrices at a time)."""
    attn = block.attn
    n_heads = arch.n_heads

    def one(weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if weight is None else _stat(weight)[None]

    mlp = getattr(block, "mlp", None) if arch.has_mlp else None
    return _LayerWeights(
        W_Q=one(_per_head(attn.W_Q, n_heads, True)),
        W_K=one(_per_head(attn.W_K, arch.n_kv_heads, True)),
        W_V=one(_per_head(attn.W_V, arch.n_kv_heads, True)),
        W_O=one(_per_head(attn.W_O, n_heads, False)),
        b_O=one(getattr(attn, "b_O", None)),
        b_V=one(getattr(attn, "b_V", None)),
        W_in=one(mlp.W_in) if mlp is not None else None,
        W_out=one(mlp.W_out) if mlp is not None else None,
        W_gate=one(mlp.W_gate) if mlp is not None and arch.gated_mlp else None,
    )


def _row_scaled(weight: Optional[torch.Tensor], gain: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``diag(gain) @ weight`` on the d_model axis (dim -2) of [L, (H,) d_model, n] matrices, with
    gain [L, (1,) d_model]; the weight itself when there is no gain."""
    if weight is None or gain is None:
        return weight
    return weight * gain[..., None].to(weight)


def _ov_norms(W_V: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """[L, H] ||W_V[g(h)] W_O[h]||_F from W_V [L, kv, d_model, d_head] and W_O [L, H, d_head, d_model]."""
    group = W_O.shape[1] // W_V.shape[1]
    value_gram = torch.einsum("lkmd,lkme->lkde", W_V, W_V).repeat_interleave(group, dim=1)  # W_V^T W_V
    output_gram = torch.einsum("lhdm,lhem->lhde", W_O, W_O)  # W_O W_O^T
    # trace(A B) = sum(A * B^T) and B is symmetric; clamp rounding below zero before the square root.
    return (value_gram * output_gram).sum(dim=(-2, -1)).clamp_min(0.0).sqrt()


@torch.no_grad()
def weight_norms(
    bridge,
    tokens: Optional[torch.Tensor] = None,
    *,
    fold_ln: bool = False,
    tl_process: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
) -> WeightNorms:
    """Weight norms of every layer.

    ``tokens`` and ``attention_mask`` are ignored (weights need no input); they are there so every probe
    can be called as ``probe(bridge, tokens, attention_mask=...)``. ``fold_ln=True`` adds the ``*_folded``
    variants (norm gains folded into the weights that read the normalised stream), ``tl_process=True`` the
    ``*_tlproc`` ones (TransformerLens' weight processing, see the module doc). ``arch``: the model's
    :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given).
    """
    del tokens, attention_mask
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    # Layer by layer: one layer's float32 copies at a time (stacking every layer's W_in and W_out of
    # GPT-2 XL alone would copy ~4 GB); every reduction below keeps its layer axis of length 1.
    per_layer = [_layer_norms(bridge.blocks[layer], arch, fold_ln, tl_process) for layer in range(arch.n_layers)]
    result = WeightNorms(**{
        field.name: (None if per_layer[0][field.name] is None
                     else torch.cat([norms[field.name] for norms in per_layer]).float().cpu())
        for field in fields(WeightNorms) if field.name in per_layer[0]
    })
    final_gain = _gain(getattr(bridge, "ln_final", None))
    if final_gain is not None:
        result.ln_final_gain = torch.linalg.vector_norm(final_gain).float().cpu()
    return result


def _layer_norms(block, arch: Arch, fold_ln: bool, tl_process: bool) -> dict[str, Optional[torch.Tensor]]:
    """{WeightNorms field: [1, ...] norms of this one block} (every field but ln_final_gain)."""
    w = _layer_weights(block, arch)
    blocks = [block]
    ln1_gain = _stacked_gains(blocks, "ln1")
    ln2_gain = _stacked_gains(blocks, "ln2") if arch.has_mlp else None

    def vector_norms(vector: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if vector is None else torch.linalg.vector_norm(vector, dim=-1)

    out: dict[str, Optional[torch.Tensor]] = {
        "W_OV": _ov_norms(w.W_V, w.W_O),
        "W_Q": _frobenius(w.W_Q),
        "W_K": _frobenius(w.W_K),
        "W_V": _frobenius(w.W_V),
        "W_O": _frobenius(w.W_O),
        "b_O": vector_norms(w.b_O),
        "W_in": _frobenius(w.W_in),
        "W_out": _frobenius(w.W_out),
        "W_gate": _frobenius(w.W_gate),
        "ln1_gain": vector_norms(ln1_gain),
        "ln2_gain": vector_norms(ln2_gain),
    }
    out.update(dict.fromkeys(("W_OV_folded", "W_Q_folded", "W_K_folded", "W_V_folded", "W_in_folded",
                              "W_gate_folded", "W_OV_tlproc", "W_Q_tlproc", "W_K_tlproc", "W_V_tlproc",
                              "W_O_tlproc", "b_O_tlproc", "W_in_tlproc", "W_out_tlproc", "W_gate_tlproc")))
    if fold_ln:
        head_gain = None if ln1_gain is None else ln1_gain[:, None, :]  # broadcast over heads
        W_V_folded = _row_scaled(w.W_V, head_gain)
        out["W_OV_folded"] = _ov_norms(W_V_folded, w.W_O)
        out["W_Q_folded"] = _frobenius(_row_scaled(w.W_Q, head_gain))
        out["W_K_folded"] = _frobenius(_row_scaled(w.W_K, head_gain))
        out["W_V_folded"] = _frobenius(W_V_folded)
        out["W_in_folded"] = _frobenius(_row_scaled(w.W_in, ln2_gain))
        out["W_gate_folded"] = _frobenius(_row_scaled(w.W_gate, ln2_gain))
    if tl_process:
        out.update(_tl_processed_norms(w, arch, blocks))
    return out


def _offset_gains(blocks, name: str) -> Optional[torch.Tensor]:
    """[n_layers, d_model] effective gains of ``block.<name>`` (``1 + w`` for offset norms), or None."""
    gains = []
    for block in blocks:
        norm = getattr(block, name, None)
        gain = _gain(norm)
        if gain is None:
            return None
        gains.append(1.0 + gain if getattr(norm, "uses_weight_offset", False) else gain)
    return torch.stack(gains)


def _stacked_biases(blocks, name: str) -> Optional[torch.Tensor]:
    """[n_layers, d_model] biases of the norm layers ``block.<name>``, or None if any has none."""
    biases = []
    for block in blocks:
        bias = getattr(getattr(block, name, None), "bias", None)
        if not isinstance(bias, torch.Tensor):
            return None
        biases.append(_stat(bias))
    return torch.stack(biases)


def _centred(weight: Optional[torch.Tensor], dim: int, centre: bool) -> Optional[torch.Tensor]:
    """``weight`` minus its mean over ``dim`` (the d_model axis) when ``centre``."""
    if weight is None or not centre:
        return weight
    return weight - weight.mean(dim=dim, keepdim=True)


def _tl_processed_norms(w: _LayerWeights, arch: Arch, blocks) -> dict[str, Optional[torch.Tensor]]:
    """The ``*_tlproc`` norms of one layer (see the module doc): TransformerLens' processing
    (``ProcessWeights.process_weights`` with fold_ln, center_writing_weights, fold_value_biases) redone on
    copies of the raw weights; the bridge is not modified."""
    centre = arch.norm in ("LN", "LNPre")  # TransformerLens centres only LayerNorm-family models
    ln1 = _offset_gains(blocks, "ln1")
    ln2 = _offset_gains(blocks, "ln2") if arch.has_mlp else None
    if ln2 is None and arch.has_mlp and arch.parallel:  # parallel blocks with one shared norm (GPT-J)
        ln2 = ln1
    head_gain = None if ln1 is None else ln1[:, None, :]

    def reading(weight, gain):  # [L, (H,) d_model, n]: gain folded into the d_model rows, then centred
        return _centred(_row_scaled(weight, gain), -2, centre)

    W_V_t = reading(w.W_V, head_gain)
    W_O_t = _centred(w.W_O, -1, centre)  # [L, H, d_head, d_model]
    out = {
        "W_OV_tlproc": _ov_norms(W_V_t, W_O_t),
        "W_Q_tlproc": _frobenius(reading(w.W_Q, head_gain)),
        "W_K_tlproc": _frobenius(reading(w.W_K, head_gain)),
        "W_V_tlproc": _frobenius(W_V_t),
        "W_O_tlproc": _frobenius(W_O_t),
    }
    if arch.has_mlp:
        out["W_in_tlproc"] = _frobenius(reading(w.W_in, ln2))
        out["W_gate_tlproc"] = _frobenius(reading(w.W_gate, ln2))
        out["W_out_tlproc"] = _frobenius(_centred(w.W_out, -1, centre))
    if w.b_O is None:  # bias-free attention output: no b_O to report
        return out
    W_V, W_O = w.W_V, w.W_O
    b_V = w.b_V if w.b_V is not None else torch.zeros(*W_V.shape[:2], W_V.shape[-1], dtype=W_V.dtype,
                                                      device=W_V.device)
    ln1_bias = _stacked_biases(blocks, "ln1") if arch.norm == "LN" else None
    if ln1_bias is not None:  # fold_ln folds the LayerNorm bias into b_V through the raw W_V
        b_V = b_V + torch.einsum("lm,lkmd->lkd", ln1_bias.to(W_V), W_V)
    group = W_O.shape[1] // W_V.shape[1]
    value_bias = torch.einsum("lhd,lhdm->lm", b_V.repeat_interleave(group, dim=1).to(W_O), W_O)
    out["b_O_tlproc"] = torch.linalg.vector_norm(_centred(w.b_O + value_bias, -1, centre), dim=-1)
    return out
