"""residual_norms against a float64 brute force, planted growth rates, and position-0 / padding exclusion."""

import math

import numpy as np
import pytest
import torch

from reference_models import VARIANTS, Reference, hf_bridge, make_bridge, native_weights, planted_growth_bridge
from reference_models import random_tokens, real_positions, right_padding_mask
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.residual_norms import residual_norms


def l2(vector: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in vector.tolist()))


def lstsq_log_fit(norms: list[float]) -> tuple[float, float]:
    """Slope of log(norm) against layer index and its classical standard error, via numpy lstsq."""
    x = np.arange(len(norms), dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    y = np.log(np.asarray(norms, dtype=np.float64))
    beta, residuals, _, _ = np.linalg.lstsq(design, y, rcond=None)
    sigma2 = float(residuals[0]) / (len(norms) - 2)
    covariance = sigma2 * np.linalg.inv(design.T @ design)
    return float(beta[1]), math.sqrt(covariance[1, 1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_brute_force(variant):
    bridge = make_bridge(n_layers=4, **VARIANTS[variant])
    tokens = random_tokens(3, 8)
    mask = right_padding_mask([8, 5, 7], 8)

    result = residual_norms(bridge, tokens, attention_mask=mask, prompt_index=1)
    acts = Reference(bridge).activations(tokens, mask)
    positions = real_positions(tokens, mask)

    assert set(result.norms) == set(acts) - {"mlp_pre"}
    assert result.n_positions == len(positions)
    for kind, per_layer in result.norms.items():
        expected = [sum(l2(acts[kind][layer][b][p]) for b, p in positions) / len(positions) for layer in range(4)]
        torch.testing.assert_close(per_layer, torch.tensor(expected, dtype=torch.float32), rtol=2e-5, atol=1e-6)

    post = [sum(l2(acts["resid_post"][layer][b][p]) for b, p in positions) / len(positions) for layer in range(4)]
    embed = sum(l2(acts["resid_pre"][0][b][p]) for b, p in positions) / len(positions)
    expected_ratio = [post[0] / embed] + [post[layer] / post[layer - 1] for layer in range(1, 4)]
    torch.testing.assert_close(result.ratio, torch.tensor(expected_ratio, dtype=torch.float32), rtol=2e-5, atol=0)

    slope, slope_se = lstsq_log_fit(post)
    assert result.log_slope.item() == pytest.approx(slope, rel=1e-4, abs=1e-6)
    assert result.log_slope_se.item() == pytest.approx(slope_se, rel=1e-3, abs=1e-6)
    assert result.growth_rate.item() == pytest.approx(math.exp(slope), rel=1e-5)
    assert result.two_point.item() == pytest.approx((post[3] / post[0]) ** (1 / 3), rel=1e-5)

    # Per-position norms of prompt 1: every position, BOS and padding included.
    expected_positions = [[l2(acts["resid_post"][layer][1][p]) for p in range(8)] for layer in range(4)]
    torch.testing.assert_close(
        result.position_norms, torch.tensor(expected_positions, dtype=torch.float32), rtol=2e-5, atol=1e-6
    )


def test_planted_constant_growth_rate_is_recovered_exactly():
    r = 1.5
    bridge = planted_growth_bridge([r] * 5)
    result = residual_norms(bridge, random_tokens(2, 6, seed=3))

    torch.testing.assert_close(result.ratio, torch.full((5,), r), rtol=1e-6, atol=0)
    assert result.growth_rate.item() == pytest.approx(r, rel=1e-6)
    assert result.log_slope.item() == pytest.approx(math.log(r), rel=1e-6)
    assert result.log_slope_se.item() == pytest.approx(0.0, abs=1e-6)
    assert result.two_point.item() == pytest.approx(r, rel=1e-6)
    # The construction itself: attention writes nothing, the MLP writes (r - 1) times its input.
    assert result.norms["attn_out"].abs().max().item() == 0.0
    torch.testing.assert_close(result.norms["mlp_out"], (r - 1) * result.norms["resid_mid"], rtol=1e-6, atol=0)
    torch.testing.assert_close(result.norms["resid_post"], r * result.norms["resid_pre"], rtol=1e-6, atol=0)


def test_planted_two_phase_growth_respects_fit_and_two_point_ranges():
    # Blocks 0-1 double the stream, blocks 2-5 grow it by 1.25 each.
    bridge = planted_growth_bridge([2.0, 2.0, 1.25, 1.25, 1.25, 1.25])
    tokens = random_tokens(2, 6, seed=4)

    late = residual_norms(bridge, tokens, fit_layers=(2, 5))
    assert late.growth_rate.item() == pytest.approx(1.25, rel=1e-6)
    assert late.two_point.item() == pytest.approx(1.25, rel=1e-6)  # defaults to the fit range ends
    assert late.log_slope_se.item() == pytest.approx(0.0, abs=1e-6)
    assert (late.fit_layers, late.two_point_layers) == ((2, 5), (2, 5))

    early_two_point = residual_norms(bridge, tokens, fit_layers=(2, 5), two_point=(0, 1))
    assert early_two_point.two_point.item() == pytest.approx(2.0, rel=1e-6)
    assert early_two_point.growth_rate.item() == pytest.approx(1.25, rel=1e-6)

    # Over all layers the fit mixes the phases: in between, and no longer a perfect line.
    everything = residual_norms(bridge, tokens)
    assert 1.25 < everything.growth_rate.item() < 2.0
    assert everything.log_slope_se.item() > 0.01
    # resid_post[0] -> resid_post[5] passes blocks 1..5: one doubling and four factors of 1.25.
    assert everything.two_point.item() == pytest.approx((2 * 1.25**4) ** (1 / 5), rel=1e-6)


def test_position_zero_and_padding_do_not_enter_the_statistics():
    """In the planted model positions never interact, so a huge token at position 0 and in the padding
    must leave every mean untouched, while the per-position norms still show it."""
    bridge = planted_growth_bridge([1.5, 1.25, 2.0])
    huge = 0
    with torch.no_grad():
        native_weights(bridge)["tok_embed.weight"][huge].fill_(1e4)
    tokens = 1 + random_tokens(2, 7, seed=5) % 40  # never the huge token
    mask = right_padding_mask([7, 4], 7)
    poisoned = tokens.clone()
    poisoned[:, 0] = huge
    poisoned[1, 4:] = huge

    clean = residual_norms(bridge, tokens, attention_mask=mask, prompt_index=1)
    dirty = residual_norms(bridge, poisoned, attention_mask=mask, prompt_index=1)

    for kind in clean.norms:
        torch.testing.assert_close(dirty.norms[kind], clean.norms[kind], rtol=1e-6, atol=0)
    torch.testing.assert_close(dirty.ratio, clean.ratio, rtol=1e-6, atol=0)
    assert dirty.growth_rate.item() == pytest.approx(clean.growth_rate.item(), rel=1e-6)
    assert dirty.n_positions == clean.n_positions == 6 + 3
    # The per-position view keeps position 0 and the padding.
    assert (dirty.position_norms[:, 0] > 1e4).all() and (dirty.position_norms[:, 4:] > 1e4).all()
    assert (dirty.position_norms[:, 1:4] < 1e3).all()


def test_records_have_stable_names():
    bridge = make_bridge(n_layers=3)
    records = residual_norms(bridge, random_tokens(2, 5)).records()
    names = {(r.name, r.layer) for r in records}
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "ratio"):
        assert {(f"resid_norm/{kind}", layer) for layer in range(3)} <= names
    scalars = {r.name for r in records if r.layer is None}
    assert scalars == {"growth_rate", "growth_rate/log_slope", "growth_rate/log_slope_se", "growth_rate/two_point"}
    assert len(records) == 6 * 3 + 4 and all(r.head is None for r in records)

    attn_only = residual_norms(make_bridge(n_layers=3, attn_only=True), random_tokens(2, 5)).records()
    assert not any(r.name in ("resid_norm/resid_mid", "resid_norm/mlp_out") for r in attn_only)


def test_one_layer_model_has_no_growth_fit():
    result = residual_norms(planted_growth_bridge([1.5]), random_tokens(2, 5))
    assert result.ratio.item() == pytest.approx(1.5, rel=1e-6)
    assert result.fit_layers is None and result.two_point_layers is None
    assert math.isnan(result.growth_rate.item()) and math.isnan(result.two_point.item())
    with pytest.raises(ValueError):
        residual_norms(planted_growth_bridge([1.5]), random_tokens(2, 5), fit_layers=(0, 1))


def test_bad_arguments_raise():
    bridge = make_bridge(n_layers=3)
    tokens = random_tokens(2, 5)
    for kwargs in ({"fit_layers": (1, 1)}, {"fit_layers": (0, 3)}, {"two_point": (2, 1)}, {"prompt_index": 2}):
        with pytest.raises(ValueError):
            residual_norms(bridge, tokens, **kwargs)
    with pytest.raises(ValueError):  # nothing left after dropping position 0
        residual_norms(bridge, tokens[:, :1])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_huggingface_bridge_matches_hidden_states(kind):
    """On boot_transformers bridges the resid_pre / resid_post means equal HF's own hidden states."""
    model, bridge, _ = hf_bridge(kind)
    tokens = random_tokens(2, 7, d_vocab=100, seed=6)
    mask = right_padding_mask([7, 5], 7)
    result = residual_norms(bridge, tokens, attention_mask=mask)
    with torch.no_grad():
        hidden = model(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    positions = real_positions(tokens, mask)

    def mean_norm(states: torch.Tensor) -> float:
        return sum(l2(states[b, p].double()) for b, p in positions) / len(positions)

    n_layers = bridge.cfg.n_layers
    expected_pre = torch.tensor([mean_norm(hidden[layer]) for layer in range(n_layers)])
    torch.testing.assert_close(result.norms["resid_pre"], expected_pre, rtol=1e-5, atol=0)
    # The last hidden state has the final norm applied, so resid_post is checked up to the last-but-one layer.
    torch.testing.assert_close(
        result.norms["resid_post"][:-1],
        torch.tensor([mean_norm(hidden[layer + 1]) for layer in range(n_layers - 1)]),
        rtol=1e-5,
        atol=0,
    )


# --- the mean-centred stream (centered=True) -------------------------------------------------------------


def centred_l2(vector: torch.Tensor) -> float:
    values = vector.tolist()
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values))


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "ln_attn_only"])
def test_centered_norms_match_float64_brute_force(variant):
    bridge = make_bridge(n_layers=4, **VARIANTS[variant])
    tokens = random_tokens(3, 8)
    mask = right_padding_mask([8, 5, 7], 8)
    result = residual_norms(bridge, tokens, attention_mask=mask, centered=True)
    acts = Reference(bridge).activations(tokens, mask)
    positions = real_positions(tokens, mask)
    centred = result.centered
    assert set(centred.norms) == set(result.norms)
    for kind, per_layer in centred.norms.items():
        expected = [sum(centred_l2(acts[kind][layer][b][p]) for b, p in positions) / len(positions)
                    for layer in range(4)]
        torch.testing.assert_close(per_layer, torch.tensor(expected, dtype=torch.float32), rtol=2e-5, atol=1e-6)
    post = [sum(centred_l2(acts["resid_post"][layer][b][p]) for b, p in positions) / len(positions)
            for layer in range(4)]
    slope, slope_se = lstsq_log_fit(post)
    assert centred.log_slope.item() == pytest.approx(slope, rel=1e-4, abs=1e-6)
    assert centred.log_slope_se.item() == pytest.approx(slope_se, rel=1e-3, abs=1e-6)
    assert centred.growth_rate.item() == pytest.approx(math.exp(slope), rel=1e-5)
    assert centred.two_point.item() == pytest.approx((post[3] / post[0]) ** (1 / 3), rel=1e-5)
    # the raw numbers are unchanged by the option, and differ from the centred ones
    raw = residual_norms(bridge, tokens, attention_mask=mask)
    assert raw.centered is None
    torch.testing.assert_close(result.norms["resid_post"], raw.norms["resid_post"])
    assert not torch.allclose(centred.norms["resid_post"], raw.norms["resid_post"], rtol=1e-3)


