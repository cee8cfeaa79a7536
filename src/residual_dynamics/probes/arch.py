"""What the probes need to know about a model's architecture, in one place.

An :class:`Arch` is built ONCE per model -- from a bridge (:meth:`Arch.of`) or, without building any
model, from our trained model's config (:meth:`Arch.from_model_config`) -- and handed to the probes and to
their ``Options.check``. It is the only place that:

* formats TransformerLens hook names (:meth:`Arch.hook`, in the spirit of TransformerLens'
  ``get_act_name``): ``arch.hook("resid_pre", 3) == "blocks.3.hook_resid_pre"``,
  ``arch.hook("z", 0) == "blocks.0.attn.hook_z"``, ``arch.hook("embed") == "hook_embed"``;
* knows which of those hook points the model has (:attr:`Arch.hook_kinds`, :meth:`Arch.has`);
* says whether blocks have an MLP, whether it is gated, whether attention and MLP are parallel (read the
  same input: GPT-NeoX / Pythia, GPT-J), the grouped-query layout and the sizes;
* numbers the sublayers in forward order (:attr:`Arch.sublayers`): attn_0, mlp_0, attn_1, ...
  (attention-only models: attn_0, attn_1, ...), each with the hook that feeds its input, the hook of what
  it writes to the residual stream, and the residual point right after it;
* gives each sublayer its *write index* (:meth:`Arch.write_index`): the order in which outputs reach the
  residual stream, with the two sublayers of a parallel block written at the same time, and the
  residual points in that order (:meth:`Arch.residual_points`: no ``resid_mid`` in parallel blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Hook kinds of one block: kind -> template (formatted with the layer).
LAYER_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "ln1_in": "blocks.{layer}.ln1.hook_in",
    "ln2_in": "blocks.{layer}.ln2.hook_in",
    "ln1_scale": "blocks.{layer}.ln1.hook_scale",
    "pattern": "blocks.{layer}.attn.hook_pattern",
}
# Hook kinds of the whole model (no layer).
MODEL_HOOKS = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "ln_final_in": "ln_final.hook_in",
    "ln_final_scale": "ln_final.hook_scale",
    "unembed_in": "unembed.hook_in",
}
HOOK_KINDS = tuple(LAYER_HOOKS) + tuple(MODEL_HOOKS)

# Hook kinds our native model lacks, by reason (see Arch.from_model_config).
_MLP_KINDS = frozenset({"resid_mid", "mlp_out", "mlp_pre", "ln2_in"})


def hook_name(kind: str, layer: Optional[int] = None) -> str:
    """The TransformerLens hook name of ``kind`` (at ``layer`` for block hooks)."""
    if kind in LAYER_HOOKS:
        if layer is None:
            raise ValueError(f"hook kind {kind!r} is per block: give a layer")
        return LAYER_HOOKS[kind].format(layer=int(layer))
    if kind in MODEL_HOOKS:
        if layer is not None:
            raise ValueError(f"hook kind {kind!r} has no layer, got layer={layer}")
        return MODEL_HOOKS[kind]
    raise KeyError(f"unknown hook kind {kind!r}; kinds: {HOOK_KINDS}")


@dataclass(frozen=True)
class Sublayer:
    """One sublayer, in forward order.

    kind:        "attn" or "mlp".
    layer:       its block.
    index:       its position in forward order (attn_0 = 0, mlp_0 = 1, attn_1 = 2, ... with MLPs).
    input_hook:  replacing this tensor changes what the sublayer reads, not the residual stream
                 (the input of its pre-norm, ``ln1`` / ``ln2``, or of the identity slot without norm;
                 ``ln1`` for the MLP of a parallel block with one shared pre-norm, GPT-J).
    output_hook: what the sublayer adds to the residual stream.
    resid_after: the residual point right after it writes (``resid_mid`` after attention in blocks with an
                 MLP, else ``resid_post``).
    """

    kind: str
    layer: int
    index: int
    input_hook: str
    output_hook: str
    resid_after: str


@dataclass(frozen=True)
class Arch:
    """A descriptor of a model's architecture (see the module doc). Sizes are None only in
    :meth:`Arch.unknown`, the placeholder for a model not loaded yet (``known`` is False)."""

    n_layers: Optional[int]
    d_model: Optional[int]
    n_heads: Optional[int]
    n_kv_heads: Optional[int]  # == n_heads without grouped-query attention
    d_head: Optional[int]
    d_mlp: Optional[int]  # None without MLPs
    has_mlp: bool
    gated_mlp: bool
    parallel: bool  # attention and MLP read the same input (GPT-NeoX / Pythia, GPT-J)
    norm: Optional[str]  # "LN", "LNPre", "RMS", "RMSPre", or None (no norm)
    positional: Optional[str]  # "standard" (an added learned embedding, hook_pos_embed), "rotary", ...
    hook_kinds: frozenset = frozenset()  # the HOOK_KINDS the model has (block kinds: in every block)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def of(cls, bridge) -> "Arch":
        """The architecture of a TransformerLens bridge (trained or pretrained)."""
        cfg = bridge.cfg
        n_layers = int(cfg.n_layers)
        n_heads = int(cfg.n_heads)
        has_mlp = not bool(getattr(cfg, "attn_only", False))
        names = set(bridge.hook_dict)
        kinds = frozenset(
            kind for kind in HOOK_KINDS
            if (kind in MODEL_HOOKS and MODEL_HOOKS[kind] in names)
            or (kind in LAYER_HOOKS and all(hook_name(kind, layer) in names for layer in range(n_layers)))
        )
        d_mlp = getattr(cfg, "d_mlp", None)
        return cls(
            n_layers=n_layers,
            d_model=int(cfg.d_model),
            n_heads=n_heads,
            n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
            d_head=int(cfg.d_head),
            d_mlp=int(d_mlp) if has_mlp and d_mlp is not None else None,
            has_mlp=has_mlp,
            gated_mlp=has_mlp and bool(getattr(cfg, "gated_mlp", False)),
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
            norm=getattr(cfg, "normalization_type", None) or None,
            positional=getattr(cfg, "positional_embedding_type", None) or "standard",
            hook_kinds=kinds,
        )

    @classmethod
    def from_model_config(cls, cfg) -> "Arch":
        """The architecture of our trained model (``residual_dynamics.training.model.ModelConfig``) as its
        bridge (``training.convert.to_transformer_lens``) will have it, without building any model."""
        has_mlp = not cfg.attn_only
        d_head = cfg.d_head if cfg.d_head is not None else cfg.d_model // cfg.n_heads
        d_mlp = cfg.d_mlp if cfg.d_mlp is not None else 4 * cfg.d_model
        norm = None if cfg.normalization_type in (None, "none") else cfg.normalization_type
        positional = "standard" if cfg.positional_embedding == "learned" else cfg.positional_embedding
        kinds = set(HOOK_KINDS)
        if not has_mlp:
            kinds -= _MLP_KINDS
        if positional != "standard":
            kinds.discard("pos_embed")
        if norm is None:  # the norms are identity slots without a scale
            kinds -= {"ln_final_scale", "ln1_scale"}
        return cls(
            n_layers=int(cfg.n_layers),
            d_model=int(cfg.d_model),
            n_heads=int(cfg.n_heads),
            n_kv_heads=int(cfg.n_heads),
            d_head=int(d_head),
            d_mlp=int(d_mlp) if has_mlp else None,
            has_mlp=has_mlp,
            gated_mlp=False,
            parallel=False,
            norm=norm,
            positional=positional,
            hook_kinds=frozenset(kinds),
        )

    @classmethod
    def unknown(cls) -> "Arch":
        """A placeholder for a model not loaded yet: ``Options.check`` then checks only what needs no
        architecture (types, signs); the rest is checked again once the model is there."""
        return cls(n_layers=None, d_model=None, n_heads=None, n_kv_heads=None, d_head=None, d_mlp=None,
                   has_mlp=False, gated_mlp=False, parallel=False, norm=None, positional=None)

    # ---------------------------------------------------------------- derived facts

    @property
    def known(self) -> bool:
        return self.n_layers is not None

    def hook(self, kind: str, layer: Optional[int] = None) -> str:
        """The hook name of ``kind`` (see :data:`LAYER_HOOKS` and :data:`MODEL_HOOKS`)."""
        return hook_name(kind, layer)

    def has(self, kind: str) -> bool:
        """Whether the model has hook kind ``kind`` (in every block, for block kinds)."""
        if kind not in HOOK_KINDS:
            raise KeyError(f"unknown hook kind {kind!r}; kinds: {HOOK_KINDS}")
        return kind in self.hook_kinds

    def missing(self, *kinds: str) -> list[str]:
        """The hook names (``blocks.*.`` for block kinds) of the kinds in ``kinds`` the model lacks."""
        return [LAYER_HOOKS[kind].format(layer="*") if kind in LAYER_HOOKS else MODEL_HOOKS[kind]
                for kind in kinds if not self.has(kind)]

    @property
    def has_pos_embed(self) -> bool:
        """An additive positional embedding (``hook_pos_embed``), i.e. "standard" positions."""
        return self.positional == "standard"

    @property
    def has_final_norm(self) -> bool:
        """A final norm with a scale (``ln_final.hook_scale``); without one the final slot is an identity."""
        return self.has("ln_final_scale")

    @property
    def sublayers(self) -> tuple[Sublayer, ...]:
        """The sublayers in forward order: attn_0, mlp_0, attn_1, ... (attention-only: attns only).
        Parallel blocks are listed in the same order, though their attention and MLP read the same input
        and are written at the same time (see :meth:`write_index`)."""
        out = []
        for layer in range(self.n_layers or 0):
            after_attn = "resid_mid" if self.has_mlp and not self.parallel else "resid_post"
            out.append(Sublayer("attn", layer, len(out), hook_name("ln1_in", layer), hook_name("attn_out", layer),
                                hook_name(after_attn, layer)))
            if self.has_mlp:
                # a parallel block with one shared pre-norm (GPT-J) feeds its MLP from ln1
                shared = self.parallel and not self.has("ln2_in") and self.has("ln1_in")
                out.append(Sublayer("mlp", layer, len(out), hook_name("ln1_in" if shared else "ln2_in", layer),
                                    hook_name("mlp_out", layer), hook_name("resid_post", layer)))
        return tuple(out)

    @property
    def n_sublayers(self) -> int:
        return (self.n_layers or 0) * (2 if self.has_mlp else 1)

    def sublayer_index(self, kind: str, layer: int) -> int:
        """Forward-order index of sublayer ``kind`` ("attn" / "mlp") of ``layer``; the embeddings are -1."""
        per_layer = 2 if self.has_mlp else 1
        if kind == "attn":
            return per_layer * layer
        if kind == "mlp" and self.has_mlp:
            return per_layer * layer + 1
        raise ValueError(f"no sublayer {kind!r} in layer {layer} of this model")

    def write_index(self, kind: str, layer: Optional[int] = None) -> int:
        """When the output of sublayer ``kind`` ("attn" / "mlp" / "embed") of ``layer`` reaches the residual
        stream, in forward order: the embeddings are -1; sequential blocks number their sublayers like
        :meth:`sublayer_index` (attn_0 = 0, mlp_0 = 1, ...); in parallel blocks attention and MLP of
        layer l are written at the same time, both with index l. A sublayer with write index i writes just
        before residual point i + 1 of :meth:`residual_points`."""
        if kind == "embed":
            return -1
        if self.parallel:
            self.sublayer_index(kind, layer)  # raises for a kind the model lacks
            return int(layer)
        return self.sublayer_index(kind, layer)

    def residual_points(self) -> list[tuple[str, str]]:
        """(point name, hook name) of the residual stream in forward order: ``resid_pre_0``, then the point
        right after each write (``resid_mid_l`` / ``resid_post_l``; parallel blocks write once per layer,
        so they have only ``resid_post_l``); point p follows the outputs with write index p - 1."""
        points = [("resid_pre_0", hook_name("resid_pre", 0))]
        for sub in self.sublayers:
            if self.parallel and sub.kind == "mlp":
                continue  # written together with the attention of its block: one point, resid_post
            kind = "resid_mid" if sub.resid_after.endswith("hook_resid_mid") else "resid_post"
            points.append((f"{kind}_{sub.layer}", sub.resid_after))
        return points

    @property
    def stop_hook(self) -> Optional[str]:
        """The hook point entered right after the last block (``ln_final.hook_in``, else
        ``unembed.hook_in``), or None."""
        for kind in ("ln_final_in", "unembed_in"):
            if self.has(kind):
                return hook_name(kind)
        return None
