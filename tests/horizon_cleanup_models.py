"""Small models and an independent float64 reference for the layer-horizon and clean-up probe tests.

``Reference`` recomputes a TL-native model from its raw weights with explicit Python loops over heads
and query positions (no bridge code, no hooks). It is checked against the bridge's own logits in the
tests before it is used to check the probes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: these models are tiny, and on a shared 2-core box torch's thread pool
    spins far more than it computes (a 3-layer forward goes from ~10 ms to ~400 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
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

# (id, config overrides): every normalization family, plain / gated MLP, GQA and attention-only.
VARIANTS = [
    ("ln", {}),
    ("rms-gated-gqa", dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2)),
    ("no-norm", dict(normalization_type=None, seed=1)),
    ("lnpre-attn-only", dict(normalization_type="LNPre", attn_only=True, seed=2)),
    ("rmspre", dict(normalization_type="RMSPre", seed=3)),
]


def make_bridge(**overrides) -> TransformerBridge:
    return TransformerBridge.boot_native(TransformerBridgeConfig(**{**BASE, **overrides}))


def native_weights(bridge) -> dict[str, torch.Tensor]:
    """The native model's parameters by their plain names (``layers.0.attn.q.weight``, ...).

    The tensors share storage with the model, so in-place writes (under no_grad) edit it.
    """
    return {
        name.replace("_original_component.", ""): tensor
        for name, tensor in bridge.original_model.state_dict().items()
    }


def random_tokens(batch: int, pos: int, d_vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


class Reference:
    """Float64 forward of a TL-native model from its weights, one explicit step at a time."""

    def __init__(self, bridge):
        self.cfg = bridge.cfg
        self.w = {name: t.detach().double().clone() for name, t in native_weights(bridge).items()}
        self.norm = self.cfg.normalization_type
        self.has_mlp = not self.cfg.attn_only
        self.n_sublayers = self.cfg.n_layers * (2 if self.has_mlp else 1)

    # --- pieces -------------------------------------------------------------------------------
    def token_embedding(self, tokens):
        return self.w["tok_embed.weight"][tokens]

    def pos_embedding(self, tokens):
        return self.w["pos.weight"][torch.arange(tokens.shape[1])].expand(tokens.shape[0], -1, -1)

    def embed(self, tokens):
        return self.token_embedding(tokens) + self.pos_embedding(tokens)

    def scale(self, x):
        """The normalization denominator (1 for models without normalization)."""
        if self.norm is None:
            return torch.ones_like(x[..., :1])
        centered = x - x.mean(-1, keepdim=True) if self.norm in ("LN", "LNPre") else x
        return (centered.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()

    def normalize(self, x, prefix):
        if self.norm is None:
            return x
        centered = x - x.mean(-1, keepdim=True) if self.norm in ("LN", "LNPre") else x
        out = centered / self.scale(x)
        if self.norm in ("LN", "RMS"):
            out = out * self.w[f"{prefix}.weight"]
        if self.norm == "LN":
            out = out + self.w[f"{prefix}.bias"]
        return out

    def head_z(self, x, layer, attention_mask=None):
        """z [batch, pos, head, d_head] with an explicit loop over heads and query positions."""
        cfg, w = self.cfg, self.w
        a = f"layers.{layer}.attn"
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        batch, pos, _ = x.shape
        q = (x @ w[f"{a}.q.weight"].T + w[f"{a}.q.bias"]).view(batch, pos, cfg.n_heads, cfg.d_head)
        k = (x @ w[f"{a}.k.weight"].T + w[f"{a}.k.bias"]).view(batch, pos, n_kv, cfg.d_head)
        v = (x @ w[f"{a}.v.weight"].T + w[f"{a}.v.bias"]).view(batch, pos, n_kv, cfg.d_head)
        keep = torch.ones(batch, pos, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        z = torch.zeros(batch, pos, cfg.n_heads, cfg.d_head, dtype=torch.float64)
        for h in range(cfg.n_heads):
            kv = h // (cfg.n_heads // n_kv)
            for p in range(pos):
                scores = torch.einsum("bd,bjd->bj", q[:, p, h], k[:, : p + 1, kv]) / math.sqrt(cfg.d_head)
                scores = scores.masked_fill(~keep[:, : p + 1], -math.inf)
                pattern = scores.softmax(-1)
                z[:, p, h] = torch.einsum("bj,bjd->bd", pattern, v[:, : p + 1, kv])
        return z

    def w_o(self, layer, head):
        """[d_head, d_model] slice of the output projection for one head."""
        d = self.cfg.d_head
        return self.w[f"layers.{layer}.attn.o.weight"][:, head * d : (head + 1) * d].T

    def head_outputs(self, x, layer, attention_mask=None):
        """[head, batch, pos, d_model]: z_h W_O,h (no b_O), head by head and position by position."""
        z = self.head_z(x, layer, attention_mask)
        out = torch.zeros(self.cfg.n_heads, *x.shape, dtype=torch.float64)
        for h in range(self.cfg.n_heads):
            for p in range(x.shape[1]):
                out[h, :, p] = z[:, p, h] @ self.w_o(layer, h)
        return out

    def attn(self, x, layer, attention_mask=None):
        normed = self.normalize(x, f"layers.{layer}.ln1")
        return self.head_outputs(normed, layer, attention_mask).sum(0) + self.w[f"layers.{layer}.attn.o.bias"]

    def mlp(self, x, layer):
        w, m = self.w, f"layers.{layer}.mlp"
        normed = self.normalize(x, f"layers.{layer}.ln2")
        if self.cfg.gated_mlp:
            act = F.silu if self.cfg.act_fn == "silu" else F.gelu
            return (act(normed @ w[f"{m}.gate.weight"].T) * (normed @ w[f"{m}.in.weight"].T)) @ w[f"{m}.out.weight"].T
        hidden = F.gelu(normed @ w[f"{m}.fc_in.weight"].T + w[f"{m}.fc_in.bias"])
        return hidden @ w[f"{m}.fc_out.weight"].T + w[f"{m}.fc_out.bias"]

    def sublayer(self, s, x, attention_mask=None):
        """Sublayer s in forward order: attn_0, mlp_0, attn_1, ... (attn-only: attn_0, attn_1, ...)."""
        if not self.has_mlp:
            return self.attn(x, s, attention_mask)
        layer, is_mlp = divmod(s, 2)
        return self.mlp(x, layer) if is_mlp else self.attn(x, layer, attention_mask)

    def unembed_direction(self, t1, t2):
        return self.w["head.weight"][t1] - self.w["head.weight"][t2]

    def logits(self, final_resid):
        out = self.normalize(final_resid, "ln_out") @ self.w["head.weight"].T
        return out + self.w["head.bias"] if "head.bias" in self.w else out

    # --- whole passes -------------------------------------------------------------------------
    def forward(self, tokens, attention_mask=None):
        """(logits, sublayer outputs in order, residual stream before each sublayer and at the end)."""
        resid = self.embed(tokens)
        outputs, streams = [], [resid]
        for s in range(self.n_sublayers):
            outputs.append(self.sublayer(s, resid, attention_mask))
            resid = resid + outputs[-1]
            streams.append(resid)
        return self.logits(resid), outputs, streams


def next_token_loss(logits, tokens, attention_mask=None):
    """Mean -log p(token p+1) over p >= 1 with p and p+1 real, by an explicit loop over (b, p)."""
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    losses = []
    for b in range(tokens.shape[0]):
        for p in range(1, tokens.shape[1] - 1):
            if real[b, p] and real[b, p + 1]:
                losses.append(-logits[b, p].log_softmax(-1)[tokens[b, p + 1]])
    return torch.stack(losses).mean()


def offline_tokenizer():
    """A word-level tokenizer built in memory, so boot_transformers needs no Hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(BASE["d_vocab"])}, unk_token="t0"))
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


def hf_bridges() -> dict[str, TransformerBridge]:
    """Random tiny HF GPT-2 and Llama (GQA, RMSNorm, rotary) bridges."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=50,
            max_position_embeddings=16,
        )
    )
    # Models built from a config start in training mode (dropout on).
    gpt2.eval()
    llama.eval()
    return {
        "gpt2": TransformerBridge.boot_transformers("gpt2", hf_model=gpt2, tokenizer=offline_tokenizer()),
        "llama": TransformerBridge.boot_transformers(
            "meta-llama/Llama-3.2-1B", hf_model=llama, tokenizer=offline_tokenizer()
        ),
    }


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
        d_model=64, d_head=16, n_heads=4, n_layers=2, normalization_type=None, attn_only=True, seed=seed
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
