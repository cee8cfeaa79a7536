"""The probe table and run_probes.

* The shared forward: the activation-only probes (residual_norms, activation_rates) in ONE hooked forward
  that stops after the last block, with the same results as each probe on its own, no unembedding, and a
  bridge left exactly as it was.
* The table: every probe's Options fields are keyword options of its function (and of its pass builder),
  ``check_options`` names ``probes.<name>.<field>``, and one mechanism for unsupported architectures.
"""

import dataclasses
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from reference_models import VARIANTS, hf_bridge, make_bridge, random_tokens, right_padding_mask
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes import activation_rates as activation_rates_mod
from residual_dynamics.probes import cleanup as cleanup_mod
from residual_dynamics.probes import layer_horizon as layer_horizon_mod
from residual_dynamics.probes import logit_lens as logit_lens_mod
from residual_dynamics.probes import residual_norms as residual_norms_mod
from residual_dynamics.probes import sublayer_ablation as sublayer_ablation_mod
from residual_dynamics.probes import weight_norms as weight_norms_mod
from residual_dynamics.probes.activation_rates import activation_rates, activation_rates_pass
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import ProbeUnsupported, Unsupported
from residual_dynamics.probes.forward import ActivationPass, run_activation_passes, stop_hook_name
from residual_dynamics.probes.registry import PROBE_NAMES, PROBES, ProbeSpec, check_options, run_probes
from residual_dynamics.probes.residual_norms import residual_norms, residual_norms_pass


def options_of(values):
    """{probe: Options} from {probe: {option: value}}."""
    return {name: PROBES[name].Options(**kwargs) for name, kwargs in values.items()}


def kwargs_of(options):
    """The keyword options of one Options instance."""
    return dataclasses.asdict(options)


FUSED_VARIANTS = ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "lnpre_attn_only", "rmspre_gated"]
OPTIONS = options_of({
    "residual_norms": {"fit_layers": [1, 2], "two_point": [0, 2], "prompt_index": 1},
    "activation_rates": {"n_random": 24, "seed": 3},
})
HF_OPTIONS = options_of({"residual_norms": {"prompt_index": 1}, "activation_rates": {"n_random": 16, "seed": 2}})
# Hook points after the last block: none of them may fire in a stopped forward.
AFTER_BLOCKS = ("ln_final.hook_out", "unembed.hook_in", "unembed.hook_out")


def assert_same(a, b, where="result"):
    """Exactly equal, field by field (tensors bitwise, NaN == NaN)."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name), f"{where}.{field.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


class HookCounter:
    """Counts how often hook points fire, through a context that outlives the probes' own hooks."""

    def __init__(self, bridge, names):
        self.bridge = bridge
        self.names = [name for name in names if name in bridge.hook_dict]
        self.counts = dict.fromkeys(self.names, 0)

    def _hook(self, name):
        def count(activation, hook):
            self.counts[name] += 1

        return count

    def __enter__(self):
        self._context = self.bridge.hooks(fwd_hooks=[(name, self._hook(name)) for name in self.names])
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def hook_state(bridge):
    """Every hook the bridge (and the model it wraps) has registered, as counts per module."""
    state = {}
    for name, module in bridge.named_modules():
        counts = (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks))
        counts += (len(getattr(module, "fwd_hooks", ())), len(getattr(module, "bwd_hooks", ())))
        if any(counts):
            state[name] = counts
    return state, getattr(bridge, "context_level", 0)


BRIDGE_IDS = FUSED_VARIANTS + ["hf_gpt2", "hf_llama"]


def build(case):
    """(bridge, run_probes options, vocabulary size) of a native variant or ``hf_gpt2`` / ``hf_llama``."""
    if case.startswith("hf_"):
        return hf_bridge(case[3:])[1], HF_OPTIONS, 100
    return make_bridge(**VARIANTS[case]), OPTIONS, 50


