"""The shared activation forward (residual_norms + activation_rates) over chunks of batch rows.

Every chunking (one row per forward, two, all) and a ``max_memory`` budget that leaves room for one row
give the float64 brute-force numbers (explicit loops over the reference model's activations); the prompt
whose per-position norms are kept may sit in any chunk; a budget too small for one row is a note.
"""

import math

import pytest
import torch
from reference_models import VARIANTS, Reference, hf_bridge, make_bridge, random_tokens, real_positions
from reference_models import right_padding_mask
from reference_models import single_thread  # noqa: F401  (autouse fixture: torch on one thread)

from residual_dynamics.probes import activation_rates as rates_mod
from residual_dynamics.probes import residual_norms as norms_mod
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import PLANNED_SHARE, Unsupported
from residual_dynamics.probes.forward import pass_bytes_per_row, plan_rows, run_activation_passes
from residual_dynamics.probes.registry import PROBES, run_probes


def l2(vector) -> float:
    return math.sqrt(sum(v * v for v in vector.tolist()))


def brute_force(bridge, tokens, mask, prompt_index):
    """Per hook kind the mean L2 norm over real positions, the mean centred norm, the per-position
    resid_post norms of ``prompt_index`` and the MLP positive fractions, by loops in float64."""
    acts = Reference(bridge).activations(tokens, mask)
    positions = real_positions(tokens, mask)
    layers = range(bridge.cfg.n_layers)
    kinds = [kind for kind in norms_mod.HOOK_KINDS if kind in acts]
    norms = {kind: [sum(l2(acts[kind][layer][b][p]) for b, p in positions) / len(positions) for layer in layers]
             for kind in kinds}
    centred = {kind: [sum(l2(acts[kind][layer][b][p] - acts[kind][layer][b][p].mean()) for b, p in positions)
                      / len(positions) for layer in layers] for kind in kinds}
    row = [[l2(acts["resid_post"][layer][prompt_index][p]) for p in range(tokens.shape[1])] for layer in layers]
    rates = None
    if "mlp_pre" in acts:
        rates = [sum(int(v > 0) for b, p in positions for v in acts["mlp_pre"][layer][b][p].tolist())
                 / (len(positions) * bridge.cfg.d_mlp) for layer in layers]
    return norms, centred, row, rates, len(positions)


def passes(bridge, tokens, mask, prompt_index, max_memory=None):
    arch = Arch.of(bridge)
    out = [norms_mod.residual_norms_pass(bridge, tokens, attention_mask=mask, prompt_index=prompt_index,
                                         centered=True, max_memory=max_memory, arch=arch)]
    if arch.has_mlp:
        out.append(rates_mod.activation_rates_pass(bridge, tokens, attention_mask=mask, n_random=8,
                                                   max_memory=max_memory, arch=arch))
    return out


