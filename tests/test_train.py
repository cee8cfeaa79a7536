"""The training entry point (config validation: tests/test_spec.py): the real CLI end to end (W&B offline, read back), a Hydra
multirun with one W&B run per job, and a killed run resumed with ckpt_path=last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import wandb_offline

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings shared by the CLI tests.
FAST = [
    "model=tiny", "data.seq_len=32", "data.batch_size=8", "data.val_batches=2", "tokenizer.vocab_size=512",
    "trainer.log_every=1",
]


def cli(args, cwd, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "residual_dynamics.train", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, **kwargs)


SWEEPS = [
    ("heads_x_seeds", "heads_vs_growth", ["model.n_heads: 1,2,4,8", "seed: 0,1,2"]),
    ("depth_x_horizon", "horizon_vs_depth", ["model.n_layers: 2,4,6,8", "seed: 0,1"]),
    ("norm_x_decay", "norm_x_decay", ["model.normalization_type: LN,LNPre,RMS,RMSPre,none",
                                      "optim.decay_norm_params: false,true"]),
]


@pytest.mark.parametrize("sweep,group,params", SWEEPS, ids=[s[0] for s in SWEEPS])
def test_sweep_config_composes_through_the_readme_command(sweep, group, params, tmp_path):
    """`--config-dir sweeps --config-name <sweep>`, as in the README, with --cfg to print, not run."""
    proc = cli(["--config-dir", str(REPO / "sweeps"), "--config-name", sweep, "--cfg", "all"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"group: {group}" in proc.stdout
    for param in params:
        assert param in proc.stdout


def test_cli_rejects_bad_config_before_any_compute(tmp_path):
    cache = tmp_path / "cache"
    proc = cli(["model.n_heads=3", f"paths.cache_dir={cache}", f"paths.output_root={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode != 0
    assert "model.n_heads" in proc.stderr + proc.stdout
    assert not cache.exists()  # no corpus, tokenizer or shard was built


def test_train_end_to_end_logs_probes_to_wandb(tmp_path, data_cache):
    """The main job's code path with small settings: checkpoints, an offline W&B run whose history holds
    the training and probe keys at the scheduled steps, the results file and the figures."""
    proc = cli(FAST + ["trainer.max_steps=12", "trainer.val_every=6", "trainer.ckpt_every=6",
                       "probes.schedule.log_spaced_until=4", "probes.schedule.every=6", "probes.batch_size=4",
                       "probes.layer_horizon.ks=[1,2]", f"paths.cache_dir={data_cache}",
                       f"paths.output_root={tmp_path / 'out'}", "run_name=e2e", "logger.group=test-group",
                       "logger.tags=[a,b]"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "e2e"
    assert "Trained to step 12" in proc.stdout and str(run_dir) in proc.stdout
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"step000006.ckpt", "step000012.ckpt",
                                                                     "last.ckpt"}
    [wandb_run] = wandb_offline.offline_runs(run_dir)
    info = wandb_offline.run_info(wandb_run)
    assert info["group"] == "test-group" and info["tags"] == ["a", "b"] and info["job_type"] == "train"
    assert info["config"]["model"]["n_layers"] == 2  # the resolved config is logged

    history = wandb_offline.history(wandb_run)
    assert any("train/loss" in row for row in history) and any("val/loss" in row for row in history)
    probe_steps = sorted(row["trainer/global_step"] for row in history if "growth_rate" in row)
    assert probe_steps == [0, 1, 2, 6, 12]
    # horizon and clean-up have early: false, so they run at the checkpoint cadence and the end only
    assert sorted(row["trainer/global_step"] for row in history if "horizon/k_eff" in row) == [6, 12]
    last = [row for row in history if row.get("trainer/global_step") == 12 and "growth_rate" in row][0]
    # logger.detail=layer (default): the probe family first; per-layer resid_post norms are scalars, per-head
    # detail is not (it is in the W&B tables, and in results.jsonl)
    for key in ["resid_norm/resid_post/L00", "resid_norm/resid_post/L01", "horizon/k_eff", "cleanup/n_cleaned"]:
        assert key in last, f"{key} not logged; have {sorted(last)[:60]}"
    assert last["resid_norm/resid_post/L01"] > 0
    assert not any(k.startswith(("probe/", "W_OV/L", "mlp_act_rate/tokens/L")) for k in last)
    # media are stored flattened: <key>/_type, <key>/path, ...; a table + line chart per family and step
    assert last.get("probe_figures/norm_vs_layer/_type") == "image-file"
    assert last.get("probe_figures/layer_step_heatmap/_type") == "image-file"
    for family in ("resid_norm", "W_OV", "mlp_act_rate", "cleanup"):
        assert last.get(f"{family}/vs_layer_table/_type") == "table-file", family

    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 6, 12]
    assert {r["probe"] for r in rows} == {"residual_norms", "weight_norms", "activation_rates", "layer_horizon",
                                          "cleanup", "sublayer_ablation", "logit_lens"}
    by_key = {(r["step"], r["name"], r["layer"], r["head"]): r["value"] for r in rows}
    assert by_key[(12, "resid_norm/resid_post", 1, None)] == pytest.approx(last["resid_norm/resid_post/L01"])
    assert (12, "W_OV", 1, 3) in by_key  # the results file keeps every record
    for png in ("norm_vs_layer.png", "layer_step_heatmap.png"):
        assert (run_dir / "figures" / png).stat().st_size > 1000


def test_multirun_gives_one_wandb_run_per_job(tmp_path, data_cache):
    proc = cli(["-m", "model.n_heads=2,4"] + FAST + [
        "trainer.max_steps=3", "trainer.val_every=3", "trainer.ckpt_every=3", "probes=off",
        f"paths.cache_dir={data_cache}", f"paths.output_root={tmp_path / 'out'}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = wandb_offline.offline_runs(tmp_path / "out" / "multirun")
    assert len(runs) == 2
    heads = sorted(wandb_offline.run_info(r)["config"]["model"]["n_heads"] for r in runs)
    assert heads == [2, 4]
    ids = {wandb_offline.run_file(r).name for r in runs}
    assert len(ids) == 2  # two distinct W&B runs, not one run logged twice


def _final_weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def test_killed_run_resumes_from_last_checkpoint(tmp_path, data_cache):
    """SIGKILL a run once it has checkpointed past step 8, resume with ckpt_path=last: it continues from the saved
    step and ends with exactly the weights of a run that was never interrupted."""
    steps = 160
    common = FAST + [f"trainer.max_steps={steps}", "trainer.val_every=1000", "trainer.ckpt_every=4",
                     "probes=off", "logger=none", f"paths.cache_dir={data_cache}",
                     f"paths.output_root={tmp_path / 'out'}"]
    straight = cli(common + ["run_name=straight"], tmp_path, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "out" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "residual_dynamics.train", *common, "run_name=killed"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # last.ckpt is written right after step<N>.ckpt, so once step 12 exists last.ckpt is at step >= 8
    while not (run_dir / "checkpoints" / "step000012.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-12 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at, _ = _final_weights(run_dir)
    assert 8 <= killed_at < steps, f"the kill came too late (last checkpoint at step {killed_at})"

    resumed = cli(common + ["run_name=killed", "ckpt_path=last"], tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Trained to step {steps}" in resumed.stdout
    step_a, weights_a = _final_weights(tmp_path / "out" / "straight")
    step_b, weights_b = _final_weights(run_dir)
    assert step_a == step_b == steps
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
