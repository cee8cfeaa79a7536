"""Tests of the effective-layer-horizon probe.

The probe (one batched, hooked forward for all k) is checked against a float64 brute force that runs
the model sublayer by sublayer from its raw weights, one k at a time, building every windowed input
straight from the definition; and on relay models whose horizon is known by construction.
"""

import math

import numpy as np
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
    relay_bridge,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.layer_horizon import HorizonResult, default_ks, layer_horizon, sublayers


OPTIONS = [
    dict(mode=mode, include_embedding=embedding, unembed_reads_window=unembed)
    for mode in ("clean", "same_pass")
    for embedding in (True, False)
    for unembed in (False, True)
]


def brute_force_loss(ref, tokens, k, clean_outputs, *, mode, include_embedding, unembed_reads_window, attention_mask):
    """Loss with horizon k, sublayer by sublayer in float64 (``clean_outputs``: of the unmodified model)."""
    embedding = ref.embed(tokens)

    def window(outputs, n_before):
        total = sum(outputs[j] for j in range(n_before - k, n_before))
        return total if include_embedding else total + embedding

    resid, outputs = embedding, []
    for s in range(ref.n_sublayers):
        if s >= k:
            read = window(clean_outputs if mode == "clean" else outputs, s)
        else:
            read = resid
        outputs.append(ref.sublayer(s, read, attention_mask))
        resid = resid + outputs[-1]
    final = window(outputs, ref.n_sublayers) if unembed_reads_window and ref.n_sublayers >= k else resid
    return next_token_loss(ref.logits(final), tokens, attention_mask)


