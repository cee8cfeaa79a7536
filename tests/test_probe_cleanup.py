"""Tests of the clean-up probe.

The probe's tables are checked against a float64 brute force: node outputs from the reference model
(heads head by head and position by position from z and W_O), projection ratios as explicit dot
products position by position, percentiles from numpy, the scan re-derived with plain Python, and the
V-composition part of the cleaners' DLA summed key position by key position from the reference's
attention patterns; on every sequential variant and on a GPT-NeoX / Pythia model with parallel blocks.
Planted models check that an exact negative copy of a writer is found as its cleaner with PR = -1, with
a V-composition part of 0 (it recomputes the writer) or of all of it (it reads the writer). Every
chunking of writers and rows, cached or not, gives the unchunked numbers.
"""

import math

import numpy as np
from pathlib import Path

import pytest
import torch
from reference_models import (
    HF_VOCAB,
    VARIANTS,
    ParallelReference,
    Reference,
    hf_bridge,
    make_bridge,
    native_weights,
    planted_cleanup_bridge,
    planted_vcomp_bridge,
    random_tokens,
    real_positions,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.cleanup import CleanupPlan, CleanupResult, cleanup, cleanup_with_plan, plan
from residual_dynamics.probes.common import Unsupported


THRESHOLD, WRITER_MIN, TOP_N = 0.5, 0.6, 3  # loose enough that random models have cleaned writers


def padded_tokens(d_vocab=50):
    tokens = random_tokens(3, 9, d_vocab=d_vocab, seed=1)
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, 7:] = 0
    return tokens, attention_mask


def brute_force(ref, tokens, attention_mask):
    """Node outputs {name: (write index, [batch, pos, d_model])}, residual points, logits. Sequential
    blocks write in sublayer order; both sublayers of parallel block l write at time l, and its residual
    points are resid_pre_0 and each resid_post (``streams``)."""
    logits, outputs, streams = ref.forward(tokens, attention_mask)
    nodes = {"EMBED": (-1, ref.token_embedding(tokens))}
    if ref.has_pos:
        nodes["POS"] = (-1, ref.pos_embedding(tokens))
    per_layer = 2 if ref.has_mlp else 1
    for layer in range(ref.cfg.n_layers):
        s = per_layer * layer
        read = ref.sublayer_input(streams, s)
        heads = ref.head_outputs(ref.normalize(read, f"layers.{layer}.ln1"), layer, attention_mask)
        for h in range(ref.cfg.n_heads):
            nodes[f"L{layer}H{h}"] = (layer if ref.parallel else s, heads[h])
        if ref.has_mlp:
            nodes[f"L{layer}MLP"] = (layer if ref.parallel else s + 1, outputs[s + 1])
    return logits, nodes, streams


def vcomp_dla(ref, writer, cleaners, tokens, attention_mask, streams, logits, positions):
    """DLA at each position of ``positions`` of the V-composition part of the head cleaners of
    ``writer``: sum over cleaners c = L{l}H{h} and key positions i <= p of
    A_c(p, i) * ln1_l(b_w(i)) W_V,c W_O,c, with ln1_l frozen at its scale (as a linear map), written out."""
    b_w = writer
    per_layer = 2 if ref.has_mlp else 1
    patterns, scales = {}, {}
    for name in cleaners:
        if not name.endswith("MLP"):
            layer = int(name[1:].split("H")[0])
            read = ref.sublayer_input(streams, per_layer * layer)
            if layer not in patterns:
                patterns[layer] = ref.head_patterns(ref.normalize(read, f"layers.{layer}.ln1"), layer, attention_mask)
                scales[layer] = ref.scale(read)
    values = []
    for b, p in positions:
        total = torch.zeros(ref.cfg.d_model, dtype=torch.float64)
        for name in cleaners:
            if name.endswith("MLP"):
                continue  # no V-composition
            layer, head = (int(part) for part in name[1:].split("H"))
            pattern, scale = patterns[layer], scales[layer]
            for i in range(p + 1):
                normed = ref.norm_linear(b_w[b, i], f"layers.{layer}.ln1", scale[b, i, 0])
                total += pattern[b, head, p, i] * (normed @ ref.w_v(layer, head) @ ref.w_o(layer, head))
        values.append(dla_of(ref, total, streams[-1], logits, b, p))
    return values


