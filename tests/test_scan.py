"""The injection-coefficient scan (``python -m residual_dynamics.scan``).

* The attributions are checked component by component against a float64 brute force: the reference
  forward from the raw weights, sublayer by sublayer, with the vector added by hand, every head's
  z W_O, MLP (or neuron) output and bias taken from it, and the final norm linearised by hand at the
  frozen scale -- and their sum against the reference logit difference.
* A planted linear model (no norm, zero attention, MLPs that multiply the stream by fixed factors): each
  component's attribution is linear in the coefficient with a slope and an intercept computed by hand.
* Clustering recovers planted groups of profiles (k-means and hierarchical) and marks flat ones.
* Bad input: a token that is not one token, a layer out of range, an empty coefficient range, bad
  vector files, all before any forward.
* The command end to end on a local Hugging Face GPT-2 (``model=local``) and on a trained checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from composed import composed
from reference_models import (
    VARIANTS,
    Reference,
    activation,
    make_bridge,
    native_float64,
    offline_tokenizer,
    planted_growth_bridge,
    random_tokens,
)
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.probes.arch import Arch
from residual_dynamics.scan.cluster import cluster_profiles
from residual_dynamics.scan.core import actadd_vector, coefficient_range, injection_scan
from residual_dynamics.scan.spec import check_against_model, load_vector, parse_scan

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- float64 brute force


def reference_scan(bridge, tokens, placed, layer, coefficients, t1, t2, p, neurons=False):
    """({component: [N] attribution}, [N] logit difference) by hand in float64 (see the module doc)."""
    ref = Reference(bridge)
    w = native_float64(bridge)
    cfg = ref.cfg
    norm = cfg.normalization_type
    per_layer = 2 if ref.has_mlp else 1
    u = ref.unembed_direction(t1, t2)
    gain = w["ln_out.weight"] if norm in ("LN", "RMS") else torch.ones(cfg.d_model, dtype=torch.float64)
    beta = w["ln_out.bias"] if norm == "LN" else torch.zeros(cfg.d_model, dtype=torch.float64)
    placed = placed.double()
    out: dict[str, list[float]] = {}
    diffs = []
    for c in coefficients.tolist():
        parts: dict[str, torch.Tensor] = {"embed": ref.token_embedding(tokens)[0, p],
                                          "pos_embed": ref.pos_embedding(tokens)[0, p]}
        bias = torch.zeros(cfg.d_model, dtype=torch.float64)
        resid = ref.embed(tokens)
        for s in range(ref.n_sublayers):
            if s == per_layer * layer:
                resid = resid + c * placed
            l, is_mlp = divmod(s, 2) if ref.has_mlp else (s, 0)
            if not is_mlp:
                heads = ref.head_outputs(ref.normalize(resid, f"layers.{l}.ln1"), l)  # [H, 1, T, d]
                for h in range(cfg.n_heads):
                    parts[f"L{l}H{h}"] = heads[h, 0, p]
                o_bias = w[f"layers.{l}.attn.o.bias"]
                bias = bias + o_bias
                written = heads.sum(0) + o_bias
            else:
                pre, written = ref.mlp(resid, l)
                if neurons:
                    m = f"layers.{l}.mlp"
                    if cfg.gated_mlp:
                        normed = ref.normalize(resid, f"layers.{l}.ln2")
                        hidden = activation(cfg.act_fn, pre) * (normed @ w[f"{m}.in.weight"].T)
                        w_out = w[f"{m}.out.weight"]
                    else:
                        hidden, w_out = activation(cfg.act_fn, pre), w[f"{m}.fc_out.weight"]
                        bias = bias + w[f"{m}.fc_out.bias"]
                    for k in range(hidden.shape[-1]):
                        parts[f"L{l}N{k}"] = hidden[0, p, k] * w_out[:, k]
                else:
                    parts[f"L{l}MLP"] = written[0, p]
            resid = resid + written
        parts["bias"] = bias
        parts["injection"] = c * placed[p]
        scale = ref.scale(resid)[0, p]

        def attribution(vector):
            if norm in ("LN", "LNPre"):
                vector = vector - vector.mean()
            return float((gain * vector / scale) @ u)

        for name, vector in parts.items():
            out.setdefault(name, []).append(attribution(vector))
        out.setdefault("ln_final_bias", []).append(float(beta @ u))
        head_bias = w.get("head.bias")
        out.setdefault("unembed_bias", []).append(0.0 if head_bias is None else float(head_bias[t1] - head_bias[t2]))
        logits = ref.logits(resid)[0, p]
        diffs.append(float(logits[t1] - logits[t2]))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}, torch.tensor(diffs, dtype=torch.float64)


CASES = [
    ("ln_gelu", "front", False),
    ("ln_gelu", "all", True),
    ("rms_gated_gqa", "front", True),
    ("no_norm_relu", "all", False),
    ("lnpre_attn_only", "front", False),
    ("rmspre", "all", False),
]


@pytest.mark.parametrize("variant, positions, neurons", CASES, ids=[f"{v}-{p}-{'neurons' if n else 'mlp'}"
                                                                     for v, p, n in CASES])
def test_attributions_match_float64_brute_force_and_sum_to_the_logit_difference(variant, positions, neurons):
    bridge = make_bridge(**VARIANTS[variant])
    tokens = random_tokens(1, 6, seed=3)
    generator = torch.Generator().manual_seed(4)
    vector = torch.randn(2 if positions == "front" else 1, 32, generator=generator) * 0.5
    coefficients = coefficient_range(-10, 10, 5)
    layer, t1, t2 = 1, 7, 11
    position = 1 if positions == "front" else -1  # front: where the vector's second row goes
    result = injection_scan(bridge, tokens, vector, layer=layer, coefficients=coefficients, logit_tokens=(t1, t2),
                            position=position, positions=positions, neurons=neurons)
    placed = torch.zeros(6, 32)
    if positions == "front":
        placed[: vector.shape[0]] = vector
    else:
        placed[:] = vector[0]
    expected, diff = reference_scan(bridge, tokens, placed, layer, coefficients, t1, t2, result.position, neurons)

    names = [component.name for component in result.components]
    assert set(names) == set(expected)
    for name in names:
        torch.testing.assert_close(result.of(name), expected[name], atol=2e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(result.logit_diff, diff, atol=2e-4, rtol=1e-4)
    # exactly the logit difference, given the frozen scale: the sum over the components
    torch.testing.assert_close(result.total, result.logit_diff, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sum(expected.values()), diff, atol=1e-9, rtol=1e-9)  # the hand formula too
    assert result.of("injection").abs().max() > 1e-3
    assert (result.logit_diff.max() - result.logit_diff.min()) > 1e-2  # the injection moves the logits


def test_chunked_forwards_give_the_same_attributions():
    bridge = make_bridge()
    tokens = random_tokens(1, 5)
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(layer=2, coefficients=coefficient_range(-3, 3, 7), logit_tokens=(1, 2), positions="all")
    whole = injection_scan(bridge, tokens, vector, **kwargs)
    chunked = injection_scan(bridge, tokens, vector, max_batch=3, **kwargs)
    torch.testing.assert_close(chunked.attribution, whole.attribution, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- planted linear model


def test_planted_linear_model_has_hand_computed_slopes():
    """No norm, zero attention, and MLP_k(x) = (r_k - 1) x: with c v added at resid_pre of layer 1 at every
    position, resid_pre_2 = r_1 (r_0 e + c v) and the final stream is r_2 r_1 (r_0 e + c v). So, with
    u = W_U[:, t1] - W_U[:, t2] and e the embedding at the scored position:
      MLP_0 = (r_0 - 1) e.u,   MLP_1 = (r_1 - 1)(r_0 e.u + c v.u),   MLP_2 = (r_2 - 1) r_1 (r_0 e.u + c v.u),
      injection = c v.u, embed = e_tok.u, pos_embed = e_pos.u, every head 0, every bias 0."""
    factors = [1.5, 2.0, 1.25]
    bridge = planted_growth_bridge(factors)
    w = native_float64(bridge)
    tokens = random_tokens(1, 5, seed=6)
    vector = torch.randn(16, generator=torch.Generator().manual_seed(7))
    t1, t2, p = 3, 9, 4
    c = coefficient_range(-10, 10, 9)
    result = injection_scan(bridge, tokens, vector, layer=1, coefficients=c, logit_tokens=(t1, t2),
                            positions="all")
    u = w["head.weight"][t1] - w["head.weight"][t2]
    e_tok = w["tok_embed.weight"][tokens[0, p]] @ u
    e_pos = w["pos.weight"][p] @ u
    e, vu = e_tok + e_pos, vector.double() @ u
    r0, r1, r2 = factors
    expected = {
        "embed": e_tok + 0 * c, "pos_embed": e_pos + 0 * c,
        "L0MLP": (r0 - 1) * e + 0 * c,
        "L1MLP": (r1 - 1) * (r0 * e + c * vu),
        "L2MLP": (r2 - 1) * r1 * (r0 * e + c * vu),
        "injection": c * vu, "bias": 0 * c, "ln_final_bias": 0 * c, "unembed_bias": 0 * c,
        **{f"L{l}H{h}": 0 * c for l in range(3) for h in range(4)},
    }
    for name, values in expected.items():
        torch.testing.assert_close(result.of(name), values, atol=1e-4, rtol=1e-5, msg=name)
    slopes = {name: (result.of(name)[1:] - result.of(name)[:-1]) / (c[1:] - c[:-1]) for name in expected}
    torch.testing.assert_close(slopes["L2MLP"], torch.full((8,), (r2 - 1) * r1 * float(vu), dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.total, r2 * r1 * (r0 * e + c * vu), atol=1e-4, rtol=1e-5)
    assert abs(float(vu)) > 0.1


# --------------------------------------------------------------------------- clustering


SHAPES = {
    "rising": lambda c: c / 20,
    "bump": lambda c: np.exp(-c**2 / 8),
    "late_step": lambda c: 1 / (1 + np.exp(-(c - 5))),
    "falling_early": lambda c: -1 / (1 + np.exp(-(c + 5))),
}


def planted_profiles(seed=0):
    rng = np.random.default_rng(seed)
    c = np.linspace(-10, 10, 41)
    rows, groups = [], []
    for group, shape in enumerate(SHAPES.values()):
        for _ in range(6):
            scale = rng.uniform(0.5, 3.0)
            rows.append(scale * shape(c) + rng.normal(0, 5) + rng.normal(0, 0.01 * scale, len(c)))
            groups.append(group)
    for _ in range(5):  # flat: a constant with noise far below the others' ranges
        rows.append(rng.normal(0, 5) + rng.normal(0, 1e-5, len(c)))
        groups.append(-1)
    order = rng.permutation(len(rows))
    return np.array(rows)[order], np.array(groups)[order]


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
def test_clustering_recovers_planted_groups(method):
    from sklearn.metrics import adjusted_rand_score

    profiles, groups = planted_profiles()
    clusters = cluster_profiles(profiles, n_clusters=4, method=method, min_range=0.02)
    assert (clusters.labels == -1).tolist() == (groups == -1).tolist()
    moving = groups >= 0
    assert adjusted_rand_score(groups[moving], clusters.labels[moving]) == 1.0
    assert clusters.n_clusters == 4 and clusters.centers.shape == (4, 41)


def test_clustering_of_shuffled_noise_does_not_invent_the_planted_groups():
    """Null data: profiles of pure noise share no shape; the same call finds clusters, but they do not
    line up with any grouping of the rows (the planted-group score is near 0)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(1)
    _, groups = planted_profiles()
    noise = rng.normal(0, 1, (len(groups), 41))
    labels = cluster_profiles(noise, n_clusters=4).labels
    assert abs(adjusted_rand_score(groups, labels)) < 0.2


