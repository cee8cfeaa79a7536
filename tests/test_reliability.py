"""Nothing lost, nothing run that should not be (issue 9): checkpoint safety, divergence, resumes that fail
or are interrupted at any stage, W&B after a kill, tokenizer integrity, the run-directory lock, multirun
names, a damaged last.ckpt, and the smaller error paths.

Most runs are in-process (``train(parse_train(composed config))``, no interpreter start-up); the ones that
need a real process (exit status, a printed command, a multirun, SIGKILL) go through the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import wandb_offline
from composed import composed
from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.spec import DamagedCheckpoint, Resume, parse_train
from residual_dynamics.training.guards import DivergenceConfig, DivergenceGuard, Diverged, SpikeDetector
from residual_dynamics.training.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["model=tiny", "data.seq_len=32", "data.batch_size=8", "data.val_batches=2", "tokenizer.vocab_size=512",
        "trainer.log_every=1", "trainer.val_every=1000"]
# few, cheap probes at every 4th step (log-spaced 0, 1, 2 first)
PROBES = ["probes.schedule.log_spaced_until=3", "probes.schedule.every=4", "probes.batch_size=2", "probes.seq_len=16",
          "probes.layer_horizon.enabled=false", "probes.cleanup.enabled=false", "probes.sublayer_ablation.enabled=false",
          "probes.logit_lens.enabled=false", "probes.activation_rates.enabled=false"]


def cli(args, cwd, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "residual_dynamics.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"}, **kwargs)


def spec_of(run_dir: Path, cache: Path, *overrides, logger="none"):
    cfg = composed("config", FAST + [f"paths.cache_dir={cache}", f"paths.run_dir={run_dir}",
                                     f"run_name={run_dir.name}", f"logger={logger}", *overrides])
    return parse_train(cfg)


def rows_by_key(run_dir: Path) -> dict:
    """{(step, probe, name, layer, head): value} of results.jsonl; duplicates are a failure."""
    out = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = (row["step"], row["probe"], row["name"], row["layer"], row["head"])
        assert key not in out, f"{key} recorded twice"
        out[key] = row["value"]
    return out


def assert_same_rows(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


class Stop(Exception):
    """Interrupts a run from a callback (Lightning re-raises it after its own clean-up)."""


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        if self.step == trainer.global_step:
            raise Stop(f"stopped at the start, step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Stop(f"stopped at step {trainer.global_step}")


def finished_history(folder: Path, timeout: float = 60.0) -> list[dict]:
    """The history of an offline W&B folder once W&B has written its exit record (an in-process run's
    service may still be writing the file when wandb.finish returns)."""
    deadline = time.time() + timeout
    while True:
        kinds = {r.WhichOneof("record_type") for r in wandb_offline.records(wandb_offline.run_file(folder))}
        if "exit" in kinds or time.time() > deadline:
            return wandb_offline.history(folder)
        time.sleep(0.2)


def ckpt_weights(path: Path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


# --------------------------------------------------------------------------- 1. no code from checkpoints


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what unpickling it with weights_only=False would run
        return (os.mkdir, (str(self.marker),))


def write_payload(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 4, "epoch": 0, "evil": _Payload(marker)}, path)
    return path


def test_payload_checkpoint_runs_no_code_anywhere(tmp_path, data_cache, monkeypatch):
    """A pickle with a __reduce__ payload: refused (naming the file) by the config check and by Lightning's own
    resume load, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, which makes torch's default load run it."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from residual_dynamics.training.checkpoint import SafeCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload_ran"
    payload = write_payload(tmp_path / "evil.ckpt", marker)
    TorchCheckpointIO().load_checkpoint(payload)  # the control: Lightning's default IO runs the payload here
    assert marker.is_dir()
    marker.rmdir()

    with pytest.raises(Exception):
        SafeCheckpointIO().load_checkpoint(payload)
    with pytest.raises(DataError, match=re.escape(str(payload))):
        spec_of(tmp_path / "run", data_cache, f"ckpt_path={payload}", "probes=off")
    # Lightning's resume load itself (the config check bypassed, as if the file changed after it)
    spec = spec_of(tmp_path / "run2", data_cache, "probes=off", "trainer.max_steps=8")
    with pytest.raises(DataError, match=re.escape(str(payload))):
        train(dataclasses.replace(spec, resume=Resume(str(payload), 4)))
    assert not marker.exists(), "the checkpoint ran code"