def padded_tokens():
    tokens = random_tokens(3, 9)
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, 6:] = 0
    attention_mask[2, 8:] = 0
    return tokens, attention_mask


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_reference_reproduces_the_bridge(variant):
    bridge = make_bridge(**variant)
    tokens, attention_mask = padded_tokens()
    with torch.no_grad():
        logits = bridge(tokens, attention_mask=attention_mask)
    expected = Reference(bridge).forward(tokens, attention_mask)[0]
    real = attention_mask.bool()
    torch.testing.assert_close(logits.double()[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_matches_brute_force(variant):
    bridge = make_bridge(**variant)
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
    n = ref.n_sublayers
    ks = (1, 2, n - 1, n + 1)
    clean_logits, clean_outputs, _ = ref.forward(tokens, attention_mask)
    clean = next_token_loss(clean_logits, tokens, attention_mask)
    for options in OPTIONS:
        result = layer_horizon(bridge, tokens, ks=ks, attention_mask=attention_mask, **options)
        expected = torch.stack(
            [
                brute_force_loss(ref, tokens, k, clean_outputs, attention_mask=attention_mask, **options)
                for k in result.ks
            ]
        )
        torch.testing.assert_close(result.loss, expected, atol=2e-5, rtol=0, msg=str(options))
        torch.testing.assert_close(result.loss_clean, clean, atol=2e-5, rtol=0)
        torch.testing.assert_close(result.loss_increase, result.loss - result.loss_clean)


@pytest.mark.parametrize("mode", ["clean", "same_pass"])
@pytest.mark.parametrize("include_embedding", [True, False])
def test_planted_relay_chain_has_horizon_three(mode, include_embedding):
    # Sublayer s copies the output of sublayer s - 3 (the embedding for s < 3); the unembedding reads
    # sublayer 5, so the chain embedding -> 2 -> 5 survives exactly when k >= 3.
    bridge = relay_bridge([-1, -1, -1, 0, 1, 2], readout=5)
    tokens = constant_sequences()
    result = layer_horizon(bridge, tokens, ks=range(1, 8), mode=mode, include_embedding=include_embedding)
    assert result.loss_clean < 1e-3
    broken = torch.full((2,), math.log(16), dtype=torch.float64) - result.loss_clean  # logits all 0
    torch.testing.assert_close(result.loss_increase[:2], broken, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.loss_increase[2:], torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)
    assert int(result.k_eff) == 3


def test_planted_compounding_separates_the_modes():
    # Sublayer 1 copies the embedding, sublayer 2 copies sublayer 1, the unembedding reads sublayer 2.
    # With k = 1, sublayer 1 reads only sublayer 0's output and writes nothing. In the clean mode
    # sublayer 2 still reads the CLEAN output of sublayer 1 (horizon 1); in the same pass it reads the
    # broken one (horizon 2).
    bridge = relay_bridge([-1, -1, 1], readout=2)
    tokens = constant_sequences()
    clean = layer_horizon(bridge, tokens, ks=(1, 2, 3), mode="clean")
    same_pass = layer_horizon(bridge, tokens, ks=(1, 2, 3), mode="same_pass")
    assert int(clean.k_eff) == 1 and clean.loss_increase.abs().max() < 1e-5
    assert int(same_pass.k_eff) == 2
    assert same_pass.loss_increase[0] > 2.7 and same_pass.loss_increase[1:].abs().max() < 1e-5


@pytest.mark.parametrize(
    ("unembed_reads_window", "include_embedding", "k_eff"),
    [(False, True, 1), (True, True, 4), (True, False, 1)],
)
def test_planted_readout_of_the_embedding(unembed_reads_window, include_embedding, k_eff):
    # The unembedding reads only the embedding block. It is lost only when the unembedding reads a
    # window (3 sublayers before it, so k <= 3) that leaves the embedding out (include_embedding=True).
    bridge = relay_bridge([-1, -1, -1], readout=-1)
    result = layer_horizon(
        bridge,
        constant_sequences(),
        ks=(1, 2, 3, 4),
        unembed_reads_window=unembed_reads_window,
        include_embedding=include_embedding,
    )
    assert int(result.k_eff) == k_eff
    changed = result.loss_increase > 1.0
    assert changed.tolist() == [k < k_eff for k in (1, 2, 3, 4)]


def test_no_k_within_tolerance_gives_minus_one_and_a_nan_fit():
    bridge = relay_bridge([-1, -1, -1, 0, 1, 2], readout=5)
    result = layer_horizon(bridge, constant_sequences(), ks=(1, 2))
    assert int(result.k_eff) == -1
    # Two positive increases of the same size: a flat fit.
    assert math.isinf(float(result.decay_tau))
    result = layer_horizon(bridge, constant_sequences(), ks=(1, 3))
    assert math.isnan(float(result.decay_tau)) and math.isnan(float(result.decay_amplitude))


def test_decay_fit_is_least_squares_on_log_increase():
    bridge = make_bridge(n_layers=4, seed=5)
    tokens = random_tokens(4, 12, seed=5)
    result = layer_horizon(bridge, tokens, ks=range(1, 9), mode="same_pass")
    positive = result.loss_increase > 0
    assert positive.sum() >= 2
    slope, intercept = np.polyfit(result.ks[positive].numpy(), np.log(result.loss_increase[positive].numpy()), 1)
    assert float(result.decay_tau) == pytest.approx(-1 / slope, rel=1e-6)
    assert float(result.decay_amplitude) == pytest.approx(math.exp(intercept), rel=1e-6)


def test_one_clean_pass_and_batched_windowed_passes(monkeypatch):
    bridge = make_bridge()
    tokens = random_tokens(2, 8)
    batches = []
    original = bridge.run_with_hooks

    def counting(inputs, *args, **kwargs):
        batches.append(inputs.shape[0])
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(bridge, "run_with_hooks", counting)
    for mode in ("clean", "same_pass"):
        batches.clear()
        ks = (1, 2, 3, 4, 5)
        whole = layer_horizon(bridge, tokens, ks=ks, mode=mode, unembed_reads_window=True, max_batch=10)
        assert batches == [2, 10]
        for max_batch, expected in [(5, [2, 4, 4, 2]), (None, [2, 2, 2, 2, 2, 2])]:  # None: one copy on CPU
            batches.clear()
            split = layer_horizon(bridge, tokens, ks=ks, mode=mode, unembed_reads_window=True, max_batch=max_batch)
            assert batches == expected
            torch.testing.assert_close(split.loss, whole.loss, atol=1e-6, rtol=0)


def test_records_and_defaults():
    bridge = make_bridge()
    assert len(sublayers(bridge)) == 6 and default_ks(6) == (1, 2, 4)
    assert len(sublayers(make_bridge(attn_only=True))) == 3
    result = layer_horizon(bridge, random_tokens(2, 8), ks=(4, 1, 2, 2))
    assert isinstance(result, HorizonResult) and result.ks.tolist() == [1, 2, 4]
    names = [r.name for r in result.records()]
    assert names == [
        "horizon/loss_clean",
        "horizon/loss_increase/k01",
        "horizon/loss_increase/k02",
        "horizon/loss_increase/k04",
        "horizon/k_eff",
        "horizon/decay_amplitude",
        "horizon/decay_tau",
    ]
    assert all(r.layer is None and r.head is None for r in result.records())


def test_rejects_bad_arguments():
    bridge = make_bridge()
    tokens = random_tokens(2, 8)
    with pytest.raises(ValueError, match="mode"):
        layer_horizon(bridge, tokens, mode="patched")
    with pytest.raises(ValueError, match="positive"):
        layer_horizon(bridge, tokens, ks=(0, 1))
    with pytest.raises(ValueError, match="length"):
        layer_horizon(bridge, tokens[:, :2])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_bridges(name):
    # No float64 reference for HF modules; check the identities every model must satisfy: a horizon
    # beyond the depth changes nothing, and with include_embedding=False a window of all n sublayers
    # plus the embedding is the full residual stream.
    _, bridge, _ = hf_bridge(name)
    n = len(sublayers(bridge))
    tokens = random_tokens(2, 8)
    for mode in ("clean", "same_pass"):
        result = layer_horizon(
            bridge, tokens, ks=(1, n, n + 1), mode=mode, include_embedding=False, unembed_reads_window=True
        )
        assert result.loss_increase[1:].abs().max() < 1e-5
        assert result.loss_increase[0].abs() > 1e-4