@pytest.mark.parametrize("variant", ["ln_gelu", "lnpre_mqa"])
def test_centered_norms_are_the_norms_of_transformer_lens_centred_model(variant):
    """TransformerLens' processing (center_writing_weights) makes the stream itself mean-centred: the raw
    norms of the processed model equal the centred norms of the unprocessed one."""
    tokens = random_tokens(3, 8)
    mask = right_padding_mask([8, 5, 7], 8)
    raw = make_bridge(**VARIANTS[variant])
    processed = make_bridge(**VARIANTS[variant])
    processed.process_weights(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    centred = residual_norms(raw, tokens, attention_mask=mask, centered=True).centered
    of_processed = residual_norms(processed, tokens, attention_mask=mask)
    for kind, per_layer in of_processed.norms.items():
        torch.testing.assert_close(centred.norms[kind], per_layer, rtol=1e-4, atol=1e-5, msg=kind)


def test_centered_records_use_their_own_keys():
    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    raw_names = {r.name for r in residual_norms(bridge, tokens).records()}
    names = {r.name for r in residual_norms(bridge, tokens, centered=True).records()}
    assert not any("centered" in name for name in raw_names)
    assert names - raw_names == {f"resid_norm_centered/{k}" for k in ("resid_pre", "resid_mid", "resid_post",
                                                                      "attn_out", "mlp_out")} | {
        "growth_rate_centered", "growth_rate_centered/log_slope", "growth_rate_centered/log_slope_se",
        "growth_rate_centered/two_point"}
