"""The typed-spec redesign changed no probe number: every probe value on a fixed model equals the value the
code gave before the redesign (frozen once into fixtures/probe_values_frozen.json by freeze_probe_values.py
at commit 7804258)."""

from __future__ import annotations

import json
import math

import pytest

from freeze_probe_values import FIXTURE, OPTIONS, fixed_model, fixed_tokens, records_of


def test_probe_values_equal_the_frozen_ones():
    from residual_dynamics.training.convert import to_transformer_lens
    from residual_dynamics.probes.registry import run_probes

    frozen = json.loads(FIXTURE.read_text())
    bridge = to_transformer_lens(fixed_model())
    got = {(r["probe"], r["name"], r["layer"], r["head"]): r["value"]
           for r in records_of(run_probes(bridge, fixed_tokens(), OPTIONS))}
    want = {(r["probe"], r["name"], r["layer"], r["head"]): r["value"] for r in frozen["records"]}
    missing = sorted(set(want) - set(got), key=str)
    assert not missing, f"values no longer reported: {missing[:5]}"
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
