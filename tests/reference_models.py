"""Small models and an independent float64 reference forward for the probe tests.

* :data:`BASE` and :data:`VARIANTS`: random TL-native models (every normalization family, plain and gated
  MLPs with GELU / ReLU / SiLU, grouped-query and multi-query attention, attention-only), built by
  :func:`make_bridge`; :func:`hf_bridge`: random local HF GPT-2 / Llama bridges (no Hub access).
* :class:`Reference`: recomputes a TL-native model in float64 from the raw parameters of the native
  module (``bridge.original_model``), never the bridge's ``W_*`` properties or hooks, with explicit Python
  loops over heads and query positions, so a probe checked against it is checked against an independent
  computation. It runs whole passes (:meth:`Reference.forward`, :meth:`Reference.activations`) and single
  sublayers on any input (:meth:`Reference.sublayer`, for windowed inputs).
* Planted models whose answer is known by construction: :func:`planted_growth_bridge`,
  :func:`relay_bridge` (with :func:`constant_sequences`) and :func:`planted_cleanup_bridge`.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers TransformerBridge.boot_native)


@pytest.fixture(autouse=True)
def single_thread():
    """Autouse fixture of every test module that imports it: run torch on one thread. These models are
    tiny, and on a shared 2-core box torch's thread pool spins far more than it computes (a 3-layer
    forward goes from ~10 ms to ~400 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


BASE = dict(
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

# Config overrides of the random models every probe is checked on: each normalization family, plain and
# gated MLPs with each activation, grouped-query (2 kv heads) and multi-query (1) attention, attention-only.
VARIANTS = {
    "ln_gelu": dict(),
    "rms_gated_gqa": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2),
    "no_norm_relu": dict(normalization_type=None, act_fn="relu"),
    "no_norm_gelu": dict(normalization_type=None, seed=1),
    "lnpre_mqa": dict(normalization_type="LNPre", n_key_value_heads=1),
    "lnpre_attn_only": dict(normalization_type="LNPre", attn_only=True, seed=2),
    "rmspre_gated": dict(normalization_type="RMSPre", gated_mlp=True, act_fn="gelu"),
    "rmspre": dict(normalization_type="RMSPre", seed=3),
    "ln_attn_only": dict(attn_only=True),
    "ln_attn_only_gqa": dict(attn_only=True, n_key_value_heads=2),
}


def native_weights(bridge) -> dict[str, torch.Tensor]:
    """The native model's tensors by their plain names (``layers.0.attn.q.weight``, ``lm_head.weight``, ...).

    The tensors share storage with the model, so in-place writes (under no_grad) edit it.
    """
    return {
        name.replace("_original_component.", ""): tensor
        for name, tensor in bridge.original_model.state_dict().items()
    }


def native_float64(bridge) -> dict[str, torch.Tensor]:
    """Detached float64 copies of :func:`native_weights`."""
    return {name: tensor.detach().double().clone() for name, tensor in native_weights(bridge).items()}


def make_bridge(*, perturb: bool = True, **overrides) -> TransformerBridge:
    """A random TL-native bridge with config ``BASE | overrides``.

    With ``perturb`` its biases and norm gains (every 1-d parameter) get N(0, 0.3^2) noise: the native
    init leaves them at 0 / 1, which would hide bias and gain handling. The planted models pass
    ``perturb=False`` and set what they need by hand.
    """
    config = {**BASE, **overrides}
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    if perturb:
        generator = torch.Generator().manual_seed(config["seed"] + 1)
        with torch.no_grad():
            for param in bridge.original_model.parameters():
                if param.dim() == 1:
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return bridge


def random_tokens(batch: int, pos: int, d_vocab: int = BASE["d_vocab"], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def right_padding_mask(lengths: list[int], pos: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (pos - n) for n in lengths])


