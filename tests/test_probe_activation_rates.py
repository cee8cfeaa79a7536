"""activation_rates against a float64 brute force, planted rates, masking, and attention-only models."""

import math

import pytest
import torch

from reference_models import VARIANTS, Reference, hf_bridge, make_bridge, native_weights, planted_growth_bridge
from reference_models import random_tokens, real_positions, right_padding_mask
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.activation_rates import Options, activation_rates, normalized_gaussian_inputs
from residual_dynamics.probes.activation_rates import unsupported as activation_rates_unsupported
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import ProbeUnsupported, Unsupported
from residual_dynamics.probes.registry import run_probes


def positive_fraction(vectors) -> float:
    """Fraction of entries > 0 over a list of vectors, by explicit loops."""
    positive = total = 0
    for vector in vectors:
        for value in vector.tolist():
            positive += value > 0
            total += 1
    return positive / total


def l2(vector: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in vector.tolist()))


@pytest.mark.parametrize("variant", [name for name, config in VARIANTS.items() if not config.get("attn_only")])
def test_matches_float64_brute_force(variant):
    bridge = make_bridge(**VARIANTS[variant])
    tokens = random_tokens(3, 8, seed=1)
    mask = right_padding_mask([8, 6, 3], 8)
    n_random = 48

    result = activation_rates(bridge, tokens, attention_mask=mask, n_random=n_random, seed=7)

    ref = Reference(bridge)
    acts = ref.activations(tokens, mask)
    positions = real_positions(tokens, mask)
    inputs = normalized_gaussian_inputs(n_random, bridge.cfg.d_model, seed=7).double()
    d_mlp = bridge.cfg.d_mlp
    for layer in range(bridge.cfg.n_layers):
        token_rate = positive_fraction(acts["mlp_pre"][layer][b][p] for b, p in positions)
        # float32 vs float64 may flip the sign of a pre-activation within rounding of zero: allow one entry.
        assert result.token_rate[layer].item() == pytest.approx(token_rate, abs=1.01 / (len(positions) * d_mlp))
        pre_out = [ref.mlp(x, layer) for x in inputs]
        assert result.random_rate[layer].item() == pytest.approx(
            positive_fraction(pre for pre, _ in pre_out), abs=1.01 / (n_random * d_mlp)
        )
        mean_out_norm = sum(l2(out) for _, out in pre_out) / n_random
        assert result.random_out_norm[layer].item() == pytest.approx(mean_out_norm, rel=1e-5)
    assert result.gated == VARIANTS[variant].get("gated_mlp", False)
    assert (result.n_positions, result.n_random) == (len(positions), n_random)


def test_normalized_gaussian_inputs():
    x = normalized_gaussian_inputs(100, 24, seed=3)
    assert x.shape == (100, 24) and x.dtype == torch.float32
    for row in x.double():
        values = row.tolist()
        mean = sum(values) / 24
        assert mean == pytest.approx(0.0, abs=1e-6)
        assert sum((v - mean) ** 2 for v in values) / 24 == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(normalized_gaussian_inputs(100, 24, seed=3), x, rtol=0, atol=0)
    assert not torch.equal(normalized_gaussian_inputs(100, 24, seed=4), x)
    state = torch.random.get_rng_state()
    normalized_gaussian_inputs(5, 24, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_planted_rates_and_output_norms():
    """In the planted model hook_pre = [x; -x] (exactly half of the entries are > 0 for any input without
    zeros) and the MLP (no norm in front) maps x to (r - 1) x, so a normalized input of norm sqrt(d_model)
    comes out with norm (r - 1) sqrt(d_model)."""
    factors = [1.5, 2.0, 3.0]
    bridge = planted_growth_bridge(factors, d_model=16)
    result = activation_rates(bridge, random_tokens(2, 6, seed=2), n_random=32)
    torch.testing.assert_close(result.token_rate, torch.full((3,), 0.5), rtol=0, atol=0)
    torch.testing.assert_close(result.random_rate, torch.full((3,), 0.5), rtol=0, atol=0)
    expected_norms = torch.tensor([(r - 1) * math.sqrt(16) for r in factors])
    torch.testing.assert_close(result.random_out_norm, expected_norms, rtol=1e-6, atol=0)


def test_position_zero_and_padding_are_excluded():
    """Planted: positions never interact and hook_pre = [x; x], so the rate is the fraction of positive
    residual entries. A token whose embedding is all +1e4 (rate 1) at position 0 and in the padding must not
    move the token rate."""
    bridge = planted_growth_bridge([1.5, 1.25], d_model=16)
    identity = torch.eye(16)
    params = native_weights(bridge)
    with torch.no_grad():
        for layer in range(2):
            params[f"layers.{layer}.mlp.fc_in.weight"].copy_(torch.cat([identity, identity], dim=0))
        params["tok_embed.weight"][0].fill_(1e4)
    tokens = 1 + random_tokens(2, 7, seed=5) % 40
    mask = right_padding_mask([7, 3], 7)
    poisoned = tokens.clone()
    poisoned[:, 0] = 0
    poisoned[1, 3:] = 0

    clean = activation_rates(bridge, tokens, attention_mask=mask, n_random=8)
    dirty = activation_rates(bridge, poisoned, attention_mask=mask, n_random=8)
    torch.testing.assert_close(dirty.token_rate, clean.token_rate, rtol=0, atol=0)
    assert clean.token_rate.max().item() < 0.9  # the poisoned positions alone would read 1.0
    assert dirty.n_positions == 6 + 2


def test_attention_only_model_is_unsupported_with_a_note():
    """No MLP, no activation rates: called directly the probe refuses (ProbeUnsupported), and run_probes
    gives an Unsupported result with the same reason and no records, without running the probe."""
    bridge = make_bridge(attn_only=True)
    arch = Arch.of(bridge)
    reason = activation_rates_unsupported(arch)
    assert reason is not None and "attention-only" in reason
    with pytest.raises(ProbeUnsupported, match="attention-only"):
        activation_rates(bridge, random_tokens(2, 5))
    result = run_probes(bridge, random_tokens(2, 5), {"activation_rates": Options()})["activation_rates"]
    assert isinstance(result, Unsupported) and result.note == reason and result.records() == []
    assert activation_rates_unsupported(Arch.of(make_bridge())) is None


def test_n_random_below_one_is_refused():
    """n_random=0 used to make every random-input metric null: the option check and the probe refuse it."""
    arch = Arch.of(make_bridge())
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="n_random"):
            Options(n_random=bad).check(arch)
        with pytest.raises(ValueError, match="n_random"):
            activation_rates(make_bridge(), random_tokens(2, 5), n_random=bad)
    with pytest.raises(ConfigError, match="n_random: must be an integer"):
        Options(n_random="abc").check(arch)
    with pytest.raises(ConfigError, match="seed"):
        Options(seed=1.5).check(arch)
    Options(n_random=1).check(arch)


