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

    fold_ln: also report the ``*_folded`` norms (norm gains folded into the reading weights).
    """

    fold_ln: bool = False

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_bool(self.fold_ln, "fold_ln")


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`weight_norms` cannot run on ``arch``, or None: it reads weights only, so it runs on all."""
    return None


@dataclass
class WeightNorms:
    """Result of :func:`weight_norms`. All tensors are float32 on the host.

    Per query head [n_layers, n_heads]: W_OV, W_Q, W_O.  Per key/value head [n_layers, n_kv_heads]: W_K, W_V.
    Per layer [n_layers]: b_O, W_in, W_out, W_gate, ln1_gain, ln2_gain.  Scalar: ln_final_gain.
    ``*_folded`` fields hold the same norms with the norm gain folded in (only with ``fold_ln=True``).
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
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
) -> WeightNorms:
    """Weight norms of every layer.

    ``tokens`` and ``attention_mask`` are ignored (weights need no input); they are there so every probe
    can be called as ``probe(bridge, tokens, attention_mask=...)``. ``fold_ln=True`` adds the ``*_folded``
    variants (norm gains folded into the weights that read the normalised stream). ``arch``: the model's
    :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given).
    """
    del tokens, attention_mask
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    has_mlp = arch.has_mlp
    gated = arch.gated_mlp
    blocks = [bridge.blocks[layer] for layer in range(arch.n_layers)]

    W_Q, W_K, W_V, W_O = (_stat(w) for w in (bridge.W_Q, bridge.W_K, bridge.W_V, bridge.W_O))
    W_in = _stat(bridge.W_in) if has_mlp else None
    W_gate = _stat(bridge.W_gate) if gated else None
    try:
        b_O = torch.linalg.vector_norm(_stat(bridge.b_O), dim=-1)
    except AttributeError:  # the bridge refuses b_O on bias-free attention outputs (e.g. Llama family)
        b_O = None
    ln1_gain = _stacked_gains(blocks, "ln1")
    ln2_gain = _stacked_gains(blocks, "ln2") if has_mlp else None
    final_gain = _gain(getattr(bridge, "ln_final", None))

    def vector_norms(gain: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if gain is None else torch.linalg.vector_norm(gain, dim=-1)

    result = WeightNorms(
        W_OV=_ov_norms(W_V, W_O),
        W_Q=_frobenius(W_Q),
        W_K=_frobenius(W_K),
        W_V=_frobenius(W_V),
        W_O=_frobenius(W_O),
        b_O=b_O,
        W_in=_frobenius(W_in),
        W_out=_frobenius(_stat(bridge.W_out)) if has_mlp else None,
        W_gate=_frobenius(W_gate),
        ln1_gain=vector_norms(ln1_gain),
        ln2_gain=vector_norms(ln2_gain),
        ln_final_gain=vector_norms(final_gain),
    )
    if fold_ln:
        head_gain = None if ln1_gain is None else ln1_gain[:, None, :]  # broadcast over heads
        W_V_folded = _row_scaled(W_V, head_gain)
        result.W_OV_folded = _ov_norms(W_V_folded, W_O)
        result.W_Q_folded = _frobenius(_row_scaled(W_Q, head_gain))
        result.W_K_folded = _frobenius(_row_scaled(W_K, head_gain))
        result.W_V_folded = _frobenius(W_V_folded)
        result.W_in_folded = _frobenius(_row_scaled(W_in, ln2_gain))
        result.W_gate_folded = _frobenius(_row_scaled(W_gate, ln2_gain))

    for field in fields(result):
        value = getattr(result, field.name)
        if value is not None:
            setattr(result, field.name, value.float().cpu())
    return result
