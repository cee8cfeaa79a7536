"""run_probes' shared forward: the activation-only probes (residual_norms, activation_rates) in ONE hooked
forward that stops after the last block, with the same results as each probe on its own, no unembedding,
and a bridge left exactly as it was."""

import dataclasses
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from reference_models import VARIANTS, hf_bridge, make_bridge, random_tokens, right_padding_mask
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes.activation_rates import activation_rates, activation_rates_pass
from residual_dynamics.probes.forward import ActivationPass, run_activation_passes, stop_hook_name
from residual_dynamics.probes.registry import PROBE_NAMES, pass_builder, probe_function, run_probes
from residual_dynamics.probes.residual_norms import residual_norms, residual_norms_pass

FUSED_VARIANTS = ["ln_gelu", "rms_gated_gqa", "no_norm_relu", "lnpre_attn_only", "rmspre_gated"]
OPTIONS = {
    "residual_norms": {"fit_layers": [1, 2], "two_point": [0, 2], "prompt_index": 1},
    "activation_rates": {"n_random": 24, "seed": 3},
}
HF_OPTIONS = {"residual_norms": {"prompt_index": 1}, "activation_rates": {"n_random": 16, "seed": 2}}
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
    alone = {
        "residual_norms": residual_norms(bridge, tokens, attention_mask=mask, **options["residual_norms"]),
        "activation_rates": activation_rates(bridge, tokens, attention_mask=mask, **options["activation_rates"]),
    }
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
    with HookCounter(bridge, names) as counter:
        residual_norms(bridge, tokens, attention_mask=mask)
        activation_rates(bridge, tokens, attention_mask=mask, n_random=4)
    has_mlp = not bridge.cfg.attn_only
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
    probes = {
        "cleanup": {"threshold": 0.3},
        "residual_norms": {"fit_layers": [0, 2]},
        "weight_norms": {"fold_ln": True},
        "activation_rates": {"n_random": 16},
        "layer_horizon": {"ks": [1, 2]},
    }
    results = run_probes(bridge, tokens, probes, attention_mask=mask)
    assert list(results) == list(probes)
    for name, options in probes.items():
        function = probe_function(name)
        if "attention_mask" in inspect.signature(function).parameters:
            options = {**options, "attention_mask": mask}
        assert_same(results[name], function(bridge, tokens, **options), name)


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


def test_passes_without_hooks_run_no_forward():
    bridge = make_bridge(attn_only=True)
    tokens = random_tokens(2, 5)
    with HookCounter(bridge, ["blocks.0.hook_resid_pre"]) as counter:
        result = run_probes(bridge, tokens, {"activation_rates": {}})
        assert run_activation_passes(bridge, tokens, []) == []
    assert counter.counts["blocks.0.hook_resid_pre"] == 0
    assert_same(result["activation_rates"], activation_rates(bridge, tokens))
    assert "attention-only" in result["activation_rates"].note


def test_pass_builders_take_exactly_the_probe_options():
    """enabled_probes validates options against the probe function; the builder gets the same options."""
    builders = {name: pass_builder(name) for name in PROBE_NAMES}
    assert {name for name, builder in builders.items() if builder is not None} == {"residual_norms", "activation_rates"}
    for name, builder in builders.items():
        if builder is not None:
            assert inspect.signature(builder).parameters == inspect.signature(probe_function(name)).parameters
    assert builders["residual_norms"] is residual_norms_pass and builders["activation_rates"] is activation_rates_pass


def test_parallel_blocks_report_unsupported_probes_instead_of_failing():
    """GPT-NeoX / Pythia blocks run attention and MLP in parallel: the horizon and clean-up probes say so in
    their result, the other probes still measure, and the run does not fail."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from residual_dynamics.probes.common import Unsupported
    from residual_dynamics.probes.registry import run_probes
    from reference_models import HF_VOCAB, offline_tokenizer

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=HF_VOCAB, max_position_embeddings=32,
                                        use_parallel_residual=True)
    bridge = TransformerBridge.boot_transformers("EleutherAI/pythia-70m",
                                                 hf_model=transformers.GPTNeoXForCausalLM(config).eval(),
                                                 tokenizer=offline_tokenizer())
    assert bridge.cfg.parallel_attn_mlp
    tokens = torch.randint(0, HF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    probes = {"residual_norms": {}, "weight_norms": {}, "activation_rates": {}, "layer_horizon": {"ks": [1, 2]},
              "cleanup": {}}
    results = run_probes(bridge, tokens, probes)
    for name in ("layer_horizon", "cleanup"):
        assert isinstance(results[name], Unsupported) and "parallel" in results[name].note
        assert results[name].records() == []
    names = {record.name for record in results["residual_norms"].records()}
    assert "resid_norm/resid_post" in names and "growth_rate" in names
    assert any(record.name == "W_OV" for record in results["weight_norms"].records())
    assert results["activation_rates"].records()
