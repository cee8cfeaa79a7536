"""Tests of the effective-layer-horizon probe.

The probe (batched, hooked forwards over chunks of rows and k values) is checked against a float64 brute
force that runs the model sublayer by sublayer from its raw weights, one k at a time, building every
windowed input straight from the definition, in sublayer and in layer units, on sequential models and on
a GPT-NeoX / Pythia model with parallel blocks; on relay models whose horizon is known by construction;
and at several chunkings of rows and k values against the unchunked sweep.
"""

import math

import numpy as np
import pytest
import torch
from reference_models import (
    HF_VOCAB,
    VARIANTS,
    ParallelReference,
    Reference,
    constant_sequences,
    hf_bridge,
    make_bridge,
    next_token_loss,
    random_tokens,
    relay_bridge,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import Unsupported
from residual_dynamics.probes.layer_horizon import HorizonResult, default_ks, layer_horizon, plan, sublayers


OPTIONS = [
    dict(mode=mode, include_embedding=embedding, unembed_reads_window=unembed)
    for mode in ("clean", "same_pass")
    for embedding in (True, False)
    for unembed in (False, True)
]


def brute_force_loss(ref, tokens, k, clean_outputs, *, mode, include_embedding, unembed_reads_window, attention_mask,
                     unit="sublayer"):
    """Loss with horizon k, sublayer by sublayer in float64 (``clean_outputs``: of the unmodified model).

    Outputs are numbered o_0 = attn_0, o_1 = mlp_0, ... (attention-only: o_l = attn_l). A reader's window
    lists the outputs it reads, written out from the definition:
    * sublayer units: the k outputs before it, if it has at least k sublayers before it;
    * layer units: all outputs of layers n-k .. n-1 (plus attention n for the MLP of a sequential block
      n), if n >= k;
    and in a parallel block both sublayers read the window that ends where their block starts."""
    embedding = ref.embed(tokens)
    per_layer = 2 if ref.has_mlp else 1

    def window(outputs, indices):
        total = sum(outputs[j] for j in indices)
        return total if include_embedding else total + embedding

    def indices_of(layer, before):
        """The outputs in the window of a reader of block ``layer`` with outputs o_0 .. o_{before-1}
        before it, or None when it reads its usual input."""
        if unit == "sublayer":
            return list(range(before - k, before)) if before >= k else None
        if layer < k:
            return None
        of_layers = [j for n in range(layer - k, layer) for j in range(per_layer * n, per_layer * (n + 1))]
        return of_layers + list(range(per_layer * layer, before))  # + attention n for a sequential MLP

    resid, outputs = embedding, []
    block_input = resid
    for s in range(ref.n_sublayers):
        layer = s // per_layer
        if s % per_layer == 0:
            block_input = resid
        before = per_layer * layer if ref.parallel else s
        usual = block_input if ref.parallel else resid
        indices = indices_of(layer, before)
        read = usual if indices is None else window(clean_outputs if mode == "clean" else outputs, indices)
        outputs.append(ref.sublayer(s, read, attention_mask))
        resid = resid + outputs[-1]
    indices = indices_of(ref.cfg.n_layers, ref.n_sublayers)
    final = window(outputs, indices) if unembed_reads_window and indices is not None else resid
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


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "lnpre_attn_only"])
def test_layer_units_match_brute_force(variant):
    # n_layers = 3: k = 1, 2 window some readers, k = 3 only the final norm, k = 4 nothing.
    bridge = make_bridge(**VARIANTS[variant])
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
    clean_outputs = ref.forward(tokens, attention_mask)[1]
    for options in OPTIONS:
        result = layer_horizon(bridge, tokens, ks=(1, 2, 3, 4), unit="layer", attention_mask=attention_mask, **options)
        expected = torch.stack([brute_force_loss(ref, tokens, k, clean_outputs, attention_mask=attention_mask,
                                                 unit="layer", **options) for k in (1, 2, 3, 4)])
        torch.testing.assert_close(result.loss, expected, atol=2e-5, rtol=0, msg=str(options))
        if not options["unembed_reads_window"]:
            torch.testing.assert_close(result.loss_increase[2:], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_layer_units_are_twice_the_sublayers_for_attention_only_readers():
    # In layer units the attention of layer n reads 2k sublayer outputs, exactly the sublayer window of
    # size 2k; its MLP reads 2k + 1. On the relay chain (attention only) one layer is one sublayer.
    bridge = relay_bridge([-1, -1, -1, 0, 1, 2], readout=5)
    tokens = constant_sequences()
    by_layer = layer_horizon(bridge, tokens, ks=range(1, 7), unit="layer")
    by_sublayer = layer_horizon(bridge, tokens, ks=range(1, 7))
    torch.testing.assert_close(by_layer.loss, by_sublayer.loss, atol=1e-6, rtol=0)
    assert int(by_layer.k_eff) == 3


def parallel_model():
    model, bridge, state = hf_bridge("neox")
    return bridge, ParallelReference(model, state)


def test_parallel_reference_reproduces_the_bridge():
    bridge, ref = parallel_model()
    tokens, attention_mask = padded_tokens()
    with torch.no_grad():
        logits = bridge(tokens, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(logits.double()[real], ref.forward(tokens, attention_mask)[0][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("unit", ["sublayer", "layer"])
def test_parallel_blocks_match_brute_force(unit):
    # Pythia-shaped (GPT-NeoX, 2 parallel blocks): both sublayers of a block read the same window, and
    # the MLP of a block never reads its own block's attention.
    bridge, ref = parallel_model()
    tokens, attention_mask = padded_tokens()
    assert Arch.of(bridge).parallel
    ks = (1, 2, 3, 5) if unit == "sublayer" else (1, 2, 3)
    clean_outputs = ref.forward(tokens, attention_mask)[1]
    for options in OPTIONS:
        result = layer_horizon(bridge, tokens, ks=ks, unit=unit, attention_mask=attention_mask, **options)
        expected = torch.stack([brute_force_loss(ref, tokens, k, clean_outputs, attention_mask=attention_mask,
                                                 unit=unit, **options) for k in ks])
        torch.testing.assert_close(result.loss, expected, atol=2e-5, rtol=0, msg=f"{unit} {options}")
        if unit == "layer" and not options["include_embedding"] and not options["unembed_reads_window"]:
            # two blocks: the only window, embedding + layer 0 for block 1, is the whole stream
            assert result.loss_increase.abs().max() < 1e-6
        else:
            assert result.loss_increase.abs().max() > 1e-4  # the windows change the loss


def test_parallel_brute_force_differs_from_a_sequential_reading():
    # Guard of the brute force itself: letting the MLP of a parallel block read its own attention (a
    # sequential reading) gives other numbers, so the parallel test can tell the two conventions apart.
    bridge, ref = parallel_model()
    tokens, attention_mask = padded_tokens()
    clean_outputs = ref.forward(tokens, attention_mask)[1]
    options = dict(mode="clean", include_embedding=True, unembed_reads_window=False, attention_mask=attention_mask)
    parallel = brute_force_loss(ref, tokens, 1, clean_outputs, **options)
    ref.parallel = False
    sequential = brute_force_loss(ref, tokens, 1, clean_outputs, **options)
    assert abs(float(parallel - sequential)) > 1e-4
    result = layer_horizon(bridge, tokens, ks=(1,), attention_mask=attention_mask)
    assert float(result.loss[0]) == pytest.approx(float(parallel), abs=2e-5)


def test_gptj_shared_prenorm_identities():
    # GPT-J: one pre-norm feeds attention and MLP; replacing its input windows both. Horizons beyond the
    # depth change nothing, and a window of every sublayer plus the embedding is the full stream.
    _, bridge, _ = hf_bridge("gptj")
    arch = Arch.of(bridge)
    assert arch.parallel and not arch.has("ln2_in")
    tokens = random_tokens(2, 8, d_vocab=HF_VOCAB)
    for mode in ("clean", "same_pass"):
        for unit, top in (("sublayer", 4), ("layer", 2)):
            result = layer_horizon(bridge, tokens, ks=(1, top, top + 1), mode=mode, unit=unit,
                                   include_embedding=False, unembed_reads_window=True)
            assert result.loss_increase[1:].abs().max() < 1e-5
            assert result.loss_increase[0].abs() > 1e-4


CHUNK_OPTIONS = [OPTIONS[0], OPTIONS[3], OPTIONS[5], OPTIONS[6]]  # each mode and each switch both ways


@pytest.mark.parametrize("unit", ["sublayer", "layer"])
@pytest.mark.parametrize("options", CHUNK_OPTIONS, ids=[str(o) for o in CHUNK_OPTIONS])
def test_chunked_equals_unchunked(unit, options):
    # Rows and k values in chunks of every size (max_batch) and under budgets (max_memory) that force
    # small chunks: the same per-token losses, averaged once, so the same numbers (up to the float32
    # rounding of forwards over batches of other sizes: most chunkings agree bit for bit).
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    ks = (1, 2, 3, 5)
    whole = layer_horizon(bridge, tokens, ks=ks, unit=unit, attention_mask=attention_mask, max_batch=12, **options)
    assert (whole.plan.rows, whole.plan.copies) == (3, 4)
    seen = set()
    for chunking in (dict(max_batch=1), dict(max_batch=2), dict(max_batch=3), dict(max_batch=6),
                     dict(max_memory="120KB"), dict(max_memory="250KB")):
        split = layer_horizon(bridge, tokens, ks=ks, unit=unit, attention_mask=attention_mask, **chunking, **options)
        seen.add((split.plan.rows, split.plan.copies))
        torch.testing.assert_close(split.loss, whole.loss, atol=1e-6, rtol=0, msg=str(chunking))
        torch.testing.assert_close(split.loss_clean, whole.loss_clean, atol=1e-6, rtol=0)
    assert {(1, 1), (2, 1), (3, 1), (3, 2)} <= seen


def test_budget_sets_the_chunks_and_a_budget_too_small_is_a_note():
    bridge = make_bridge()
    tokens = random_tokens(3, 9)
    rows = [layer_horizon(bridge, tokens, ks=(1, 2), max_memory=budget).plan.rows
            for budget in ("60KB", "120KB", "10MB")]
    assert rows == sorted(rows) and rows[0] < rows[-1] == 3
    small = layer_horizon(bridge, tokens, ks=(1, 2), max_memory="1KB")
    assert isinstance(small, Unsupported) and "max_memory" in small.note and small.records() == []


GPT2_XL = Arch(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, d_head=64, d_mlp=6400, has_mlp=True,
               gated_mlp=False, parallel=False, norm="LN", positional="standard")


@pytest.mark.parametrize("budget_gb", [0.5, 1, 2, 8])
@pytest.mark.parametrize("mode", ["clean", "same_pass"])
def test_plan_at_gpt2_xl_scale_stays_within_the_budget(budget_gb, mode):
    # 32 x 128 tokens, K = 7 (1, 2, ..., 64 sublayers): the clean outputs alone are 2.5 GB, so the rows
    # are chunked; the accelerator plan takes as many k values per forward as fit, never all K when they
    # do not fit.
    budget = int(budget_gb * 1e9)
    for accelerator in (False, True):
        chosen, smallest = plan(GPT2_XL, batch=32, seq=128, d_vocab=50257, n_ks=7, max_span=64, mode=mode,
                                include_embedding=True, unembed_reads_window=False, budget=budget, max_batch=None,
                                accelerator=accelerator)
        assert chosen is not None and chosen.bytes <= budget and smallest <= chosen.bytes
        assert 1 <= chosen.rows <= 32 and 1 <= chosen.copies <= (7 if accelerator else 1)
        if mode == "clean" and budget_gb <= 2:
            assert chosen.rows < 32


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
    by_layer = layer_horizon(bridge, random_tokens(2, 8), unit="layer")
    assert by_layer.ks.tolist() == [1, 2] and by_layer.unit == "layer"  # default_ks(3 layers)
    assert [r.name for r in by_layer.records()] == [
        "horizon/layers/loss_clean",
        "horizon/layers/loss_increase/k01",
        "horizon/layers/loss_increase/k02",
        "horizon/layers/k_eff",
        "horizon/layers/decay_amplitude",
        "horizon/layers/decay_tau",
    ]
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
    with pytest.raises(ValueError, match="unit"):
        layer_horizon(bridge, tokens, unit="block")


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox"])
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