def dla_of(ref, component, final, logits, b, p):
    """DLA of one component vector at (b, p), written out: g * C(c) / s . (W_U[:, t1] - W_U[:, t2])."""
    t1, t2 = logits[b, p].topk(2).indices.tolist()
    c = component
    if ref.norm in ("LN", "LNPre"):
        c = c - c.mean()
    if ref.norm in ("LN", "RMS"):
        c = c * ref.w["ln_out.weight"]
    return float(torch.dot(c / ref.scale(final)[b, p, 0], ref.unembed_direction(t1, t2)))


def percentiles(values):
    return np.nanpercentile(np.array(values, dtype=np.float64), [25, 50, 75])


def pr(a, b):
    return float(torch.dot(a, b) / torch.dot(b, b))


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_matches_brute_force(variant):
    bridge = make_bridge(**variant)
    check_against_brute_force(bridge, Reference(bridge), *padded_tokens())


def test_parallel_blocks_match_brute_force():
    # Pythia-shaped (GPT-NeoX, parallel blocks, rotary: no POS node): the MLP of a block writes at the
    # same time as its heads (it is not later, so never their cleaner), and the residual points are
    # resid_pre_0, resid_post_0, resid_post_1.
    model, bridge, state = hf_bridge("neox")
    tokens, attention_mask = padded_tokens(HF_VOCAB)
    result = check_against_brute_force(bridge, ParallelReference(model, state), tokens, attention_mask)
    assert result.point_names == ["resid_pre_0", "resid_post_0", "resid_post_1"]
    assert [node.sublayer for node in result.nodes if node.layer == 1] == [1] * 5
    assert (result.dla_vcomp.nan_to_num().abs().amax((1, 2)) > 1e-4).sum() >= 3  # V-composition exercised