@pytest.mark.parametrize("case", BRIDGE_IDS)
@pytest.mark.parametrize("padded", [True, False])
def test_fused_results_equal_standalone_probes(case, padded):
    bridge, options, vocab = build(case)
    tokens = random_tokens(3, 8, d_vocab=vocab, seed=4)
    mask = right_padding_mask([8, 5, 7], 8) if padded else None

    fused = run_probes(bridge, tokens, options, attention_mask=mask)
    alone = {"residual_norms": residual_norms(bridge, tokens, attention_mask=mask,
                                              **kwargs_of(options["residual_norms"]))}
    if bridge.cfg.attn_only:  # no MLP: unsupported, the probe did not run (and refuses when called directly)
        with pytest.raises(ProbeUnsupported) as refusal:
            activation_rates(bridge, tokens, attention_mask=mask, **kwargs_of(options["activation_rates"]))
        alone["activation_rates"] = Unsupported(note=str(refusal.value))
    else:
        alone["activation_rates"] = activation_rates(bridge, tokens, attention_mask=mask,
                                                     **kwargs_of(options["activation_rates"]))
    assert list(fused) == list(options)
    assert_same(fused, alone)
    # The order of the probes in the config sets the order of the keys, not the numbers.
    reordered = run_probes(bridge, tokens, dict(reversed(list(options.items()))), attention_mask=mask)
    assert list(reordered) == list(reversed(list(options)))
    for name in options:
        assert_same(reordered[name], alone[name], name)


@pytest.mark.parametrize("case", ["ln_gelu", "no_norm_relu", "lnpre_attn_only", "hf_gpt2", "hf_llama"])
def test_fused_path_runs_one_forward_and_no_unembedding(case):
    bridge, options, vocab = build(case)
    tokens = random_tokens(2, 6, d_vocab=vocab, seed=5)
    mask = right_padding_mask([6, 4], 6)
    last = bridge.cfg.n_layers - 1
    names = ("hook_embed", "blocks.0.hook_resid_pre", f"blocks.{last}.hook_resid_post") + AFTER_BLOCKS
    names += ("hook_unembed",)

    with HookCounter(bridge, names) as counter:
        run_probes(bridge, tokens, options, attention_mask=mask)
    assert counter.counts["blocks.0.hook_resid_pre"] == 1
    assert counter.counts[f"blocks.{last}.hook_resid_post"] == 1
    assert counter.counts.get("hook_embed", 1) == 1
    assert "unembed.hook_out" in counter.counts  # the unembedding is watched, and never reached:
    assert {name: n for name, n in counter.counts.items() if name in AFTER_BLOCKS + ("hook_unembed",)} == (
        {name: 0 for name in counter.counts if name in AFTER_BLOCKS + ("hook_unembed",)}
    )

    # Each probe on its own: one stopped forward each, no unembedding either.
    has_mlp = not bridge.cfg.attn_only
    with HookCounter(bridge, names) as counter:
        residual_norms(bridge, tokens, attention_mask=mask)
        if has_mlp:
            activation_rates(bridge, tokens, attention_mask=mask, n_random=4)
    assert counter.counts["blocks.0.hook_resid_pre"] == 1 + has_mlp
    assert counter.counts["unembed.hook_out"] == 0

    # A plain forward does reach the unembedding (the counter sees it).
    with HookCounter(bridge, names) as counter:
        bridge(tokens, attention_mask=mask)
    assert counter.counts["unembed.hook_out"] == 1 and counter.counts["blocks.0.hook_resid_pre"] == 1


def test_other_probes_run_as_before_and_keys_are_unchanged():
    bridge = make_bridge(**VARIANTS["rms_gated_gqa"])
    tokens = random_tokens(3, 8, seed=6)
    mask = right_padding_mask([8, 6, 8], 8)
    probes = options_of({
        "cleanup": {"threshold": 0.3},
        "residual_norms": {"fit_layers": [0, 2]},
        "weight_norms": {"fold_ln": True},
        "activation_rates": {"n_random": 16},
        "layer_horizon": {"ks": [1, 2]},
    })
    results = run_probes(bridge, tokens, probes, attention_mask=mask)
    assert list(results) == list(probes)
    for name, options in probes.items():
        assert_same(results[name], PROBES[name].fn(bridge, tokens, attention_mask=mask, **kwargs_of(options)), name)
    # An Arch handed in is used as it is (the same one Arch.of builds), with the same numbers.
    given = run_probes(bridge, tokens, probes, attention_mask=mask, arch=Arch.of(bridge))
    for name in probes:
        assert_same(given[name], results[name], name)


