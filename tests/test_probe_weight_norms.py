"""weight_norms against float64 brute force on the raw native (and HF) weights, sliced by hand."""

import math

import pytest
import torch

from reference_models import VARIANTS, hf_bridge, make_bridge, native_float64, native_weights
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.weight_norms import weight_norms


def frobenius(matrix: torch.Tensor) -> float:
    """sqrt of the sum of squares, by explicit loops."""
    return math.sqrt(sum(v * v for row in matrix.tolist() for v in (row if isinstance(row, list) else [row])))


def scaled_rows(matrix: torch.Tensor, gain) -> torch.Tensor:
    """diag(gain) @ matrix ([d_model, n]); ``gain`` None means no gain."""
    return matrix if gain is None else matrix * gain[:, None]


def brute_force(bridge) -> dict[str, list]:
    """Every norm from the native nn.Linear weights (stored [out, in]), one head at a time, in float64.

    Query head h reads key/value head h // (n_heads / n_kv_heads). In TransformerLens orientation
    W_V[g] = v.weight[g*d:(g+1)*d].T  [d_model, d_head] and W_O[h] = o.weight[:, h*d:(h+1)*d].T
    [d_head, d_model]; W_OV is their full d_model x d_model product.
    """
    cfg = bridge.cfg
    params = native_float64(bridge)
    d, n_heads = cfg.d_head, cfg.n_heads
    n_kv = cfg.n_key_value_heads or n_heads
    gated = cfg.gated_mlp
    out: dict[str, list] = {}

    def add(name, layer, value):
        out.setdefault(name, [[] for _ in range(cfg.n_layers)])[layer].append(value)

    for layer in range(cfg.n_layers):
        p = f"layers.{layer}"
        ln1 = params.get(f"{p}.ln1.weight")
        ln2 = params.get(f"{p}.ln2.weight")
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            W_V = params[f"{p}.attn.v.weight"][g * d : (g + 1) * d].T
            W_O = params[f"{p}.attn.o.weight"][:, h * d : (h + 1) * d].T
            W_Q = params[f"{p}.attn.q.weight"][h * d : (h + 1) * d].T
            add("W_OV", layer, frobenius(W_V @ W_O))
            add("W_OV_folded", layer, frobenius(scaled_rows(W_V, ln1) @ W_O))
            add("W_Q", layer, frobenius(W_Q))
            add("W_Q_folded", layer, frobenius(scaled_rows(W_Q, ln1)))
            add("W_O", layer, frobenius(W_O))
        for g in range(n_kv):
            for name in ("W_K", "W_V"):
                W = params[f"{p}.attn.{name[-1].lower()}.weight"][g * d : (g + 1) * d].T
                add(name, layer, frobenius(W))
                add(f"{name}_folded", layer, frobenius(scaled_rows(W, ln1)))
        add("b_O", layer, frobenius(params[f"{p}.attn.o.bias"]))
        if not cfg.attn_only:
            W_in = params[f"{p}.mlp.in.weight" if gated else f"{p}.mlp.fc_in.weight"].T
            add("W_in", layer, frobenius(W_in))
            add("W_in_folded", layer, frobenius(scaled_rows(W_in, ln2)))
            add("W_out", layer, frobenius(params[f"{p}.mlp.out.weight" if gated else f"{p}.mlp.fc_out.weight"]))
            if gated:
                W_gate = params[f"{p}.mlp.gate.weight"].T
                add("W_gate", layer, frobenius(W_gate))
                add("W_gate_folded", layer, frobenius(scaled_rows(W_gate, ln2)))
        for name, gain in (("ln1_gain", ln1), ("ln2_gain", ln2)):
            if gain is not None:
                add(name, layer, frobenius(gain))
    if "ln_out.weight" in params:
        out["ln_final_gain"] = frobenius(params["ln_out.weight"])
    return out


def as_tensor(values) -> torch.Tensor:
    """Per-layer lists of one value become [n_layers]; lists of several (heads) stay [n_layers, heads]."""
    if isinstance(values, float):
        return torch.tensor(values, dtype=torch.float32)
    if all(len(v) == 1 for v in values):
        return torch.tensor([v[0] for v in values], dtype=torch.float32)
    return torch.tensor(values, dtype=torch.float32)