def check_against_brute_force(bridge, ref, tokens, attention_mask) -> CleanupResult:
    result = cleanup(
        bridge, tokens, attention_mask=attention_mask, threshold=THRESHOLD, writer_min=WRITER_MIN, top_n=TOP_N
    )
    logits, nodes, streams = brute_force(ref, tokens, attention_mask)
    positions = real_positions(tokens, attention_mask)
    names = [node.name for node in result.nodes]
    assert names == list(nodes) and len(result.point_names) == len(streams)

    # Projection ratios, position by position.
    node_pr = {w: {n: [pr(nodes[n][1][b, p], nodes[w][1][b, p]) for b, p in positions] for n in names} for w in names}
    resid_pr = {w: [[pr(stream[b, p], nodes[w][1][b, p]) for b, p in positions] for stream in streams] for w in names}
    for w, writer in enumerate(names):
        expected = np.array([percentiles(values) for values in resid_pr[writer]])
        np.testing.assert_allclose(result.resid_pr[w].numpy(), expected, rtol=1e-4, atol=1e-5)
        # Nodes written at or after the writer (its own sublayer included); NaN for the earlier ones,
        # which cannot clean it up.
        expected = np.array([percentiles(node_pr[writer][n]) if nodes[n][0] >= nodes[writer][0] else [np.nan] * 3
                             for n in names])
        np.testing.assert_allclose(result.node_pr[w].numpy(), expected, rtol=1e-4, atol=1e-5)

    # DLA of every node at every kept position; NaN elsewhere.
    final = streams[-1]
    dla = {n: [dla_of(ref, nodes[n][1][b, p], final, logits, b, p) for b, p in positions] for n in names}
    for i, n in enumerate(names):
        np.testing.assert_allclose([float(result.dla[i, b, p]) for b, p in positions], dla[n], rtol=1e-4, atol=1e-5)
    assert result.dla[:, :, 0].isnan().all() and result.dla[:, 0, 7:].isnan().all()

    # The scan, re-derived from the brute-force medians.
    sublayer = {n: nodes[n][0] for n in names}
    for w, writer in enumerate(names):
        trace = [float(np.median(values)) for values in resid_pr[writer]][sublayer[writer] + 1 :]
        peak_at = int(np.argmax(trace))
        after = trace[peak_at + 1 :]
        assert float(result.peak_pr[w]) == pytest.approx(trace[peak_at], rel=1e-4, abs=1e-5)
        score = trace[peak_at] - min(after) if after else 0.0
        assert float(result.writer_score[w]) == pytest.approx(score, rel=1e-4, abs=1e-5)
        cleaned = trace[peak_at] >= WRITER_MIN and any(value < THRESHOLD for value in after)
        assert bool(result.cleaned[w]) == cleaned

        medians = {n: float(np.median(node_pr[writer][n])) for n in names}
        later_negative = [n for n in names if sublayer[n] > sublayer[writer] and medians[n] < 0]
        cleaners = sorted(later_negative, key=medians.get)[:TOP_N]
        assert result.cleaner_names(writer) == cleaners
        if cleaners:
            summed = [sum(node_pr[writer][c][i] for c in cleaners) for i in range(len(positions))]
            np.testing.assert_allclose(result.cleaner_pr_sum[w].numpy(), percentiles(summed), rtol=1e-4, atol=1e-5)
            summed_dla = [sum(dla[c][i] for c in cleaners) for i in range(len(positions))]
            r = np.corrcoef(dla[writer], summed_dla)[0, 1]
            assert float(result.dla_corr[w]) == pytest.approx(r, abs=1e-4)
        else:
            assert result.cleaner_pr_sum[w].isnan().all() and math.isnan(float(result.dla_corr[w]))
        # The V-composition part of the head cleaners' DLA, and its correlation with the writer's DLA.
        expected = vcomp_dla(ref, nodes[writer][1], cleaners, tokens, attention_mask, streams, logits, positions)
        got = [float(result.dla_vcomp[w, b, p]) for b, p in positions]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        if any(not c.endswith("MLP") for c in cleaners) and np.std(expected) > 1e-6:
            r = np.corrcoef(dla[writer], expected)[0, 1]
            assert float(result.dla_corr_vcomp[w]) == pytest.approx(r, abs=1e-4)
        else:
            assert math.isnan(float(result.dla_corr_vcomp[w]))
    assert result.dla_vcomp[:, :, 0].isnan().all()
    scores = result.writer_score[result.ranking]
    assert result.cleaned[result.ranking].all() and len(result.ranking) == int(result.cleaned.sum())
    assert (scores[:-1] >= scores[1:]).all()
    return result


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_dla_of_all_nodes_and_biases_is_the_logit_difference(variant):
    # With the final norm frozen at its scale, logits are linear in the residual stream, which is the
    # sum of all node outputs and the attention biases b_O (MLP outputs include their bias).
    bridge = make_bridge(**variant)
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
    result = cleanup(bridge, tokens, attention_mask=attention_mask)
    logits, _, streams = ref.forward(tokens, attention_mask)
    b_o = sum(ref.w[f"layers.{layer}.attn.o.bias"] for layer in range(ref.cfg.n_layers))
    for b, p in real_positions(tokens, attention_mask):
        t1, t2 = logits[b, p].topk(2).indices.tolist()
        constant = dla_of(ref, b_o, streams[-1], logits, b, p)
        if ref.norm == "LN":
            constant += float(torch.dot(ref.w["ln_out.bias"], ref.unembed_direction(t1, t2)))
        constant += float(ref.w["head.bias"][t1] - ref.w["head.bias"][t2])
        total = float(result.dla[:, b, p].double().sum()) + constant
        assert total == pytest.approx(float(logits[b, p, t1] - logits[b, p, t2]), abs=1e-4)


