"""Small random models and a float64 brute-force forward pass for the probe tests.

The brute force reads the raw parameters of the native module (``bridge.original_model``), never the
bridge's ``W_*`` properties or hooks, and runs every block by hand with explicit Python loops over
layers, heads and positions, so a probe checked against it is checked against an independent computation.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers TransformerBridge.boot_native)

BASE_CONFIG = dict(
    d_model=32,
    d_head=8,
    n_heads=4,
    n_layers=3,
    n_ctx=16,
    d_vocab=50,
    act_fn="gelu",
    normalization_type="LN",
    d_mlp=64,
    seed=0,
    gated_mlp=False,
    n_key_value_heads=None,
    attn_only=False,
    positional_embedding_type="standard",
)

# Model variants every probe is checked on: each norm family, plain and gated MLPs, grouped-query attention.
VARIANTS = {
    "ln_gelu": dict(),
    "rms_gated_gqa": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2),
    "no_norm_relu": dict(normalization_type=None, act_fn="relu"),
    "lnpre_gqa": dict(normalization_type="LNPre", n_key_value_heads=1),
    "rmspre_gated": dict(normalization_type="RMSPre", gated_mlp=True, act_fn="gelu"),
}


def native_parameters(bridge) -> dict[str, torch.nn.Parameter]:
    """The native model's live parameters under their plain names (``layers.0.attn.v.weight``, ...)."""
    return {
        name.replace("._original_component", ""): param for name, param in bridge.original_model.named_parameters()
    }


def native_float64(bridge) -> dict[str, torch.Tensor]:
    """Detached float64 copies of :func:`native_parameters`."""
    return {name: param.detach().double().clone() for name, param in native_parameters(bridge).items()}


def boot(seed: int = 0, **overrides):
    """A random native bridge whose biases and norm gains are perturbed too (native init leaves them at 0 / 1,
    which would hide bias and gain handling)."""
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**{**BASE_CONFIG, "seed": seed, **overrides}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in native_parameters(bridge).values():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return bridge


def random_tokens(batch: int, pos: int, d_vocab: int = BASE_CONFIG["d_vocab"], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def right_padding_mask(lengths: list[int], pos: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (pos - n) for n in lengths])


# --- float64 brute force ---------------------------------------------------------------------------------