def test_record_names_say_gate_for_gated_mlps():
    tokens = random_tokens(2, 5)
    plain = {(r.name, r.layer) for r in activation_rates(make_bridge(), tokens, n_random=8).records()}
    gated = {(r.name, r.layer) for r in activation_rates(make_bridge(gated_mlp=True), tokens, n_random=8).records()}
    names = ("{}/tokens", "{}/random")
    assert plain == {(n.format("mlp_act_rate"), l) for n in names for l in range(3)} | {
        ("mlp_out_norm/random", l) for l in range(3)
    }
    assert gated == {(n.format("mlp_gate_rate"), l) for n in names for l in range(3)} | {
        ("mlp_out_norm/random", l) for l in range(3)
    }


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_huggingface_random_inputs(kind):
    """Random-input rates and output norms on boot_transformers bridges, by hand from the HF weights."""
    model, bridge, state = hf_bridge(kind)
    n_random = 32
    result = activation_rates(bridge, random_tokens(2, 6, d_vocab=100), n_random=n_random, seed=1)
    inputs = normalized_gaussian_inputs(n_random, 32, seed=1).double()
    for layer in range(2):
        pres, outs = [], []
        for x in inputs:
            if kind == "gpt2":
                p = f"transformer.h.{layer}"
                centred = x - x.mean()
                normed = centred / math.sqrt(float((centred**2).mean()) + model.config.layer_norm_epsilon)
                normed = normed * state[f"{p}.ln_2.weight"] + state[f"{p}.ln_2.bias"]
                pre = normed @ state[f"{p}.mlp.c_fc.weight"] + state[f"{p}.mlp.c_fc.bias"]  # Conv1D: x @ W + b
                out = _gelu_new(pre) @ state[f"{p}.mlp.c_proj.weight"] + state[f"{p}.mlp.c_proj.bias"]
            else:
                p = f"model.layers.{layer}"
                normed = x / math.sqrt(float((x**2).mean()) + model.config.rms_norm_eps)
                normed = normed * state[f"{p}.post_attention_layernorm.weight"]
                pre = state[f"{p}.mlp.gate_proj.weight"] @ normed
                hidden = pre / (1 + torch.exp(-pre)) * (state[f"{p}.mlp.up_proj.weight"] @ normed)
                out = state[f"{p}.mlp.down_proj.weight"] @ hidden
            pres.append(pre)
            outs.append(out)
        rate = positive_fraction(pres)
        assert result.random_rate[layer].item() == pytest.approx(rate, abs=1.01 / (n_random * len(pres[0])))
        assert result.random_out_norm[layer].item() == pytest.approx(sum(l2(o) for o in outs) / n_random, rel=1e-5)
    assert result.gated == (kind == "llama")
