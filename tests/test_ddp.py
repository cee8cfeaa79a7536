"""DDP on CPU (gloo), end to end, under a Hydra multirun: ``trainer=ddp trainer.accelerator=cpu
trainer.devices=2`` with the probes on. Exactly one W&B run, one results file and one set of figures (rank
0 only); the token cache built once; every directory where it belongs (no stray run directory from the
second rank, Lightning issue 11300 / Hydra issue 2070); checkpoints that resume, again on two ranks."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import wandb_offline

WORDS = ("the residual stream grows with depth while heads read and write features that later layers clean "
         "up so the norm of each token vector tells how much was added").split()
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "trainer.compile=false"]
SMALL = ["model=tiny", "data=text_files", "data.seq_len=32", "data.batch_size=4", "data.val_batches=2",
         "data.val_fraction=0.1", "tokenizer.vocab_size=300", "trainer.log_every=1", "trainer.val_every=4",
         "trainer.ckpt_every=4", "probes.schedule.log_spaced_until=2", "probes.schedule.every=4",
         "probes.batch_size=2", "probes.seq_len=16", "probes.layer_horizon.ks=[1]", "probes.cleanup.enabled=false",
         "probes.sublayer_ablation.enabled=false", "probes.logit_lens.enabled=false"]


def own_entries(root: Path) -> list[str]:
    """What is in the test's directory, less W&B's settings and cache folders (tests/conftest.py)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("wandb_"))


def cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "residual_dynamics.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_ddp_on_cpu_under_a_multirun(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(60):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
    cache, out = tmp_path / "cache", tmp_path / "out"
    common = DDP + SMALL + [f"data.path={corpus}", f"paths.cache_dir={cache}", f"paths.output_root={out}"]
    proc = cli(["-m", "seed=0", "trainer.max_steps=8"] + common, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # directories: only the job's, under the sweep; nothing from rank 1 anywhere else
    assert own_entries(tmp_path) == ["cache", "corpus", "out"]
    [sweep] = (out / "multirun").iterdir()
    [job] = [p for p in sweep.iterdir() if p.is_dir()]
    assert sorted(p.name for p in out.rglob("results.jsonl")) == ["results.jsonl"]
    assert [p.parent for p in out.rglob("results.jsonl")] == [job]
    assert [p.parent for p in out.rglob("figures")] == [job]
    assert sorted(p.name for p in job.iterdir() if p.name.endswith(".log")) == ["train.log",
                                                                                "train_ddp_process_1.log"]
    assert len(list(job.rglob(".hydra"))) == 1  # rank 1 ran with hydra.output_subdir=null
    assert not list(tmp_path.rglob("lightning_logs"))

    # one W&B run, one results file written by rank 0 only (no row twice)
    [wandb_run] = wandb_offline.offline_runs(tmp_path)
    steps = sorted({row["trainer/global_step"] for row in wandb_offline.history(wandb_run) if "growth_rate" in row})
    assert steps == [0, 1, 4, 8]
    rows = [json.loads(line) for line in (job / "results.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["probe"], r["name"], r["layer"], r["head"]) for r in rows]
    assert len(keys) == len(set(keys)) and sorted({r["step"] for r in rows}) == [0, 1, 4, 8]
    # the token cache: tokenized once (rank 0, before rank 1 started), loaded by rank 1
    logs = "".join((job / name).read_text() for name in ("train.log", "train_ddp_process_1.log"))
    assert logs.count("tokenizing the text_files corpus") == 1
    assert (job / "checkpoints" / "step000008.ckpt").is_file()

    # the printed command resumes the job, again on two ranks, in its directory
    [command] = [line.split("resume with   :", 1)[1].strip() for line in proc.stdout.splitlines()
                 if "resume with   :" in line]
    args = [a for a in shlex.split(command)[3:] if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=12"]
    again = cli(args, tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert "Trained to step 12 (resumed from step 8)" in again.stdout
    assert (job / "checkpoints" / "step000012.ckpt").is_file()
    assert len(wandb_offline.offline_runs(tmp_path)) == 2  # the same W&B run, a second (rewound) folder
    rows = [json.loads(line) for line in (job / "results.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["probe"], r["name"], r["layer"], r["head"]) for r in rows]
    assert len(keys) == len(set(keys)) and sorted({r["step"] for r in rows}) == [0, 1, 4, 8, 12]
    assert own_entries(tmp_path) == ["cache", "corpus", "out"]
