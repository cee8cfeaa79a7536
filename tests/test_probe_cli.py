"""The pretrained-model probe entry point, ``python -m residual_dynamics.probe``, run as a real CLI.

* A tiny random GPT-2 (saved with ``save_pretrained``) with exactly the shape of ``model=tiny`` goes
  through ``model=local model.path=...`` offline: the W&B offline run (read back from its transaction
  log), ``results.jsonl`` and the figures are checked, and its W&B keys (``<probe family>/...`` scalars at
  the default ``logger.detail=layer``, and one table per family holding the other records) are compared
  with those a real training run (``python -m residual_dynamics.train model=tiny ...``) logs at a checkpoint.
* ``x_axis_step``: the W&B x-axis of a ``model.revision=step<N>`` checkpoint (no model load).
* Bad configs fail before anything is loaded, naming the field.
* ``@pytest.mark.smollm2``: the real SmolLM2-135M-Instruct through ``model=smollm2_offline``.

Subprocesses get W&B offline into this module's temporary directories and the Hugging Face hub offline.
Timings on a 2-core machine: about 40 s without SmolLM2, and the SmolLM2 CLI run itself 15-20 s.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import wandb_offline
from residual_dynamics.pretrained.cli import x_axis_step
from residual_dynamics.probes.common import Record
from residual_dynamics.pretrained.prompts import load_prompts
from residual_dynamics.reporting.results import metric_key, parse_metric_key
from test_pretrained import make_tokenizer, smollm2_dir  # noqa: F401  (smollm2_dir is a fixture)

REPO = Path(__file__).resolve().parents[1]
STEP_KEY = "trainer/global_step"
TINY_NAME = "tiny-gpt2"  # model.name of the CLI run, hence its W&B group

# Probe options shared by the probe CLI and the training run, so both log the same horizon keys.
PROBE_OPTIONS = ["probes.layer_horizon.ks=[1,2]"]

# Cleanup metrics logged only for writers the probe finds "cleaned" on the data at hand (see
# probes/cleanup.py): which of these keys exist depends on the weights and the batch, not on the
# architecture, so key sets are compared without them (and checked for consistency on their own).
CLEANED_ONLY = ("cleanup/top_cleaner_pr", "cleanup/cleaner_pr_sum", "cleanup/dla_corr")

# Key families (keys without their /Lxx[Hyy] suffix) of a Llama-family model that differ from those of
# our model=tiny (LayerNorm, GELU MLP, attention biases, learned positions), with the reason:
LLAMA_ONLY_FAMILIES = {
    "W_gate", "W_gate_folded",  # gated (SwiGLU) MLP: a gate matrix
    "mlp_gate_rate/tokens", "mlp_gate_rate/random",  # hook_pre is the gate pre-activation
}
TINY_ONLY_FAMILIES = {
    "b_O",  # Llama's attention has no output bias
    "cleanup/writer_score/pos",  # rotary positions: no positional-embedding node
    "mlp_act_rate/tokens", "mlp_act_rate/random",  # named mlp_gate_rate on gated MLPs
}


# --------------------------------------------------------------------------- helpers


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: W&B offline into ``root``, no hub, no API key, and one torch
    thread unless OMP_NUM_THREADS says otherwise (on a busy 2-core machine two OpenMP threads wait on each
    other: the SmolLM2 run took 36 s with 2 threads against 18 s with 1)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }
    env.pop("WANDB_API_KEY", None)
    return env


@dataclass
class CliRun:
    proc: subprocess.CompletedProcess
    seconds: float
    run_dir: Path

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def wandb_run(self) -> Path:
        [run] = wandb_offline.offline_runs(self.run_dir)
        return run


def run_cli(module: str, args: list[str], root: Path, timeout: float = 600, **env: str) -> CliRun:
    """``python -m <module> <args>`` with ``paths.output_root=<root>/out`` and ``run_name=run``."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*args, f"paths.output_root={root / 'out'}", "run_name=run"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=cli_env(root, **env),
                          capture_output=True, text=True, timeout=timeout)
    return CliRun(proc, time.perf_counter() - started, root / "out" / "run")


def probe_rows(history: list[dict]) -> list[dict]:
    """History rows holding probe scalars."""
    return [row for row in history if any(parse_metric_key(key) for key in row)]


def probe_keys(row: dict) -> set[str]:
    """The probe scalar keys of a history row."""
    return {key for key in row if parse_metric_key(key)}


