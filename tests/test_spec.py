"""The typed run spec: every bad value is stopped before any data or model work, with an error naming the
full field, whether Hydra's structured configs catch it when composing (unknown keys, wrong types) or
``parse_train`` catches it (ranges, cross-field checks, probe options against the architecture, Lightning's
knobs, W&B credentials, the resume checkpoint)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.spec import ProbeRunSpec, RunSpec, parse_probe, parse_train

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides, config_name="config"):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def parse(overrides, tmp_path: Path) -> RunSpec:
    """Compose with paths in tmp_path (as the CLI would set them) and parse."""
    cfg = compose_cfg([*overrides, f"paths.cache_dir={tmp_path / 'cache'}", f"paths.run_dir={tmp_path / 'run'}",
                       "run_name=test"])
    return parse_train(cfg)


# (overrides, environment, the full field the error must name)
BAD = [
    # the cases of the issue: accepted late or silently before the redesign
    (["trainer.precision=banana"], {}, "trainer.precision"),
    (["trainer.accelerator=banana"], {}, "trainer.accelerator"),
    (["trainer.devices=0"], {}, "trainer.devices"),
    (["trainer.strategy=banana"], {}, "trainer.strategy"),
    (["optim.lr=abc"], {}, "optim.lr"),
    (["model.eps=abc"], {}, "model.eps"),
    (["optim.grad_clip=abc"], {}, "optim.grad_clip"),
    (["seed=abc"], {}, "seed"),
    (["probes.cleanup.threshold=abc"], {}, "probes.cleanup.threshold"),
    (["probes.layer_horizon.ks=[100]"], {}, "probes.layer_horizon.ks"),
    (["probes.activation_rates.n_random=0"], {}, "probes.activation_rates.n_random"),
    (["optim.warmup_steps=1.5"], {}, "optim.warmup_steps"),
    (["+foo=1"], {}, "foo"),
    (["logger.mode=banana"], {"WANDB_MODE": "offline"}, "logger.mode"),
    (["logger.mode=online"], {}, "logger.mode"),
    (["logger.mode=auto"], {"WANDB_MODE": "online"}, "WANDB_MODE"),
    (["logger.mode=auto"], {"WANDB_MODE": "banana"}, "WANDB_MODE"),
    # model
    (["model.n_heads=3"], {}, "model.n_heads"),
    (["model.normalization_type=BatchNorm"], {}, "model.normalization_type"),
    (["model.act_fn=tanh"], {}, "model.act_fn"),
    (["model.positional_embedding=alibi"], {}, "model.positional_embedding"),
    (["model.n_layers=0"], {}, "model.n_layers"),
    (["model.n_ctx=0"], {}, "model.n_ctx"),
    (["+model.n_experts=4"], {}, "model.n_experts"),
    (["model.d_vocab=100"], {}, "model.d_vocab"),
    (["model.d_head=abc"], {}, "model.d_head"),
    (["model.attn_only=maybe"], {}, "model.attn_only"),
    (["model.positional_embedding=rotary", "model.d_head=7"], {}, "model.d_head"),
    # optim
    (["optim.lr=0"], {}, "optim.lr"),
    (["optim.betas=[0.9]"], {}, "optim.betas"),
    (["optim.weight_decay=-0.1"], {}, "optim.weight_decay"),
    (["optim.min_lr_ratio=2"], {}, "optim.min_lr_ratio"),
    (["optim.decay_norm_params=sometimes"], {}, "optim.decay_norm_params"),
    # data and tokenizer
    (["data.seq_len=512"], {}, "data.seq_len"),
    (["data.batch_size=0"], {}, "data.batch_size"),
    (["data.val_fraction=0.9"], {}, "data.val_fraction"),
    (["data.num_workers=-1"], {}, "data.num_workers"),
    (["tokenizer.vocab_size=70000", "data.shard_dtype=uint16"], {}, "data.shard_dtype"),
    (["data=text_files", "data.path=/nonexistent/corpus"], {}, "data.path"),
    (["tokenizer.name=sentencepiece"], {}, "tokenizer.name"),
    (["tokenizer.vocab_size=100"], {}, "tokenizer.vocab_size"),
    # trainer
    (["trainer.max_steps=0"], {}, "trainer.max_steps"),
    (["trainer.val_every=0"], {}, "trainer.val_every"),
    (["trainer.ckpt_every=-1"], {}, "trainer.ckpt_every"),
    (["trainer.log_every=abc"], {}, "trainer.log_every"),
    (["trainer.accelerator=gpu"], {}, "trainer.accelerator"),
    (["+trainer.gradient_accumulation=2"], {}, "trainer.gradient_accumulation"),
    # logger
    (["logger.kind=tensorboard"], {}, "logger.kind"),
    (["logger.mode=sometimes"], {}, "logger.mode"),
    (["logger.detail=everything"], {}, "logger.detail"),
    # probes
    (["+probes.layer_horizon.bogus=1"], {}, "probes.layer_horizon.bogus"),
    (["probes.seq_len=1"], {}, "probes.seq_len"),
    (["probes.seq_len=1000"], {}, "probes.seq_len"),
    (["probes.batch_size=0"], {}, "probes.batch_size"),
    (["probes.schedule.every=-5"], {}, "probes.schedule.every"),
    (["probes.layer_horizon.mode=bogus"], {}, "probes.layer_horizon.mode"),
    (["probes.layer_horizon.tolerance=-1"], {}, "probes.layer_horizon.tolerance"),
    (["probes.layer_horizon.ks=[0,2]"], {}, "probes.layer_horizon.ks"),
    (["probes.sublayer_ablation.layers=[0,9]"], {}, "probes.sublayer_ablation.layers"),  # model=small: 4 layers
    (["probes.cleanup.early=sometimes"], {}, "probes.cleanup.early"),
    (["probes.cleanup.spill_dir=/no/such/dir"], {}, "probes.cleanup.spill_dir"),
    (["probes.cleanup.spill=maybe"], {}, "probes.cleanup.spill"),
    (["probes.residual_norms.enabled=maybe"], {}, "probes.residual_norms.enabled"),
    (["probes.residual_norms.fit_layers=[2,9]"], {}, "probes.residual_norms.fit_layers"),
    # the run
    (["seed=-1"], {}, "seed"),
    (["ckpt_path=/nonexistent/last.ckpt"], {}, "/nonexistent/last.ckpt"),
]


@pytest.mark.parametrize("overrides,env,field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_config_is_stopped_naming_the_full_field(overrides, env, field, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises((ConfigError, DataError, HydraException, OmegaConfBaseException)) as excinfo:
        parse(overrides, tmp_path)
    assert field in str(excinfo.value), str(excinfo.value)
    assert not (tmp_path / "cache").exists()  # nothing of the data pipeline ran
    assert not (tmp_path / "run").exists()


def test_the_table_covers_at_least_forty_cases():
    assert len(BAD) >= 40


def test_errors_say_what_the_value_must_be(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"probes.layer_horizon.ks: .*4"):  # 4 sublayers: k <= 4
        parse(["model=tiny", "probes.layer_horizon.ks=[5]"], tmp_path)
    with pytest.raises(ConfigError, match="wandb login"):
        parse(["logger.mode=online"], tmp_path)


SHIPPED = ([], ["experiment=heads_vs_growth"], ["experiment=norm_decay"], ["experiment=horizon_vs_depth"],
           ["experiment=norm_x_decay"], ["model=deep"], ["model=bench"], ["model=tiny"],
           ["trainer=ddp", "trainer.accelerator=cpu"], ["logger=csv"], ["logger=none"], ["probes=off"],
           ["tokenizer=gpt2"], ["data=openwebtext", "data.data_files=/nonexistent.parquet"])


@pytest.mark.parametrize("overrides", SHIPPED[:-1], ids=lambda o: " ".join(o) or "default")
def test_shipped_configs_parse_into_a_typed_spec(overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = parse(overrides, tmp_path)
    assert isinstance(spec, RunSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    assert spec.schedule.every == spec.trainer.ckpt_every  # the probe cadence defaults to the checkpoints
    assert not (tmp_path / "cache").exists()


def test_spec_holds_typed_parts_and_the_enabled_probe_options(tmp_path, monkeypatch):
    from residual_dynamics.data.config import DataSettings
    from residual_dynamics.probes.registry import PROBES
    from residual_dynamics.training.model import ModelConfig
    from residual_dynamics.training.optim import OptimConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = parse(["model=tiny", "probes.layer_horizon.ks=[1,3]", "probes.cleanup.enabled=false"], tmp_path)
    assert isinstance(spec.model, ModelConfig) and spec.model.n_layers == 2 and spec.model.name == "tiny"
    assert isinstance(spec.optim, OptimConfig) and isinstance(spec.data, DataSettings)
    assert list(spec.probes) == ["residual_norms", "weight_norms", "activation_rates", "layer_horizon",
                                 "sublayer_ablation", "logit_lens"]
    for name, options in spec.probes.items():
        assert type(options) is PROBES[name].Options
    assert list(spec.probes["layer_horizon"].ks) == [1, 3]
    assert spec.early_probes == {"residual_norms", "weight_norms", "activation_rates"}
    assert spec.config["model"]["n_layers"] == 2  # plain containers for W&B


def test_schedule_knows_its_steps_and_which_are_full(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = parse(["trainer.max_steps=12", "trainer.ckpt_every=6", "probes.schedule.log_spaced_until=4"], tmp_path)
    assert spec.schedule.steps == [0, 1, 2, 6, 12]
    assert [s for s in spec.schedule.steps if spec.schedule.is_full(s)] == [6, 12]


def test_probe_cli_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = compose_cfg([f"pretrained@model=local", f"model.path={model_dir}", f"paths.run_dir={tmp_path / 'run'}",
                       f"paths.cache_dir={tmp_path / 'cache'}"], "probe")
    spec = parse_probe(cfg)
    assert isinstance(spec, ProbeRunSpec) and spec.model.path == str(model_dir)
    for bad, field in ((["model.dtype=float8"], "model.dtype"), (["prompts.n=0"], "prompts.n"),
                       (["prompts.source=web"], "prompts.source"), (["step=-3"], "step"),
                       (["probes.activation_rates.n_random=0"], "probes.activation_rates.n_random"),
                       (["+model.bogus=1"], "model.bogus")):
        with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as excinfo:
            parse_probe(compose_cfg([f"pretrained@model=local", f"model.path={model_dir}",
                                     f"paths.run_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'c'}",
                                     *bad], "probe"))
        assert field in str(excinfo.value), (bad, str(excinfo.value))
    with pytest.raises(ConfigError, match="model.path"):
        parse_probe(compose_cfg(["pretrained@model=local", f"paths.run_dir={tmp_path}",
                                 f"paths.cache_dir={tmp_path}"], "probe"))


CLI_BAD = [
    ["trainer.precision=banana"], ["trainer.accelerator=banana"], ["trainer.devices=0"],
    ["trainer.strategy=banana"], ["optim.lr=abc"], ["+foo=1"], ["logger.mode=online"],
    ["probes.layer_horizon.ks=[100]"],
]


def test_cli_stops_every_bad_value_within_seconds_before_any_data_work(tmp_path):
    """The real entry point, as a user runs it: each bad value fails fast, names its field, prints no
    traceback, and leaves the (empty) cache directory untouched: no corpus, tokenizer or shard work."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)
    for overrides in CLI_BAD:
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "residual_dynamics.train", *overrides,
                               f"paths.cache_dir={cache}", f"paths.output_root={tmp_path / 'out'}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - started
        output = proc.stdout + proc.stderr
        field = overrides[0].split("=")[0].lstrip("+")
        assert proc.returncode != 0, overrides
        assert field in output, (overrides, output[-2000:])
        assert "Traceback" not in output, (overrides, output[-3000:])
        assert list(cache.iterdir()) == [], overrides
        assert seconds < 60, (overrides, seconds)
