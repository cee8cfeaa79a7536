"""Arch, the one descriptor of a model's architecture, and the probes' Options checks against it.

* ``Arch.from_model_config(cfg)`` equals ``Arch.of`` of the bridge the trained model converts to, field by
  field, for every variant that changes the architecture (attention-only, each norm, rotary, sizes).
* ``Arch.of`` of random HF bridges: GPT-2 (standard), Llama (gated MLP, grouped-query, RMSNorm, rotary),
  GPT-NeoX (parallel attention + MLP).
* Every hook name Arch gives for a hook kind it says the model has is a hook point of the bridge.
* ``Options.check(arch)`` rejects bad values naming the option, on ``Arch.from_model_config`` alone: no model
  is built and no probe runs.
"""

from __future__ import annotations

import dataclasses

import pytest

from reference_models import VARIANTS, hf_bridge, make_bridge
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes import activation_rates, cleanup, layer_horizon, residual_norms, weight_norms
from residual_dynamics.probes.arch import HOOK_KINDS, LAYER_HOOKS, Arch, hook_name
from residual_dynamics.probes.registry import PROBE_NAMES, PROBES, check_options
from residual_dynamics.training.model import ModelConfig

SMALL = dict(n_layers=2, d_model=16, n_heads=2, n_ctx=8, d_vocab=24)
CONFIG_VARIANTS = {
    "default_ln": dict(),
    "attn_only": dict(attn_only=True),
    "lnpre": dict(normalization_type="LNPre"),
    "rms": dict(normalization_type="RMS"),
    "rmspre_attn_only": dict(normalization_type="RMSPre", attn_only=True),
    "no_norm": dict(normalization_type="none", act_fn="relu"),
    "rotary": dict(positional_embedding="rotary"),
    "rotary_no_norm_attn_only": dict(positional_embedding="rotary", normalization_type="none", attn_only=True),
    "sizes": dict(n_layers=3, d_head=4, d_mlp=40, n_heads=4),
}


def model_bridge(cfg: ModelConfig):
    import torch

    from residual_dynamics.training.convert import to_transformer_lens
    from residual_dynamics.training.model import Transformer

    torch.manual_seed(0)
    return to_transformer_lens(Transformer(cfg))


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_from_model_config_equals_arch_of_the_converted_bridge(variant):
    cfg = ModelConfig(**{**SMALL, **CONFIG_VARIANTS[variant]})
    cfg.validate()
    declared = Arch.from_model_config(cfg)
    bridge = model_bridge(cfg)
    discovered = Arch.of(bridge)
    for field in dataclasses.fields(Arch):
        assert getattr(declared, field.name) == getattr(discovered, field.name), field.name
    assert declared == discovered
    assert declared.has_mlp == (not cfg.attn_only) and declared.d_head == cfg.head_dim
    assert declared.d_mlp == (None if cfg.attn_only else cfg.mlp_dim)
    assert declared.n_sublayers == len(declared.sublayers) == cfg.n_layers * (1 if cfg.attn_only else 2)
    assert_hooks_exist(discovered, bridge)


def assert_hooks_exist(arch: Arch, bridge):
    """Every hook Arch names for a kind it says the model has is a hook point of the bridge, and every
    kind it says the model lacks is absent."""
    names = set(bridge.hook_dict)
    for kind in HOOK_KINDS:
        layers = range(arch.n_layers) if kind in LAYER_HOOKS else [None]
        present = [arch.hook(kind, layer) in names for layer in layers]
        assert all(present) == arch.has(kind), kind
    for sub in arch.sublayers:
        assert {sub.input_hook, sub.output_hook, sub.resid_after} <= names
    assert {hook for _, hook in arch.residual_points()} <= names
    assert arch.stop_hook in names


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "lnpre_attn_only", "no_norm_relu"])
def test_arch_of_native_bridges(variant):
    config = VARIANTS[variant]
    bridge = make_bridge(**config)
    arch = Arch.of(bridge)
    assert arch.known and arch.n_layers == 3 and arch.d_model == 32 and arch.d_head == 8 and arch.n_heads == 4
    assert arch.n_kv_heads == (config.get("n_key_value_heads") or 4)
    assert arch.has_mlp == (not config.get("attn_only", False))
    assert arch.gated_mlp == config.get("gated_mlp", False)
    assert arch.norm == config.get("normalization_type", "LN") and not arch.parallel
    assert arch.has_final_norm == (arch.norm is not None)
    assert_hooks_exist(arch, bridge)


