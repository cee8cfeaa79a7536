"""The W&B layout (issue 10, "Comparing curves in the W&B UI"), read back from real offline W&B runs.

* Keys start with the probe family (``resid_norm/...``, ``W_OV/...``, ``horizon/...``), one W&B section
  each; ``logger.detail`` (summary | layer | head) selects the scalar keys; every per-layer, per-head and
  per-node record goes into one table per family and probe step, drawn as a value-vs-layer line chart.
* Scalars and tables together hold exactly the records of ``results.jsonl``, with the same values.
* Every probe key plots against ``trainer/global_step`` (the reporter's own ``define_metric``).
* A GPT-2-XL-shaped model (48 layers x 25 heads, tiny width, the real probes) logs at most 500 distinct
  keys at the default detail (89 measured with every default probe), against 13,669 at ``detail=head``,
  which warns.

Probe runs are in-process on random models of our Transformer: the five probes of ``OPTIONS``, except where
every probe of the registry or of conf/probes/default.yaml runs. About 45 s on a busy 2-core machine, most
of it the 48-layer model's conversion and probes (sublayer ablation, clean-up).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import wandb_offline
from freeze_probe_values import probe_options
from residual_dynamics.probes.registry import run_probes
from residual_dynamics.reporting.reporter import STEP_KEY, ProbeReporter
from residual_dynamics.reporting.results import (metric_key, parse_metric_key, probe_of, rows, scalar_detail,
                                                 scalars)
from test_probe_cli import tiny_shape_gpt2_dir  # noqa: F401  (a fixture)

# the options of conf/probes/default.yaml, with two horizons and fewer random inputs (faster)
OPTIONS = {
    "residual_norms": {"fit_layers": None},
    "weight_norms": {"fold_ln": True},
    "activation_rates": {"n_random": 64},
    "layer_horizon": {"ks": [1, 2], "mode": "clean", "tolerance": 0.05},
    "cleanup": {"threshold": 0.3},
}
SMALL = dict(n_layers=3, d_model=16, n_heads=4, d_mlp=32, n_ctx=16, d_vocab=64)
XL = dict(n_layers=48, d_model=16, n_heads=25, d_head=2, d_mlp=16, n_ctx=16, d_vocab=64)  # GPT-2 XL's depth x heads
STEPS = (0, 4)

# What a 3-layer LN/GELU model of ours logs at the default detail (layer), written out by hand:
SMALL_SCALARS = {
    "growth_rate", "growth_rate/log_slope", "growth_rate/log_slope_se", "growth_rate/two_point",
    "resid_norm/resid_post/L00", "resid_norm/resid_post/L01", "resid_norm/resid_post/L02",
    "horizon/loss_clean", "horizon/loss_increase/k01", "horizon/loss_increase/k02", "horizon/k_eff",
    "horizon/decay_amplitude", "horizon/decay_tau",
    "cleanup/n_cleaned", "ln_final_gain",
}
SMALL_SUMMARY = {key for key in SMALL_SCALARS if not key.startswith("resid_norm/")}
SMALL_TABLE_FAMILIES = {  # families with per-layer / per-head / per-node records: one table + chart each
    "resid_norm", "W_OV", "W_OV_folded", "W_Q", "W_Q_folded", "W_K", "W_K_folded", "W_V", "W_V_folded", "W_O",
    "b_O", "W_in", "W_in_folded", "W_out", "ln1_gain", "ln2_gain", "mlp_act_rate", "mlp_out_norm", "cleanup",
}


# --------------------------------------------------------------------------- helpers


def probe_results(shape: dict, options=None, seed: int = 0) -> dict:
    """The probes ({name: Options}, default: the five of ``OPTIONS``) on a random model of ``shape``."""
    from residual_dynamics.training.convert import to_transformer_lens
    from residual_dynamics.training.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**shape)).eval()
    tokens = torch.randint(0, shape["d_vocab"], (2, 12), generator=torch.Generator().manual_seed(seed))
    return run_probes(to_transformer_lens(model), tokens, probe_options(OPTIONS) if options is None else options)


def conf_default_probes(shape: dict, tmp_path: Path) -> dict:
    """{name: Options} of the probes conf/probes/default.yaml enables, parsed for a model of ``shape``."""
    from composed import composed
    from residual_dynamics.spec import parse_train

    overrides = [f"model.{field}={value}" for field, value in shape.items() if field != "d_vocab"]
    spec = parse_train(composed("config", [*overrides, "tokenizer.vocab_size=512", "data.seq_len=16",
                                           f"paths.cache_dir={tmp_path / 'cache'}",
                                           f"paths.run_dir={tmp_path / 'run'}", "run_name=keys"]))
    return spec.probes


def all_records(results: dict) -> list[tuple[str, object]]:
    """(probe, record) of every record."""
    return [(probe, record) for probe, result in results.items() for record in result.records()]


def offline_wandb(root: Path):
    """A fresh offline W&B run in ``root`` (nothing defined on it before the reporter)."""
    import wandb

    return wandb.init(project="test-keys", dir=str(root), mode="offline",
                      settings=wandb.Settings(silent=True, x_disable_stats=True))


def flush_wandb() -> None:
    """Wait until W&B has written its offline files: in-process, ``run.finish()`` can return before the
    service has flushed the transaction log (read back truncated at a block boundary 1 time in 5 here)."""
    import wandb

    wandb.teardown()


def report_into_offline_run(root: Path, results: dict, detail: str) -> tuple[Path, Path]:
    """ProbeReporter at ``STEPS`` into a fresh offline run; returns (results-file dir, offline run dir)."""
    run = offline_wandb(root)
    try:
        reporter = ProbeReporter(root / "run", wandb_run=run, meta={"run": "r"}, detail=detail)
        for step in STEPS:
            reporter.report(results, step, draw=False)
    finally:
        run.finish()
        flush_wandb()
    [offline] = wandb_offline.offline_runs(root)
    return root / "run", offline


def media_keys(row: dict) -> dict[str, str]:
    """{media key: its _type} of a history row (media are stored flattened: <key>/_type, <key>/path, ...)."""
    return {key[:-len("/_type")]: value for key, value in row.items() if key.endswith("/_type")}


def logged_metrics(history: list[dict]) -> set[str]:
    """The distinct W&B metrics of a run: scalar keys and media keys (their sub-fields folded), without
    W&B's own ``_step``, ``_runtime``, ``_timestamp``."""
    out: set[str] = set()
    for row in history:
        media = media_keys(row)
        out |= set(media)
        out |= {key for key in row if not key.startswith("_") and not any(key.startswith(m + "/") for m in media)}
    return out


