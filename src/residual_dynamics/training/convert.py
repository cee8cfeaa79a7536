"""Convert a trained ``Transformer`` into a TransformerLens 4.x ``TransformerBridge``.

The bridge is built with ``TransformerBridge.boot_native`` from the matching ``TransformerBridgeConfig``
(without TL's own initialisation), then our weights are copied in through an explicit state-dict
mapping. TransformerLens' native model uses the same formulas as ``residual_dynamics.training.model`` (norms,
adjacent-pair rotary, biased q/k/v/o and MLP projections, bias-free unembedding), so the bridge gives the
same logits; ``tests/test_convert.py`` checks that for every variant. Probes then see our model through
the standard TransformerLens hook names (``blocks.3.hook_resid_post``, ``blocks.0.attn.hook_z``, ...).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from residual_dynamics.training.model import Transformer

_NATIVE_WRAPPER = "._original_component"


def bridge_config(model: Transformer):
    """The ``TransformerBridgeConfig`` describing ``model``'s architecture."""
    from transformer_lens.config import TransformerBridgeConfig

    cfg = model.cfg
    return TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.head_dim,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        d_mlp=cfg.mlp_dim,
        act_fn=cfg.act_fn,
        normalization_type=None if cfg.normalization_type == "none" else cfg.normalization_type,
        positional_embedding_type="standard" if cfg.positional_embedding == "learned" else "rotary",
        rotary_dim=cfg.head_dim,
        rotary_base=cfg.rotary_base,
        attn_only=cfg.attn_only,
        eps=cfg.eps,
        init_weights=False,
        original_architecture="residual_dynamics.Transformer",
    )


# (our parameter name pattern, native parameter name template). Order matters only for readability.
_RENAMES = [
    (r"embed\.weight", "tok_embed.weight"),
    (r"pos_embed\.weight", "pos.weight"),
    (r"blocks\.(\d+)\.ln([12])\.(weight|bias)", r"layers.\1.ln\2.\3"),
    (r"blocks\.(\d+)\.attn\.o\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"blocks\.(\d+)\.mlp\.w_in\.(weight|bias)", r"layers.\1.mlp.fc_in.\2"),
    (r"blocks\.(\d+)\.mlp\.w_out\.(weight|bias)", r"layers.\1.mlp.fc_out.\2"),
    (r"blocks\.(\d+)\.mlp\.ln\.(weight|bias)", r"layers.\1.mlp.ln.\2"),
    (r"ln_final\.(weight|bias)", r"ln_out.\1"),
    (r"unembed\.weight", "head.weight"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def native_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and the fused QKV split) into TransformerLens' native parameter names."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if model.cfg.tied_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    for name, tensor in state.items():
        qkv = _QKV.fullmatch(name)
        if qkv:
            layer, kind = qkv.groups()
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"layers.{layer}.attn.{part}.{kind}"] = chunk
            continue
        for pattern, template in _RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, template, name)] = tensor
                break
        else:
            raise KeyError(f"no TransformerLens mapping for parameter {name!r}")
    return out


def to_transformer_lens(model: Transformer, device: Optional[torch.device | str] = None):
    """A ``TransformerBridge`` with ``model``'s weights (a copy: later training does not affect it).

    The bridge gets no tokenizer: probes take token ids, and TransformerLens 4.3 would try to reload a
    tokenizer by its ``name_or_path``, which our corpus-trained BPE tokenizers do not have."""
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)

    device = device if device is not None else next(model.parameters()).device
    bridge = TransformerBridge.boot_native(bridge_config(model), device=device)
    params = {
        name.replace(_NATIVE_WRAPPER, ""): param for name, param in bridge.original_model.named_parameters()
    }
    mapped = native_state_dict(model)
    missing = sorted(set(params) - set(mapped))
    unexpected = sorted(set(mapped) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"state-dict mapping mismatch for {model.cfg}: missing in ours {missing}, not in bridge {unexpected}"
        )
    with torch.no_grad():
        for name, param in params.items():
            source = mapped[name]
            if source.shape != param.shape:
                raise RuntimeError(f"{name}: shape {tuple(source.shape)} != bridge {tuple(param.shape)}")
            param.copy_(source.to(device=param.device, dtype=param.dtype))
    bridge.eval()
    return bridge