PER_HEAD = {"W_OV", "W_Q", "W_K", "W_V", "W_O"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_brute_force(variant):
    bridge = make_bridge(**VARIANTS[variant])
    result = weight_norms(bridge, fold_ln=True)
    expected = brute_force(bridge)

    gainless = bridge.cfg.normalization_type not in ("LN", "RMS")
    for name, values in expected.items():
        if gainless and name.endswith("_folded"):
            continue  # checked below: without a gain the folded norms are the raw ones
        if name in PER_HEAD or name.removesuffix("_folded") in PER_HEAD:
            expected_tensor = torch.tensor(values, dtype=torch.float32)
        else:
            expected_tensor = as_tensor(values)
        torch.testing.assert_close(getattr(result, name), expected_tensor, rtol=1e-5, atol=1e-6, msg=name)

    reported = {f.name for f in result.__dataclass_fields__.values() if getattr(result, f.name) is not None}
    assert reported == set(expected)
    if gainless:
        for name in reported:
            if name.endswith("_folded"):
                torch.testing.assert_close(getattr(result, name), getattr(result, name.removesuffix("_folded")))


def test_gqa_shapes_and_sharing():
    """Query heads of one key/value group share W_V: with W_O made equal across heads, their W_OV agree."""
    bridge = make_bridge(n_heads=4, n_key_value_heads=2)
    with torch.no_grad():
        o = native_weights(bridge)["layers.0.attn.o.weight"]  # [d_model, n_heads * d_head]
        o[:, 8:16] = o[:, 0:8]
        o[:, 24:32] = o[:, 16:24]
    result = weight_norms(bridge)
    assert result.W_OV.shape == result.W_Q.shape == result.W_O.shape == (3, 4)
    assert result.W_K.shape == result.W_V.shape == (3, 2)
    assert result.W_OV[0, 0].item() == pytest.approx(result.W_OV[0, 1].item(), rel=1e-6)
    assert result.W_OV[0, 2].item() == pytest.approx(result.W_OV[0, 3].item(), rel=1e-6)
    assert result.W_OV[0, 0].item() != pytest.approx(result.W_OV[0, 2].item(), rel=1e-3)


def test_folding_scales_with_the_gain():
    """Planted: a constant ln1 gain c multiplies every folded reading norm by |c| and leaves the raw ones."""
    bridge = make_bridge()
    raw = weight_norms(bridge, fold_ln=True)
    with torch.no_grad():
        native_weights(bridge)["layers.1.ln1.weight"].fill_(-3.0)
    folded = weight_norms(bridge, fold_ln=True)
    for name in ("W_OV", "W_Q", "W_K", "W_V"):
        torch.testing.assert_close(getattr(folded, name), getattr(raw, name))
        # Folded norm with gain -3 everywhere = 3 * raw norm, whatever the old gain was.
        torch.testing.assert_close(getattr(folded, f"{name}_folded")[1], 3 * getattr(raw, name)[1], rtol=1e-5, atol=0)
    assert folded.ln1_gain[1].item() == pytest.approx(3.0 * math.sqrt(32), rel=1e-6)


def test_records():
    bridge = make_bridge(n_key_value_heads=2, gated_mlp=True, normalization_type="RMS")
    raw = weight_norms(bridge)
    assert raw.W_OV_folded is None
    records = raw.records()
    keys = {(r.name, r.layer, r.head) for r in records}
    assert ("W_OV", 2, 3) in keys and ("W_OV", 2, None) not in keys
    assert ("W_Q", 2, 3) in keys and ("W_Q", 2, None) in keys
    assert ("W_K", 2, 1) in keys and ("W_K", 2, 2) not in keys
    assert {("W_gate", 0, None), ("b_O", 0, None), ("ln2_gain", 0, None), ("ln_final_gain", None, None)} <= keys
    assert not any(r.name.endswith("_folded") for r in records)
    # The per-layer total of a per-head field is the Frobenius norm of the stacked layer matrix.
    total = next(r.value for r in records if (r.name, r.layer, r.head) == ("W_Q", 1, None))
    stacked = native_float64(bridge)["layers.1.attn.q.weight"]
    assert total == pytest.approx(frobenius(stacked), rel=1e-5)
    assert {r.name for r in weight_norms(bridge, fold_ln=True).records()} >= {"W_OV_folded", "W_gate_folded"}


def test_tokens_are_optional():
    bridge = make_bridge()
    with_tokens = weight_norms(bridge, torch.zeros(1, 4, dtype=torch.long))
    torch.testing.assert_close(with_tokens.W_OV, weight_norms(bridge).W_OV)


def test_huggingface_gpt2_joint_qkv():
    """GPT-2 stores Q, K, V side by side in one Conv1D ``c_attn.weight`` [d_model, 3 d_model] (x @ W)."""
    _, bridge, state = hf_bridge("gpt2")
    result = weight_norms(bridge, fold_ln=True)
    d_model, d = 32, 8
    for layer in range(2):
        p = f"transformer.h.{layer}"
        qkv, c_proj = state[f"{p}.attn.c_attn.weight"], state[f"{p}.attn.c_proj.weight"]
        ln1 = state[f"{p}.ln_1.weight"]
        for h in range(4):
            W_V = qkv[:, 2 * d_model + h * d : 2 * d_model + (h + 1) * d]
            W_O = c_proj[h * d : (h + 1) * d]
            assert result.W_OV[layer, h].item() == pytest.approx(frobenius(W_V @ W_O), rel=1e-5)
            folded = frobenius(scaled_rows(W_V, ln1) @ W_O)
            assert result.W_OV_folded[layer, h].item() == pytest.approx(folded, rel=1e-5)
        assert result.b_O[layer].item() == pytest.approx(frobenius(state[f"{p}.attn.c_proj.bias"]), rel=1e-5)
        assert result.W_in[layer].item() == pytest.approx(frobenius(state[f"{p}.mlp.c_fc.weight"]), rel=1e-5)
        assert result.W_out[layer].item() == pytest.approx(frobenius(state[f"{p}.mlp.c_proj.weight"]), rel=1e-5)
    assert result.ln_final_gain.item() == pytest.approx(frobenius(state["transformer.ln_f.weight"]), rel=1e-5)


def test_huggingface_llama_gqa_gated():
    """Llama: v_proj [n_kv * d_head, d_model], o_proj [d_model, n_heads * d_head], bias-free, gated MLP."""
    _, bridge, state = hf_bridge("llama")
    result = weight_norms(bridge, fold_ln=True)
    d = 8
    assert result.b_O is None
    for layer in range(2):
        p = f"model.layers.{layer}"
        v, o = state[f"{p}.self_attn.v_proj.weight"], state[f"{p}.self_attn.o_proj.weight"]
        ln1 = state[f"{p}.input_layernorm.weight"]
        for h in range(4):
            g = h // 2
            W_V, W_O = v[g * d : (g + 1) * d].T, o[:, h * d : (h + 1) * d].T
            assert result.W_OV[layer, h].item() == pytest.approx(frobenius(W_V @ W_O), rel=1e-5)
            folded = frobenius(scaled_rows(W_V, ln1) @ W_O)
            assert result.W_OV_folded[layer, h].item() == pytest.approx(folded, rel=1e-5)
        gate, ln2 = state[f"{p}.mlp.gate_proj.weight"].T, state[f"{p}.post_attention_layernorm.weight"]
        assert result.W_gate[layer].item() == pytest.approx(frobenius(gate), rel=1e-5)
        assert result.W_gate_folded[layer].item() == pytest.approx(frobenius(scaled_rows(gate, ln2)), rel=1e-5)
        assert result.W_in[layer].item() == pytest.approx(frobenius(state[f"{p}.mlp.up_proj.weight"]), rel=1e-5)
        assert result.ln2_gain[layer].item() == pytest.approx(frobenius(ln2), rel=1e-5)


# --- TransformerLens weight processing (tl_process) ------------------------------------------------------

TLPROC = ("W_OV", "W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out", "W_gate")


def processed_brute_force(processed) -> dict[str, torch.Tensor]:
    """Norms of the weights TransformerLens' own ``process_weights`` produced, head by head, in float64."""
    cfg = processed.cfg
    n_heads, n_kv = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    W_Q, W_K, W_V, W_O = (w.detach().double() for w in (processed.W_Q, processed.W_K, processed.W_V, processed.W_O))
    out: dict[str, list] = {name: [] for name in TLPROC}
    for layer in range(cfg.n_layers):
        out["W_OV"].append([frobenius(W_V[layer, h // (n_heads // n_kv)] @ W_O[layer, h]) for h in range(n_heads)])
        out["W_Q"].append([frobenius(W_Q[layer, h]) for h in range(n_heads)])
        out["W_O"].append([frobenius(W_O[layer, h]) for h in range(n_heads)])
        out["W_K"].append([frobenius(W_K[layer, g]) for g in range(n_kv)])
        out["W_V"].append([frobenius(W_V[layer, g]) for g in range(n_kv)])
        try:
            out["b_O"].append(frobenius(processed.blocks[layer].attn.b_O.detach().double()))
        except AttributeError:
            pass
        if not cfg.attn_only:
            out["W_in"].append(frobenius(processed.blocks[layer].mlp.W_in.detach().double()))
            out["W_out"].append(frobenius(processed.blocks[layer].mlp.W_out.detach().double()))
            if cfg.gated_mlp:
                out["W_gate"].append(frobenius(processed.blocks[layer].mlp.W_gate.detach().double()))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items() if values}


def check_against_tl(raw, processed):
    result = weight_norms(raw, fold_ln=True, tl_process=True)
    expected = processed_brute_force(processed)
    for name in TLPROC:
        got = getattr(result, f"{name}_tlproc")
        if name not in expected:
            assert got is None, name
            continue
        torch.testing.assert_close(got.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    return result


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tl_processing_matches_transformer_lens_process_weights(variant):
    """``*_tlproc`` from the raw weights == the norms of TransformerLens' own processed weights (a fresh
    copy of the same model run through ``TransformerBridge.process_weights``: fold_ln,
    center_writing_weights, center_unembed, fold_value_biases)."""
    raw = make_bridge(**VARIANTS[variant])
    processed = make_bridge(**VARIANTS[variant])
    processed.process_weights(fold_ln=True, center_writing_weights=True, center_unembed=True,
                              fold_value_biases=True)
    result = check_against_tl(raw, processed)
    if bridge_norm(raw) in ("LN", "LNPre"):  # centring changed something: the keys must not coincide
        assert not torch.allclose(result.W_OV_tlproc, result.W_OV_folded, rtol=1e-3)
        assert not torch.allclose(result.W_O_tlproc, result.W_O, rtol=1e-3)


def bridge_norm(bridge):
    return bridge.cfg.normalization_type


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tl_processing_on_huggingface_models(kind):
    """A random HF GPT-2 (LayerNorm: gains folded and everything centred) and Llama (RMSNorm, GQA, gated,
    bias-free: gains folded, nothing centred)."""
    _, raw, _ = hf_bridge(kind)
    _, processed, _ = hf_bridge(kind)
    processed.enable_compatibility_mode(disable_warnings=True)  # HookedTransformer's processing
    result = check_against_tl(raw, processed)
    assert (result.b_O_tlproc is None) == (kind == "llama")
    if kind == "llama":  # RMS: nothing is centred, so the tlproc reading norms are the folded ones
        torch.testing.assert_close(result.W_OV_tlproc, result.W_OV_folded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.W_O_tlproc, result.W_O)


def test_tl_process_keys_are_labelled_and_off_by_default():
    bridge = make_bridge()
    assert weight_norms(bridge).W_OV_tlproc is None
    assert not any(r.name.endswith("_tlproc") for r in weight_norms(bridge, fold_ln=True).records())
    names = {r.name for r in weight_norms(bridge, tl_process=True).records()}
    assert {f"{name}_tlproc" for name in ("W_OV", "W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out")} <= names
    assert not any(name.endswith("_folded") for name in names)
    keys = {(r.name, r.layer, r.head) for r in weight_norms(bridge, tl_process=True).records()}
    assert ("W_OV_tlproc", 1, 2) in keys and ("W_OV_tlproc", 1, None) not in keys