def scalar_keys(row: dict) -> set[str]:
    media = media_keys(row)
    return {key for key in row if not key.startswith("_") and key != STEP_KEY
            and not any(key.startswith(m + "/") for m in media)}


def logged_tables(offline: Path, row: dict) -> dict[str, list[dict]]:
    """{media key: rows as dicts} of the W&B tables of a history row, read from the run's files."""
    out = {}
    for key, kind in media_keys(row).items():
        if kind == "table-file":
            data = json.loads((offline / "files" / row[f"{key}/path"]).read_text())
            out[key] = [dict(zip(data["columns"], values)) for values in data["data"]]
    return out


def chart_specs(offline: Path) -> dict[str, dict]:
    """{chart key: its panel config} from the run's ``_wandb.visualize`` config updates."""
    out = {}
    for record in wandb_offline.records(wandb_offline.run_file(offline)):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                path = list(item.nested_key)
                if path[:2] == ["_wandb", "visualize"]:
                    out[path[2]] = json.loads(item.value_json)["panel_config"]
    return out


def step_metric_definitions(offline: Path) -> list[tuple[str, bool, str]]:
    """(name or glob, is_glob, step_metric) of every define_metric record of the run."""
    out = []
    for record in wandb_offline.records(wandb_offline.run_file(offline)):
        if record.WhichOneof("record_type") == "metric":
            metric = record.metric
            out.append((metric.glob_name or metric.name, bool(metric.glob_name), metric.step_metric))
    return out


def recorded(rows_or_records) -> dict[tuple, object]:
    return {(r["name"], r["layer"], r["head"]): r["value"] for r in rows_or_records}


def same(a, b) -> bool:
    """Equal numbers; None (a non-finite value in results.jsonl and tables) and NaN equal each other."""
    def missing(v):
        return v is None or (isinstance(v, float) and not math.isfinite(v))

    if missing(a) or missing(b):
        return missing(a) and missing(b)
    return a == pytest.approx(b, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def small() -> dict:
    return probe_results(SMALL)


@pytest.fixture(scope="module")
def small_run(small, tmp_path_factory) -> tuple[Path, Path]:
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("wandb-keys")
        for name, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"),
                          ("WANDB_CACHE_DIR", "wandb_cache")):
            patch.setenv(name, str(root / sub))
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        return report_into_offline_run(root, small, "layer")


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> dict:
    """Every probe conf/probes/default.yaml enables, with its default options, on the XL-shaped model."""
    return probe_results(XL, conf_default_probes(XL, tmp_path_factory.mktemp("xl-spec")))


# --------------------------------------------------------------------------- keys, detail, families


