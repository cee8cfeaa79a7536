"""Tests of the logit-lens probe.

Checked against a float64 brute force (each layer's resid_post from the raw-weight reference forward,
decoded with the reference final norm and unembedding, loss and KL by explicit loops over the scored
positions), on a relay model whose lens is known by construction, and on Hugging Face GPT-2 / Llama
bridges against the HF model's own final norm and head.
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
    random_tokens,
    relay_bridge,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import ProbeUnsupported, Unsupported
from residual_dynamics.probes.logit_lens import logit_lens, logit_lens_with_rows, plan_rows, unsupported


def padded_tokens():
    tokens = random_tokens(3, 9)
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, 6:] = 0
    attention_mask[2, 8:] = 0
    return tokens, attention_mask


def lens_by_loops(layer_logits, final_logits, tokens, attention_mask):
    """(loss, KL(final || lens)) by an explicit loop over p >= 1 with p and p + 1 real."""
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    losses, kls = [], []
    for b in range(tokens.shape[0]):
        for p in range(1, tokens.shape[1] - 1):
            if real[b, p] and real[b, p + 1]:
                log_q = layer_logits[b, p].log_softmax(-1)
                log_p = final_logits[b, p].log_softmax(-1)
                losses.append(-log_q[tokens[b, p + 1]])
                kls.append(sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p.tolist(), log_q.tolist())))
    return torch.stack(losses).mean(), torch.tensor(kls, dtype=torch.float64).mean()


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "lnpre_mqa", "ln_attn_only"])
def test_matches_float64_brute_force(variant):
    bridge = make_bridge(**VARIANTS[variant])
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
    final_logits, _, streams = ref.forward(tokens, attention_mask)
    per_layer = 2 if ref.has_mlp else 1
    expected = [lens_by_loops(ref.logits(streams[per_layer * (layer + 1)]), final_logits, tokens, attention_mask)
                for layer in range(ref.cfg.n_layers)]
    result = logit_lens(bridge, tokens, attention_mask=attention_mask)
    torch.testing.assert_close(result.loss, torch.stack([e[0] for e in expected]), atol=2e-5, rtol=0)
    torch.testing.assert_close(result.kl, torch.stack([e[1] for e in expected]), atol=2e-5, rtol=0)
    loss_final, _ = lens_by_loops(final_logits, final_logits, tokens, attention_mask)
    torch.testing.assert_close(result.loss_final, loss_final, atol=2e-5, rtol=0)
    assert result.kl[-1].item() == pytest.approx(0.0, abs=1e-5)  # the last layer is the model's output
    assert result.kl[0].item() > 1e-3
    assert result.n_scored == 7 + 4 + 6  # scored predictions of the three rows


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa"])
def test_chunked_rows_match_the_brute_force_and_the_budget_sets_them(variant):
    """One row per chunk, two, or all: the same float64 brute-force numbers; a budget sets the rows; one too
    small for a single row is a note, not a crash."""
    bridge = make_bridge(**VARIANTS[variant])
    ref = Reference(bridge)
    tokens, attention_mask = padded_tokens()
    final_logits, _, streams = ref.forward(tokens, attention_mask)
    per_layer = 2 if ref.has_mlp else 1
    expected = torch.stack([lens_by_loops(ref.logits(streams[per_layer * (layer + 1)]), final_logits, tokens,
                                          attention_mask)[1] for layer in range(ref.cfg.n_layers)])
    whole = logit_lens(bridge, tokens, attention_mask=attention_mask)
    for rows in (1, 2):
        chunked = logit_lens_with_rows(bridge, tokens, rows, attention_mask=attention_mask)
        torch.testing.assert_close(chunked.kl, expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(chunked.loss, whole.loss, atol=1e-6, rtol=0)
        assert chunked.n_scored == whole.n_scored
    arch = Arch.of(bridge)
    per_row = plan_rows(arch, batch=3, seq=tokens.shape[1], d_vocab=bridge.cfg.d_vocab, budget=10**9)[1]
    one_row = int(1.5 * per_row / 0.85)
    assert plan_rows(arch, batch=3, seq=tokens.shape[1], d_vocab=bridge.cfg.d_vocab, budget=one_row)[0] == 1
    small = logit_lens(bridge, tokens, attention_mask=attention_mask, max_memory=str(one_row))
    torch.testing.assert_close(small.kl, expected, atol=2e-5, rtol=0)
    tiny = logit_lens(bridge, tokens, attention_mask=attention_mask, max_memory=str(per_row // 2))
    assert isinstance(tiny, Unsupported) and "smallest chunk" in tiny.note and tiny.records() == []


def test_planted_relay_lens():
    """Relay model (no norm): the unembedding reads block F_1, written by sublayer 1 only. Layer 0's stream
    has nothing there: uniform logits, loss log 16 and KL = log 16 - H(final). From layer 1 on the stream
    reads like the output: KL 0, the clean loss."""
    bridge = relay_bridge([-1, -1, 0], readout=1)
    result = logit_lens(bridge, constant_sequences())
    clean = math.log(1 + 15 * math.exp(-12.0))
    p_top = 1 / (1 + 15 * math.exp(-12.0))
    p_rest = math.exp(-12.0) * p_top
    entropy = -(p_top * math.log(p_top) + 15 * p_rest * math.log(p_rest))
    assert result.loss_final.item() == pytest.approx(clean, abs=1e-6)
    assert result.loss[0].item() == pytest.approx(math.log(16), abs=1e-5)
    assert result.kl[0].item() == pytest.approx(math.log(16) - entropy, abs=1e-5)
    for layer in (1, 2):
        assert result.loss[layer].item() == pytest.approx(clean, abs=1e-6)
        assert result.kl[layer].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_huggingface_against_the_hf_head(kind):
    """HF models: the hidden states from output_hidden_states, decoded with the HF final norm and lm_head."""
    model, bridge, _ = hf_bridge(kind)
    tokens = random_tokens(2, 7, d_vocab=100, seed=2)
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
        norm, head = {"gpt2": (lambda: (model.transformer.ln_f, model.lm_head)),
                      "llama": (lambda: (model.model.norm, model.lm_head)),
                      "neox": (lambda: (model.gpt_neox.final_layer_norm, model.get_output_embeddings()))}[kind]()
        # hidden_states[l + 1] is the output of block l; HF applies the final norm to the last one already
        layer_logits = [head(norm(h)).double() for h in out.hidden_states[1:-1]] + [out.logits.double()]
    expected = [lens_by_loops(logits, out.logits.double(), tokens, None) for logits in layer_logits]
    result = logit_lens(bridge, tokens)
    torch.testing.assert_close(result.loss, torch.stack([e[0] for e in expected]), atol=2e-5, rtol=0)
    torch.testing.assert_close(result.kl, torch.stack([e[1] for e in expected]), atol=2e-5, rtol=0)


def test_records():
    result = logit_lens(make_bridge(), random_tokens(2, 6))
    keys = {(r.name, r.layer) for r in result.records()}
    assert keys == {("logit_lens/loss_final", None)} | {(n, l) for n in ("logit_lens/loss", "logit_lens/kl")
                                                      for l in range(3)}


def test_unsupported_without_the_hooks():
    bare = Arch(n_layers=2, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_mlp=None, has_mlp=False,
                gated_mlp=False, parallel=False, norm=None, positional="standard", hook_kinds=frozenset())
    assert "hook points" in unsupported(bare)
    assert unsupported(Arch.of(make_bridge())) is None
    with pytest.raises(ProbeUnsupported):
        logit_lens(make_bridge(), random_tokens(2, 6), arch=bare)


def test_training_runs_draw_the_layer_x_step_heatmaps(tmp_path):
    """The reporter of a training run draws both heatmaps from the results file; a pretrained run (one
    point in time) does not."""
    from residual_dynamics.probes.sublayer_ablation import sublayer_ablation
    from residual_dynamics.reporting.reporter import ProbeReporter

    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    results = {"sublayer_ablation": sublayer_ablation(bridge, tokens), "logit_lens": logit_lens(bridge, tokens)}
    reporter = ProbeReporter(tmp_path / "train")
    reporter.report(results, 0, draw=False)
    pngs = reporter.report(results, 10)
    for name, file in (("sublayer_ablation", "sublayer_ablation_heatmap.png"), ("logit_lens", "logit_lens_heatmap.png")):
        assert pngs[name] == tmp_path / "train" / "figures" / file and pngs[name].stat().st_size > 5000
    pretrained = ProbeReporter(tmp_path / "pretrained", pretrained=True)
    assert not {"sublayer_ablation", "logit_lens"} & set(pretrained.report(results, 0))