def test_clustering_edge_cases():
    flat = np.ones((3, 5))
    assert cluster_profiles(flat).labels.tolist() == [-1, -1, -1]
    two = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    clusters = cluster_profiles(two, n_clusters=4)
    assert sorted(clusters.labels.tolist()) == [-1, 0, 1]
    with pytest.raises(ValueError, match="method"):
        cluster_profiles(two, method="dbscan")


# --------------------------------------------------------------------------- bad input


def scan_cfg(tmp_path, *overrides):
    return composed("scan", ["logger=none", f"paths.run_dir={tmp_path / 'run'}", *overrides])


def test_defaults_parse(tmp_path):
    spec = parse_scan(scan_cfg(tmp_path, f"checkpoint={touch(tmp_path / 'x.ckpt')}"))
    assert spec.settings.coefficients.n == 128
    assert list(spec.settings.vector.prompts) == [" Love", " Hate"]


def touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("override, field, message", [
    ("scan.coefficients.n=0", "scan.coefficients.n", "empty coefficient range"),
    ("scan.coefficients.n=1", "scan.coefficients.n", "empty coefficient range"),
    ("scan.coefficients.stop=-10", "scan.coefficients.stop", "is empty"),
    ("scan.coefficients.start=nan", "scan.coefficients.start", "finite"),
    ("scan.logit_tokens=[' a']", "scan.logit_tokens", "two non-empty strings"),
    ("scan.logit_tokens=[' a',' a']", "scan.logit_tokens", "differ"),
    ("scan.vector.prompts=[x]", "scan.vector.prompts", "two non-empty strings"),
    ("scan.vector.layer=-1", "scan.vector.layer", ">= 0"),
    ("scan.vector.positions=middle", "scan.vector.positions", "front"),
    ("scan.vector.file=/nonexistent/v.pt", "scan.vector.file", "does not exist"),
    ("scan.vector.file=/etc/hostname", "scan.vector.file", ".pt or .npy"),
    ("scan.top_k=0", "scan.top_k", ">= 1"),
    ("scan.max_batch=0", "scan.max_batch", ">= 1"),
    ("scan.clustering.method=dbscan", "scan.clustering.method", "kmeans"),
    ("scan.clustering.n_clusters=0", "scan.clustering.n_clusters", ">= 1"),
    ("scan.clustering.min_range=1.5", "scan.clustering.min_range", "[0, 1)"),
    ("scan.prompt=' '", "scan.prompt", "non-empty"),
    ("checkpoint=/nonexistent.ckpt", "checkpoint", "does not exist"),
])
def test_bad_settings_are_rejected_naming_the_field(tmp_path, override, field, message):
    base = [] if override.startswith("checkpoint") else [f"checkpoint={touch(tmp_path / 'x.ckpt')}"]
    with pytest.raises(ConfigError) as error:
        parse_scan(scan_cfg(tmp_path, *base, override))
    assert error.value.field == field and message in str(error.value)