def check(results, expected, d_mlp):
    norms, centred, row, rates, n_positions = expected
    result = results[0]
    assert result.n_positions == n_positions
    for kind, per_layer in norms.items():
        torch.testing.assert_close(result.norms[kind], torch.tensor(per_layer, dtype=torch.float32),
                                   rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(result.centered.norms[kind], torch.tensor(centred[kind], dtype=torch.float32),
                                   rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(result.position_norms, torch.tensor(row, dtype=torch.float32), rtol=2e-5, atol=1e-6)
    if rates is not None:
        # float32 vs float64 may flip the sign of a pre-activation within rounding of zero: one entry
        torch.testing.assert_close(results[1].token_rate, torch.tensor(rates, dtype=torch.float32),
                                   atol=1.01 / (n_positions * d_mlp), rtol=0)


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_gated_gqa", "ln_attn_only"])
@pytest.mark.parametrize("prompt_index", [0, 2])
def test_every_chunking_matches_the_float64_brute_force(variant, prompt_index):
    bridge = make_bridge(**VARIANTS[variant])
    tokens = random_tokens(3, 8, seed=4)
    mask = right_padding_mask([8, 3, 6], 8)
    expected = brute_force(bridge, tokens, mask, prompt_index)
    whole = run_activation_passes(bridge, tokens, passes(bridge, tokens, mask, prompt_index), attention_mask=mask,
                                  rows=3)
    check(whole, expected, bridge.cfg.d_mlp)
    for rows in (1, 2):
        chunked = run_activation_passes(bridge, tokens, passes(bridge, tokens, mask, prompt_index),
                                        attention_mask=mask, rows=rows)
        check(chunked, expected, bridge.cfg.d_mlp)
        # the same numbers as one forward, up to the float rounding of the sums
        torch.testing.assert_close(chunked[0].log_slope, whole[0].log_slope, rtol=1e-5, atol=1e-7)
        if len(whole) > 1:
            # counts; a row alone may round a pre-activation near zero to the other sign: one entry
            n_entries = whole[1].n_positions * bridge.cfg.d_mlp
            torch.testing.assert_close(chunked[1].token_rate, whole[1].token_rate, atol=1.01 / n_entries, rtol=0)
            assert torch.equal(chunked[1].random_rate, whole[1].random_rate)  # no forward over rows


def test_the_budget_sets_the_rows_and_a_too_small_one_is_a_note():
    bridge = make_bridge(**VARIANTS["ln_gelu"])
    arch = Arch.of(bridge)
    tokens = random_tokens(3, 8, seed=5)
    mask = right_padding_mask([8, 7, 5], 8)
    per_row = pass_bytes_per_row(arch, seq=8)
    assert per_row == 4 * (8 * (16 * arch.d_model + 8 * arch.d_mlp) + 6 * arch.n_heads * 64)
    one_row = int(1.5 * per_row / PLANNED_SHARE)
    assert plan_rows(arch, batch=3, seq=8, budget=one_row) == (1, per_row)
    assert plan_rows(arch, batch=3, seq=8, budget=10**9) == (3, per_row)
    forwards = []
    handle = bridge.blocks[0].hook_resid_pre.register_forward_hook(lambda module, args, out: forwards.append(1))
    try:
        small = run_probes(bridge, tokens, {name: PROBES[name].Options(max_memory=str(one_row))
                                            for name in ("residual_norms", "activation_rates")},
                           attention_mask=mask)
    finally:
        handle.remove()
    assert len(forwards) == 3  # one forward per row
    expected_norms, _, expected_row, expected_rates, _ = brute_force(bridge, tokens, mask, 0)
    torch.testing.assert_close(small["residual_norms"].norms["resid_post"],
                               torch.tensor(expected_norms["resid_post"], dtype=torch.float32), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(small["activation_rates"].token_rate, torch.tensor(expected_rates, dtype=torch.float32),
                               atol=1.01 / (small["activation_rates"].n_positions * arch.d_mlp), rtol=0)
    # the smaller of the two budgets wins for the shared forward
    tiny = run_probes(bridge, tokens, {"residual_norms": PROBES["residual_norms"].Options(max_memory=str(per_row // 2)),
                                       "activation_rates": PROBES["activation_rates"].Options()},
                      attention_mask=mask)
    for name in ("residual_norms", "activation_rates"):
        assert isinstance(tiny[name], Unsupported) and "smallest chunk" in tiny[name].note
        assert name in tiny[name].note and tiny[name].records() == []
    alone = norms_mod.residual_norms(bridge, tokens, attention_mask=mask, max_memory=str(per_row // 2))
    assert isinstance(alone, Unsupported)


def test_rows_must_be_positive():
    bridge = make_bridge(**VARIANTS["ln_gelu"])
    tokens = random_tokens(2, 5)
    for rows in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="rows"):
            run_activation_passes(bridge, tokens, passes(bridge, tokens, None, 0), rows=rows)


def test_huggingface_parallel_blocks_chunked_equal_one_forward():
    """Pythia-style parallel blocks through boot_transformers: one row per forward gives the numbers of one
    forward over all rows."""
    _, bridge, _ = hf_bridge("neox")
    tokens = random_tokens(3, 7, d_vocab=100, seed=6)
    mask = right_padding_mask([7, 4, 6], 7)
    whole = run_activation_passes(bridge, tokens, passes(bridge, tokens, mask, 1), attention_mask=mask, rows=3)
    chunked = run_activation_passes(bridge, tokens, passes(bridge, tokens, mask, 1), attention_mask=mask, rows=1)
    for kind in whole[0].norms:
        torch.testing.assert_close(chunked[0].norms[kind], whole[0].norms[kind], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[0].position_norms, whole[0].position_norms, rtol=1e-5, atol=1e-6)
    n_entries = whole[1].n_positions * bridge.cfg.d_mlp
    torch.testing.assert_close(chunked[1].token_rate, whole[1].token_rate, atol=1.01 / n_entries, rtol=0)


def kept_patterns(bridge) -> list[str]:
    return [name for name, module in bridge.named_modules() if isinstance(getattr(module, "_pattern", None), torch.Tensor)]


def test_no_probe_forward_leaves_the_bridge_holding_attention_patterns():
    """TransformerLens' joint-QKV attention (GPT-2, Pythia) keeps its last pattern per layer: a plain forward
    leaves n_layers patterns behind; after every probe, none is left (each layer's is dropped as soon as
    its attention output is written, so a forward never holds them all)."""
    from residual_dynamics.probes.forward import drop_kept_patterns
    from residual_dynamics.spec import ProbesConfig

    for kind in ("gpt2", "neox"):
        _, bridge, _ = hf_bridge(kind)
        tokens = random_tokens(2, 6, d_vocab=100, seed=7)
        with torch.no_grad():
            bridge(tokens)
        assert len(kept_patterns(bridge)) == bridge.cfg.n_layers  # the behaviour worked around
        drop_kept_patterns(bridge)
        assert kept_patterns(bridge) == []
        probes = ProbesConfig().enabled()
        for name, options in probes.items():
            with torch.no_grad():
                bridge(tokens)
            held = []
            handle = bridge.blocks[-1].hook_resid_post.register_forward_hook(
                lambda module, args, out: held.append(len(kept_patterns(bridge))))
            try:
                run_probes(bridge, tokens, {name: options})
            finally:
                handle.remove()
            assert kept_patterns(bridge) == [], name
            assert all(count == 0 for count in held), (name, held)  # none held at the end of any forward


def test_bound_heap_sets_glibc_threshold_on_linux():
    import sys

    from residual_dynamics.heap import bound_heap

    assert bound_heap() == sys.platform.startswith("linux")