def test_planted_negative_copy_is_the_top_cleaner():
    bridge = planted_cleanup_bridge()
    result = cleanup(bridge, random_tokens(3, 10))
    w = result.writer_index("L0H0")
    assert result.point_names == ["resid_pre_0", "resid_post_0", "resid_post_1"]
    # Before L0H0 writes, nothing of it; after, all of it; after layer 1, 1 - 1 - 0.5 of it.
    expected = torch.tensor([0.0, 1.0, -0.5])[:, None].expand(3, 3)
    torch.testing.assert_close(result.resid_pr[w], expected, atol=1e-5, rtol=0)
    assert result.cleaner_names("L0H0") == ["L1H1", "L1H2"]
    torch.testing.assert_close(result.cleaner_pr[w, :2], torch.tensor([-1.0, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.cleaner_pr_sum[w], torch.full((3,), -1.5), atol=1e-5, rtol=0)
    assert bool(result.cleaned[w]) and result.point_names[int(result.cleaned_at[w])] == "resid_post_1"
    assert float(result.writer_score[w]) == pytest.approx(1.5, abs=1e-5)
    assert int(result.writers[result.ranking[0]]) == [n.name for n in result.nodes].index("L0H0")
    # The cleaners' summed DLA is exactly -1.5 times the writer's.
    assert float(result.dla_corr[w]) == pytest.approx(-1.0, abs=1e-6)
    names = [n.name for n in result.nodes]
    writer_dla = result.dla[names.index("L0H0")]
    cleaners_dla = result.dla[names.index("L1H1")] + result.dla[names.index("L1H2")]
    torch.testing.assert_close(cleaners_dla, -1.5 * writer_dla, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_planted_recomputing_cleaner_has_no_v_composition():
    # L1H1 and L1H2 recompute L0H0's output from the embeddings (their values never read L0H0's block):
    # the total DLA of the cleaners is -1.5 x the writer's, the V-composition part exactly 0.
    result = cleanup(planted_cleanup_bridge(), random_tokens(3, 10))
    w = result.writer_index("L0H0")
    kept = ~result.dla_vcomp[w].isnan()
    assert kept.sum() == 3 * 9 and (result.dla_vcomp[w][kept] == 0).all()
    assert math.isnan(float(result.dla_corr_vcomp[w])) and float(result.dla_corr[w]) == pytest.approx(-1.0, abs=1e-6)


def test_planted_v_composing_cleaner_cancels_the_writer_dla():
    # L1H1 reads L0H0's output through W_V = I and writes it back through W_O = -I: its whole output is
    # V-composition with L0H0, so the V-composition DLA is exactly minus the writer's (r = -1, slope -1),
    # while the total DLA of both cleaners is -1.5 x the writer's (L1H2 recomputes).
    result = cleanup(planted_vcomp_bridge(), random_tokens(3, 10))
    w = result.writer_index("L0H0")
    assert result.cleaner_names("L0H0") == ["L1H1", "L1H2"]
    torch.testing.assert_close(result.cleaner_pr[w, :2], torch.tensor([-1.0, -0.5]), atol=1e-5, rtol=0)
    names = [n.name for n in result.nodes]
    writer_dla = result.dla[names.index("L0H0")]
    torch.testing.assert_close(result.dla_vcomp[w], -writer_dla, atol=1e-5, rtol=1e-5, equal_nan=True)
    total = result.dla[names.index("L1H1")] + result.dla[names.index("L1H2")]
    torch.testing.assert_close(total, -1.5 * writer_dla, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert float(result.dla_corr_vcomp[w]) == pytest.approx(-1.0, abs=1e-6)
    rows = {(r.name, r.layer, r.head): r.value for r in result.records()}
    assert rows[("cleanup/dla_corr_vcomp", 0, 0)] == pytest.approx(-1.0, abs=1e-6)
    assert rows[("cleanup/dla_corr", 0, 0)] == pytest.approx(-1.0, abs=1e-6)


FIELDS = ("resid_pr", "node_pr", "dla", "peak_pr", "writer_score", "cleaned", "cleaned_at", "ranking", "cleaners",
          "cleaner_pr", "cleaner_pr_sum", "dla_corr", "dla_vcomp", "dla_corr_vcomp")


def assert_same_result(got: CleanupResult, want: CleanupResult, msg: str = "") -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if a.dtype in (torch.bool, torch.int64):
            assert torch.equal(a, b), f"{msg} {name}"
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True, msg=f"{msg} {name}")


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "lnpre_attn_only"])
def test_chunked_equals_unchunked(variant):
    # Every chunking -- one writer or several per pass, one row or several per forward, one position or
    # several per block of products, activations recorded once (with or without the patterns, in memory
    # or spilled with the tables) or recomputed per pass -- gives the numbers of one chunk of everything.
    bridge = make_bridge(**VARIANTS[variant])
    tokens, attention_mask = padded_tokens()
    options = dict(threshold=THRESHOLD, writer_min=WRITER_MIN, top_n=TOP_N, attention_mask=attention_mask)
    n_writers = len(cleanup(bridge, tokens, writers=["EMBED"], **options).nodes)
    whole = cleanup_with_plan(bridge, tokens, CleanupPlan(n_writers, 3, cache=True, cache_patterns=True), **options)
    assert (whole.cleaners >= 0).any() and (whole.dla_vcomp.nan_to_num() != 0).any()
    plans = [CleanupPlan(writers, rows, cache, patterns, spill=spill, positions=positions)
             for writers, rows, positions in ((1, 1, 1), (2, 2, 3), (5, 3, 7), (n_writers - 1, 1, 64))
             for cache, patterns, spill in ((True, True, False), (True, False, False), (False, False, False),
                                            (True, True, True))]
    for chunking in plans:
        assert_same_result(cleanup_with_plan(bridge, tokens, chunking, **options), whole, str(chunking))


def test_spilled_activations_go_to_a_private_directory_that_is_removed(tmp_path, monkeypatch):
    """A spilled plan writes one file per chunk of rows into its own directory below spill_dir, reads them
    back memory-mapped, and leaves nothing behind; the budget decides when it spills."""
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    options = dict(threshold=THRESHOLD, writer_min=WRITER_MIN, top_n=TOP_N, attention_mask=attention_mask)
    whole = cleanup(bridge, tokens, **options)
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (saved.append(Path(path)), real_save(obj, path, *a, **k))[1])
    spilled = cleanup_with_plan(bridge, tokens, CleanupPlan(2, 1, cache=True, cache_patterns=True, spill=True),
                                spill_dir=str(tmp_path), **options)
    assert_same_result(spilled, whole, "spilled")
    assert len(saved) == tokens.shape[0] and all(p.parent.parent == tmp_path for p in saved)
    assert list(tmp_path.iterdir()) == []  # removed when the probe ended
    # a budget below the in-memory cache: with spill the plan records once; without, it reruns forwards
    for budget in ("200KB", "180KB"):
        spill_on = cleanup(bridge, tokens, max_memory=budget, spill_dir=str(tmp_path), **options)
        spill_off = cleanup(bridge, tokens, max_memory=budget, spill=False, **options)
        assert spill_on.plan.spill and spill_on.plan.forwards == 1 and spill_on.plan.spill_bytes > 0
        assert not spill_off.plan.spill and spill_off.plan.forwards > 1
        assert_same_result(spill_on, whole, budget)
    unspilled = cleanup(bridge, tokens, spill_dir=str(tmp_path), **options)
    assert not unspilled.plan.spill  # what fits the budget stays in memory


