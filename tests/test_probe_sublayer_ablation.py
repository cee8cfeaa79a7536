"""Tests of the sublayer-ablation probe.

The probe (the batch repeated once per sublayer of a chunk, each copy hooked at its own sublayer) is
checked against a float64 brute force that runs the model sublayer by sublayer from its raw weights, one
ablated sublayer at a time, with the mean taken by an explicit loop over the real positions; on a relay
model in which exactly one sublayer matters (its answer computed by hand); and, for a Hugging Face GPT-2,
against the HF model itself with its attention / MLP module outputs zeroed by torch forward hooks.
"""

import math

import pytest
import torch
from reference_models import (
    VARIANTS,
    Reference,
    constant_sequences,
    hf_bridge,
    make_bridge,
    next_token_loss,
    random_tokens,
    real_positions,
    relay_bridge,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import ProbeUnsupported, Unsupported
from residual_dynamics.probes.sublayer_ablation import Options, plan_chunks, sublayer_ablation, unsupported


def padded_tokens():
    tokens = random_tokens(3, 9)
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, 6:] = 0
    attention_mask[2, 8:] = 0
    return tokens, attention_mask


def brute_force(ref, tokens, attention_mask, mode):
    """(clean loss, [loss with sublayer s ablated for every s]) in float64, sublayer by sublayer."""
    _, clean_outputs, _ = ref.forward(tokens, attention_mask)
    positions = real_positions(tokens, attention_mask)
    losses = []
    for s in range(ref.n_sublayers):
        mean = sum(clean_outputs[s][b, p] for b, p in positions) / len(positions)
        resid = ref.embed(tokens)
        for t in range(ref.n_sublayers):
            out = ref.sublayer(t, resid, attention_mask)
            if t == s:
                out = out.clone()
                for b, p in positions:
                    out[b, p] = mean if mode == "mean" else 0.0
            resid = resid + out
        losses.append(next_token_loss(ref.logits(resid), tokens, attention_mask))
    clean = next_token_loss(ref.forward(tokens, attention_mask)[0], tokens, attention_mask)
    return clean, torch.stack(losses)


@pytest.mark.parametrize("mode", ["mean", "zero"])
@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "lnpre_attn_only"])
def test_matches_float64_brute_force(variant, mode):
    bridge = make_bridge(**VARIANTS[variant])
    tokens, attention_mask = padded_tokens()
    clean, losses = brute_force(Reference(bridge), tokens, attention_mask, mode)
    result = sublayer_ablation(bridge, tokens, mode=mode, attention_mask=attention_mask)
    torch.testing.assert_close(result.loss_clean, clean, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.loss, losses, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.loss_increase, losses - clean, atol=4e-5, rtol=0)
    assert result.loss_increase.abs().max() > 1e-3  # the ablations change something


def test_chunking_gives_the_same_numbers():
    """All sublayers in one forward, two per forward, or one per forward: the same losses."""
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    one = sublayer_ablation(bridge, tokens, attention_mask=attention_mask, max_batch=3)
    for max_batch in (6, 100):
        other = sublayer_ablation(bridge, tokens, attention_mask=attention_mask, max_batch=max_batch)
        torch.testing.assert_close(other.loss, one.loss, atol=1e-5, rtol=0)


