"""The analysis (python -m residual_dynamics.analyze, the multirun callback): planted effects are recovered,
null data give few false positives, bad input gets a clear error, both W&B routes build the same table as
the run files, and a real tiny multirun ends with a report, a Parquet table and an analysis W&B run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis_synth as synth
import wandb_offline
from residual_dynamics.analysis import collect as C
from residual_dynamics.analysis import pipeline, stats
from residual_dynamics.analysis.spec import load_config, validate
from residual_dynamics.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
FAST = ["analysis.n_resamples=999", "analysis.permutations=999"]


def hypothesis(name: str, *overrides: str):
    return validate(load_config(name, overrides=[*FAST, *overrides]).analysis)


def analyse_dirs(name: str, inputs, tmp_path: Path, *overrides: str, **fields):
    cfg = load_config(name, inputs=[str(i) for i in inputs], overrides=[*FAST, *overrides],
                      output_dir=str(tmp_path / "out" / name), progress=False, **fields)
    return pipeline.run(cfg, echo=False)


# --------------------------------------------------------------------------- planted effects, from run dirs


def test_planted_slope_recovered_from_run_directories(tmp_path):
    rng = np.random.default_rng(7)
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00"
    values = synth.trend_values(rng, [1, 2, 4, 8], range(8), slope=0.02, noise=0.02)
    synth.write_sweep(sweep, values, x_field="model.n_heads", metric="growth_rate")
    # a failed job (config, no results), an incomplete one, and a crashed one with a torn last line
    synth.write_run(synth.job_dir(sweep, 40, {"model.n_heads": 2, "seed": 99}),
                    synth.make_config(**{"model.n_heads": 2, "seed": 99}), None)
    synth.write_run(synth.job_dir(sweep, 41, {"model.n_heads": 4, "seed": 98}),
                    synth.make_config(**{"model.n_heads": 4, "seed": 98}),
                    synth.make_rows({"growth_rate": 5.0}, steps=(0, 1, 2)))
    torn_rows = synth.make_rows({"growth_rate": 1.0 + 0.02 * 8})
    synth.write_run(synth.job_dir(sweep, 42, {"model.n_heads": 8, "seed": 97}),
                    synth.make_config(**{"model.n_heads": 8, "seed": 97}), torn_rows, torn=True)

    result = analyse_dirs("heads_vs_growth", [sweep], tmp_path, "analysis.log_x=false", wandb={"log": False})
    row = result.verdict.iloc[0]
    assert row["ci_low"] <= 0.02 <= row["ci_high"]
    assert row["ci_high"] - row["ci_low"] < 0.01
    assert row["verdict"] == "supported" and row["p"] < 0.01
    assert row["n_runs"] == 33 and row["n_seeds"] == 9

    runs = result.collection.runs.set_index("run")
    assert runs.loc["2026-01-01_00-00-00/40", "status"] == "failed"
    assert "no results.jsonl" in runs.loc["2026-01-01_00-00-00/40", "reason"]
    assert runs.loc["2026-01-01_00-00-00/41", "status"] == "incomplete"
    assert "trainer.max_steps=100" in runs.loc["2026-01-01_00-00-00/41", "reason"]
    assert runs.loc["2026-01-01_00-00-00/42", "status"] == "ok"  # the torn line is skipped, the rest is kept
    assert "torn" in runs.loc["2026-01-01_00-00-00/42", "reason"]
    report = result.report.read_text()
    assert "2026-01-01_00-00-00/40" in report and "2026-01-01_00-00-00/41" in report and "incomplete" in report
    assert "| heads_vs_growth |" in report and "supported" in report
    for name in ("y_vs_x", "curve_vs_step", "curve_vs_tokens", "layer_profile"):
        assert result.figures[name].exists() and f"figures/{name}.png" in report

    tidy = pd.read_parquet(result.parquet)
    n_lines = sum(len((d / "results.jsonl").read_text().splitlines()) for d in sweep.iterdir()
                  if (d / "results.jsonl").exists())
    assert len(tidy) == n_lines - 1  # every row but the torn one
    assert {"run", "step", "tokens", "probe", "name", "layer", "head", "value", "model.n_heads", "seed",
            "job_type", "group", "model", "run_dir"} <= set(tidy.columns)
    final = tidy[(tidy["name"] == "growth_rate") & (tidy["step"] == 100)]
    assert (final["tokens"] == 100 * synth.BATCH * synth.SEQ).all()
    assert (tidy["group"] == "synthetic").all() and (tidy["job_type"] == "train").all()


def test_planted_power_law_recovered_with_extrapolation(tmp_path):
    rng = np.random.default_rng(12)
    sweep = tmp_path / "depth"
    values = synth.power_values(rng, [1, 2, 4, 8, 16], range(6), a=1.5, b=0.6, noise=0.05)
    synth.write_sweep(sweep, values, x_field="model.n_layers", metric="horizon/k_eff")
    result = analyse_dirs("horizon_vs_depth", [sweep], tmp_path, wandb={"log": False})
    row = result.verdict.iloc[0]
    assert row["ci_low"] <= 0.6 <= row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.1
    assert row["verdict"] == "supported" and row["r2"] > 0.9
    truth = 1.5 * 24 ** 0.6
    assert row["prediction_low"] <= truth <= row["prediction_high"]
    assert {"y_vs_x", "residuals"} <= set(result.figures)


def test_planted_cell_difference_paired_by_seed(tmp_path):
    """decay_norm_params=true lowers y by 0.05 for RMS only; every other difference is zero."""
    rng = np.random.default_rng(4)
    runs = []
    num = 0
    for norm in ("LN", "RMS"):
        for decay in (False, True):
            for seed in range(8):
                seed_effect = 0.03 * seed  # shared by the cells of a seed: pairing removes it
                y = 1.1 + seed_effect - (0.05 if (norm == "RMS" and decay) else 0.0) + rng.normal(0, 0.005)
                config = synth.make_config(**{"model.normalization_type": norm, "optim.decay_norm_params": decay,
                                              "seed": seed})
                runs.append(C.RunData(run=f"s/{num}", run_dir=f"/mem/s/{num}", source="files", config=config,
                                      rows=synth.make_rows({"growth_rate": y}, steps=(0, 100))))
                num += 1
    hyp = hypothesis("norm_x_decay")
    extracted, verdict, details = pipeline.analyse(C.build_frame(runs), hyp)
    diffs = details["differences"].set_index(["factor", "context"])
    rms = diffs.loc[("optim.decay_norm_params", "model.normalization_type=RMS")]
    ln = diffs.loc[("optim.decay_norm_params", "model.normalization_type=LN")]
    assert bool(rms["paired"]) and rms["ci_low"] <= -0.05 <= rms["ci_high"] and rms["verdict"] == "supported"
    assert ln["ci_low"] <= 0.0 <= ln["ci_high"] and ln["verdict"] == "inconclusive"
    assert len(verdict) == len(details["differences"]) and verdict["p_adj"].notna().all()
    cells = details["cells"]
    assert len(cells) == 4 and (cells["n"] == 8).all()


def _decay_runs(gain_shift: float, w_ov_shift: float, seed: int) -> list:
    """LN and RMS runs, decay off/on x 8 seeds, per-layer ln1_gain and per-head W_OV at the final step; the
    LN runs with decay get ``gain_shift`` on every ln1 gain and ``w_ov_shift`` on every head's W_OV, the RMS
    runs get a large opposite shift (the hypotheses' ``where`` must drop them)."""
    rng = np.random.default_rng(seed)
    runs = []
    for norm in ("LN", "RMS"):
        for decay in (False, True):
            for unit in range(8):
                sign = 1.0 if norm == "LN" else -5.0
                rows = []
                for step in (0, 100):
                    for layer in range(2):
                        gain = 8.0 + 0.2 * unit + layer + (sign * gain_shift if decay and step == 100 else 0.0)
                        rows.append({"step": step, "probe": "weight_norms", "name": "ln1_gain", "layer": layer,
                                     "head": None, "value": gain + rng.normal(0, 0.01)})
                        for head in range(2):
                            w_ov = 1.0 + 0.1 * unit + 0.1 * head + (sign * w_ov_shift if decay and step == 100 else 0.0)
                            rows.append({"step": step, "probe": "weight_norms", "name": "W_OV", "layer": layer,
                                         "head": head, "value": w_ov + rng.normal(0, 0.01)})
                config = synth.make_config(**{"model.normalization_type": norm, "optim.decay_norm_params": decay,
                                              "seed": unit})
                num = len(runs)
                runs.append(C.RunData(run=f"d/{num}", run_dir=f"/mem/d/{num}", source="files", config=config,
                                      rows=rows))
    return runs


@pytest.mark.parametrize("name,planted", [("decay_shrinks_gains", (-0.1, 0.0)), ("decay_grows_W_OV", (0.0, 0.05))])
def test_shipped_decay_hypotheses_on_planted_and_null_runs(name, planted):
    """The two halves of "decay on the gains moves the growth into W_OV" (sweeps/norm_x_decay.yaml): a planted
    shift of the LN runs' per-layer gains / per-head W_OV is found within its CI and supported; without it the
    verdict is not 'supported'; the RMS runs (shifted the other way) are left out by ``where``."""
    effect = planted[0] if name == "decay_shrinks_gains" else planted[1]
    hyp = hypothesis(name)
    extracted, verdict, _ = pipeline.analyse(C.build_frame(_decay_runs(*planted, seed=1)), hyp)
    (row,) = verdict.to_dict("records")
    assert row["ci_low"] <= effect <= row["ci_high"] and row["verdict"] == "supported", row
    assert row["n_runs"] == 16 and len(extracted.excluded) == 16
    _, null_verdict, _ = pipeline.analyse(C.build_frame(_decay_runs(0.0, 0.0, seed=2)), hyp)
    (null_row,) = null_verdict.to_dict("records")
    assert null_row["verdict"] != "supported" and null_row["ci_low"] <= 0.0 <= null_row["ci_high"], null_row


# --------------------------------------------------------------------------- calibration


def test_confidence_intervals_cover_planted_values():
    """100 synthetic sweeps each (4 x values x 8 seeds): the 95% CI of the slope and of the power-law
    exponent covers the planted value in at least 90 of them. Per-run frames are built in memory and go
    through the pipeline's test function (the files -> frame path is checked by the planted tests above)."""
    rng = np.random.default_rng(2024)
    trend_h = hypothesis("heads_vs_growth", "analysis.log_x=false")
    scaling_h = hypothesis("horizon_vs_depth", "analysis.extrapolate_to=null")
    covered = {"slope": 0, "exponent": 0}

    def frame(values):
        return pd.DataFrame([{"run": f"r{i}", "x": float(x), "unit": s, "y": y} for i, (x, s, y) in enumerate(values)])

    for _ in range(100):
        verdict, _ = pipeline.run_test(trend_h, frame(synth.trend_values(rng, [1, 2, 4, 8], range(8), 0.02, 0.05)))
        covered["slope"] += bool(verdict["ci_low"].iloc[0] <= 0.02 <= verdict["ci_high"].iloc[0])
        verdict, _ = pipeline.run_test(scaling_h, frame(synth.power_values(rng, [1, 2, 4, 8], range(8), 1.5, 0.6, 0.1)))
        covered["exponent"] += bool(verdict["ci_low"].iloc[0] <= 0.6 <= verdict["ci_high"].iloc[0])
    assert covered["slope"] >= 90, covered
    assert covered["exponent"] >= 90, covered


def test_trend_false_positive_rate_on_null_data():
    """200 null sweeps (y independent of x): trend is supported or contradicted in at most 8% of them."""
    rng = np.random.default_rng(99)
    hits = 0
    x = np.repeat([1.0, 2.0, 4.0, 8.0], 3)
    for i in range(200):
        y = 1.1 + rng.normal(0, 0.05, size=x.size)
        res = stats.trend(x, y, sign=1, n_resamples=199, permutations=999, rng=i)
        hits += res["verdict"] != "inconclusive"
    assert hits / 200 <= 0.08, hits


# --------------------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors(tmp_path):
    # a directory with no runs
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no runs under"):
        analyse_dirs("heads_vs_growth", [tmp_path / "empty"], tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        analyse_dirs("heads_vs_growth", [tmp_path / "nope"], tmp_path)
    # a run without its config
    lone = synth.write_run(tmp_path / "lone" / "run1", None, synth.make_rows({"growth_rate": 1.1}))
    with pytest.raises(DataError, match=r"missing \.hydra/config\.yaml"):
        analyse_dirs("heads_vs_growth", [lone], tmp_path)

    rng = np.random.default_rng(0)
    sweep = tmp_path / "sweep"
    synth.write_sweep(sweep, synth.trend_values(rng, [1, 2], range(3), slope=0.1, noise=0.01),
                      x_field="model.n_heads", metric="growth_rate")
    # an unknown metric: the error lists the metrics present
    with pytest.raises(ConfigError, match=r"analysis\.y: no metric 'growht_rate'.*growth_rate.*resid_norm/resid_post"):
        analyse_dirs("heads_vs_growth", [sweep], tmp_path, "analysis.y=growht_rate")
    # x that is not a config field: the error lists the fields that vary
    with pytest.raises(ConfigError, match=r"analysis\.x: 'model.n_head' is not a config field.*model\.n_heads, seed"):
        analyse_dirs("heads_vs_growth", [sweep], tmp_path, "analysis.x=model.n_head")
    # a per-layer metric needs a reduction over layers
    with pytest.raises(ConfigError, match=r"analysis\.reduce: .*per layer"):
        analyse_dirs("heads_vs_growth", [sweep], tmp_path, "analysis.y=resid_norm/resid_post")
    # one x value cannot show a trend
    one = tmp_path / "one_x"
    synth.write_sweep(one, synth.trend_values(rng, [4], range(3), slope=0.1, noise=0.01),
                      x_field="model.n_heads", metric="growth_rate")
    with pytest.raises(ConfigError, match=r"analysis\.x: model\.n_heads has one value \(4\).*cannot show a trend"):
        analyse_dirs("heads_vs_growth", [one], tmp_path)
    # the spec is checked before any data are read
    for override, message in [("analysis.test=regression", r"analysis\.test: must be one of trend, scaling, compare"),
                              ("analysis.expected=null", r"analysis\.expected: test=trend needs"),
                              ("analysis.at=step=abc", r"analysis\.at\.step: must be a number"),
                              ("analysis.reduce=median", r"analysis\.reduce: must be one of"),
                              ("analysis.statistic=argmax", r"analysis\.statistic: must be null or one of")]:
        with pytest.raises(ConfigError, match=message):
            analyse_dirs("heads_vs_growth", [tmp_path / "nope"], tmp_path, override)
    with pytest.raises(ConfigError, match="no hypothesis 'heads_vs_grwth'.*heads_vs_growth"):
        load_config("heads_vs_grwth")


def test_y_options_reduce_statistic_and_at(tmp_path):
    """Per-layer / per-head reductions, at=step / tokens / last_fraction / curve, argmax_step: on planted data."""
    rng = np.random.default_rng(5)
    values = synth.trend_values(rng, [1, 2, 4, 8], range(4), slope=0.02, noise=0.01)
    collection = C.build_frame(synth.rundata(values, x_field="model.n_heads", metric="growth_rate"))
    # resid_post at the last layer, final step: 1 + layer * 2 = 3 for every run -> no trend, an exact value
    ex, verdict, _ = pipeline.analyse(collection, hypothesis(
        "heads_vs_growth", "analysis.y=resid_norm/resid_post", "analysis.reduce=last"))
    assert np.allclose(ex.per_run["y"], 3.0) and verdict["verdict"].iloc[0] == "inconclusive"
    ex, _, _ = pipeline.analyse(collection, hypothesis(
        "heads_vs_growth", "analysis.y=W_OV", "analysis.reduce=layer=0", "analysis.head_reduce=max"))
    assert np.allclose(ex.per_run["y"], 0.5 + 0.1 + 0.01 * 100)
    ex, _, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.at=step=0"))
    assert np.allclose(ex.per_run["y"], 1.0)
    ex, _, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.at=tokens=25600"))
    assert (ex.per_run["step"] == 100).all()
    ex, _, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.at=last_fraction=0.5"))
    assert np.allclose(sorted(ex.per_run["y"]), sorted(v for _, _, v in values))
    ex, _, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.statistic=argmax_step"))
    assert set(ex.per_run["step"]) == {100}
    ex, verdict, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.at=curve"))
    assert list(verdict["at"]) == ["step=0", "step=100"] and verdict.iloc[1]["verdict"] == "supported"
    ex, _, _ = pipeline.analyse(collection, hypothesis("heads_vs_growth", "analysis.where.seed=1"))
    assert set(ex.per_run["unit"]) == {1}


def test_metric_keys_parse_back():
    assert C.parse_metric_key("resid_norm/resid_post/L03") == ("residual_norms", "resid_norm/resid_post", 3, None)
    assert C.parse_metric_key("W_OV_folded/L02H05") == ("weight_norms", "W_OV_folded", 2, 5)
    assert C.parse_metric_key("growth_rate") == ("residual_norms", "growth_rate", None, None)
    assert C.parse_metric_key("horizon/loss_increase/k02") == ("layer_horizon", "horizon/loss_increase/k02", None, None)
    assert C.parse_metric_key("cleanup/n_cleaned") == ("cleanup", "cleanup/n_cleaned", None, None)
    # keys of runs logged before the keys lost their probe/ prefix
    assert C.parse_metric_key("probe/resid_norm/resid_post/L03") == ("residual_norms", "resid_norm/resid_post", 3, None)
    assert C.parse_metric_key("probe/W_OV/L02H05") == ("weight_norms", "W_OV", 2, 5)
    for key in ("train/loss", "trainer/global_step", "probe_figures/x/path", "resid_norm/vs_layer_table/nrows"):
        assert C.parse_metric_key(key) is None, key


# --------------------------------------------------------------------------- the W&B routes


def _measurements(collection: C.Collection) -> pd.DataFrame:
    cols = ["run", "step", "tokens", "probe", "name", "layer", "head", "value", "model.n_heads", "seed",
            "job_type", "group", "model", "run_dir", "status"]
    return collection.tidy[cols].sort_values(["run", "step", "name", "layer", "head"]).reset_index(drop=True)


def test_wandb_api_and_offline_routes_build_the_same_table(tmp_path):
    rng = np.random.default_rng(1)
    sweep = tmp_path / "multirun" / "2026-02-02_00-00-00"
    values = synth.trend_values(rng, [1, 2, 4], range(3), slope=0.03, noise=0.01)
    dirs = synth.write_sweep(sweep, values, x_field="model.n_heads", metric="growth_rate")
    files = C.collect([sweep], "files")
    hyp = hypothesis("heads_vs_growth")

    # the API route, through an object with wandb's Run attributes (config as training logs it: resolved)
    fake = []
    for d in dirs:
        config = C.read_config(d)
        config["paths"]["run_dir"] = str(d.resolve())
        config["probes"]["seq_len"] = config["data"]["seq_len"]
        config["run_name"] = sweep.name
        rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
        # half the runs log every record as a scalar, half log per-layer/per-head records as W&B tables
        fake.append(synth.FakeApiRun(config, rows, name=d.name, group="synthetic", tables=len(fake) % 2 == 1))
    api = C.build_frame(C.runs_from_wandb_api(fake + [synth.FakeApiRun({}, [], name="a", group="synthetic",
                                                                        job_type="analysis")]))
    pd.testing.assert_frame_equal(_measurements(files), _measurements(api))

    # the offline route, from real offline run files written by wandb.init(mode="offline")
    import wandb

    for d, run in zip(dirs, fake):
        w = wandb.init(project="residual-dynamics", group="synthetic", job_type="train", dir=str(d), mode="offline",
                       config=run.config, settings=wandb.Settings(silent=True, console="off"))
        for row in run.scan_history():
            w.log({k: (wandb.Table(**run._files[v["path"]]) if isinstance(v, dict) else v) for k, v in row.items()})
        w.finish()
    offline = C.collect([sweep], "wandb")
    pd.testing.assert_frame_equal(_measurements(files), _measurements(offline))
    verdicts = [pipeline.analyse(c, hyp)[1] for c in (files, api, offline)]
    for other in verdicts[1:]:
        pd.testing.assert_frame_equal(verdicts[0], other)


# --------------------------------------------------------------------------- end to end


def test_cli_analyze_by_hand(tmp_path):
    rng = np.random.default_rng(4)
    sweep_a, sweep_b = tmp_path / "a", tmp_path / "b"
    synth.write_sweep(sweep_a, synth.trend_values(rng, [1, 2], range(3), 0.05, 0.01), x_field="model.n_heads",
                      metric="growth_rate")
    synth.write_sweep(sweep_b, synth.trend_values(rng, [4, 8], range(3), 0.05, 0.01), x_field="model.n_heads",
                      metric="growth_rate")
    # a pretrained run next to them (probe CLI layout: no trainer, model.{name,source,revision}, no n_heads field)
    pretrained = tmp_path / "pretrained" / "pythia-70m_step1000"
    synth.write_run(pretrained, {"model": {"name": "pythia-70m", "source": "hf", "revision": "step1000"},
                                 "logger": {"job_type": "pretrained", "group": "pythia"}, "seed": 0},
                    [{**r, "model": "pythia-70m"} for r in synth.make_rows({"growth_rate": 1.04}, steps=(0,))])
    out = subprocess.run([sys.executable, "-m", "residual_dynamics.analyze", "analysis=heads_vs_growth",
                          f"inputs=[{sweep_a},{sweep_b},{pretrained.parent}]", *FAST, "progress=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = sweep_a / "analysis" / "heads_vs_growth" / "report.md"
    assert report.exists() and f"report        : {report}" in out.stdout
    text = report.read_text()
    assert "supported" in out.stdout and "runs found: 13 (13 ok); analysed: 12" in text
    assert "| pythia-70m_step1000 | no model.n_heads in its config |" in text
    tidy = pd.read_parquet(report.parent / "tidy.parquet")
    assert set(tidy["run"].str.split("/").str[0]) == {"a", "b", "pythia-70m_step1000"}
    pythia = tidy[tidy["run"] == "pythia-70m_step1000"]
    assert (pythia["job_type"] == "pretrained").all() and pythia["tokens"].isna().all()
    bad = subprocess.run([sys.executable, "-m", "residual_dynamics.analyze", "analysis=heads_vs_growth",
                          f"inputs=[{sweep_a}]", "analysis.test=regression"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "analysis.test: must be one of trend, scaling, compare" in bad.stdout + bad.stderr


def test_tiny_multirun_ends_with_report_parquet_and_analysis_run(tmp_path, data_cache):
    """2 head counts x 2 seeds, 4 steps: the callback analyses the sweep, prints the verdict and the report path."""
    out_root = tmp_path / "out"
    cmd = [sys.executable, "-m", "residual_dynamics.train", "-m", "model=tiny", "model.n_heads=1,2", "seed=0,1",
           "trainer.max_steps=4", "data.seq_len=32", "data.batch_size=8", "data.val_batches=2",
           "tokenizer.vocab_size=512", "probes.schedule.every=2", "probes.cleanup.enabled=false",
           "logger=wandb", "logger.group=e2e_heads", f"paths.output_root={out_root}", f"paths.cache_dir={data_cache}",
           "+hydra.callbacks.analyze._target_=residual_dynamics.analysis.callback.AnalyzeOnMultirunEnd",
           "+hydra.callbacks.analyze.hypothesis=heads_vs_growth",
           '+hydra.callbacks.analyze.overrides=["analysis.n_resamples=999","analysis.permutations=999"]']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = list((out_root / "multirun").iterdir())
    out_dir = sweep / "analysis" / "heads_vs_growth"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    tail = "\n".join(lines[-12:])
    assert f"report        : {out_dir / 'report.md'}" in tail
    assert "analysis heads_vs_growth" in tail and "heads_vs_growth" in tail and "verdict" in tail

    report = (out_dir / "report.md").read_text()
    assert "## Verdict" in report and "runs found: 4 (4 ok)" in report
    assert all((out_dir / "figures" / f"{n}.png").exists() for n in ("y_vs_x", "curve_vs_step", "layer_profile"))
    tidy = pd.read_parquet(out_dir / "tidy.parquet")
    jobs = sorted(d for d in sweep.iterdir() if (d / "results.jsonl").exists())
    assert len(jobs) == 4
    assert len(tidy) == sum(len((d / "results.jsonl").read_text().splitlines()) for d in jobs)
    growth = tidy[tidy["name"] == "growth_rate"]
    assert sorted(growth["step"].unique()) == [0, 1, 2, 4]
    assert (growth["tokens"] == growth["step"] * 8 * 32).all()
    assert set(growth["model.n_heads"]) == {1, 2} and set(growth["seed"]) == {0, 1}
    assert (tidy["group"] == "e2e_heads").all()

    (analysis_run,) = wandb_offline.offline_runs(out_dir)
    info = wandb_offline.run_info(analysis_run)
    assert info["job_type"] == "analysis" and info["group"] == "e2e_heads"
    assert info["config"]["analysis"]["name"] == "heads_vs_growth"
    (row,) = wandb_offline.history(analysis_run)
    assert row["analysis/verdict/nrows"] == 1 and row["analysis/summary/nrows"] == 4
    table = json.loads((analysis_run / "files" / row["analysis/verdict/path"]).read_text())
    verdict_row = dict(zip(table["columns"], table["data"][0]))
    assert verdict_row["hypothesis"] == "heads_vs_growth" and verdict_row["n_runs"] == 4
    assert verdict_row["verdict"] in ("supported", "contradicted", "inconclusive")
    assert any(k.startswith("analysis_figures/y_vs_x") for k in row)

    # the W&B offline files of the training runs give the same measurements as their results files
    files = C.collect([sweep], "files")
    offline = C.collect([sweep], "wandb")
    keys = ["run", "step", "probe", "name", "layer", "head"]
    merged = files.tidy.merge(offline.tidy, on=keys, suffixes=("_f", "_w"))
    assert len(merged) == len(offline.tidy) == len(files.tidy)
    assert np.allclose(merged["value_f"], merged["value_w"], equal_nan=True)
    assert (merged["model.n_heads_f"] == merged["model.n_heads_w"]).all()