def test_spill_needs_the_space():
    arch = SHAPES["gpt2-xl"]
    n_nodes = 1 + int(arch.has_pos_embed) + arch.n_layers * (arch.n_heads + 1)
    kwargs = dict(batch=32, seq=128, n_kept=32 * 127, d_vocab=50257, budget=int(2e9))
    spilled, _ = plan(arch, spill_space=10**12, **kwargs)
    assert spilled.spill and spilled.forwards == 1 and spilled.passes == 1 and spilled.bytes <= 0.85 * 2e9
    # every head's z, MLP outputs, residual points and patterns (7.6 GB), and the tables: the residual
    # points and the nodes each writer sees at 32 x 127 positions (15 GB)
    assert 20e9 < spilled.spill_bytes < 25e9
    short, _ = plan(arch, spill_space=spilled.spill_bytes - 1, **kwargs)
    assert not short.spill and short.forwards > 2


def test_budget_sets_the_plan_and_a_budget_too_small_is_a_note():
    bridge = make_bridge()
    tokens, attention_mask = padded_tokens()
    whole = cleanup(bridge, tokens, attention_mask=attention_mask)
    assert whole.plan.cache and whole.plan.cache_patterns and whole.plan.forwards == 1
    seen = set()
    for budget in ("1200KB", "260KB", "220KB", "200KB"):
        result = cleanup(bridge, tokens, attention_mask=attention_mask, max_memory=budget, spill=False)
        assert result.plan.bytes <= int(budget[:-2]) * 1000
        seen.add((result.plan.cache, result.plan.passes > 1))
        assert_same_result(result, whole, budget)
    assert len(seen) == 4  # the smaller budgets chose other chunkings (several passes, no cache)
    small = cleanup(bridge, tokens, attention_mask=attention_mask, max_memory="150KB")
    assert isinstance(small, Unsupported) and "smallest chunk" in small.note and small.records() == []