def test_memory_budget_sets_the_chunks_and_keeps_the_brute_force_numbers():
    """A budget that fits one copy and one decoded row at a time gives the float64 brute-force losses; a
    larger one more rows and copies; one too small for either is a note, not a crash."""
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    clean, losses = brute_force(Reference(bridge), tokens, attention_mask, "mean")
    arch = Arch.of(bridge)
    sizes = dict(batch=tokens.shape[0], seq=tokens.shape[1], d_vocab=bridge.cfg.d_vocab, copies=100)
    _, _, smallest = plan_chunks(arch, budget=10**9, **sizes)
    assert plan_chunks(arch, budget=smallest, **sizes)[:2] == (1, 1)
    assert plan_chunks(arch, budget=10**9, **sizes)[:2] == (100, tokens.shape[0])
    tight = sublayer_ablation(bridge, tokens, attention_mask=attention_mask, max_batch=300, max_memory=str(smallest))
    torch.testing.assert_close(tight.loss_clean, clean, atol=2e-5, rtol=0)
    torch.testing.assert_close(tight.loss, losses, atol=2e-5, rtol=0)
    small = sublayer_ablation(bridge, tokens, attention_mask=attention_mask, max_memory=str(smallest // 2))
    assert isinstance(small, Unsupported) and "smallest chunk" in small.note and small.records() == []


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_planted_relay_only_one_sublayer_matters(mode):
    """Relay model: sublayer 1 copies the token block into F_1, which the unembedding reads; sublayers 0
    and 2 write blocks nobody reads. Ablating 0 or 2 changes nothing; ablating 1 leaves logits of 0
    (zero) or sharpness/16 for every token (mean over the 16 constant sequences): uniform, loss log 16."""
    bridge = relay_bridge([-1, -1, 0], readout=1)
    tokens = constant_sequences()
    result = sublayer_ablation(bridge, tokens, mode=mode)
    clean = math.log(1 + 15 * math.exp(-12.0))  # -log softmax of logits (12, 0, ..., 0) at the token
    assert result.loss_clean.item() == pytest.approx(clean, abs=1e-6)
    assert result.kinds == ["attn", "attn", "attn"] and result.layers == [0, 1, 2]
    assert result.loss_increase[0].item() == pytest.approx(0.0, abs=1e-6)
    assert result.loss_increase[2].item() == pytest.approx(0.0, abs=1e-6)
    assert result.loss_increase[1].item() == pytest.approx(math.log(16) - clean, abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_huggingface_zero_ablation_matches_hf_module_hooks(kind):
    """Zeroing the HF attention / MLP module outputs at positions >= 1 (no padding here, so those are the
    real positions) with torch forward hooks gives the same losses; GPT-NeoX has parallel blocks, whose
    attention and MLP outputs are ablated one at a time all the same."""
    model, bridge, _ = hf_bridge(kind)
    tokens = random_tokens(3, 8, d_vocab=100, seed=1)
    result = sublayer_ablation(bridge, tokens, mode="zero")

    def hf_loss(module=None, sublayer=None):
        def zero_after_0(mod, args, output):
            first = (output[0] if sublayer == "attn" else output).clone()
            first[:, 1:] = 0.0
            return (first,) + tuple(output[1:]) if sublayer == "attn" else first

        handle = None if module is None else module.register_forward_hook(zero_after_0)
        try:
            with torch.no_grad():
                return next_token_loss(model(tokens).logits.double(), tokens)
        finally:
            if handle is not None:
                handle.remove()

    if kind == "gpt2":
        modules = [(block.attn, "attn", block.mlp) for block in model.transformer.h]
    else:
        modules = [(block.attention, "attn", block.mlp) for block in model.gpt_neox.layers]
    expected = []
    for attn, _, mlp in modules:
        expected += [hf_loss(attn, "attn"), hf_loss(mlp, "mlp")]
    torch.testing.assert_close(result.loss, torch.stack(expected), atol=2e-5, rtol=0)
    torch.testing.assert_close(result.loss_clean, hf_loss(), atol=2e-5, rtol=0)
    assert (result.loss_increase.abs() > 1e-3).all()


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_chosen_layers_give_the_rows_of_the_full_sweep(mode):
    # Ablating only the sublayers of some layers gives exactly their rows of the full sweep (the same
    # clean run, the same means), and only their records.
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    full = sublayer_ablation(bridge, tokens, mode=mode, attention_mask=attention_mask)
    some = sublayer_ablation(bridge, tokens, mode=mode, attention_mask=attention_mask, layers=[2, 0])
    assert (some.kinds, some.layers) == (["attn", "mlp", "attn", "mlp"], [0, 0, 2, 2])
    rows = [i for i, layer in enumerate(full.layers) if layer in (0, 2)]
    torch.testing.assert_close(some.loss, full.loss[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(some.loss_clean, full.loss_clean, atol=1e-6, rtol=0)
    assert {r.layer for r in some.records()} == {None, 0, 2}


def test_records_name_the_mode_and_the_sublayer():
    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    rows = sublayer_ablation(bridge, tokens, mode="zero").records()
    keys = {(r.name, r.layer) for r in rows}
    assert keys == {("ablation/loss_clean", None)} | {(f"ablation/zero/{k}", l) for k in ("attn", "mlp") for l in range(3)}
    attn_only = make_bridge(attn_only=True)
    names = {r.name for r in sublayer_ablation(attn_only, tokens).records()}
    assert names == {"ablation/loss_clean", "ablation/mean/attn"}


def test_options_are_checked():
    from residual_dynamics.errors import ConfigError

    arch = Arch.of(make_bridge())
    Options().check(arch)
    with pytest.raises(ConfigError, match="mode"):
        Options(mode="resample").check(arch)
    with pytest.raises(ConfigError, match="max_batch"):
        Options(max_batch=0).check(arch)
    Options(layers=[0, 2]).check(arch)
    for layers, message in (([], "non-empty"), ([1, 1], "repeat"), ([3], "0..2"), ([-1], "0..2"), ([0.5], "integer")):
        with pytest.raises(ConfigError, match="layers") as error:
            Options(layers=layers).check(arch)
        assert message in str(error.value)
    with pytest.raises(ConfigError, match="layers"):  # also when called directly
        sublayer_ablation(make_bridge(), random_tokens(2, 6), layers=[5])
    with pytest.raises(ValueError, match="mode"):
        sublayer_ablation(make_bridge(), random_tokens(2, 6), mode="resample")


def test_unsupported_without_the_hooks():
    arch = Arch.of(make_bridge())
    assert unsupported(arch) is None
    bare = Arch(n_layers=2, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_mlp=None, has_mlp=False,
                gated_mlp=False, parallel=False, norm=None, positional="standard", hook_kinds=frozenset())
    assert "hook points" in unsupported(bare)
    with pytest.raises(ProbeUnsupported):
        sublayer_ablation(make_bridge(), random_tokens(2, 6), arch=bare)
