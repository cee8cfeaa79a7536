"""The bridge built by to_transformer_lens computes exactly our model's function, for every variant."""

import itertools

import pytest
import torch

from residual_dynamics.training.convert import native_state_dict, to_transformer_lens
from residual_dynamics.training.model import ACT_FNS, NORM_TYPES, POS_EMBEDDINGS, ModelConfig, Transformer

VARIANTS = list(itertools.product(NORM_TYPES, ACT_FNS, POS_EMBEDDINGS, [False, True]))


def _perturbed_model(norm, act, pos, attn_only, tied=False):
    torch.manual_seed(hash((norm, act, pos, attn_only)) % 2**31)
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=50, act_fn=act,
        normalization_type=norm, positional_embedding=pos, attn_only=attn_only, tied_embeddings=tied,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # move gains off 1 and biases off 0 so a dropped or misplaced one shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.5 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("norm,act,pos,attn_only", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
def test_bridge_logits_match(norm, act, pos, attn_only):
    model = _perturbed_model(norm, act, pos, attn_only)
    bridge = to_transformer_lens(model)
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours, theirs = model(tokens), bridge(tokens)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_tied_embeddings_and_hooks():
    model = _perturbed_model("LN", "gelu", "learned", False, tied=True)
    assert model.unembed.weight is model.embed.weight
    bridge = to_transformer_lens(model)
    tokens = torch.randint(0, 50, (2, 16))
    seen = {}

    def hook(act, hook):  # hook.name is TL's canonical name (blocks.1.hook_out), so key by alias here
        seen["blocks.1.hook_resid_post"] = act.clone()

    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", hook)])
        # an independent forward up to the last residual stream, from our own modules
        x = model.embed(tokens) + model.pos_embed.weight[:16]
        for block in model.blocks:
            x = block(x)
    assert torch.allclose(seen["blocks.1.hook_resid_post"], x, atol=1e-5)
    assert torch.allclose(logits, model(tokens), atol=1e-5)


def test_bridge_is_a_copy():
    model = _perturbed_model("RMS", "silu", "rotary", False)
    bridge = to_transformer_lens(model)
    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        before = bridge(tokens).clone()
        model.blocks[0].attn.qkv.weight.add_(1.0)
        assert torch.equal(bridge(tokens), before)


def test_mapping_covers_every_parameter():
    model = _perturbed_model("LN", "solu_ln", "learned", False)
    mapped = native_state_dict(model)
    n_ours = sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in mapped.values()) == n_ours
    assert "layers.1.mlp.ln.weight" in mapped and "layers.0.attn.v.bias" in mapped


@pytest.mark.parametrize("kind", ["LN", "LNPre", "RMS", "RMSPre"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_match_the_float64_formulas(kind, dtype):
    """Norm (F.layer_norm / F.rms_norm) against the formulas written out in float64: LN centres and divides
    by sqrt(biased variance + eps), RMS divides by sqrt(mean square + eps); a gain (and LN's bias) after.
    Non-float32 inputs are normalised in float32 and cast back."""
    from residual_dynamics.training.model import Norm

    torch.manual_seed(0)
    d, eps = 48, 1e-5
    norm = Norm(kind, d, eps)
    with torch.no_grad():
        for param in norm.parameters():
            param.copy_(torch.randn_like(param))
    x = (3 * torch.randn(4, 7, d) + 1).to(dtype)
    out = norm(x)
    assert out.dtype == dtype and out.shape == x.shape

    x64 = x.double()
    if kind in ("LN", "LNPre"):
        x64 = x64 - x64.mean(-1, keepdim=True)
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + eps)
    if norm.weight is not None:
        expected = expected * norm.weight.double()
    if norm.bias is not None:
        expected = expected + norm.bias.double()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the cast back to 8 mantissa bits
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=tolerance, atol=tolerance)