def test_detail_selects_the_scalar_keys(small):
    assert set(scalars(small, "summary")) == SMALL_SUMMARY
    assert set(scalars(small, "layer")) == SMALL_SCALARS
    every = all_records(small)
    head = scalars(small, "head")
    assert set(head) == {metric_key(record) for _, record in every} and len(head) == len(every)  # no collision
    assert {"W_OV/L02H03", "W_Q/L01", "W_Q/L01H00", "cleanup/writer_score/L00H01", "cleanup/writer_score/mlp/L02",
            "cleanup/writer_score/embed", "mlp_act_rate/tokens/L01", "resid_norm/ratio/L00"} <= set(head)
    for _, record in every:
        value = head[metric_key(record)]
        assert value == record.value or (math.isnan(value) and math.isnan(record.value))
    with pytest.raises(ValueError, match="detail"):
        scalars(small, "heads")


def test_every_key_starts_with_its_family_and_parses_back(small):
    from residual_dynamics.probes.activation_rates import ActivationRates
    from residual_dynamics.probes.registry import PROBES
    from residual_dynamics.probes.weight_norms import WeightNorms

    every_probe = probe_results(SMALL, {**{name: spec.Options() for name, spec in PROBES.items()},
                                        **probe_options(OPTIONS)})
    assert set(every_probe) == set(PROBES)
    for probe, record in all_records(every_probe):
        key = metric_key(record)
        assert probe_of(key.split("/")[0]) == probe, key
        assert parse_metric_key(key) == (probe, record.name, record.layer, record.head), key
    # fields our model lacks (a gate matrix, gated MLPs are named mlp_gate_rate) are families too
    assert {probe_of(f.name) for f in dataclasses.fields(WeightNorms)} == {"weight_norms"}
    gated = ActivationRates(torch.ones(2), torch.ones(2), torch.ones(2), gated=True, n_positions=1, n_random=1)
    assert {parse_metric_key(metric_key(r))[0] for r in gated.records()} == {"activation_rates"}
    assert {r.name.split("/")[0] for r in gated.records()} == {"mlp_gate_rate", "mlp_out_norm"}
    for key in ("train/loss", "val/loss", STEP_KEY, "epoch", "probe_figures/norm_vs_layer", "W_OV/vs_layer_table",
                "resid_norm/vs_layer_table/path"):
        assert parse_metric_key(key) is None, key


def test_scalar_detail_of_each_kind_of_record():
    from residual_dynamics.probes.common import Record

    assert scalar_detail(Record("growth_rate", 1.0)) == "summary"
    assert scalar_detail(Record("horizon/k_eff", 1.0)) == "summary"
    assert scalar_detail(Record("resid_norm/resid_post", 1.0, layer=3)) == "layer"
    assert scalar_detail(Record("resid_norm/resid_pre", 1.0, layer=3)) == "head"
    assert scalar_detail(Record("W_OV", 1.0, layer=3, head=1)) == "head"
    assert scalar_detail(Record("cleanup/writer_score/embed", 1.0)) == "head"  # one node's, not the model's
    assert scalar_detail(Record("cleanup/writer_score/mlp", 1.0, layer=0)) == "head"


# --------------------------------------------------------------------------- read back from an offline run


def test_offline_run_has_family_sections_and_one_chart_per_family(small_run):
    _, offline = small_run
    history = wandb_offline.history(offline)
    assert [row[STEP_KEY] for row in history] == list(STEPS)
    for row in history:
        assert scalar_keys(row) == SMALL_SCALARS
        media = media_keys(row)
        assert media == {f"{family}/vs_layer_table": "table-file" for family in SMALL_TABLE_FAMILIES}
    sections = {key.split("/")[0] for key in logged_metrics(history)} - {"trainer"}
    assert all(probe_of(section) for section in sections), sections
    specs = chart_specs(offline)
    assert set(specs) == {f"{family}/vs_layer" for family in SMALL_TABLE_FAMILIES}
    for spec in specs.values():
        assert spec["panelDefId"] == "wandb/line/v0"
        assert spec["fieldSettings"] == {"x": "layer", "y": "value", "stroke": "series"}