def real_positions(tokens: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """(b, p) pairs that statistics run over, listed by hand: p >= 1 and not padding."""
    batch, pos = tokens.shape
    return [
        (b, p)
        for b in range(batch)
        for p in range(1, pos)
        if attention_mask is None or attention_mask[b, p] == 1
    ]


def next_token_loss(logits, tokens, attention_mask=None):
    """Mean -log p(token p+1) over p >= 1 with p and p+1 real, by an explicit loop over (b, p)."""
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    losses = []
    for b in range(tokens.shape[0]):
        for p in range(1, tokens.shape[1] - 1):
            if real[b, p] and real[b, p + 1]:
                losses.append(-logits[b, p].log_softmax(-1)[tokens[b, p + 1]])
    return torch.stack(losses).mean()


# --- float64 reference ---------------------------------------------------------------------------------


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP activation written out: exact (erf) GELU, ReLU, SiLU."""
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "relu":
        return x.clamp_min(0)
    if name == "silu":
        return x / (1 + torch.exp(-x))
    raise ValueError(name)


class Reference:
    """Float64 forward of a TL-native model from its raw weights, one explicit step at a time.

    Inputs of the building blocks are residual vectors ``[..., d_model]``; attention takes
    ``[batch, pos, d_model]`` and loops over heads and query positions. Sublayers are numbered in forward
    order: attn_0, mlp_0, attn_1, ... (attention-only: attn_0, attn_1, ...).
    """

    parallel = False  # attention and MLP read the same input (ParallelReference)

    def __init__(self, bridge):
        self.cfg = bridge.cfg
        self.w = native_float64(bridge)
        self.norm = self.cfg.normalization_type
        self.has_mlp = not self.cfg.attn_only
        self.has_pos = (getattr(self.cfg, "positional_embedding_type", None) or "standard") == "standard"
        self.n_sublayers = self.cfg.n_layers * (2 if self.has_mlp else 1)

    # --- building blocks ------------------------------------------------------------------------
    def token_embedding(self, tokens):
        return self.w["tok_embed.weight"][tokens]

    def pos_embedding(self, tokens):
        return self.w["pos.weight"][torch.arange(tokens.shape[1])].expand(tokens.shape[0], -1, -1)

    def embed(self, tokens):
        return self.token_embedding(tokens) + self.pos_embedding(tokens)

    def scale(self, x):
        """The normalization denominator of each vector (1 for models without normalization)."""
        if self.norm is None:
            return torch.ones_like(x[..., :1])
        centered = x - x.mean(-1, keepdim=True) if self.norm in ("LN", "LNPre") else x
        return (centered.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()

    def normalize(self, x, prefix):
        """Norm layer ``prefix`` (e.g. ``layers.0.ln1``) applied to every vector of ``x``."""
        if self.norm is None:
            return x
        centered = x - x.mean(-1, keepdim=True) if self.norm in ("LN", "LNPre") else x
        out = centered / self.scale(x)
        if self.norm in ("LN", "RMS"):
            out = out * self.w[f"{prefix}.weight"]
        if self.norm == "LN":
            out = out + self.w[f"{prefix}.bias"]
        return out

    def rotate(self, q, k):
        """Rotary embedding of queries and keys [batch, pos, head, d_head] (none: standard positions)."""
        return q, k

    def qkv(self, x, layer):
        """Queries [batch, pos, head, d_head], keys and values [batch, pos, kv_head, d_head] of normalized
        inputs ``x``, biases included, rotary applied."""
        cfg, w = self.cfg, self.w
        a = f"layers.{layer}.attn"
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        batch, pos, _ = x.shape
        q = (x @ w[f"{a}.q.weight"].T + w[f"{a}.q.bias"]).view(batch, pos, cfg.n_heads, cfg.d_head)
        k = (x @ w[f"{a}.k.weight"].T + w[f"{a}.k.bias"]).view(batch, pos, n_kv, cfg.d_head)
        v = (x @ w[f"{a}.v.weight"].T + w[f"{a}.v.bias"]).view(batch, pos, n_kv, cfg.d_head)
        q, k = self.rotate(q, k)
        return q, k, v

    def kv_head(self, head):
        """The key/value head query head ``head`` reads (grouped-query attention)."""
        n_kv = self.cfg.n_key_value_heads or self.cfg.n_heads
        return head // (self.cfg.n_heads // n_kv)

    def head_patterns(self, x, layer, attention_mask=None):
        """Attention patterns [batch, head, query, key] of normalized inputs ``x``, with an explicit loop
        over heads and query positions; query head h reads key/value head :meth:`kv_head`, masked
        (padding) keys are never attended to, and keys after the query get 0."""
        cfg = self.cfg
        q, k, _ = self.qkv(x, layer)
        batch, pos, _ = x.shape
        keep = torch.ones(batch, pos, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        patterns = torch.zeros(batch, cfg.n_heads, pos, pos, dtype=torch.float64)
        for h in range(cfg.n_heads):
            kv = self.kv_head(h)
            for p in range(pos):
                scores = torch.einsum("bd,bjd->bj", q[:, p, h], k[:, : p + 1, kv]) / math.sqrt(cfg.d_head)
                scores = scores.masked_fill(~keep[:, : p + 1], -math.inf)
                patterns[:, h, p, : p + 1] = scores.softmax(-1)
        return patterns

    def head_z(self, x, layer, attention_mask=None):
        """z [batch, pos, head, d_head] of normalized inputs ``x``: each head's pattern
        (:meth:`head_patterns`) times its values, query position by query position."""
        cfg = self.cfg
        _, _, v = self.qkv(x, layer)
        patterns = self.head_patterns(x, layer, attention_mask)
        batch, pos, _ = x.shape
        z = torch.zeros(batch, pos, cfg.n_heads, cfg.d_head, dtype=torch.float64)
        for h in range(cfg.n_heads):
            for p in range(pos):
                z[:, p, h] = torch.einsum("bj,bjd->bd", patterns[:, h, p, : p + 1], v[:, : p + 1, self.kv_head(h)])
        return z

    def w_v(self, layer, head):
        """[d_model, d_head] value weights that query head ``head`` reads through (no bias)."""
        d, kv = self.cfg.d_head, self.kv_head(head)
        return self.w[f"layers.{layer}.attn.v.weight"][kv * d : (kv + 1) * d].T

    def norm_linear(self, c, prefix, scale):
        """The norm ``prefix`` frozen at ``scale``, as a linear map of one component c [..., d_model]:
        centering (LayerNorms), the gain (norms with a weight), division by the scale; no bias."""
        if self.norm in ("LN", "LNPre"):
            c = c - c.mean(-1, keepdim=True)
        if self.norm in ("LN", "RMS"):
            c = c * self.w[f"{prefix}.weight"]
        return c / scale

    def w_o(self, layer, head):
        """[d_head, d_model] slice of the output projection for one head."""
        d = self.cfg.d_head
        return self.w[f"layers.{layer}.attn.o.weight"][:, head * d : (head + 1) * d].T

    def head_outputs(self, x, layer, attention_mask=None):
        """[head, batch, pos, d_model]: z_h W_O,h (no b_O) of normalized inputs ``x``, head by head and
        position by position."""
        z = self.head_z(x, layer, attention_mask)
        out = torch.zeros(self.cfg.n_heads, *x.shape, dtype=torch.float64)
        for h in range(self.cfg.n_heads):
            for p in range(x.shape[1]):
                out[h, :, p] = z[:, p, h] @ self.w_o(layer, h)
        return out

    def attn(self, x, layer, attention_mask=None):
        """Output of ``attn(ln1(x))`` of block ``layer`` for residual vectors ``x`` [batch, pos, d_model]."""
        normed = self.normalize(x, f"layers.{layer}.ln1")
        return self.head_outputs(normed, layer, attention_mask).sum(0) + self.w[f"layers.{layer}.attn.o.bias"]

    def mlp(self, x, layer):
        """(hook_pre, output) of ``mlp(ln2(x))`` of block ``layer`` for residual vectors ``x`` [..., d_model];
        for gated MLPs hook_pre is the gate pre-activation."""
        w, m = self.w, f"layers.{layer}.mlp"
        normed = self.normalize(x, f"layers.{layer}.ln2")
        if self.cfg.gated_mlp:
            gate = normed @ w[f"{m}.gate.weight"].T
            hidden = activation(self.cfg.act_fn, gate) * (normed @ w[f"{m}.in.weight"].T)
            return gate, hidden @ w[f"{m}.out.weight"].T
        pre = normed @ w[f"{m}.fc_in.weight"].T + w[f"{m}.fc_in.bias"]
        return pre, activation(self.cfg.act_fn, pre) @ w[f"{m}.fc_out.weight"].T + w[f"{m}.fc_out.bias"]

    def sublayer_input(self, streams, s):
        """The residual stream sublayer s reads in the clean forward (``streams`` of :meth:`forward`)."""
        return streams[s // 2] if self.parallel else streams[s]

    def sublayer(self, s, x, attention_mask=None):
        """Output of sublayer s (forward order) on residual vectors ``x`` [batch, pos, d_model]."""
        if not self.has_mlp:
            return self.attn(x, s, attention_mask)
        layer, is_mlp = divmod(s, 2)
        return self.mlp(x, layer)[1] if is_mlp else self.attn(x, layer, attention_mask)

    def unembed_direction(self, t1, t2):
        return self.w["head.weight"][t1] - self.w["head.weight"][t2]

    def logits(self, final_resid):
        out = self.normalize(final_resid, "ln_out") @ self.w["head.weight"].T
        return out + self.w["head.bias"] if "head.bias" in self.w else out

    # --- whole passes ---------------------------------------------------------------------------
    def forward(self, tokens, attention_mask=None):
        """(logits, sublayer outputs in order, residual stream before each sublayer and at the end)."""
        resid = self.embed(tokens)
        outputs, streams = [], [resid]
        for s in range(self.n_sublayers):
            outputs.append(self.sublayer(s, resid, attention_mask))
            resid = resid + outputs[-1]
            streams.append(resid)
        return self.logits(resid), outputs, streams

    def activations(self, tokens, attention_mask=None) -> dict[str, list[torch.Tensor]]:
        """``acts[kind][layer]`` [batch, pos, d] for kind in resid_pre, resid_mid, resid_post, attn_out,
        mlp_out, mlp_pre (the last three absent on attention-only models)."""
        _, outputs, streams = self.forward(tokens, attention_mask)
        per_layer = 2 if self.has_mlp else 1
        kinds = ["resid_pre", "resid_post", "attn_out"] + (["resid_mid", "mlp_out", "mlp_pre"] if self.has_mlp else [])
        acts: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for layer in range(self.cfg.n_layers):
            s = per_layer * layer
            acts["resid_pre"].append(streams[s])
            acts["attn_out"].append(outputs[s])
            acts["resid_post"].append(streams[s + per_layer])
            if self.has_mlp:
                acts["resid_mid"].append(streams[s + 1])
                acts["mlp_out"].append(outputs[s + 1])
                acts["mlp_pre"].append(self.mlp(streams[s + 1], layer)[0])
        return acts


class ParallelReference(Reference):
    """Float64 forward of a GPT-NeoX / Pythia model (:func:`hf_bridge` ``"neox"``) from the raw Hugging
    Face state dict: parallel blocks ``x + attn(ln1(x)) + mlp(ln2(x))``, LayerNorm, partial rotary
    embeddings (rotate-half, on the first ``rotary_pct`` of each head), exact GELU, no positional embedding
    and no unembedding bias. The weights are renamed to :class:`Reference`'s names (the fused
    ``query_key_value`` split per head into q, k, v), so every building block is shared; sublayers are
    numbered attn_0, mlp_0, attn_1, ... and ``forward`` returns the L + 1 residual points resid_pre_0,
    resid_post_0, ... (no resid_mid)."""

    parallel = True

    def __init__(self, model, state):
        from types import SimpleNamespace

        config = model.config
        n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
        d_model = config.hidden_size
        d_head = d_model // n_heads
        self.cfg = SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_model=d_model,
                                   n_key_value_heads=None, eps=config.layer_norm_eps, gated_mlp=False,
                                   act_fn=config.hidden_act, attn_only=False)
        assert config.use_parallel_residual and config.hidden_act == "gelu"
        self.norm, self.has_mlp, self.has_pos = "LN", True, False
        self.n_sublayers = 2 * n_layers
        rope = config.rope_parameters
        self.rotary_dim = int(d_head * rope.get("partial_rotary_factor", 1.0))
        self.rotary_base = float(rope["rope_theta"])
        w = {"tok_embed.weight": state["gpt_neox.embed_in.weight"], "head.weight": state["lm_head.weight"]}
        for name in ("weight", "bias"):
            w[f"ln_out.{name}"] = state[f"gpt_neox.final_layer_norm.{name}"]
        for layer in range(n_layers):
            hf, ours = f"gpt_neox.layers.{layer}", f"layers.{layer}"
            for name in ("weight", "bias"):
                w[f"{ours}.ln1.{name}"] = state[f"{hf}.input_layernorm.{name}"]
                w[f"{ours}.ln2.{name}"] = state[f"{hf}.post_attention_layernorm.{name}"]
                fused = state[f"{hf}.attention.query_key_value.{name}"]
                per_head = fused.view(n_heads, 3, d_head, *fused.shape[1:])  # [head, (q, k, v), d_head, ...]
                for index, part in enumerate(("q", "k", "v")):
                    w[f"{ours}.attn.{part}.{name}"] = per_head[:, index].reshape(n_heads * d_head, *fused.shape[1:])
                w[f"{ours}.attn.o.{name}"] = state[f"{hf}.attention.dense.{name}"]
                w[f"{ours}.mlp.fc_in.{name}"] = state[f"{hf}.mlp.dense_h_to_4h.{name}"]
                w[f"{ours}.mlp.fc_out.{name}"] = state[f"{hf}.mlp.dense_4h_to_h.{name}"]
        self.w = w

    def pos_embedding(self, tokens):
        return torch.zeros(*tokens.shape, self.cfg.d_model, dtype=torch.float64)

    def embed(self, tokens):
        return self.token_embedding(tokens)

    def rotate(self, q, k):
        """Rotate-half rotary embedding of the first ``rotary_dim`` dims of each head, angle
        p / base^(2i / rotary_dim) at position p, written out (GPT-NeoX)."""
        dim, pos = self.rotary_dim, q.shape[1]
        inv_freq = 1.0 / self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.arange(pos, dtype=torch.float64)[:, None] * inv_freq[None]  # [pos, dim / 2]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None]

        def apply(x):
            rot, rest = x[..., :dim], x[..., dim:]
            half = dim // 2
            rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
            return torch.cat([rot * cos + rotated * sin, rest], -1)

        return apply(q), apply(k)

    def forward(self, tokens, attention_mask=None):
        """(logits, sublayer outputs attn_0, mlp_0, ..., the residual stream before each block and at
        the end): both sublayers of a block read the block's input."""
        resid = self.embed(tokens)
        outputs, streams = [], [resid]
        for layer in range(self.cfg.n_layers):
            attn = self.sublayer(2 * layer, resid, attention_mask)
            mlp = self.sublayer(2 * layer + 1, resid, attention_mask)
            outputs += [attn, mlp]
            resid = resid + attn + mlp
            streams.append(resid)
        return self.logits(resid), outputs, streams