def wandb_records(wandb_run: Path, row: dict) -> dict[str, object]:
    """{record key: value} of every record the W&B row holds, as a scalar or as a row of a family table."""
    from test_wandb_keys import logged_tables

    out = {key: row[key] for key in probe_keys(row)}
    for table in logged_tables(wandb_run, row).values():
        for r in table:
            out.setdefault(metric_key(Record(r["name"], 0.0, r["layer"], r["head"])), r["value"])
    return out


def logged_sections(row: dict) -> set[str]:
    """Probe scalar keys and media keys (tables) of a row, figures left out (they differ by run kind)."""
    media = {key[:-len("/_type")] for key in row if key.endswith("/_type")}
    return probe_keys(row) | {key for key in media if not key.startswith("probe_figures/")}


def family(key: str) -> str:
    """``W_OV/L29H08`` -> ``W_OV``; ``cleanup/writer_score/mlp/L01`` -> ``cleanup/writer_score/mlp``."""
    return re.sub(r"/(L\d+(H\d+)?|H\d+)$", "", key)


def split_cleaned_only(keys: set[str]) -> tuple[set[str], dict[str, set[str]]]:
    """(keys fixed by the architecture, {cleaned-only metric: node suffixes present})."""
    fixed = {key for key in keys if not key.startswith(CLEANED_ONLY)}
    nodes = {metric: {key[len(metric):] for key in keys if key.startswith(metric + "/") or key == metric}
             for metric in CLEANED_ONLY}
    return fixed, nodes


def check_cleaned_only_keys(keys: set[str], row: dict) -> None:
    """The cleaned-only cleanup records (``keys``: record keys of the W&B row) name exactly ``n_cleaned``
    writers, the same ones for each metric, and only nodes that have a writer_score."""
    _, nodes = split_cleaned_only(keys)
    first = nodes[CLEANED_ONLY[0]]
    assert all(found == first for found in nodes.values()), nodes
    assert len(first) == row["cleanup/n_cleaned"], (first, row["cleanup/n_cleaned"])
    writers = {key[len("cleanup/writer_score"):] for key in keys if key.startswith("cleanup/writer_score")}
    assert first <= writers, first - writers