def test_arch_of_hf_gpt2():
    bridge = hf_bridge("gpt2")[1]
    arch = Arch.of(bridge)
    sizes = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_mlp)
    assert sizes == (2, 32, 4, 4, 8, 128)
    assert arch.has_mlp and not arch.gated_mlp and not arch.parallel
    assert arch.norm == "LN" and arch.positional == "standard" and arch.has_pos_embed and arch.has_final_norm
    assert arch.hook_kinds == frozenset(HOOK_KINDS)
    assert_hooks_exist(arch, bridge)


def test_arch_of_hf_llama_gated_gqa():
    bridge = hf_bridge("llama")[1]
    arch = Arch.of(bridge)
    sizes = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_mlp)
    assert sizes == (2, 32, 4, 2, 8, 64)
    assert arch.has_mlp and arch.gated_mlp and not arch.parallel
    assert arch.norm == "RMS" and arch.positional == "rotary" and not arch.has_pos_embed
    assert [(s.kind, s.layer) for s in arch.sublayers] == [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    assert_hooks_exist(arch, bridge)


def test_arch_of_hf_neox_parallel():
    bridge = hf_bridge("neox")[1]
    arch = Arch.of(bridge)
    assert arch.parallel and arch.has_mlp and not arch.gated_mlp
    assert (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_mlp) == (2, 32, 4, 4, 64)
    assert arch.positional == "rotary"
    # parallel blocks are supported: both sublayers of block l are written at once, after resid_pre_l
    for module in (layer_horizon, cleanup, residual_norms, activation_rates, weight_norms):
        assert module.unsupported(arch) is None, module.__name__
    assert [arch.write_index(kind, layer) for layer in (0, 1) for kind in ("attn", "mlp")] == [0, 0, 1, 1]
    assert arch.write_index("embed") == -1
    assert [name for name, _ in arch.residual_points()] == ["resid_pre_0", "resid_post_0", "resid_post_1"]
    assert not arch.has("resid_mid")
    assert_hooks_exist(arch, bridge)


def test_arch_of_hf_gptj_shared_prenorm():
    bridge = hf_bridge("gptj")[1]
    arch = Arch.of(bridge)
    assert arch.parallel and arch.has_mlp and not arch.has("ln2_in") and arch.has("ln1_in")
    assert layer_horizon.unsupported(arch) is None and cleanup.unsupported(arch) is None
    assert_hooks_exist(arch, bridge)


def test_hook_names_and_sublayer_order():
    arch = Arch.from_model_config(ModelConfig(**SMALL))
    assert arch.hook("resid_pre", 1) == "blocks.1.hook_resid_pre"
    assert arch.hook("z", 0) == "blocks.0.attn.hook_z"
    assert arch.hook("mlp_pre", 1) == "blocks.1.mlp.hook_pre"
    assert arch.hook("ln1_in", 0) == "blocks.0.ln1.hook_in" and arch.hook("ln2_in", 1) == "blocks.1.ln2.hook_in"
    assert (arch.hook("embed"), arch.hook("pos_embed")) == ("hook_embed", "hook_pos_embed")
    assert (arch.hook("ln_final_in"), arch.hook("ln_final_scale")) == ("ln_final.hook_in", "ln_final.hook_scale")
    assert arch.hook("unembed_in") == hook_name("unembed_in") == "unembed.hook_in"
    with pytest.raises(KeyError):
        arch.hook("resid_pre_typo", 0)
    with pytest.raises(ValueError):
        arch.hook("resid_pre")  # a block hook needs a layer
    with pytest.raises(ValueError):
        arch.hook("embed", 0)

    assert [(s.kind, s.layer, s.index) for s in arch.sublayers] == [
        ("attn", 0, 0), ("mlp", 0, 1), ("attn", 1, 2), ("mlp", 1, 3)]
    first = arch.sublayers[0]
    assert (first.input_hook, first.output_hook, first.resid_after) == (
        "blocks.0.ln1.hook_in", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid")
    assert [name for name, _ in arch.residual_points()] == [
        "resid_pre_0", "resid_mid_0", "resid_post_0", "resid_mid_1", "resid_post_1"]
    assert arch.sublayer_index("mlp", 1) == 3
    assert [arch.write_index(kind, layer) for layer in (0, 1) for kind in ("attn", "mlp")] == [0, 1, 2, 3]
    assert arch.hook("ln1_scale", 1) == "blocks.1.ln1.hook_scale" and arch.hook("pattern", 0) == "blocks.0.attn.hook_pattern"

    attn_only = Arch.from_model_config(ModelConfig(**SMALL, attn_only=True))
    assert [(s.kind, s.layer, s.index) for s in attn_only.sublayers] == [("attn", 0, 0), ("attn", 1, 1)]
    assert [name for name, _ in attn_only.residual_points()] == ["resid_pre_0", "resid_post_0", "resid_post_1"]
    assert attn_only.sublayer_index("attn", 1) == 1
    with pytest.raises(ValueError):
        attn_only.sublayer_index("mlp", 0)
    assert activation_rates.unsupported(attn_only) is not None


# --- Options.check on the configured architecture: no model, no probe ----------------------------------

ARCH = Arch.from_model_config(ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=8))  # 4 sublayers


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_defaults_pass_on_configured_and_unknown_architectures(name):
    PROBES[name].Options().check(ARCH)
    PROBES[name].Options().check(Arch.unknown())
    check_options(name, PROBES[name].Options(), ARCH)


BAD = [
    # (probe, options, field, message part)
    ("layer_horizon", dict(ks=[100]), "ks", "1..4"),
    ("layer_horizon", dict(ks=[1, 5]), "ks", "1..4"),
    ("layer_horizon", dict(ks=[0]), "ks", "1..4"),
    ("layer_horizon", dict(ks=[]), "ks", "non-empty"),
    ("layer_horizon", dict(ks=["a"]), "ks", "integer"),
    ("layer_horizon", dict(ks=[1.5]), "ks", "integer"),
    ("layer_horizon", dict(ks=3), "ks", "list"),
    ("layer_horizon", dict(mode="fast"), "mode", "clean"),
    ("layer_horizon", dict(tolerance=0), "tolerance", "> 0"),
    ("layer_horizon", dict(tolerance=-0.1), "tolerance", "> 0"),
    ("layer_horizon", dict(tolerance="abc"), "tolerance", "must be a number, got 'abc'"),
    ("layer_horizon", dict(include_embedding="yes"), "include_embedding", "true or false"),
    ("layer_horizon", dict(unembed_reads_window=1), "unembed_reads_window", "true or false"),
    ("layer_horizon", dict(max_batch=0), "max_batch", ">= 1"),
    ("layer_horizon", dict(unit="block"), "unit", "sublayer"),
    ("layer_horizon", dict(ks=[3], unit="layer"), "ks", "1..2 (the model's number of layers)"),
    ("layer_horizon", dict(ks=[4], unit="layer"), "ks", "1..2"),
    ("layer_horizon", dict(max_memory="lots"), "max_memory", "memory size"),
    ("layer_horizon", dict(max_memory="2 parsecs"), "max_memory", "units"),
    ("layer_horizon", dict(max_memory=0), "max_memory", "positive"),
    ("layer_horizon", dict(max_memory=True), "max_memory", "memory size"),
    ("cleanup", dict(max_memory="-1GB"), "max_memory", "memory size"),
    ("cleanup", dict(max_memory=[2]), "max_memory", "memory size"),
    ("residual_norms", dict(max_memory="big"), "max_memory", "memory size"),
    ("activation_rates", dict(max_memory=-5), "max_memory", "positive"),
    ("activation_rates", dict(n_random=0), "n_random", ">= 1"),
    ("activation_rates", dict(n_random="abc"), "n_random", "integer"),
    ("activation_rates", dict(n_random=True), "n_random", "integer"),
    ("activation_rates", dict(seed="x"), "seed", "integer"),
    ("residual_norms", dict(fit_layers=[1, 1]), "fit_layers", "0 <= a < b < n_layers=2"),
    ("residual_norms", dict(fit_layers=[0, 2]), "fit_layers", "n_layers=2"),
    ("residual_norms", dict(fit_layers=[-1, 1]), "fit_layers", "0 <= a"),
    ("residual_norms", dict(fit_layers=[0, 1, 1]), "fit_layers", "two layers"),
    ("residual_norms", dict(fit_layers="0,1"), "fit_layers", "list"),
    ("residual_norms", dict(two_point=[1, 0]), "two_point", "a < b"),
    ("residual_norms", dict(prompt_index=-1), "prompt_index", ">= 0"),
    ("residual_norms", dict(prompt_index="first"), "prompt_index", "integer"),
    ("weight_norms", dict(fold_ln="true"), "fold_ln", "true or false"),
    ("cleanup", dict(threshold="abc"), "threshold", "must be a number, got 'abc'"),
    ("cleanup", dict(writer_min=0), "writer_min", "> 0"),
    ("cleanup", dict(threshold=0.8, writer_min=0.7), "threshold", "< writer_min"),
    ("cleanup", dict(threshold=float("nan")), "threshold", "finite"),
    ("cleanup", dict(top_n=0), "top_n", ">= 1"),
    ("cleanup", dict(top_n=2.0), "top_n", "integer"),
    ("cleanup", dict(writers=[]), "writers", "non-empty"),
    ("cleanup", dict(writers="L0H0"), "writers", "list"),
    ("cleanup", dict(writers=["L0H0", 3]), "writers", "strings"),
    ("cleanup", dict(writers=["L9H9"]), "writers", "L9H9"),
    ("cleanup", dict(writers=["L0H2"]), "writers", "head < 2"),
]


@pytest.mark.parametrize("probe, values, field, message", BAD,
                         ids=[f"{p}-{f}-{i}" for i, (p, _, f, _) in enumerate(BAD)])
def test_check_rejects_bad_values_naming_the_option(probe, values, field, message):
    options = PROBES[probe].Options(**values)
    with pytest.raises(ConfigError) as error:
        options.check(ARCH)
    assert error.value.field == field and message in str(error.value)
    with pytest.raises(ConfigError) as error:
        check_options(probe, options, ARCH)
    assert error.value.field == f"probes.{probe}.{field}" and message in str(error.value)


GOOD = [
    ("layer_horizon", dict(ks=[1, 2, 4], mode="same_pass", tolerance=1, max_batch=8)),
    ("layer_horizon", dict(ks=[1, 2], unit="layer", max_memory="512MiB")),
    ("cleanup", dict(max_memory=3_000_000_000)),
    ("activation_rates", dict(n_random=1, seed=5)),
    ("residual_norms", dict(fit_layers=[0, 1], two_point=[0, 1], prompt_index=3)),
    ("weight_norms", dict(fold_ln=True)),
    ("cleanup", dict(threshold=-0.5, writer_min=1.2, top_n=1, writers=["EMBED", "POS", "L1H1", "L1MLP"])),
]


@pytest.mark.parametrize("probe, values", GOOD)
def test_check_accepts_good_values(probe, values):
    PROBES[probe].Options(**values).check(ARCH)


def test_checks_follow_the_architecture():
    """The same option is right on one architecture and wrong on another: ks against the number of
    sublayers (or layers, with unit=layer), writers against the nodes (no POS with rotary, no MLP nodes
    without MLPs)."""
    attn_only = Arch.from_model_config(ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=8, attn_only=True))
    layer_horizon.Options(ks=[4]).check(ARCH)
    with pytest.raises(ConfigError, match="1..2"):
        layer_horizon.Options(ks=[4]).check(attn_only)
    layer_horizon.Options(ks=[2], unit="layer").check(attn_only)
    with pytest.raises(ConfigError, match="layers"):
        layer_horizon.Options(ks=[3], unit="layer").check(ARCH)
    with pytest.raises(ConfigError, match="L0MLP"):
        cleanup.Options(writers=["L0MLP"]).check(attn_only)
    rotary = Arch.from_model_config(ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=8,
                                                positional_embedding="rotary"))
    with pytest.raises(ConfigError, match="POS"):
        cleanup.Options(writers=["POS"]).check(rotary)
    cleanup.Options(writers=["POS"]).check(ARCH)
    one_layer = Arch.from_model_config(ModelConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=8))
    with pytest.raises(ConfigError, match="fit_layers"):
        residual_norms.Options(fit_layers=[0, 1]).check(one_layer)


