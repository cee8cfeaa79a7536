"""Checkpoint provenance (residual_dynamics.reporting.provenance): the weight fingerprint, the hub commit,
the per-sweep registry and the identical-weights warning, in the probe CLI and in the training callback.

* The fingerprint follows exactly the tensors it is documented to hash: equal for a copy, changed by a
  change to the embedding, the first or last block or the final norm, blind to a middle block.
* The registry: each job sees the jobs registered before it, also under concurrent processes.
* A real ``python -m residual_dynamics.probe -m`` multirun over three local random GPT-2 directories, two
  of them with identical weights (a copy), one different (laid out as a hub-cache snapshot, so it has a
  commit): exactly the copy is warned about, and the fingerprints, commit and probe times land in every
  results row and in W&B. It also reads its prompts from a .jsonl ``prompts.file``.

Timing on a 2-core machine: about 35 s, most of it the CLI multirun (3 jobs, one cheap probe each).
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import wandb_offline
from residual_dynamics.reporting.provenance import (
    REGISTRY_FILE,
    hub_commit,
    identical_weights_message,
    register_fingerprint,
    weight_fingerprint,
)
from residual_dynamics.training.convert import to_transformer_lens
from residual_dynamics.training.model import ModelConfig, Transformer
from test_probe_cli import cli_env
from test_pretrained import make_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layers=3, d_model=16, n_heads=2, n_ctx=8, d_vocab=20)).eval()


# --------------------------------------------------------------------------- the fingerprint


def test_fingerprint_covers_embedding_first_and_last_block_and_final_norm():
    model = tiny_model()
    reference = weight_fingerprint(to_transformer_lens(model))
    assert len(reference) == 64 and int(reference, 16) >= 0
    assert weight_fingerprint(to_transformer_lens(copy.deepcopy(model))) == reference
    assert weight_fingerprint(to_transformer_lens(tiny_model(seed=1))) != reference

    def perturbed(get):
        other = copy.deepcopy(model)
        with torch.no_grad():
            tensor = get(other)
            tensor.view(-1)[0] += 1e-3  # one value, slightly
        return weight_fingerprint(to_transformer_lens(other))

    hashed = {
        "embedding": lambda m: m.embed.weight,
        "first block attention": lambda m: m.blocks[0].attn.qkv.weight,
        "first block norm": lambda m: m.blocks[0].ln1.bias,
        "last block MLP": lambda m: m.blocks[2].mlp.w_out.bias,
        "final norm": lambda m: m.ln_final.weight,
    }
    for part, get in hashed.items():
        assert perturbed(get) != reference, part
    # documented scope: a few fixed tensors, not every weight
    assert perturbed(lambda m: m.blocks[1].mlp.w_in.weight) == reference
    assert perturbed(lambda m: m.unembed.weight) == reference


def test_fingerprint_of_a_one_block_model_without_final_norm():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=20,
                                    normalization_type="none")).eval()
    fingerprint = weight_fingerprint(to_transformer_lens(model))
    with torch.no_grad():
        model.blocks[0].attn.o.bias[0] += 1.0
    assert weight_fingerprint(to_transformer_lens(model)) != fingerprint


def test_hub_commit_is_the_snapshot_folder_name(tmp_path):
    snapshot = tmp_path / "models--EleutherAI--pythia-160m" / "snapshots" / COMMIT
    assert hub_commit(snapshot) == COMMIT
    assert hub_commit(str(snapshot)) == COMMIT
    assert hub_commit(tmp_path / "snapshots" / "step1000") is None  # not a commit hash
    assert hub_commit(tmp_path / "some" / COMMIT) is None  # not under snapshots/
    assert hub_commit(None) is None


# --------------------------------------------------------------------------- the registry


def entry(label: str, fingerprint: str = "a" * 64, commit=None, job=None) -> dict:
    return {"label": label, "weights_sha256": fingerprint, "commit": commit, "job": job}


def test_registry_returns_earlier_jobs_with_the_same_weights_under_another_name(tmp_path):
    registry = tmp_path / "sweep" / REGISTRY_FILE
    assert register_fingerprint(registry, entry("m@step1")) == []
    assert register_fingerprint(registry, entry("m@step2", "b" * 64)) == []
    assert register_fingerprint(registry, entry("m@step1")) == []  # the same name again: no warning
    same = register_fingerprint(registry, entry("m@step3"))
    assert [other["label"] for other in same] == ["m@step1", "m@step1"]
    assert len(registry.read_text().splitlines()) == 4


def test_identical_weights_message():
    message = identical_weights_message(entry("m@step3", job="job3"), [entry("m@step1", job="job1")])
    assert "m@step3" in message and "m@step1 (job job1)" in message and "pythia/issues/205" in message
    assert identical_weights_message(entry("m@step3"), []) is None
    # two names of one hub commit (a branch and a tag of one snapshot) are expected to match
    assert identical_weights_message(entry("m@main", commit=COMMIT), [entry("m@v1", commit=COMMIT)]) is None
    assert identical_weights_message(entry("m@a", commit=COMMIT), [entry("m@b", commit="f" * 40)]) is not None


def _register(args):
    registry, index = args
    return len(register_fingerprint(registry, entry(f"m@step{index}")))


def test_registry_is_atomic_across_processes(tmp_path):
    """Concurrent jobs each see exactly the jobs registered before them: 0, 1, ..., n - 1 earlier ones."""
    registry = tmp_path / REGISTRY_FILE
    n = 6
    with multiprocessing.get_context("fork").Pool(n) as pool:
        seen = pool.map(_register, [(registry, index) for index in range(n)])
    assert sorted(seen) == list(range(n))
    assert len(registry.read_text().splitlines()) == n


# --------------------------------------------------------------------------- the training callback


def test_probe_callback_records_the_fingerprint_and_warns_on_unchanged_weights(tmp_path, caplog):
    from residual_dynamics.probes.registry import PROBES
    from residual_dynamics.reporting.reporter import ProbeReporter
    from residual_dynamics.training.callbacks import ProbeCallback, ProbeSchedule

    model = tiny_model()
    reporter = ProbeReporter(tmp_path)
    callback = ProbeCallback(torch.randint(0, 20, (2, 8)), {"weight_norms": PROBES["weight_norms"].Options()},
                             ProbeSchedule(max_steps=4, log_spaced_until=4, every=0), reporter)
    module = SimpleNamespace(model=model, device=torch.device("cpu"))

    def probe_at(step):
        callback._probe(SimpleNamespace(global_step=step, is_global_zero=True), module)

    expected = {0: weight_fingerprint(to_transformer_lens(model))}
    with caplog.at_level(logging.WARNING, logger="residual_dynamics.training.callbacks"):
        probe_at(0)
        probe_at(1)  # no update in between: the warning
        assert "step 1: the weights are identical to those of step 0" in caplog.text
        caplog.clear()
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(1.01)  # an optimizer step
        expected[2] = weight_fingerprint(to_transformer_lens(model))
        probe_at(2)
        assert "identical" not in caplog.text
    expected[1] = expected[0]
    rows = reporter.results.read()
    assert {row["step"] for row in rows} == {0, 1, 2}
    assert all(row["weights_sha256"] == expected[row["step"]] for row in rows)
    assert expected[2] != expected[0]


# --------------------------------------------------------------------------- the probe CLI multirun


def save_gpt2(directory: Path, tokenizer, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def summary(run_dir: Path) -> dict:
    out = {}
    for record in wandb_offline.records(wandb_offline.run_file(run_dir)):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """``-m model.path=A,B,C``: B is a copy of A, C has other weights and sits in a hub-cache snapshot."""
    from residual_dynamics.pretrained.prompts import load_prompts

    root = tmp_path_factory.mktemp("provenance-multirun")
    tokenizer = make_tokenizer(load_prompts())
    first = save_gpt2(root / "first", tokenizer, seed=0)
    copied = root / "copy"
    shutil.copytree(first, copied)
    other = save_gpt2(root / "models--org--other" / "snapshots" / COMMIT, tokenizer, seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": text}) + "\n" for text in load_prompts()[:3]))
    sweep = root / "sweep"
    args = ["-m", "model=local", f"model.path={first},{copied},{other}", "probes=off",
            "probes.weight_norms.enabled=true", f"prompts.file={prompts}", "prompts.max_len=16",
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", "run_name=job"]
    proc = subprocess.run([sys.executable, "-m", "residual_dynamics.probe", *args], cwd=root, env=cli_env(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return SimpleNamespace(proc=proc, sweep=sweep, dirs=[first, copied, other])


def job_rows(sweep: Path, job: int) -> list[dict]:
    return [json.loads(line) for line in (sweep / str(job) / "results.jsonl").read_text().splitlines()]


def test_multirun_warns_exactly_about_the_copy(multirun):
    output = multirun.proc.stdout + multirun.proc.stderr
    first, copied, other = multirun.dirs
    warnings = [line for line in output.splitlines() if "[WARNING] - identical weights:" in line]
    assert len(warnings) == 1, output[-4000:]
    assert f"identical weights: {copied} has the weight fingerprint" in warnings[0]
    assert f"of {first} (job {multirun.sweep / '0'})" in warnings[0]
    assert str(other) not in warnings[0]
    registry = [json.loads(line) for line in (multirun.sweep / REGISTRY_FILE).read_text().splitlines()]
    assert [entry["label"] for entry in registry] == [str(first), str(copied), str(other)]


def test_multirun_records_fingerprints_commit_and_probe_times(multirun):
    rows = {job: job_rows(multirun.sweep, job) for job in range(3)}
    fingerprints = {job: {row["weights_sha256"] for row in job_rows_} for job, job_rows_ in rows.items()}
    assert all(len(values) == 1 for values in fingerprints.values())
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert {row["commit"] for row in rows[2]} == {COMMIT} and {row["commit"] for row in rows[0]} == {None}
    assert all(row["probe"] == "weight_norms" and row["probe_seconds"] > 0 for job in rows for row in rows[job])
    assert "weight_norms" in multirun.proc.stdout and "probe time" in multirun.proc.stdout

    for job in range(3):
        [run] = wandb_offline.offline_runs(multirun.sweep / str(job))
        config = wandb_offline.run_info(run)["config"]
        logged = summary(run)
        assert config["provenance"]["weights_sha256"] == logged["provenance/weights_sha256"] == rows[job][0]["weights_sha256"]
        assert logged["probe_seconds/weight_norms"] == pytest.approx(rows[job][0]["probe_seconds"])
        assert ("provenance/identical_weights" in logged) == (job == 1)
        assert config["provenance"]["commit"] == (COMMIT if job == 2 else None)
        history = wandb_offline.history(run)
        assert any("probe_seconds/weight_norms" in row for row in history)