def _norm(cfg, params: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Norm layer ``prefix`` (e.g. ``layers.0.ln1``) applied to one vector ``x`` [d_model]."""
    kind = None if cfg.normalization_type is None else cfg.normalization_type.upper()
    if kind is None:
        return x
    if kind in ("LN", "LNPRE"):
        centred = x - x.mean()
        y = centred / math.sqrt(float((centred**2).mean()) + cfg.eps)
    else:
        y = x / math.sqrt(float((x**2).mean()) + cfg.eps)
    if kind in ("LN", "RMS"):
        y = y * params[f"{prefix}.weight"]
    if kind == "LN":
        y = y + params[f"{prefix}.bias"]
    return y


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "relu":
        return x.clamp_min(0)
    if name == "silu":
        return x / (1 + torch.exp(-x))
    raise ValueError(name)


def reference_mlp(cfg, params: dict, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hook_pre, output) of block ``layer``'s MLP on one normalized vector ``x``; for gated MLPs hook_pre
    is the gate pre-activation."""
    p = f"layers.{layer}.mlp"
    if cfg.gated_mlp:
        gate = params[f"{p}.gate.weight"] @ x
        hidden = _activation(cfg.act_fn, gate) * (params[f"{p}.in.weight"] @ x)
        return gate, params[f"{p}.out.weight"] @ hidden
    pre = params[f"{p}.fc_in.weight"] @ x + params[f"{p}.fc_in.bias"]
    return pre, params[f"{p}.fc_out.weight"] @ _activation(cfg.act_fn, pre) + params[f"{p}.fc_out.bias"]


def reference_sublayer_mlp(cfg, params: dict, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hook_pre, output) of ``mlp(ln2(x))`` of block ``layer`` for one residual vector ``x``."""
    return reference_mlp(cfg, params, layer, _norm(cfg, params, f"layers.{layer}.ln2", x))


def _attention(cfg, params: dict, layer: int, xs: list[torch.Tensor], real: list[bool]) -> list[torch.Tensor]:
    """Attention output at every position of one prompt; ``xs`` are the ln1 outputs, ``real[j]`` says
    whether key position ``j`` may be attended to (causal mask on top)."""
    p = f"layers.{layer}.attn"
    d_head, n_heads = cfg.d_head, cfg.n_heads
    group = n_heads // (cfg.n_key_value_heads or n_heads)
    outputs = [params[f"{p}.o.bias"].clone() for _ in xs]
    for h in range(n_heads):
        g = h // group
        q_rows, kv_rows = slice(h * d_head, (h + 1) * d_head), slice(g * d_head, (g + 1) * d_head)
        W_O_h = params[f"{p}.o.weight"][:, q_rows]
        qs = [params[f"{p}.q.weight"][q_rows] @ x + params[f"{p}.q.bias"][q_rows] for x in xs]
        ks = [params[f"{p}.k.weight"][kv_rows] @ x + params[f"{p}.k.bias"][kv_rows] for x in xs]
        vs = [params[f"{p}.v.weight"][kv_rows] @ x + params[f"{p}.v.bias"][kv_rows] for x in xs]
        for i in range(len(xs)):
            keys = [j for j in range(i + 1) if real[j]]
            scores = [float(qs[i] @ ks[j]) / math.sqrt(d_head) for j in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            z = sum(w * vs[j] for w, j in zip(weights, keys)) / sum(weights)
            outputs[i] = outputs[i] + W_O_h @ z
    return outputs


def reference_forward(bridge, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """Brute-force float64 forward of a native bridge's model.

    Returns ``acts[kind][layer][b][p]`` (one vector each) for kind in resid_pre, resid_mid, resid_post,
    attn_out, mlp_out, mlp_pre (the last three absent on attention-only models).
    """
    cfg = bridge.cfg
    params = native_float64(bridge)
    kinds = ["resid_pre", "resid_post", "attn_out"] + ([] if cfg.attn_only else ["resid_mid", "mlp_out", "mlp_pre"])
    acts: dict = {kind: [[] for _ in range(cfg.n_layers)] for kind in kinds}
    batch, pos = tokens.shape
    for b in range(batch):
        real = [attention_mask is None or bool(attention_mask[b, p]) for p in range(pos)]
        stream = [params["tok_embed.weight"][int(tokens[b, p])] + params["pos.weight"][p] for p in range(pos)]
        for layer in range(cfg.n_layers):
            acts["resid_pre"][layer].append(stream)
            attn_in = [_norm(cfg, params, f"layers.{layer}.ln1", x) for x in stream]
            attn_out = _attention(cfg, params, layer, attn_in, real)
            acts["attn_out"][layer].append(attn_out)
            stream = [x + a for x, a in zip(stream, attn_out)]
            if not cfg.attn_only:
                acts["resid_mid"][layer].append(stream)
                pre_out = [reference_sublayer_mlp(cfg, params, layer, x) for x in stream]
                acts["mlp_pre"][layer].append([pre for pre, _ in pre_out])
                acts["mlp_out"][layer].append([out for _, out in pre_out])
                stream = [x + out for x, (_, out) in zip(stream, pre_out)]
            acts["resid_post"][layer].append(stream)
    return acts


def real_positions(tokens: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """(b, p) pairs that statistics run over, listed by hand: p >= 1 and not padding."""
    batch, pos = tokens.shape
    return [
        (b, p)
        for b in range(batch)
        for p in range(1, pos)
        if attention_mask is None or attention_mask[b, p] == 1
    ]


# --- HuggingFace models (offline) ----------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(100)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # No BOS token: with one, TransformerLens re-loads the tokenizer by name from the hub.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", pad_token="w1")


def hf_bridge(kind: str):
    """(HF model, bridge, float64 copy of the HF state dict taken before booting) for a random local model:
    ``gpt2`` (Conv1D, LN, GELU) or ``llama`` (GQA, gated SiLU MLP, RMSNorm). Skips if booting would need
    the hub."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        name = "gpt2"
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
        )
    else:
        name = "meta-llama/Llama-3.2-1B"
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=100,
            max_position_embeddings=32,
        )
        model = transformers.LlamaForCausalLM(config)
    model.eval()
    with torch.no_grad():  # non-trivial norm gains
        for key, param in model.named_parameters():
            if "ln" in key or "norm" in key:
                param.add_(0.3 * torch.randn_like(param))
    state = {key: value.detach().double().clone() for key, value in model.state_dict().items()}
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=_tiny_tokenizer())
    except OSError as error:  # would have needed the hub
        pytest.skip(f"boot_transformers({name!r}) needs the network: {error}")
    return model, bridge, state


# --- planted models ------------------------------------------------------------------------------------


def planted_growth_bridge(factors: list[float], d_model: int = 16):
    """A model whose block ``l`` multiplies every residual vector by exactly ``factors[l]``.

    No norm layers; every attention weight and bias is zero, so ``attn_out = 0``; the ReLU MLP has
    ``W_in = [I; -I]`` and ``W_out = (r - 1) [I, -I]`` with zero biases, so
    ``mlp(x) = (r - 1) (relu(x) - relu(-x)) = (r - 1) x`` and ``resid_post = r * resid_pre`` at every
    position. All factors used in tests are dyadic (1.25, 1.5, 2, ...), so float32 represents ``r - 1``
    exactly. Positions never interact, and exactly half of the MLP pre-activations ``[x; -x]`` are > 0.
    """
    bridge = TransformerBridge.boot_native(
        TransformerBridgeConfig(
            **{
                **BASE_CONFIG,
                "d_model": d_model,
                "d_head": d_model // 4,
                "d_mlp": 2 * d_model,
                "n_layers": len(factors),
                "normalization_type": None,
                "act_fn": "relu",
            }
        )
    )
    params = native_parameters(bridge)
    identity = torch.eye(d_model)
    with torch.no_grad():
        for layer, factor in enumerate(factors):
            for name, param in params.items():
                if name.startswith(f"layers.{layer}.attn.") or name.endswith("bias"):
                    param.zero_()
            params[f"layers.{layer}.mlp.fc_in.weight"].copy_(torch.cat([identity, -identity], dim=0))
            params[f"layers.{layer}.mlp.fc_out.weight"].copy_((factor - 1) * torch.cat([identity, -identity], dim=1))
    return bridge
