"""Sweeps through Hydra's submitit launcher, on this machine (``hydra/launcher=submitit_local``: the same
code path as ``submitit_slurm``: pickled jobs run as a job array, requeue on preemption), end to end: a
2-job multirun, one job preempted (submitit's preemption signal) after its first checkpoint, requeued,
and resumed through ``ckpt_path=last`` in its own run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import wandb_offline
from composed import composed

FAST = ["model=tiny", "data.seq_len=32", "data.batch_size=8", "data.val_batches=2", "tokenizer.vocab_size=512",
        "trainer.log_every=1", "trainer.val_every=1000", "trainer.ckpt_every=4", "probes.schedule.log_spaced_until=2",
        "probes.schedule.every=8", "probes.batch_size=2", "probes.seq_len=16", "probes.layer_horizon.enabled=false",
        "probes.cleanup.enabled=false", "probes.sublayer_ablation.enabled=false", "probes.logit_lens.enabled=false",
        "probes.activation_rates.enabled=false", "probes.weight_norms.enabled=false"]


def test_slurm_launcher_config_documents_its_knobs_and_resumes_on_requeue():
    cfg = composed("config", ["hydra/launcher=submitit_slurm", "paths.run_dir=/tmp/x"])
    from hydra import compose, initialize_config_dir

    from composed import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        launcher = compose("config", ["hydra/launcher=submitit_slurm", "paths.run_dir=/tmp/x"],
                           return_hydra_config=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.residual_dynamics_launcher.launchers.SlurmLauncher"
    assert launcher.timeout_min == 240 and launcher.gpus_per_node == 1 and launcher.array_parallelism == 16
    assert launcher.max_num_timeout >= 1
    text = (CONF / "hydra" / "launcher" / "submitit_slurm.yaml").read_text()
    for knob in ("timeout_min", "gpus_per_node", "array_parallelism", "max_num_timeout", "ckpt_path=last"):
        assert knob in text
    from residual_dynamics.training.cluster import requeue_overrides

    assert requeue_overrides(["model.n_heads=2", "ckpt_path=/x.ckpt"]) == ["model.n_heads=2", "ckpt_path=last"]
    assert cfg.run_name  # composes


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local_with_a_preempted_job_resumed(tmp_path, data_cache):
    out = tmp_path / "out"
    args = ["-m", "hydra/launcher=submitit_local", "model.n_heads=2,4", "trainer.max_steps=24"] + FAST + [
        f"paths.cache_dir={data_cache}", f"paths.output_root={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "residual_dynamics.train", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 600
    first = None
    while first is None:  # job 1 (n_heads=4) past its first checkpoint: preempt it
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before job 1 checkpointed"
        found = [p for p in out.glob("multirun/*/1_*/checkpoints/step000004.ckpt")]
        first = found[0].parents[1] if found else None
        time.sleep(0.05)
    pid = int((first / ".lock").read_text().split()[1])
    os.kill(pid, signal.SIGUSR2)  # submitit's preemption signal (LocalJob._interrupt sends the same)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]

    [sweep] = (out / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and jobs[1] == first  # the requeued job kept its directory
    text = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Trained to step 24." in text and "(resumed from step" in text  # job 0 straight, job 1 resumed
    assert "requeued with" in text and "ckpt_path=last" in text
    for job in jobs:
        assert (job / "checkpoints" / "step000024.ckpt").is_file()
        rows = [json.loads(line) for line in (job / "results.jsonl").read_text().splitlines()]
        keys = [(r["step"], r["probe"], r["name"], r["layer"], r["head"]) for r in rows]
        assert len(keys) == len(set(keys)) and sorted({r["step"] for r in rows}) == [0, 1, 8, 16, 24]
        assert {r["run"] for r in rows} == {f"{sweep.name}_{job.name}"}
    assert len(wandb_offline.offline_runs(jobs[0])) == 1 and len(wandb_offline.offline_runs(jobs[1])) == 2