def same(a, b) -> bool:
    """Equal floats, NaN equal to NaN (results.jsonl and W&B tables store a non-finite value as null)."""
    if a is None or b is None:
        return (a is None or not math.isfinite(a)) and (b is None or not math.isfinite(b))
    return a == pytest.approx(b, rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- fixtures


def compose_train_cfg(overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_shape_gpt2_dir(tmp_path_factory) -> Path:
    """A random GPT-2 save_pretrained directory with the shape of ``model=tiny`` and a local BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = compose_train_cfg(["model=tiny"]).model
    # what GPT-2 can express: LayerNorm, learned positions, exact GELU, an MLP of 4 * d_model
    assert (tiny.normalization_type, tiny.positional_embedding, tiny.act_fn) == ("LN", "learned", "gelu")
    assert not tiny.attn_only and tiny.d_mlp is None and tiny.d_head is None
    tokenizer = make_tokenizer(load_prompts())
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=tiny.n_layers, n_embd=tiny.d_model, n_head=tiny.n_heads, n_positions=tiny.n_ctx,
        activation_function="gelu", layer_norm_epsilon=tiny.eps, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-shape-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_probe_run(tiny_shape_gpt2_dir, tmp_path_factory) -> CliRun:
    """The probe CLI on the tiny GPT-2: 4 prompts of at most 32 tokens (some padded)."""
    run = run_cli("residual_dynamics.probe", [
        "model=local", f"model.path={tiny_shape_gpt2_dir}", f"model.name={TINY_NAME}", "prompts.n=4",
        "prompts.max_len=32", *PROBE_OPTIONS,
    ], tmp_path_factory.mktemp("probe-cli"))
    assert run.proc.returncode == 0, run.output[-4000:]
    print(f"\nprobe CLI, tiny GPT-2: {run.seconds:.1f} s")
    return run


TRAIN_CKPT_STEP = 2


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, data_cache) -> CliRun:
    """A 2-step training run of model=tiny that checkpoints and probes at step 2 (and 0)."""
    overrides = [
        "model=tiny", "data.seq_len=32", "data.batch_size=8", "data.val_batches=1", "tokenizer.vocab_size=512",
        f"trainer.max_steps={TRAIN_CKPT_STEP}", f"trainer.val_every={TRAIN_CKPT_STEP}",
        f"trainer.ckpt_every={TRAIN_CKPT_STEP}", "probes.schedule.log_spaced_until=1",
        f"probes.schedule.every={TRAIN_CKPT_STEP}", "probes.batch_size=4", *PROBE_OPTIONS,
        f"paths.cache_dir={data_cache}",
    ]
    run = run_cli("residual_dynamics.train", overrides, tmp_path_factory.mktemp("train-cli"))
    assert run.proc.returncode == 0, run.output[-4000:]
    assert (run.run_dir / "checkpoints" / f"step{TRAIN_CKPT_STEP:06d}.ckpt").is_file()
    print(f"\ntraining CLI, model=tiny, {TRAIN_CKPT_STEP} steps: {run.seconds:.1f} s")
    return run


def checkpoint_row(train: CliRun) -> dict:
    rows = [row for row in probe_rows(wandb_offline.history(train.wandb_run()))
            if row.get(STEP_KEY) == TRAIN_CKPT_STEP]
    assert len(rows) == 1, f"{len(rows)} probe rows at step {TRAIN_CKPT_STEP}"
    return rows[0]


# --------------------------------------------------------------------------- tiny GPT-2 through the CLI


def test_cli_logs_a_pretrained_wandb_run_results_and_figures(tiny_probe_run):
    run = tiny_probe_run
    assert "Probed" in run.proc.stdout and str(run.run_dir) in run.proc.stdout
    wandb_run = run.wandb_run()
    info = wandb_offline.run_info(wandb_run)
    assert info["job_type"] == "pretrained" and info["group"] == TINY_NAME
    assert info["config"]["model_info"]["architecture"] == "GPT2LMHeadModel"
    assert info["config"]["model_info"]["n_layers"] == 2 and info["config"]["model"]["name"] == TINY_NAME

    [row] = probe_rows(wandb_offline.history(wandb_run))
    assert row[STEP_KEY] == 0
    keys = probe_keys(row)
    held = wandb_records(wandb_run, row)  # scalars and table rows
    for key in ("resid_norm/resid_post/L01", "growth_rate", "horizon/k_eff", "horizon/loss_increase/k02",
                "cleanup/n_cleaned"):
        assert key in keys, f"{key} not a scalar; have {sorted(keys)[:40]}"
    for key in ("W_OV/L01H03", "b_O/L00", "mlp_act_rate/tokens/L01", "mlp_out_norm/random/L00",
                "cleanup/writer_score/L00H00"):
        assert key not in keys and key in held, f"{key} not in a W&B table"
    # logger.detail=layer: the only per-layer scalars are the residual norms after each layer
    assert {parse_metric_key(key)[1] for key in keys if parse_metric_key(key)[2] is not None} == {"resid_norm/resid_post"}
    assert row["resid_norm/resid_post/L01"] > 0
    assert row.get("probe_figures/norm_vs_layer/_type") == "image-file"
    assert row.get("resid_norm/vs_layer_table/_type") == "table-file"

    # results.jsonl holds the same numbers under the same keys, at step 0, with the run's metadata
    results = [json.loads(line) for line in (run.run_dir / "results.jsonl").read_text().splitlines()]
    assert {r["step"] for r in results} == {0} and {r["model"] for r in results} == {TINY_NAME}
    assert {r["probe"] for r in results} == {"residual_norms", "weight_norms", "activation_rates",
                                             "layer_horizon", "cleanup", "sublayer_ablation", "logit_lens"}
    by_key = {metric_key(Record(r["name"], 0.0, r["layer"], r["head"])): r["value"] for r in results}
    assert len(by_key) == len(results), "a key appears twice in results.jsonl"
    assert by_key.keys() == held.keys()  # the W&B run holds every record, as a scalar or a table row
    mismatched = {key: (held[key], by_key[key]) for key in held if not same(held[key], by_key[key])}
    assert not mismatched, dict(list(mismatched.items())[:10])

    # the figures of a pretrained run (no layer x step heatmap: there is one step)
    figures = {path.name for path in (run.run_dir / "figures").iterdir()}
    assert figures == {"norm_vs_layer.png", "growth_curve.png", "W_OV_norms.png"}
    for name in figures:
        assert (run.run_dir / "figures" / name).stat().st_size > 1000
        assert str(run.run_dir / "figures" / name) in run.proc.stdout

    # provenance and per-probe wall time: fields of every row, lines of the summary, W&B history keys
    assert len({r["weights_sha256"] for r in results}) == 1 and len(results[0]["weights_sha256"]) == 64
    assert all(r["probe_seconds"] > 0 for r in results)
    fused = {r["probe_seconds"] for r in results if r["probe"] in ("residual_norms", "activation_rates")}
    assert len(fused) == 1  # one shared forward, one time
    assert "probe time" in run.proc.stdout and "(one shared forward)" in run.proc.stdout
    for probe in ("weight_norms", "layer_horizon", "cleanup"):
        assert re.search(rf"^ +{probe} +[0-9.]+ s$", run.proc.stdout, re.M), probe
    timing = [r for r in wandb_offline.history(wandb_run) if "probe_seconds/cleanup" in r]
    assert len(timing) == 1 and timing[0][STEP_KEY] == 0
    assert "probes" in run.proc.stderr  # the progress bar's final state (not a terminal: drawn once)


def test_cli_logs_the_keys_of_a_training_checkpoint(tiny_probe_run, train_run):
    """Same shape as model=tiny, hence the same W&B keys (scalars and family tables) and the same records
    in them as a training run logs at a checkpoint, so a pretrained point overlays the training curves.

    GPT-2 and our model differ in no way the probes see: both have LayerNorm gains and biases,
    attention biases (b_O), a 4 * d_model GELU MLP and learned positions. Only the cleanup metrics of
    "cleaned" writers depend on the weights (random GPT-2 vs trained tiny), so they are compared apart.
    """
    [probe_row] = probe_rows(wandb_offline.history(tiny_probe_run.wandb_run()))
    train_row = checkpoint_row(train_run)
    info = wandb_offline.run_info(train_run.wandb_run())
    assert info["job_type"] == "train" and info["config"]["model"]["d_model"] == 64

    # the logged keys themselves: probe scalars and one table per family (figures differ by run kind)
    assert logged_sections(probe_row) == logged_sections(train_row), (
        f"only in the probe CLI: {sorted(logged_sections(probe_row) - logged_sections(train_row))}; "
        f"only in training: {sorted(logged_sections(train_row) - logged_sections(probe_row))}")
    assert len(probe_keys(probe_row)) > 10
    # ... and the records they hold (the table rows included)
    probe_held = wandb_records(tiny_probe_run.wandb_run(), probe_row).keys()
    train_held = wandb_records(train_run.wandb_run(), train_row).keys()
    probe_fixed, _ = split_cleaned_only(set(probe_held))
    train_fixed, _ = split_cleaned_only(set(train_held))
    assert probe_fixed == train_fixed, (
        f"only in the probe CLI: {sorted(probe_fixed - train_fixed)}; "
        f"only in training: {sorted(train_fixed - probe_fixed)}")
    assert len(probe_fixed) > 100
    for held, row in ((probe_held, probe_row), (train_held, train_row)):
        check_cleaned_only_keys(set(held), row)


# --------------------------------------------------------------------------- progress and timing


def test_probe_progress_times_stages_and_draws_chunk_bars():
    import io

    from rich.console import Console

    from residual_dynamics.reporting.progress import ProbeProgress, chunk_progress

    seen = []
    chunk_progress(1, 2)  # nobody listens: a no-op
    screen = io.StringIO()
    with ProbeProgress(["norms", "cleanup", "failing"], console=Console(file=screen, force_terminal=True, width=100)) as bars:
        with bars.stage("norms"):
            sum(range(10000))
        with bars.stage("cleanup"):
            for done in range(1, 4):
                chunk_progress(done, 3)
                seen.append(bars._progress.tasks[1].completed)
        with pytest.raises(RuntimeError), bars.stage("failing"):
            raise RuntimeError("a probe failed")
    assert seen == [1, 2, 3]  # every chunk reached the chunk bar
    assert set(bars.seconds) == {"norms", "cleanup", "failing"} and all(t >= 0 for t in bars.seconds.values())
    drawn = screen.getvalue()
    assert "cleanup chunks" in drawn and "3/3" in drawn and "probes" in drawn
    chunk_progress(3, 3)  # the hook is gone after the stage (also after one that raised)

    quiet = ProbeProgress(["a"], enabled=False)
    with quiet, quiet.stage("a"):
        chunk_progress(1, 1)
    assert set(quiet.seconds) == {"a"}


# --------------------------------------------------------------------------- the x-axis step


def test_x_axis_step(tmp_path):
    from types import SimpleNamespace

    from residual_dynamics.spec import parse_probe

    def spec(step=None, revision=None):
        return SimpleNamespace(step=step, model=SimpleNamespace(revision=revision))

    assert x_axis_step(spec(revision="step1000")) == 1000
    assert x_axis_step(spec(revision="step0")) == 0
    assert x_axis_step(spec(step=7, revision="step1000")) == 7  # an explicit step wins
    assert x_axis_step(spec(step=0, revision="step1000")) == 0  # ... even 0
    assert x_axis_step(spec(step=5)) == 5
    for revision in (None, "main", "step", "step1000-deduped", "v1.0", "mystep12"):
        assert x_axis_step(spec(revision=revision)) == 0, revision

    # through the real config composition and parsing, as `model=pythia-160m model.revision=step1000` gives
    paths = [f"paths.run_dir={tmp_path}", f"paths.cache_dir={tmp_path}", "logger=none"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        composed = compose("probe", overrides=["pretrained@model=pythia-160m", "model.revision=step1000", *paths])
        assert x_axis_step(parse_probe(composed)) == 1000
        composed = compose("probe", overrides=["pretrained@model=pythia-160m", "model.revision=step1000", "step=3",
                                               *paths])
        assert x_axis_step(parse_probe(composed)) == 3
        assert x_axis_step(parse_probe(compose("probe", overrides=["pretrained@model=gpt2", *paths]))) == 0


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("field", ["prompts.source", "model.path"])
def test_bad_config_fails_before_loading(field, tiny_shape_gpt2_dir, tmp_path):
    # prompts.source is tried with a loadable model, so that only the bad field can stop the run
    path = "/nonexistent" if field == "model.path" else tiny_shape_gpt2_dir
    bad = ["prompts.source=web"] if field == "prompts.source" else []
    run = run_cli("residual_dynamics.probe", ["model=local", f"model.path={path}", *bad], tmp_path)
    assert run.proc.returncode != 0
    assert f"error: {field}:" in run.proc.stderr, run.output[-3000:]
    assert "Traceback" not in run.output
    assert "Loading weights" not in run.output and " loaded " not in run.output  # nothing was loaded
    assert wandb_offline.offline_runs(tmp_path) == []  # nor a W&B run started


# --------------------------------------------------------------------------- SmolLM2 (real weights)


@pytest.mark.smollm2
def test_smollm2_through_the_cli(smollm2_dir, train_run, tmp_path):  # noqa: F811  (fixture imported above)
    run = run_cli("residual_dynamics.probe", [
        "model=smollm2_offline", "prompts.n=4", "prompts.max_len=32", *PROBE_OPTIONS,
    ], tmp_path, RESIDUAL_DYNAMICS_CACHE=str(smollm2_dir.parent))
    print(f"\nprobe CLI, SmolLM2-135M-Instruct (4 x 32 tokens, every probe): {run.seconds:.1f} s")
    assert run.proc.returncode == 0, run.output[-4000:]
    wandb_run = run.wandb_run()
    info = wandb_offline.run_info(wandb_run)
    assert info["job_type"] == "pretrained" and info["group"] == "smollm2-135m-instruct"
    assert info["config"]["model_info"]["architecture"] == "LlamaForCausalLM"

    [row] = probe_rows(wandb_offline.history(wandb_run))
    assert row[STEP_KEY] == 0
    keys = set(wandb_records(wandb_run, row))  # scalars and table rows
    for key in ("resid_norm/resid_post/L29", "W_OV/L29H08", "mlp_gate_rate/tokens/L00",
                "mlp_gate_rate/random/L29", "W_gate/L29", "horizon/k_eff", "cleanup/writer_score/mlp/L29"):
        assert key in keys, f"{key} not logged"
    assert {f"resid_norm/resid_post/L{layer:02d}" for layer in range(30)} <= probe_keys(row)
    assert not any(key.startswith("mlp_act_rate") for key in keys)
    assert row["resid_norm/resid_post/L29"] > row["resid_norm/resid_post/L00"] > 0
    check_cleaned_only_keys(keys, row)

    smol = {family(key) for key in split_cleaned_only(keys)[0]}
    train_row = checkpoint_row(train_run)
    trained = {family(key) for key in split_cleaned_only(set(wandb_records(train_run.wandb_run(), train_row)))[0]}
    assert smol - trained == LLAMA_ONLY_FAMILIES
    assert trained - smol == TINY_ONLY_FAMILIES