SHAPES = {  # GPT-2 small and XL, Pythia-1b (parallel, rotary)
    "gpt2": Arch(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_head=64, d_mlp=3072, has_mlp=True,
                 gated_mlp=False, parallel=False, norm="LN", positional="standard"),
    "gpt2-xl": Arch(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, d_head=64, d_mlp=6400, has_mlp=True,
                    gated_mlp=False, parallel=False, norm="LN", positional="standard"),
    "pythia-1b": Arch(n_layers=16, d_model=2048, n_heads=8, n_kv_heads=8, d_head=256, d_mlp=8192, has_mlp=True,
                      gated_mlp=False, parallel=True, norm="LN", positional="rotary"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("budget_gb", [1, 2, 8])
def test_plan_at_real_scale_stays_within_the_budget(shape, budget_gb):
    # 32 x 128 tokens, every node a writer (GPT-2 XL: 1250 nodes, tables of 22 MB per writer, so 2 GB
    # hold about 60 writers per chunk; 0.5 GB hold not even one row's activations and one writer).
    arch = SHAPES[shape]
    n_nodes = 1 + int(arch.has_pos_embed) + arch.n_layers * (arch.n_heads + 1)
    budget = int(budget_gb * 1e9)
    chosen, smallest = plan(arch, batch=32, seq=128, n_kept=32 * 127, d_vocab=50257, budget=budget)
    assert chosen is not None and chosen.bytes <= 0.85 * budget  # 15% left for what the estimate leaves out
    assert 1 <= chosen.writers <= n_nodes and 1 <= chosen.rows <= 32
    if not chosen.cache:
        assert chosen.forwards == chosen.passes + 1
    if shape == "gpt2" and budget_gb >= 2:
        assert chosen.cache and chosen.forwards <= 2
    assert plan(arch, batch=32, seq=128, n_kept=32 * 127, d_vocab=50257,
                budget=smallest - 1)[0] is None
    if shape == "gpt2-xl":
        assert plan(arch, batch=32, seq=128, n_kept=32 * 127, d_vocab=50257,
                    budget=int(0.5e9))[0] is None


def test_restricted_writers_give_the_same_rows():
    bridge = make_bridge()
    tokens = random_tokens(2, 8)
    full = cleanup(bridge, tokens, top_n=4)
    some = cleanup(bridge, tokens, writers=["L1MLP", "L0H2"], top_n=4)
    assert [some.nodes[i].name for i in some.writers] == ["L1MLP", "L0H2"]
    rows = [full.writer_index("L1MLP"), full.writer_index("L0H2")]
    for field in ("resid_pr", "node_pr", "writer_score", "cleaner_pr", "cleaner_pr_sum", "dla_corr", "cleaners",
                  "dla_vcomp", "dla_corr_vcomp"):
        torch.testing.assert_close(getattr(some, field), getattr(full, field)[rows], equal_nan=True, msg=field)
    torch.testing.assert_close(some.dla, full.dla, equal_nan=True)


def test_records():
    result = cleanup(planted_cleanup_bridge(), random_tokens(3, 10), writers=["EMBED", "POS", "L0H0"])
    assert isinstance(result, CleanupResult)
    rows = {(r.name, r.layer, r.head): r.value for r in result.records()}
    assert rows[("cleanup/n_cleaned", None, None)] == float(result.cleaned.sum())
    assert ("cleanup/writer_score/embed", None, None) in rows and ("cleanup/writer_score/pos", None, None) in rows
    assert rows[("cleanup/writer_score", 0, 0)] == pytest.approx(1.5, abs=1e-5)
    assert rows[("cleanup/top_cleaner_pr", 0, 0)] == pytest.approx(-1.0, abs=1e-5)
    assert rows[("cleanup/cleaner_pr_sum", 0, 0)] == pytest.approx(-1.5, abs=1e-5)
    assert rows[("cleanup/dla_corr", 0, 0)] == pytest.approx(-1.0, abs=1e-6)
    mlp_rows = [r for r in cleanup(make_bridge(), random_tokens(2, 8), writers=["L1MLP"]).records()]
    assert [(r.name, r.layer, r.head) for r in mlp_rows][1] == ("cleanup/writer_score/mlp", 1, None)


def test_rejects_unknown_writers():
    with pytest.raises(ValueError, match="L9H9"):
        cleanup(make_bridge(), random_tokens(2, 8), writers=["L9H9"])
    with pytest.raises(ValueError, match="POS"):
        cleanup(make_bridge(positional_embedding_type="rotary"), random_tokens(2, 8), writers=["POS"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox", "gptj"])
def test_hf_bridges_dla_identity(name):
    # The final-norm gain, centering and scale are read from the HF module's own parameters here.
    _, bridge, _ = hf_bridge(name)
    w = native_weights(bridge)
    config = bridge.original_model.config
    tokens = random_tokens(2, 8)
    result = cleanup(bridge, tokens)
    names = [n.name for n in result.nodes]
    assert ("POS" in names) == (name == "gpt2") and names[-1] == "L1MLP"
    stored = {}
    with torch.no_grad():
        hooks = [("ln_final.hook_in", lambda x, hook: stored.update(final=x))]
        logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    if name in ("gpt2", "gptj"):  # GPT-J's attention has no output bias
        gain, shift, eps = w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], config.layer_norm_epsilon
        b_o = sum(w[f"transformer.h.{layer}.attn.c_proj.bias"] for layer in range(2)) if name == "gpt2" else 0 * gain
    elif name == "neox":
        gain, shift = w["gpt_neox.final_layer_norm.weight"], w["gpt_neox.final_layer_norm.bias"]
        eps = config.layer_norm_eps
        b_o = sum(w[f"gpt_neox.layers.{layer}.attention.dense.bias"] for layer in range(2))
    else:
        gain, shift, eps = w["model.norm.weight"], torch.zeros_like(w["model.norm.weight"]), config.rms_norm_eps
        b_o = torch.zeros_like(gain)
    for b in range(2):
        for p in range(1, 8):
            x = stored["final"][b, p].double()
            center = (lambda v: v - v.mean()) if name != "llama" else (lambda v: v)
            scale = (center(x).pow(2).mean() + eps).sqrt()
            t1, t2 = logits[b, p].topk(2).indices.tolist()
            u = (w["lm_head.weight"][t1] - w["lm_head.weight"][t2]).double()
            constant = float(torch.dot(gain.double() * center(b_o.double()) / scale + shift.double(), u))
            if "lm_head.bias" in w:
                constant += float(w["lm_head.bias"][t1] - w["lm_head.bias"][t2])
            total = float(result.dla[:, b, p].double().sum()) + constant
            assert total == pytest.approx(float(logits[b, p, t1] - logits[b, p, t2]), abs=1e-4)