def test_unknown_keys_are_rejected_at_compose_time(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        scan_cfg(tmp_path, "scan.coefficent.n=3")


def test_model_dependent_checks():
    """The layer against the depth, the logit tokens against the tokenizer (word-level: 't5 t6' is two
    tokens), the position against the prompt."""
    from residual_dynamics.scan.spec import ScanSettings, VectorConfig

    tokenizer = offline_tokenizer()
    good = ScanSettings(prompt="t7 t8 t9", vector=VectorConfig(prompts=["t3", "t4"], layer=1),
                        logit_tokens=["t5", "t6"])
    resolved = check_against_model(good, 3, tokenizer, prepend_bos=True, n_ctx=16)
    assert resolved.logit_tokens == (5, 6) and resolved.prompt_tokens == [1, 7, 8, 9] and resolved.layer == 1
    assert resolved.vector_tokens == ([1, 3], [1, 4]) and resolved.pad_id is None
    with pytest.raises(ConfigError) as error:
        check_against_model(ScanSettings(prompt="t7 t8", logit_tokens=["t5 t6", "t7"],
                                         vector=VectorConfig(prompts=["t3", "t4"])), 3, tokenizer, True, 16)
    assert error.value.field == "scan.logit_tokens" and "is 2 tokens" in str(error.value)
    with pytest.raises(ConfigError) as error:
        check_against_model(ScanSettings(prompt="t7 t8", logit_tokens=["t5", "t6"],
                                         vector=VectorConfig(prompts=["t3", "t4"], layer=3)), 3, tokenizer, True, 16)
    assert error.value.field == "scan.vector.layer" and "0..2" in str(error.value)
    with pytest.raises(ConfigError, match="scan.position"):
        check_against_model(ScanSettings(prompt="t7", logit_tokens=["t5", "t6"], position=5,
                                         vector=VectorConfig(prompts=["t3", "t4"])), 3, tokenizer, True, 16)
    with pytest.raises(ConfigError, match="scan.vector.prompts"):  # 3 rows cannot go at the front of 2 tokens
        check_against_model(ScanSettings(prompt="t7", logit_tokens=["t5", "t6"],
                                         vector=VectorConfig(prompts=["t3 t2", "t4 t2"])), 3, tokenizer, True, 16)


def test_the_scan_function_refuses_bad_arguments():
    bridge = make_bridge()
    tokens, vector = random_tokens(1, 4), torch.ones(1, 32)
    kwargs = dict(coefficients=coefficient_range(-1, 1, 3), logit_tokens=(1, 2))
    with pytest.raises(ValueError, match="layer"):
        injection_scan(bridge, tokens, vector, layer=3, **kwargs)
    with pytest.raises(ValueError, match="d_model"):
        injection_scan(bridge, tokens, torch.ones(1, 31), layer=0, **kwargs)
    with pytest.raises(ValueError, match="position"):
        injection_scan(bridge, tokens, vector, layer=0, position=4, **kwargs)
    with pytest.raises(ValueError, match="rows"):
        injection_scan(bridge, tokens, torch.ones(2, 32), layer=0, positions="all", **kwargs)
    with pytest.raises(ValueError, match="coefficients"):
        injection_scan(bridge, tokens, vector, layer=0, coefficients=torch.zeros(0), logit_tokens=(1, 2))


def test_vector_files_load_safely(tmp_path):
    good = torch.randn(2, 8)
    torch.save(good, tmp_path / "v.pt")
    np.save(tmp_path / "v.npy", good.numpy())
    torch.testing.assert_close(load_vector(tmp_path / "v.pt", 8), good)
    torch.testing.assert_close(load_vector(tmp_path / "v.npy", 8), good)
    assert load_vector(tmp_path / "v.pt", 8).shape == (2, 8)
    torch.save(torch.randn(8), tmp_path / "row.pt")
    assert load_vector(tmp_path / "row.pt", 8).shape == (1, 8)
    with pytest.raises(DataError, match="shape"):
        load_vector(tmp_path / "v.pt", 9)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable vector"):  # allow_pickle=False: no object arrays
        load_vector(tmp_path / "objects.npy", 8)
    torch.save({"vector": good}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="floating-point tensor"):
        load_vector(tmp_path / "dict.pt", 8)
    torch.save(torch.full((8,), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(DataError, match="non-finite"):
        load_vector(tmp_path / "nan.pt", 8)


def test_actadd_vector_is_the_difference_of_the_two_streams():
    bridge = make_bridge()
    ref = Reference(bridge)
    positive, negative = [1, 2, 3], [1, 4]
    vector = actadd_vector(bridge, positive, negative, layer=1, pad_id=5)
    assert vector.shape == (3, 32)
    _, _, streams = ref.forward(torch.tensor([positive, negative + [5]]))
    torch.testing.assert_close(vector.double(), streams[2][0] - streams[2][1], atol=1e-5, rtol=1e-5)
    assert vector[0].abs().max() == 0  # the shared first token


# --------------------------------------------------------------------------- the command end to end


@pytest.fixture(scope="module")
def local_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 save_pretrained directory with a small byte-level BPE tokenizer (BOS = EOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from residual_dynamics.pretrained.prompts import load_prompts
    from test_pretrained import make_tokenizer

    tokenizer = make_tokenizer(load_prompts())
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("scan-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SMALL = ["scan.prompt=the cat sat", "scan.vector.prompts=[x,y]", "scan.logit_tokens=[a,b]",
         "scan.coefficients.n=16", "scan.top_k=3", "scan.clustering.n_clusters=2"]


def test_scan_command_on_a_local_pretrained_model(tmp_path, local_gpt2, monkeypatch):
    from residual_dynamics.scan.cli import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = composed("scan", ["pretrained@model=local", f"model.path={local_gpt2}", "model.name=tiny-gpt2",
                            f"paths.run_dir={tmp_path / 'run'}", "run_name=scan", *SMALL])
    out = run(cfg)
    run_dir = tmp_path / "run"
    result = out["result"]
    assert out["resolved"].layer == 0  # null = n_layers // 4
    assert len(result.coefficients) == 16
    torch.testing.assert_close(result.total, result.logit_diff, atol=1e-4, rtol=1e-5)
    import pandas as pd

    frame = pd.read_parquet(run_dir / "scan.parquet")
    assert len(frame) == 16 * len(result.components)
    assert set(frame.columns) == {"component", "kind", "layer", "head", "neuron", "cluster", "coefficient",
                                  "attribution"}
    csv = pd.read_csv(run_dir / "scan.csv")
    assert list(csv.component) == list(frame.component)
    np.testing.assert_allclose(csv.attribution.to_numpy(), frame.attribution.to_numpy(), rtol=1e-12)
    head = frame[(frame.component == "L1H2")].sort_values("coefficient")
    np.testing.assert_allclose(head.attribution.to_numpy(), result.of("L1H2").numpy())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {row["probe"] for row in rows} == {"scan"}
    assert {"scan/attribution/head", "scan/attribution/mlp", "scan/logit_diff", "scan/cluster/head"} <= {
        row["name"] for row in rows}
    assert all({"step", "name", "layer", "head", "value", "run", "model"} <= set(row) for row in rows)
    assert (run_dir / "figures" / "scan.png").stat().st_size > 10_000
    assert (run_dir / "clusters.csv").is_file()
    assert out["wandb"] is not None and any(out["wandb"].glob("*.wandb"))


def test_scan_command_checks_the_tokens_before_any_forward(tmp_path, local_gpt2, monkeypatch):
    from residual_dynamics.scan import cli

    def never(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr("residual_dynamics.scan.core.injection_scan", never)
    monkeypatch.setattr("residual_dynamics.scan.core.actadd_vector", never)
    base = ["pretrained@model=local", f"model.path={local_gpt2}", f"paths.run_dir={tmp_path / 'run'}", "logger=none",
            *SMALL]
    with pytest.raises(ConfigError, match=r"scan.logit_tokens: 'the cat' is \d tokens"):
        cli.run(composed("scan", [*base, "scan.logit_tokens=['the cat',b]"]))
    with pytest.raises(ConfigError, match="scan.vector.layer: 5 is out of range"):
        cli.run(composed("scan", [*base, "scan.vector.layer=5"]))
    assert not (tmp_path / "run" / "scan.csv").exists()


@pytest.mark.slow
def test_scan_command_on_a_trained_checkpoint(tmp_path, data_cache):
    """A 2-step ``python -m residual_dynamics.train`` run, then ``python -m residual_dynamics.scan
    checkpoint=<its last.ckpt>``: the run's BPE tokenizer comes from its .hydra/config.yaml."""
    env = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_DIR": str(tmp_path)}
    import os

    train = subprocess.run(
        [sys.executable, "-m", "residual_dynamics.train", "model=tiny", "data.seq_len=32", "data.batch_size=8",
         "data.val_batches=1", "tokenizer.vocab_size=512", "trainer.max_steps=2", "trainer.val_every=2",
         "trainer.ckpt_every=2", "probes=off", "logger=none", f"paths.cache_dir={data_cache}",
         f"paths.output_root={tmp_path}", "run_name=train"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    scan = subprocess.run(
        [sys.executable, "-m", "residual_dynamics.scan", f"checkpoint={ckpt}", *SMALL, "scan.vector.layer=1",
         f"paths.output_root={tmp_path}", "run_name=scan", "logger.mode=offline"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert scan.returncode == 0, scan.stderr[-3000:]
    assert "tiny@step2" in scan.stdout
    run_dir = tmp_path / "scan"
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {row["step"] for row in rows} == {2} and {row["model"] for row in rows} == {"tiny@step2"}
    assert (run_dir / "figures" / "scan.png").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "residual_dynamics.scan", f"checkpoint={ckpt}", *SMALL, "scan.vector.layer=2",
         f"paths.output_root={tmp_path}", "run_name=bad", "logger=none"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "scan.vector.layer: 2 is out of range: this model has 2 layers" in bad.stderr