# --------------------------------------------------------------------------- 2. divergence


def test_divergence_stops_with_an_error_naming_the_step_and_keeps_finite_checkpoints(tmp_path, data_cache):
    """optim.lr=1e3 on model=tiny: the loss blows up within a few steps. The run exits 1 naming the step,
    never prints success, every checkpoint (last.ckpt included) is finite, no probe row is recorded at or
    after the diverged step, and the W&B run ends with exit code 1."""
    out = tmp_path / "out"
    proc = cli(FAST + PROBES + ["optim.lr=1e3", "trainer.max_steps=40", "trainer.ckpt_every=2",
                                f"paths.cache_dir={data_cache}", f"paths.output_root={out}", "run_name=div"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Trained to step" not in proc.stdout
    found = re.search(r"training diverged at step (\d+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    diverged = int(found.group(1))
    assert diverged < 40
    run_dir = out / "div"
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and any(p.name == "last.ckpt" for p in ckpts)
    for path in ckpts:
        step, weights = ckpt_weights(path)
        assert step < diverged + 1, path
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path
    last_step, _ = ckpt_weights(run_dir / "checkpoints" / "last.ckpt")
    assert f"(step {last_step}), is finite" in proc.stderr and "ckpt_path=last" in proc.stderr
    rows = rows_by_key(run_dir)
    assert rows and max(key[0] for key in rows) < diverged + 1
    [wandb_run] = wandb_offline.offline_runs(run_dir)
    exits = [r.exit.exit_code for r in wandb_offline.records(wandb_offline.run_file(wandb_run))
             if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_spike_rule_on_planted_spikes_and_on_null_data():
    """mean + 6 sigma of the previous 128 values: a planted 10-sigma spike is flagged, at its step only; a
    planted 4-sigma bump is not; 20,000 steps of Gaussian noise give no flag."""
    rng = np.random.default_rng(0)
    noise = rng.normal(3.0, 0.1, size=400)
    noise[300] = 3.0 + 1.0  # 10 sigma
    noise[350] = 3.0 + 0.4  # 4 sigma
    detector = SpikeDetector(128, 6.0)
    flagged = {i: z for i, x in enumerate(noise) if (z := detector.update(float(x))) is not None}
    assert list(flagged) == [300]
    past = noise[300 - 128:300]
    assert flagged[300] == pytest.approx((noise[300] - past.mean()) / past.std(), rel=1e-9)
    null = SpikeDetector(128, 6.0)
    assert not any(null.update(float(x)) is not None for x in rng.normal(size=20_000))
    early = SpikeDetector(128, 6.0)  # no verdict before a full window
    assert all(early.update(v) is None for v in [1.0] * 127 + [100.0])


class SpikeOneBatch(L.Callback):
    """Scales the unembedding by 30 for one batch (restored after its step): a planted loss spike. (The
    loss of the barely trained tiny model is near log(vocab) for any data, so no batch content can.)"""

    def __init__(self, batch_index: int):
        self.batch_index = batch_index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.batch_index:
            with torch.no_grad():
                pl_module.model.unembed.weight.mul_(30.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.batch_index + 1:
            with torch.no_grad():
                pl_module.model.unembed.weight.div_(30.0)


def test_planted_loss_spike_is_logged_to_wandb_and_the_results_file(tmp_path, data_cache):
    run_dir = tmp_path / "spike"
    spec = spec_of(run_dir, data_cache, "probes=off", "trainer.max_steps=30", "trainer.ckpt_every=100",
                   "divergence.spike_window=16", logger="wandb")
    train(spec, callbacks=[SpikeOneBatch(24)])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {(r["step"], r["name"]) for r in rows} == {(25, "loss_spike"), (25, "loss_spike_sigmas")}
    sigmas = [r["value"] for r in rows if r["name"] == "loss_spike_sigmas"][0]
    assert sigmas > 6 and all(r["probe"] == "divergence" and r["run"] == "spike" for r in rows)
    [wandb_run] = wandb_offline.offline_runs(run_dir)
    history = finished_history(wandb_run)
    spikes = [row for row in history if "train/loss_spike" in row]
    assert [row["trainer/global_step"] for row in spikes] == [24]
    assert spikes[0]["train/loss"] == pytest.approx(spikes[0]["train/loss_spike"])  # beside that batch's loss


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A weight that overflowed with a finite gradient: the guard refuses the checkpoint (nothing written)."""
    guard = DivergenceGuard(DivergenceConfig())
    checkpoint = {"global_step": 7, "state_dict": {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]),
                                                   "steps": torch.tensor([3])}}
    with pytest.raises(Diverged, match="step 7.*weights b are not finite"):
        guard.on_save_checkpoint(None, None, checkpoint)
    guard.on_save_checkpoint(None, None, {"global_step": 6, "state_dict": {"a": torch.ones(3)}})
    assert guard.last_saved_step == 6


# --------------------------------------------------------------------------- 3. a failed resume loses nothing


@pytest.mark.slow
def test_a_resume_interrupted_at_any_stage_loses_no_row(tmp_path, data_cache):
    """Train to 24 (probes at 0, 1, 2, 4, 8, ..., 24; checkpoints every 4), then resume from step 8 and
    interrupt it at every stage: a bad config field, another d_vocab (another tokenizer: the next test), at
    the start, after two steps (before the next probe), after a recomputed probe (step 13). After each, every
    row is still there with its value. Finally a resume from last.ckpt completes the run: the rows equal the
    originals. (The old code deleted the rows after step 8 before training, so each failed resume lost them
    and the resume from last.ckpt, at step 12, left a hole.)"""
    run_dir = tmp_path / "r"
    common = PROBES + ["trainer.max_steps=24", "trainer.ckpt_every=4"]
    train(spec_of(run_dir, data_cache, *common))
    original = rows_by_key(run_dir)
    assert sorted({key[0] for key in original}) == [0, 1, 2, 4, 8, 12, 16, 20, 24]
    step8 = run_dir / "checkpoints" / "step000008.ckpt"

    with pytest.raises(ConfigError, match="trainer.precision"):  # a bad trainer field
        spec_of(run_dir, data_cache, *common, f"ckpt_path={step8}", "trainer.precision=bogus")
    assert_same_rows(rows_by_key(run_dir), original)
    with pytest.raises(DataError, match="d_vocab=512"):
        train(spec_of(run_dir, data_cache, *common, f"ckpt_path={step8}", "model.d_vocab=600"))
    assert_same_rows(rows_by_key(run_dir), original)
    for stop in (8, 10, 13):  # at the start (restored, no step yet), before the next probe, after one
        with pytest.raises(Stop):
            train(spec_of(run_dir, data_cache, *common, f"ckpt_path={step8}"), callbacks=[StopAt(stop)])
        assert_same_rows(rows_by_key(run_dir), original)
    # the last interrupted session rewrote step000012.ckpt and last.ckpt (step 12): resume from there
    assert ckpt_weights(run_dir / "checkpoints" / "last.ckpt")[0] == 12
    paths = train(spec_of(run_dir, data_cache, *common, "ckpt_path=last"))
    assert paths["resumed_from"] == 12 and paths["global_step"] == 24
    assert_same_rows(rows_by_key(run_dir), original)


def test_results_file_replaces_earlier_rows_only_as_they_are_recomputed(tmp_path):
    from residual_dynamics.reporting.results import ResultsFile

    def row(step, value):
        return {"step": step, "probe": "p", "name": "x", "layer": None, "head": None, "value": value}

    path = tmp_path / "results.jsonl"
    first = ResultsFile(path)
    first.append([row(s, 1.0) for s in (0, 4, 8, 12)])
    with open(path, "a") as f:
        f.write('{"step": 16, "pro')  # a crash mid-write
    resumed = ResultsFile(path, resume_after=4)
    assert [r["step"] for r in resumed.read()] == [0, 4, 8, 12]
    resumed.append([row(8, 2.0)])  # recomputed 8: 12 (not yet recomputed) stays
    assert [(r["step"], r["value"]) for r in resumed.read()] == [(0, 1.0), (4, 1.0), (8, 2.0), (12, 1.0)]
    resumed.append([row(9, 2.0)])
    resumed.append([row(9, 3.0)])  # a second batch of rows of the same step is kept
    assert [(r["step"], r["value"]) for r in resumed.read()] == [(0, 1.0), (4, 1.0), (8, 2.0), (9, 2.0), (9, 3.0),
                                                                 (12, 1.0)]
    resumed.finish_resume()  # the run ended at 9: the earlier session's 12 is not this run's
    assert [r["step"] for r in resumed.read()] == [0, 4, 8, 9, 9]
    assert path.read_text().endswith("\n") and '"step": 16' not in path.read_text()


# --------------------------------------------------------------------------- 4. W&B after a kill


def stitched(folders):
    """Rows of the offline folders as `wandb sync` applies them in order: a folder with a branch point
    (rewind) keeps the earlier rows with _step <= its point."""
    rows = []
    for folder in folders:
        branch = None
        for record in wandb_offline.records(wandb_offline.run_file(folder)):
            if record.WhichOneof("record_type") == "run" and record.run.branch_point.run:
                assert record.run.branch_point.metric == "_step"
                branch = record.run.branch_point.value
        if branch is not None:
            rows = [r for r in rows if r["_step"] <= branch]
        rows += wandb_offline.history(folder)
    return rows


def metric_points(rows, keys=("train/loss", "growth_rate", "val/loss")):
    out = {}
    for row in rows:
        for key in keys:
            if key in row:
                point = (key, row["trainer/global_step"])
                assert point not in out, f"{point} logged twice"
                out[point] = row[key]
    return out


@pytest.mark.slow
def test_killed_and_resumed_run_is_one_wandb_history(tmp_path, data_cache):
    """SIGKILL a run right after a checkpoint (W&B has not written its last seconds), resume with
    ckpt_path=last: the offline folders, synced in the printed order, hold every train/loss, val/loss and probe
    point of an uninterrupted run exactly once, with the same values."""
    out = tmp_path / "out"
    common = FAST + PROBES + ["trainer.max_steps=64", "trainer.ckpt_every=8", "trainer.val_every=24",
                              "probes.schedule.every=16", "probes.weight_norms.enabled=false",
                              f"paths.cache_dir={data_cache}", f"paths.output_root={out}"]
    straight = cli(common + ["run_name=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = metric_points(wandb_offline.history(wandb_offline.offline_runs(out / "straight")[0]))
    assert len([p for p in want if p[0] == "train/loss"]) == 64

    run_dir = out / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "residual_dynamics.train", *common, "run_name=killed"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step000024.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-24 checkpoint"
        time.sleep(0.01)
    time.sleep(0.05)  # last.ckpt is written right after step000024.ckpt
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_weights(run_dir / "checkpoints" / "last.ckpt")[0]
    assert 16 <= killed_at < 64
    resumed = cli(common + ["run_name=killed", "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout

    folders = wandb_offline.offline_runs(run_dir)
    assert len(folders) == 2
    printed = [line.strip() for line in resumed.stdout.splitlines() if line.strip().startswith("wandb sync")]
    assert printed == [f"wandb sync {folder}" for folder in folders]  # oldest first
    got = metric_points(stitched(folders))
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for point, value in want.items():
        assert got[point] == pytest.approx(value, rel=1e-5), point


def test_wandb_steps_order_rows_as_lightning_logs_them(tmp_path):
    """Within a batch Lightning's train/loss comes after the probe of the weights that batch produced: the W&B
    steps (probe 2s, batch 2g+3) keep every row, and a checkpoint at S splits them at 2S+1."""
    from residual_dynamics.training.wandb_resume import (ResumePlan, WandbHistory, batch_wandb_step,
                                                         checkpoint_wandb_step, probe_wandb_step)

    class Run:  # records what reaches wandb.log
        starting_step = 0

        def __init__(self):
            self.logged = []

        def log(self, payload, step):
            assert not self.logged or step > self.logged[-1][0]
            self.logged.append((step, dict(payload)))

    run = Run()
    history = WandbHistory(tmp_path, ResumePlan({}, None, None))
    history.attach(run)
    history.log_probe({"p": 0.0}, 0)
    for g in range(3):  # Lightning's order
        history.log_probe({"p": g + 1.0}, g + 1)
        history.log_batch({"train/loss": 10.0 - g}, g)
    history.close()
    assert [(s, r.get("p", r.get("train/loss"))) for s, r in run.logged] == [
        (0, 0.0), (2, 1.0), (3, 10.0), (4, 2.0), (5, 9.0), (6, 3.0), (7, 8.0)]
    for S in range(4):  # before the checkpoint at S: probes of steps <= S, batches < S
        assert probe_wandb_step(S) <= checkpoint_wandb_step(S) < probe_wandb_step(S + 1)
        assert batch_wandb_step(S - 1) <= checkpoint_wandb_step(S) < batch_wandb_step(S)


# --------------------------------------------------------------------------- 5. tokenizer integrity


def test_resume_with_an_edited_tokenizer_is_refused_naming_both_fingerprints(tmp_path, data_cache):
    """A tokenizer directory edited after training (two tokens swapped: still valid JSON, another mapping):
    the resume is refused before anything is written, naming both fingerprints; the shard manifest and the
    checkpoint record the fingerprint."""
    import shutil

    from residual_dynamics.data.tokenizer import load_pretrained_tokenizer, tokenizer_fingerprint

    from residual_dynamics.data import prepare_token_data

    warm = spec_of(tmp_path / "warm", data_cache, "probes=off")
    cached, _ = prepare_token_data(warm.data, warm.tokenizer, data_cache)  # the BPE of FAST, from its cache
    tok_dir = tmp_path / "tok"
    shutil.copytree(cached.name_or_path, tok_dir)
    tok = ["tokenizer.name=gpt2", f"tokenizer.path={tok_dir}", "probes=off", "trainer.ckpt_every=4"]
    run_dir = tmp_path / "run"
    train(spec_of(run_dir, data_cache, *tok, "trainer.max_steps=4"))
    before = tokenizer_fingerprint(load_pretrained_tokenizer(str(tok_dir)))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["tokenizer_fingerprint"] == before
    manifests = [json.loads(p.read_text()) for p in (data_cache / "shards").glob("*/manifest.json")]
    assert before in {m["tokenizer_fingerprint"] for m in manifests}

    data = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    after = tokenizer_fingerprint(load_pretrained_tokenizer(str(tok_dir)))
    assert after != before
    with pytest.raises(DataError) as excinfo:
        train(spec_of(run_dir, data_cache, *tok, "trainer.max_steps=8", "ckpt_path=last"))
    assert before in str(excinfo.value) and after in str(excinfo.value)
    assert ckpt_weights(run_dir / "checkpoints" / "last.ckpt")[0] == 4  # nothing trained with it


# --------------------------------------------------------------------------- 6. run-directory lock


def test_a_second_run_on_a_locked_run_directory_fails_clearly(tmp_path, data_cache):
    """While another process holds <run_dir>/.lock, the same run_name fails at once, naming the holder, and
    writes nothing (no duplicated rows)."""
    out = tmp_path / "out"
    run_dir = out / "twice"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from residual_dynamics.training.rundir import RunLock; "
        f"lock = RunLock(Path({str(run_dir)!r})).acquire(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli(FAST + PROBES + ["trainer.max_steps=4", f"paths.cache_dir={data_cache}",
                                    f"paths.output_root={out}", "run_name=twice", "logger=none"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert f"{run_dir} is in use by another run (pid {holder.pid}" in proc.stderr
    assert not (run_dir / "results.jsonl").exists() and not (run_dir / "checkpoints").exists()
    # the lock dies with its holder: the same command runs now
    spec = spec_of(run_dir, data_cache, "probes=off", "trainer.max_steps=2")
    assert train(spec)["global_step"] == 2


def test_the_lock_is_exclusive_in_one_process_too(tmp_path):
    from residual_dynamics.training.rundir import RunDirectoryLocked, RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


# --------------------------------------------------------------------------- 7. multirun names


def test_multirun_jobs_have_their_own_names_and_a_resume_command_that_resumes_them(tmp_path, data_cache):
    out = tmp_path / "out"
    proc = cli(["-m", "model.n_heads=2,4"] + FAST + PROBES + [
        "trainer.max_steps=4", "trainer.ckpt_every=4", "probes.weight_norms.enabled=false",
        f"paths.cache_dir={data_cache}", f"paths.output_root={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = (out / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0].name.startswith("0_") and jobs[1].name.startswith("1_")
    assert "model.n_heads=2" in jobs[0].name and "model.n_heads=4" in jobs[1].name
    names = []
    for job in jobs:
        runs = {json.loads(line)["run"] for line in (job / "results.jsonl").read_text().splitlines()}
        assert runs == {f"{sweep.name}_{job.name}"}
        [folder] = wandb_offline.offline_runs(job)
        [record] = [r for r in wandb_offline.records(wandb_offline.run_file(folder))
                    if r.WhichOneof("record_type") == "run"]
        assert record.run.display_name == f"{sweep.name}_{job.name}"
        names.append(record.run.display_name)
    assert len(set(names)) == 2
    commands = [line.split("resume with   :", 1)[1].strip() for line in proc.stdout.splitlines()
                if "resume with   :" in line]
    assert len(commands) == 2
    # the second job's command, run further: it resumes that job, in its directory
    args = shlex.split(commands[1])[3:]
    assert "ckpt_path=last" in args and "model.n_heads=4" in args
    args = [a for a in args if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=8"]
    again = cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trained to step 8 (resumed from step 4)" in again.stdout
    assert (jobs[1] / "checkpoints" / "step000008.ckpt").is_file()
    assert not (jobs[0] / "checkpoints" / "step000008.ckpt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["multirun"]  # no stray run directory


# --------------------------------------------------------------------------- 8. smaller ones


def test_probe_time_after_a_resume_counts_this_session_only():
    from residual_dynamics.training.callbacks import ProbeCallback, ProbeSchedule

    callback = ProbeCallback(torch.zeros(1, 2, dtype=torch.long), {}, ProbeSchedule(max_steps=4), reporter=None)
    callback.load_state_dict({"seconds": 690.0})  # the earlier sessions' probe time, from the checkpoint
    assert callback.seconds == 0.0 and callback.total_seconds == 690.0
    callback.seconds = 1.5
    assert callback.state_dict() == {"seconds": 691.5}


def test_pretrained_sources_that_are_not_models_fail_clearly(tmp_path):
    from residual_dynamics.pretrained.loading import load_pretrained

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(ConfigError, match="model.gguf: .*is not a GGUF file"):
        load_pretrained({"gguf": str(fake), "device": "cpu"})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.path: .*config.json names no model_type"):
        load_pretrained({"path": str(empty), "device": "cpu"})
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model.path: .*holds no weights"):
        load_pretrained({"path": str(no_weights), "device": "cpu"})
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model.path: .*not valid JSON"):
        load_pretrained({"path": str(no_weights), "device": "cpu"})


def test_stale_checkpoint_temporaries_are_removed_when_a_run_starts(tmp_path, data_cache):
    run_dir = tmp_path / "r"
    stale = run_dir / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    train(spec_of(run_dir, data_cache, "probes=off", "trainer.max_steps=2", "trainer.ckpt_every=2"))
    assert not stale.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step000002.ckpt"]


def test_fresh_start_in_a_directory_with_checkpoints_is_refused(tmp_path, data_cache):
    run_dir = tmp_path / "r"
    train(spec_of(run_dir, data_cache, "probes=off", "trainer.max_steps=2", "trainer.ckpt_every=2"))
    with pytest.raises(ConfigError, match="ckpt_path: .*already holds 2 checkpoint"):
        spec_of(run_dir, data_cache, "probes=off", "trainer.max_steps=4")


# --------------------------------------------------------------------------- 9. a damaged last.ckpt


def test_truncated_last_checkpoint_names_the_intact_one_and_last_good_resumes_from_it(tmp_path, data_cache):
    out = tmp_path / "out"
    run_dir = out / "t"
    common = ["probes=off", "trainer.ckpt_every=4"]
    train(spec_of(run_dir, data_cache, *common, "trainer.max_steps=8"))
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with pytest.raises(DamagedCheckpoint) as excinfo:
        spec_of(run_dir, data_cache, *common, "trainer.max_steps=12", "ckpt_path=last")
    message = str(excinfo.value)
    assert str(last) in message and f"{run_dir / 'checkpoints' / 'step000008.ckpt'} (step 8)" in message
    assert "ckpt_path=last_good" in message
    # the CLI prints the command, and that command resumes from the intact checkpoint
    proc = cli(FAST + common + ["trainer.max_steps=12", "logger=none", f"paths.cache_dir={data_cache}",
                                f"paths.output_root={out}", "run_name=t", "ckpt_path=last"], tmp_path)
    assert proc.returncode == 1 and "step000008.ckpt (step 8)" in proc.stderr
    command = proc.stderr.rsplit("the command: ", 1)[1].splitlines()[0]
    again = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trained to step 12 (resumed from step 8)" in again.stdout
