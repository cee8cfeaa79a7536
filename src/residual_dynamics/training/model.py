"""A small decoder-only transformer in plain PyTorch, with every knob the experiments vary.

One file, nanoGPT-style. Attention is ``F.scaled_dot_product_attention(is_causal=True)`` on a fused QKV
projection, which trains faster than TransformerLens' own hooked models. For probing, the weights are
mapped onto a TransformerLens ``TransformerBridge`` (see ``residual_dynamics.training.convert``); the math here
(norm formulas, rotary convention, biases) is kept identical to TransformerLens' native model so both
give the same logits.

Knobs (``ModelConfig``): n_layers, d_model, n_heads, d_head (derived as d_model // n_heads when not
given), d_mlp (4 * d_model when not given), n_ctx, d_vocab (from the tokenizer), act_fn (gelu, gelu_new,
relu, silu, solu_ln), normalization_type (LN, LNPre, RMS, RMSPre, none), positional_embedding (learned,
rotary), attn_only, tied_embeddings. GPT-2 initialisation: N(0, init_std) for matrices and embeddings,
zero biases, unit norm gains, and the residual projections (attn.o, mlp.w_out) scaled by
1/sqrt(2 * n_layers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from residual_dynamics.errors import ConfigError

ACT_FNS = ("gelu", "gelu_new", "relu", "silu", "solu_ln")
NORM_TYPES = ("LN", "LNPre", "RMS", "RMSPre", "none")
POS_EMBEDDINGS = ("learned", "rotary")


@dataclass
class ModelConfig:
    """The ``model`` config group (a Hydra structured config: conf/model/*.yaml are its instances)."""

    name: str = "custom"  # the config-group option name, for humans and W&B
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: Optional[int] = None
    d_mlp: Optional[int] = None
    n_ctx: int = 256
    d_vocab: Optional[int] = None
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    positional_embedding: str = "learned"
    attn_only: bool = False
    tied_embeddings: bool = False
    eps: float = 1e-5
    init_std: float = 0.02
    rotary_base: float = 10000.0

    def validate(self, p: str = "model") -> None:
        """Raise ConfigError naming the first bad field. Call before any compute."""
        for name in ("n_layers", "d_model", "n_heads", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{p}.{name}", f"must be a positive integer, got {value!r}")
        for name in ("d_head", "d_mlp", "d_vocab"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{p}.{name}", f"must be a positive integer or null, got {value!r}")
        if self.d_head is None and self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"{p}.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "change one of them or set model.d_head explicitly",
            )
        if self.act_fn not in ACT_FNS:
            raise ConfigError(f"{p}.act_fn", f"unknown activation {self.act_fn!r}; choose one of {ACT_FNS}")
        if self.normalization_type not in NORM_TYPES:
            raise ConfigError(
                f"{p}.normalization_type",
                f"unknown norm type {self.normalization_type!r}; choose one of {NORM_TYPES}",
            )
        if self.positional_embedding not in POS_EMBEDDINGS:
            raise ConfigError(
                f"{p}.positional_embedding",
                f"unknown positional embedding {self.positional_embedding!r}; choose one of {POS_EMBEDDINGS}",
            )
        if self.positional_embedding == "rotary" and self.head_dim % 2 != 0:
            raise ConfigError(f"{p}.d_head", f"rotary embeddings need an even d_head, got {self.head_dim}")
        if not (self.eps > 0):
            raise ConfigError(f"{p}.eps", f"must be > 0, got {self.eps!r}")
        if not (self.init_std > 0):
            raise ConfigError(f"{p}.init_std", f"must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    if name == "solu_ln":  # SoLU: x * softmax(x); its LayerNorm is the MLP's ``ln`` submodule
        return lambda x: x * F.softmax(x, dim=-1)
    raise ValueError(name)


class Norm(nn.Module):
    """LN / LNPre (no parameters) / RMS / RMSPre (no parameters), over the last dimension, in float32.

    LN:  ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * weight + bias`` (``F.layer_norm``: the
         biased variance, as TransformerLens' LayerNorm / ``nn.LayerNorm``); LNPre without weight and bias.
    RMS: ``x / sqrt(mean(x^2) + eps) * weight`` (``F.rms_norm``, TransformerLens' RMSNorm); RMSPre
         without weight.
    Fused kernels, one call each. Inputs of another dtype are normalised in float32 and cast back.
    """

    def __init__(self, kind: str, d: int, eps: float):
        super().__init__()
        self.kind, self.eps, self.shape = kind, eps, (d,)
        self.weight = nn.Parameter(torch.ones(d)) if kind in ("LN", "RMS") else None
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "LN" else None
        self._layer_norm = kind in ("LN", "LNPre")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        if self._layer_norm:
            out = F.layer_norm(x, self.shape, weight, bias, self.eps)
        else:
            out = F.rms_norm(x, self.shape, weight, self.eps)
        return out if out.dtype == dtype else out.to(dtype)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return nn.Identity() if kind == "none" else Norm(kind, d, eps)


class Rotary(nn.Module):
    """Rotary embedding over the full head, rotating adjacent pairs (x0, x1) -> (-x1, x0)."""

    def __init__(self, d_head: int, n_ctx: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2).float() / d_head))
        freqs = torch.outer(torch.arange(n_ctx).float(), inv_freq)
        self.register_buffer("cos", freqs.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin", freqs.sin().repeat_interleave(2, dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, head, pos, d_head]
        pos = x.shape[-2]
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return x * self.cos[:pos].to(x.dtype) + rotated * self.sin[:pos].to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Optional[Rotary]):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.head_dim)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, _ = x.shape
        q, k, v = (
            self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
        )
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(z.transpose(1, 2).reshape(batch, pos, self.n_heads * self.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_in = nn.Linear(cfg.d_model, cfg.mlp_dim)
        self.w_out = nn.Linear(cfg.mlp_dim, cfg.d_model)
        self.act = _activation(cfg.act_fn)
        self.ln = nn.LayerNorm(cfg.mlp_dim, eps=cfg.eps) if cfg.act_fn == "solu_ln" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w_in(x))
        if self.ln is not None:
            h = self.ln(h)
        return self.w_out(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Optional[Rotary]):
        super().__init__()
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, rotary)
        self.attn_only = cfg.attn_only
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if not self.attn_only:
            x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_vocab is None:
            raise ConfigError("model.d_vocab", "must be set (it is normally filled in from the tokenizer)")
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model) if cfg.positional_embedding == "learned" else None
        rotary = (
            Rotary(cfg.head_dim, cfg.n_ctx, cfg.rotary_base) if cfg.positional_embedding == "rotary" else None
        )
        self.blocks = nn.ModuleList([Block(cfg, rotary) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.reset_parameters()
        if cfg.tied_embeddings:
            self.unembed.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std), zero biases, unit gains; residual projections / sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 1:  # norm gains
                nn.init.ones_(param)
            elif name.endswith(("attn.o.weight", "mlp.w_out.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(param, 0.0, std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, pos] -> logits [batch, pos, d_vocab]."""
        pos = tokens.shape[1]
        if pos > self.cfg.n_ctx:
            raise ValueError(f"sequence length {pos} exceeds model.n_ctx={self.cfg.n_ctx}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:pos]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on a [batch, pos + 1] window (inputs batch[:, :-1], targets batch[:, 1:])."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