@pytest.mark.parametrize("case", ["ln_gelu", "no_norm_gelu", "ln_attn_only", "hf_gpt2", "hf_llama"])
def test_bridge_works_normally_after_a_stopped_forward(case):
    bridge, options, vocab = build(case)
    tokens = random_tokens(3, 7, d_vocab=vocab, seed=7)
    mask = right_padding_mask([7, 4, 6], 7)
    with torch.no_grad():
        fresh = bridge(tokens, attention_mask=mask)
        fresh_cache_logits, fresh_cache = bridge.run_with_cache(tokens, attention_mask=mask)
    # Taken after a first plain forward: TransformerLens installs a few permanent forward pre-hooks of its
    # own on the native norm modules during the first forward of a bridge.
    before = hook_state(bridge)

    run_probes(bridge, tokens, options, attention_mask=mask)
    residual_norms(bridge, tokens)

    assert hook_state(bridge) == before  # no hook left behind, context level back where it was
    with torch.no_grad():
        after = bridge(tokens, attention_mask=mask)
        cache_logits, cache = bridge.run_with_cache(tokens, attention_mask=mask)
    assert torch.equal(after, fresh)
    assert torch.equal(cache_logits, fresh_cache_logits)
    assert set(cache.keys()) == set(fresh_cache.keys())
    for key in fresh_cache.keys():
        assert torch.equal(cache[key], fresh_cache[key]), key
    assert hook_state(bridge) == before


def test_a_probe_that_raises_in_a_hook_leaves_no_hooks():
    bridge = make_bridge()
    tokens = random_tokens(2, 5)
    with torch.no_grad():
        fresh = bridge(tokens)
    before = hook_state(bridge)  # after a first forward (see above)

    def boom(activation, hook):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_activation_passes(bridge, tokens, [ActivationPass([("blocks.1.hook_resid_pre", boom)], lambda: None)])
    assert hook_state(bridge) == before
    with torch.no_grad():
        assert torch.equal(bridge(tokens), fresh)


def test_stop_hook_name_prefers_ln_final_then_unembed():
    assert stop_hook_name(make_bridge(normalization_type=None)) == "ln_final.hook_in"
    assert stop_hook_name(SimpleNamespace(hook_dict={"unembed.hook_in": 0, "blocks.0.hook_resid_pre": 0})) == (
        "unembed.hook_in"
    )
    assert stop_hook_name(SimpleNamespace(hook_dict={"blocks.0.hook_resid_pre": 0})) is None


def test_hooks_after_the_stop_are_reported_not_silently_empty():
    bridge = make_bridge()

    def read(activation, hook):
        return None

    with pytest.raises(RuntimeError, match="unembed.hook_out"):
        run_activation_passes(bridge, random_tokens(2, 5), [ActivationPass([("unembed.hook_out", read)], lambda: 0)])


def test_passes_without_hooks_and_unsupported_probes_run_no_forward():
    bridge = make_bridge(attn_only=True)
    tokens = random_tokens(2, 5)
    with HookCounter(bridge, ["blocks.0.hook_resid_pre"]) as counter:
        result = run_probes(bridge, tokens, {"activation_rates": activation_rates_mod.Options()})
        assert run_activation_passes(bridge, tokens, []) == []
    assert counter.counts["blocks.0.hook_resid_pre"] == 0
    assert isinstance(result["activation_rates"], Unsupported)
    assert "attention-only" in result["activation_rates"].note and result["activation_rates"].records() == []


MODULES = {"residual_norms": residual_norms_mod, "weight_norms": weight_norms_mod,
           "activation_rates": activation_rates_mod, "layer_horizon": layer_horizon_mod, "cleanup": cleanup_mod,
           "sublayer_ablation": sublayer_ablation_mod, "logit_lens": logit_lens_mod}
NOT_OPTIONS = {"bridge", "tokens", "attention_mask", "arch"}


def test_the_table_lists_every_probe_with_its_own_pieces():
    assert PROBE_NAMES == ("residual_norms", "weight_norms", "activation_rates", "layer_horizon", "cleanup",
                           "sublayer_ablation", "logit_lens")
    assert tuple(PROBES) == PROBE_NAMES
    for name, spec in PROBES.items():
        module = MODULES[name]
        assert isinstance(spec, ProbeSpec)
        assert spec.fn is getattr(module, name) and spec.Options is module.Options
        assert spec.unsupported is module.unsupported
        assert not spec.Options.__dataclass_params__.frozen  # Hydra merges into it
    assert {name for name, spec in PROBES.items() if spec.pass_builder is not None} == {"residual_norms",
                                                                                        "activation_rates"}
    assert PROBES["residual_norms"].pass_builder is residual_norms_pass
    assert PROBES["activation_rates"].pass_builder is activation_rates_pass


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_options_fields_are_exactly_the_keyword_options_of_the_probe(name):
    """Options fields = the probe function's keyword options (minus attention_mask and arch), with the same
    defaults; the pass builder takes the same keywords as the function."""
    spec = PROBES[name]
    parameters = inspect.signature(spec.fn).parameters
    keyword = {key: p.default for key, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"attention_mask", "arch"} <= set(parameters)
    options = {field.name: field.default for field in dataclasses.fields(spec.Options)}
    assert not set(options) & NOT_OPTIONS
    assert options == {key: default for key, default in keyword.items() if key not in NOT_OPTIONS}
    if spec.pass_builder is not None:
        assert inspect.signature(spec.pass_builder).parameters == parameters