def test_unknown_architecture_checks_only_what_needs_none():
    unknown = Arch.unknown()
    assert not unknown.known
    layer_horizon.Options(ks=[100]).check(unknown)  # checked again once the model is loaded
    residual_norms.Options(fit_layers=[5, 9]).check(unknown)
    cleanup.Options(writers=["L9H9"]).check(unknown)
    with pytest.raises(ConfigError, match="ks"):
        layer_horizon.Options(ks=[0]).check(unknown)
    with pytest.raises(ConfigError, match="n_random"):
        activation_rates.Options(n_random=0).check(unknown)
    with pytest.raises(ConfigError, match="fit_layers"):
        residual_norms.Options(fit_layers=[3, 2]).check(unknown)
    with pytest.raises(ConfigError, match="must be a number"):
        cleanup.Options(threshold="abc").check(unknown)


def test_check_runs_no_probe(monkeypatch):
    """Checking needs only the Arch: every probe function and pass builder is replaced by one that fails."""
    def fail(*args, **kwargs):
        raise AssertionError("a probe ran during the check")

    for name, spec in list(PROBES.items()):
        builder = None if spec.pass_builder is None else fail
        monkeypatch.setitem(PROBES, name, dataclasses.replace(spec, fn=fail, pass_builder=builder))
    for name in PROBE_NAMES:
        check_options(name, PROBES[name].Options(), ARCH)
    with pytest.raises(ConfigError, match="probes.layer_horizon.ks"):
        check_options("layer_horizon", layer_horizon.Options(ks=[100]), ARCH)