def test_scalars_and_tables_hold_exactly_the_results_file(small_run):
    run_dir, offline = small_run
    results = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for row in wandb_offline.history(offline):
        step = row[STEP_KEY]
        want = recorded(r for r in results if r["step"] == step)
        got: dict[tuple, object] = {}
        for key in scalar_keys(row):
            _, name, layer, head = parse_metric_key(key)
            got[(name, layer, head)] = row[key]
        for key, table in logged_tables(offline, row).items():
            family = key.split("/")[0]
            for r in table:
                assert r["name"].split("/")[0] == family, (key, r)
                assert r["layer"] is not None or r["head"] is not None or r["name"].endswith(("/embed", "/pos")), r
                if r["head"] is not None and "/" not in r["name"]:  # a head of a weight matrix: a line per head
                    assert r["series"] == f"H{r['head']:02d}", r
                got.setdefault((r["name"], r["layer"], r["head"]), r["value"])
        # a per-layer curve is both a scalar and a table row: the two agree
        resid = {k: v for k, v in got.items() if k[0] == "resid_norm/resid_post"}
        assert len(resid) == SMALL["n_layers"]
        assert got.keys() == want.keys(), (sorted(set(want) - set(got), key=str)[:5],
                                           sorted(set(got) - set(want), key=str)[:5])
        bad = {k: (got[k], want[k]) for k in want if not same(got[k], want[k])}
        assert not bad, dict(list(bad.items())[:5])


def test_every_probe_key_plots_against_the_global_step(small_run):
    _, offline = small_run
    definitions = step_metric_definitions(offline)
    assert (STEP_KEY, False, "") in definitions  # the x-axis itself
    for key in logged_metrics(wandb_offline.history(offline)) - {STEP_KEY}:
        steps = {step for pattern, is_glob, step in definitions
                 if (fnmatch.fnmatchcase(key, pattern) if is_glob else key == pattern)}
        assert steps == {STEP_KEY}, (key, steps)


# --------------------------------------------------------------------------- a GPT-2-XL-shaped model


def test_an_xl_shaped_model_logs_at_most_500_keys(xl, tmp_path):
    every = all_records(xl)
    counts = {detail: len(scalars(xl, detail)) for detail in ("summary", "layer", "head")}
    _, offline = report_into_offline_run(tmp_path, xl, "layer")
    logged = logged_metrics(wandb_offline.history(offline))
    print(f"\nGPT-2-XL shape: {len(every)} records; scalar keys {counts}; distinct W&B metrics at the default "
          f"detail {len(logged)}")
    assert len(logged) <= 500
    assert {f"resid_norm/resid_post/L{layer:02d}" for layer in range(48)} <= logged
    assert "W_OV/vs_layer_table" in logged and not any(key.startswith("W_OV/L") for key in logged)
    assert counts["head"] == len(every) > 10_000  # every record as a key: past W&B's project guidance
    assert counts["summary"] < counts["layer"] == counts["summary"] + 48


def test_head_detail_warns_past_wandb_guidance(xl, tmp_path, caplog):
    import wandb

    for detail, warns in (("layer", False), ("head", True)):
        run = wandb.init(project="test-keys", dir=str(tmp_path), mode="disabled")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="residual_dynamics.reporting.reporter"):
            ProbeReporter(tmp_path / detail, wandb_run=run, detail=detail).report(xl, 0, draw=False)
        run.finish()
        warned = [r.getMessage() for r in caplog.records if "W&B advises" in r.getMessage()]
        assert bool(warned) == warns, (detail, warned)
        if warns:
            assert "logger.detail=head" in warned[0]
    # the results file keeps every record whatever the detail
    assert len(rows(xl, 0)) == len((tmp_path / "layer" / "results.jsonl").read_text().splitlines())


# --------------------------------------------------------------------------- logger.detail through the CLI


def test_logger_detail_reaches_the_probe_cli(tiny_shape_gpt2_dir, tmp_path):
    """``logger.detail=summary`` on ``python -m residual_dynamics.probe`` (in-process): no per-layer scalar."""
    from hydra import compose, initialize_config_dir

    from residual_dynamics.pretrained.cli import run

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("probe", overrides=[
            "pretrained@model=local", f"model.path={tiny_shape_gpt2_dir}", "model.name=tiny-gpt2", "prompts.n=2",
            "prompts.max_len=16", "probes.layer_horizon.ks=[1,2]", f"paths.run_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "logger.detail=summary"])
    run(cfg)
    flush_wandb()
    [offline] = wandb_offline.offline_runs(tmp_path / "run")
    [row] = [row for row in wandb_offline.history(offline) if "growth_rate" in row]
    keys = scalar_keys(row)
    assert {"growth_rate", "horizon/k_eff", "cleanup/n_cleaned"} <= keys
    assert all(parse_metric_key(key)[2:] == (None, None) for key in keys), sorted(keys)  # no layer, no head
    assert "resid_norm/vs_layer_table" in media_keys(row) and "W_OV/vs_layer_table" in media_keys(row)
    results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert any(r["name"] == "resid_norm/resid_post" for r in results)  # ... which the results file keeps