def test_check_options_names_the_probe_field():
    arch = Arch.of(make_bridge())  # 3 layers with MLPs: 6 sublayers
    with pytest.raises(ConfigError) as error:
        check_options("layer_horizon", layer_horizon_mod.Options(ks=[1, 100]), arch)
    assert error.value.field == "probes.layer_horizon.ks"
    assert str(error.value).startswith("probes.layer_horizon.ks: horizons must be integers in 1..6")
    with pytest.raises(ConfigError) as error:
        check_options("activation_rates", activation_rates_mod.Options(n_random=0), arch)
    assert error.value.field == "probes.activation_rates.n_random"
    with pytest.raises(ConfigError, match=r"^probes\.cleanup\.threshold: must be a number, got 'abc'$"):
        check_options("cleanup", cleanup_mod.Options(threshold="abc"), arch)
    with pytest.raises(ConfigError, match="probes.residual_norms"):  # the wrong Options class
        check_options("residual_norms", cleanup_mod.Options(), arch)
    for name in PROBE_NAMES:  # the defaults are fine
        check_options(name, PROBES[name].Options(), arch)


def test_run_probes_checks_the_options_before_running_any_probe():
    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    with HookCounter(bridge, ["blocks.0.hook_resid_pre"]) as counter:
        with pytest.raises(ConfigError, match="probes.layer_horizon.ks"):
            run_probes(bridge, tokens, {"residual_norms": residual_norms_mod.Options(),
                                        "layer_horizon": layer_horizon_mod.Options(ks=[100])})
        with pytest.raises(TypeError, match="Options"):  # plain dicts are not options
            run_probes(bridge, tokens, {"residual_norms": {"fit_layers": [0, 2]}})
    assert counter.counts["blocks.0.hook_resid_pre"] == 0


def test_config_sections_subclassing_options_run_with_the_probe_fields_only():
    """The config module subclasses Options with enabled / early: run_probes passes only the probe's fields."""

    @dataclasses.dataclass
    class Section(residual_norms_mod.Options):
        enabled: bool = True
        early: bool = False

    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    section = Section(fit_layers=[0, 2])
    check_options("residual_norms", section, Arch.of(bridge))
    got = run_probes(bridge, tokens, {"residual_norms": section})["residual_norms"]
    assert_same(got, residual_norms(bridge, tokens, fit_layers=(0, 2)))


def test_unsupported_is_decided_by_the_spec_before_the_probe_runs(monkeypatch):
    """ONE mechanism: the spec's unsupported(arch) gives the reason; the probe function is never called."""
    bridge = make_bridge()
    tokens = random_tokens(2, 6)
    calls = []

    def never(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an unsupported probe ran")

    spec = PROBES["weight_norms"]
    monkeypatch.setitem(PROBES, "weight_norms", dataclasses.replace(spec, fn=never, unsupported=lambda arch: "nope"))
    result = run_probes(bridge, tokens, {"weight_norms": weight_norms_mod.Options()})["weight_norms"]
    assert calls == [] and isinstance(result, Unsupported) and result.note == "nope" and result.records() == []


def test_parallel_blocks_run_every_probe():
    """GPT-NeoX / Pythia: every probe measures (horizon and clean-up with their parallel conventions,
    checked against the float64 brute force in their own test files), directly or through run_probes."""
    from reference_models import HF_VOCAB

    bridge = hf_bridge("neox")[1]
    assert bridge.cfg.parallel_attn_mlp
    tokens = torch.randint(0, HF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    probes = options_of({"residual_norms": {}, "weight_norms": {}, "activation_rates": {},
                         "layer_horizon": {"ks": [1, 2]}, "cleanup": {}})
    results = run_probes(bridge, tokens, probes)
    for name in probes:
        assert not isinstance(results[name], Unsupported) and results[name].records(), name
    for name in ("layer_horizon", "cleanup"):
        direct = PROBES[name].fn(bridge, tokens, **kwargs_of(probes[name]))
        assert [(r.name, r.layer, r.head) for r in direct.records()] == \
               [(r.name, r.layer, r.head) for r in results[name].records()]
    assert results["cleanup"].point_names == ["resid_pre_0", "resid_post_0", "resid_post_1"]