def test_options_accept_omegaconf_lists():
    """Hydra hands lists as ListConfig: the checks and the probes take them as lists."""
    from omegaconf import OmegaConf

    layer_horizon.Options(ks=OmegaConf.create([1, 2])).check(ARCH)
    residual_norms.Options(fit_layers=OmegaConf.create([0, 1])).check(ARCH)
    cleanup.Options(writers=OmegaConf.create(["L0H0"])).check(ARCH)
    structured = OmegaConf.structured(layer_horizon.Options)
    structured.ks = [1, 2]
    layer_horizon.Options(**OmegaConf.to_object(structured).__dict__).check(ARCH)


def test_parse_bytes():
    from residual_dynamics.probes.common import DEFAULT_MAX_MEMORY, memory_budget, parse_bytes

    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("512mb") == 512 * 10**6 and parse_bytes("64KiB") == 2**16
    assert parse_bytes(123456) == parse_bytes("123456") == parse_bytes("123456B") == 123456
    assert memory_budget(None) == parse_bytes(DEFAULT_MAX_MEMORY) == 2 * 10**9
    for bad in ("", "GB", "2XB", "1e9", "-2GB", 0, -1, float("inf"), None, False):
        with pytest.raises(ConfigError, match="probes.max_memory"):
            parse_bytes(bad, "probes.max_memory")


def test_probes_max_memory_reaches_the_probes_that_take_it():
    """``probes.max_memory`` is checked once, naming that field, and handed to every probe with a
    ``max_memory`` option whose own value is null; a probe section's own value wins."""
    from residual_dynamics.spec import ProbesConfig

    config = ProbesConfig(max_memory="3GB")
    enabled = config.validated(ARCH, None)
    budgets = {name: getattr(options, "max_memory", "absent") for name, options in enabled.items()}
    assert budgets["layer_horizon"] == budgets["cleanup"] == "3GB"
    assert budgets["residual_norms"] == budgets["activation_rates"] == "3GB"
    assert budgets["weight_norms"] == "absent"
    config.cleanup.max_memory = "500MB"
    assert config.enabled()["cleanup"].max_memory == "500MB"
    assert config.enabled()["layer_horizon"].max_memory == "3GB"
    with pytest.raises(ConfigError) as error:
        ProbesConfig(max_memory="a lot").validated(ARCH, None)
    assert error.value.field == "probes.max_memory"
    with pytest.raises(ConfigError) as error:
        bad = ProbesConfig()
        bad.layer_horizon.max_memory = "nope"
        bad.validated(ARCH, None)
    assert error.value.field == "probes.layer_horizon.max_memory"