# --- HuggingFace models (offline) ----------------------------------------------------------------------

HF_VOCAB = 100


def offline_tokenizer(vocab_size: int = HF_VOCAB):
    """A word-level tokenizer built in memory, so boot_transformers needs no Hub access (with a BOS token
    and ``add_bos_token=True`` TransformerLens keeps it instead of re-loading it by name)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="t0",
        bos_token="t1",
        eos_token="t2",
        pad_token="t3",
        add_bos_token=True,
        name_or_path="offline-word-level",
    )


def hf_bridge(kind: str):
    """(HF model, bridge, float64 copy of the HF state dict taken before booting) for a random local model
    with ``HF_VOCAB`` tokens: ``gpt2`` (Conv1D, LN, GELU), ``llama`` (GQA, gated SiLU MLP, RMSNorm,
    rotary), ``neox`` (GPT-NeoX / Pythia: parallel attention + MLP, rotary) or ``gptj`` (GPT-J: parallel
    attention + MLP behind ONE shared pre-norm, rotary). Weights are drawn with std 0.1 instead of HF's
    0.02, so that every sublayer visibly moves the logits, and norm gains are perturbed so that they
    matter."""
    import transformers

    torch.manual_seed(0)
    if kind == "gptj":  # parallel blocks with one pre-norm for attention and MLP
        name = "EleutherAI/gpt-j-6b"
        model = transformers.GPTJForCausalLM(
            transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=HF_VOCAB, n_positions=32,
                                    rotary_dim=4, initializer_range=0.1)
        )
    elif kind == "neox":  # parallel attention + MLP blocks (GPT-NeoX / Pythia)
        name = "EleutherAI/pythia-70m"
        model = transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=HF_VOCAB, max_position_embeddings=32, use_parallel_residual=True, initializer_range=0.1,
            )
        )
    elif kind == "gpt2":
        name = "gpt2"
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=4, vocab_size=HF_VOCAB, n_positions=32, initializer_range=0.1
            )
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
            vocab_size=HF_VOCAB,
            max_position_embeddings=32,
            initializer_range=0.1,
        )
        model = transformers.LlamaForCausalLM(config)
    model.eval()  # models built from a config start in training mode (dropout on)
    with torch.no_grad():  # non-trivial norm gains
        for key, param in model.named_parameters():
            if "ln" in key or "norm" in key:
                param.add_(0.3 * torch.randn_like(param))
    state = {key: value.detach().double().clone() for key, value in model.state_dict().items()}
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=offline_tokenizer())
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
    bridge = make_bridge(
        perturb=False,
        d_model=d_model,
        d_head=d_model // 4,
        d_mlp=2 * d_model,
        n_layers=len(factors),
        normalization_type=None,
        act_fn="relu",
    )
    w = native_weights(bridge)
    identity = torch.eye(d_model)
    with torch.no_grad():
        for layer, factor in enumerate(factors):
            for name, tensor in w.items():
                if name.startswith(f"layers.{layer}.attn.") or name.endswith("bias"):
                    tensor.zero_()
            w[f"layers.{layer}.mlp.fc_in.weight"].copy_(torch.cat([identity, -identity], dim=0))
            w[f"layers.{layer}.mlp.fc_out.weight"].copy_((factor - 1) * torch.cat([identity, -identity], dim=1))
    return bridge


def relay_bridge(sources: list[int], readout: int, *, vocab: int = 16, sharpness: float = 12.0):
    """Attention-only, normalization-free relay model with a planted dependency structure.

    The residual stream is split into blocks of ``vocab`` dims: F_{-1} holds the one-hot token
    embedding (no positional embedding), F_s the output of sublayer s. Every query and key weight is 0,
    so attention is uniform over the causal prefix; on constant sequences (the same token repeated)
    every position then carries the same value, and head 0 of sublayer s copies block F_{sources[s]}
    into F_s exactly. The unembedding reads block F_{readout} (logit = ``sharpness`` for the token
    found there, 0 otherwise), so the model predicts the repeated token iff the chain
    readout <- sources[readout] <- ... <- -1 is intact, and gives logits 0 (loss log(vocab)) otherwise.
    """
    n_layers = len(sources)
    d_model = (n_layers + 1) * vocab
    bridge = make_bridge(
        perturb=False,
        d_model=d_model,
        d_head=vocab,
        n_heads=1,
        n_layers=n_layers,
        d_vocab=vocab,
        normalization_type=None,
        attn_only=True,
    )

    def block(s: int) -> slice:
        return slice((s + 1) * vocab, (s + 2) * vocab)

    eye = torch.eye(vocab)
    with torch.no_grad():
        for tensor in native_weights(bridge).values():
            tensor.zero_()
        w = native_weights(bridge)
        w["tok_embed.weight"][:, block(-1)] = eye
        for s, source in enumerate(sources):
            w[f"layers.{s}.attn.v.weight"][:, block(source)] = eye
            w[f"layers.{s}.attn.o.weight"][block(s), :] = eye
        w["head.weight"][:, block(readout)] = sharpness * eye
    return bridge


def constant_sequences(vocab: int = 16, pos: int = 8) -> torch.Tensor:
    """Row t is token t repeated."""
    return torch.arange(vocab)[:, None].repeat(1, pos)


def planted_cleanup_bridge(seed: int = 0):
    """Attention-only, normalization-free model in which L1H1 writes exactly minus L0H0's output.

    d_model = 64 in four blocks: P (dims 0-15) one-hot positional embedding, T (16-31) random token
    embedding, F (32-47) written only by L0H0 and its cleaners, G (48-63) written by every other head.
    L0H0 and L1H1 have the same query, key and value weights; their queries and keys read only P with
    a large gain, so both attend (up to exp(-100)) to the current position only, and their values read
    only P and T. Nothing writes to P or T, so L1H1 reads exactly the input L0H0 read and, with W_O
    negated, writes exactly -(L0H0 output): PR = -1 at every position. L1H2 is the same head with
    W_O scaled by -0.5 (PR = -0.5). All other heads write only to G (PR = 0 onto L0H0), layer 1's
    with a small gain, and every b_O is 0.
    """
    generator = torch.Generator().manual_seed(seed)
    bridge = make_bridge(
        perturb=False,
        d_model=64,
        d_head=16,
        n_heads=4,
        n_layers=2,
        normalization_type=None,
        attn_only=True,
        seed=seed,
    )
    P, T, F_, G = (slice(16 * i, 16 * (i + 1)) for i in range(4))

    def head(h: int) -> slice:
        return slice(16 * h, 16 * (h + 1))

    def rand(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / 4

    with torch.no_grad():
        w = native_weights(bridge)
        w["pos.weight"].zero_()
        w["pos.weight"][:, P] = torch.eye(16)
        w["tok_embed.weight"].zero_()
        w["tok_embed.weight"][:, T] = rand(w["tok_embed.weight"].shape[0], 16) * 4
        value, value_bias, w_o = torch.zeros(16, 64), rand(16), torch.zeros(64, 16)
        value[:, :32] = rand(16, 32)
        w_o[F_] = rand(16, 16)
        for layer in (0, 1):
            a = f"layers.{layer}.attn"
            w[f"{a}.o.weight"].zero_()
            w[f"{a}.o.bias"].zero_()
            for h in range(4):
                w[f"{a}.o.weight"][G, head(h)] = rand(16, 16) * (1.0 if layer == 0 else 0.1)
            copies = {0: 1.0} if layer == 0 else {1: -1.0, 2: -0.5}
            for h, gain in copies.items():
                for name in ("q", "k", "v"):
                    w[f"{a}.{name}.weight"][head(h)] = 0.0
                    w[f"{a}.{name}.bias"][head(h)] = 0.0
                w[f"{a}.q.weight"][head(h), P] = 400.0 * torch.eye(16)
                w[f"{a}.k.weight"][head(h), P] = torch.eye(16)
                w[f"{a}.v.weight"][head(h)] = value
                w[f"{a}.v.bias"][head(h)] = value_bias
                w[f"{a}.o.weight"][:, head(h)] = gain * w_o
    return bridge


def planted_vcomp_bridge(seed: int = 0):
    """:func:`planted_cleanup_bridge` with L1H1 cleaning by V-composition instead of recomputation: its
    value reads the F block (where only L0H0 has written by then) with W_V = I and writes it back with
    W_O = -I, still attending (up to exp(-100)) to the current position only. So L1H1 writes exactly
    -(L0H0 output) again (PR = -1), but now all of it through V-composition with L0H0: the V-composition
    part of its output is -(L0H0 output), and its DLA is minus L0H0's. L1H2 (PR = -0.5) still recomputes
    from the P and T blocks and has no V-composition with L0H0."""
    bridge = planted_cleanup_bridge(seed)
    F_ = slice(32, 48)
    head = slice(16, 32)  # head 1
    with torch.no_grad():
        w = native_weights(bridge)
        w["layers.1.attn.v.weight"][head] = 0.0
        w["layers.1.attn.v.weight"][head, F_] = torch.eye(16)
        w["layers.1.attn.v.bias"][head] = 0.0
        w["layers.1.attn.o.weight"][:, head] = 0.0
        w["layers.1.attn.o.weight"][F_, head] = -torch.eye(16)
    return bridge
