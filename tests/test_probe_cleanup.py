"""Tests of the clean-up probe.

The probe's tables are checked against a float64 brute force: node outputs from the reference model
(heads head by head and position by position from z and W_O), projection ratios as explicit dot
products position by position, percentiles from numpy, the scan re-derived with plain Python. A
planted model checks that an exact negative copy of a writer is found as its cleaner with PR = -1.
"""

import math

import numpy as np
import pytest
import torch
from reference_models import (
    VARIANTS,
    Reference,
    hf_bridge,
    make_bridge,
    native_weights,
    planted_cleanup_bridge,
    random_tokens,
    real_positions,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.cleanup import CleanupResult, cleanup


THRESHOLD, WRITER_MIN, TOP_N = 0.5, 0.6, 3  # loose enough that random models have cleaned writers


def padded_tokens():
    tokens = random_tokens(3, 9, seed=1)
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, 7:] = 0
    return tokens, attention_mask


def brute_force(ref, tokens, attention_mask):
    """Node outputs {name: (sublayer, [batch, pos, d_model])}, residual points, DLA directions."""
    logits, outputs, streams = ref.forward(tokens, attention_mask)
    nodes = {"EMBED": (-1, ref.token_embedding(tokens)), "POS": (-1, ref.pos_embedding(tokens))}
    per_layer = 2 if ref.has_mlp else 1
    for layer in range(ref.cfg.n_layers):
        s = per_layer * layer
        heads = ref.head_outputs(ref.normalize(streams[s], f"layers.{layer}.ln1"), layer, attention_mask)
        for h in range(ref.cfg.n_heads):
            nodes[f"L{layer}H{h}"] = (s, heads[h])
        if ref.has_mlp:
            nodes[f"L{layer}MLP"] = (s + 1, outputs[s + 1])
    return logits, nodes, streams


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
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
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
        expected = np.array([percentiles(node_pr[writer][n]) for n in names])
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
    scores = result.writer_score[result.ranking]
    assert result.cleaned[result.ranking].all() and len(result.ranking) == int(result.cleaned.sum())
    assert (scores[:-1] >= scores[1:]).all()


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


def test_restricted_writers_give_the_same_rows():
    bridge = make_bridge()
    tokens = random_tokens(2, 8)
    full = cleanup(bridge, tokens, top_n=4)
    some = cleanup(bridge, tokens, writers=["L1MLP", "L0H2"], top_n=4)
    assert [some.nodes[i].name for i in some.writers] == ["L1MLP", "L0H2"]
    rows = [full.writer_index("L1MLP"), full.writer_index("L0H2")]
    for field in ("resid_pr", "node_pr", "writer_score", "cleaner_pr", "cleaner_pr_sum", "dla_corr", "cleaners"):
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


@pytest.mark.parametrize("name", ["gpt2", "llama"])
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
    if name == "gpt2":
        gain, shift, eps = w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], config.layer_norm_epsilon
        b_o = sum(w[f"transformer.h.{layer}.attn.c_proj.bias"] for layer in range(2))
    else:
        gain, shift, eps = w["model.norm.weight"], torch.zeros_like(w["model.norm.weight"]), config.rms_norm_eps
        b_o = torch.zeros_like(gain)
    for b in range(2):
        for p in range(1, 8):
            x = stored["final"][b, p].double()
            center = (lambda v: v - v.mean()) if name == "gpt2" else (lambda v: v)
            scale = (center(x).pow(2).mean() + eps).sqrt()
            t1, t2 = logits[b, p].topk(2).indices.tolist()
            u = (w["lm_head.weight"][t1] - w["lm_head.weight"][t2]).double()
            constant = float(torch.dot(gain.double() * center(b_o.double()) / scale + shift.double(), u))
            constant += float(w["lm_head.bias"][t1] - w["lm_head.bias"][t2])
            total = float(result.dla[:, b, p].double().sum()) + constant
            assert total == pytest.approx(float(logits[b, p, t1] - logits[b, p, t2]), abs=1e-4)
