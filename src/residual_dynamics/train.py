"""Train a small transformer from the Hydra config: ``python -m residual_dynamics.train [overrides]``.

With no arguments it trains the default 4-layer model on the embedded corpus (offline, CPU) for a few
minutes, probes it at scheduled steps, and prints where the checkpoints, the W&B run, the results file
and the figures are. Every config value is validated before any compute (``validate``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.model import ModelConfig
from residual_dynamics.optim import OptimConfig
from residual_dynamics.tracking import resolve_wandb_mode

log = logging.getLogger("residual_dynamics.train")

TRAINER_FIELDS = {"accelerator", "devices", "strategy", "precision", "compile", "max_steps", "val_every",
                  "ckpt_every", "log_every"}
LOGGER_KINDS = ("wandb", "csv", "none")
PROBE_SECTION_KEYS = {"batch_size", "seq_len", "schedule"}


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def validate(cfg: DictConfig) -> Optional[tuple[str, int]]:
    """Check every group before any compute; raise ConfigError naming the first bad field. Returns the
    checkpoint to resume from with its step (see :func:`_resume_point`), or None."""
    from residual_dynamics.data.config import validate_data_config
    from residual_dynamics.probes.registry import enabled_probes

    model = ModelConfig.from_dict(cfg.model)
    OptimConfig.from_dict(cfg.optim)
    seq_len = cfg.data.seq_len
    _positive_int(seq_len, "data.seq_len")
    if seq_len > model.n_ctx:
        raise ConfigError("data.seq_len", f"{seq_len} is longer than model.n_ctx={model.n_ctx}")
    _, tokenizer = validate_data_config(cfg.data, cfg.tokenizer, seq_len)
    if tokenizer.name == "bpe" and model.d_vocab is not None and model.d_vocab < tokenizer.vocab_size:
        raise ConfigError("model.d_vocab",
                          f"{model.d_vocab} is smaller than tokenizer.vocab_size={tokenizer.vocab_size}")

    for key in cfg.trainer:
        if key not in TRAINER_FIELDS:
            raise ConfigError(f"trainer.{key}", f"unknown trainer field; known: {sorted(TRAINER_FIELDS)}")
    for key in ("max_steps", "val_every", "ckpt_every", "log_every"):
        _positive_int(cfg.trainer[key], f"trainer.{key}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", "gpu requested but torch sees no CUDA device; use trainer=cpu")

    if cfg.logger.kind not in LOGGER_KINDS:
        raise ConfigError("logger.kind", f"must be one of {LOGGER_KINDS}, got {cfg.logger.kind!r}")
    if cfg.logger.kind == "wandb":
        resolve_wandb_mode(cfg.logger.mode)

    enabled = enabled_probes(cfg.probes)
    if enabled:
        _positive_int(cfg.probes.batch_size, "probes.batch_size")
        _positive_int(cfg.probes.seq_len, "probes.seq_len")
        if cfg.probes.seq_len > model.n_ctx:
            raise ConfigError("probes.seq_len", f"{cfg.probes.seq_len} is longer than model.n_ctx={model.n_ctx}")
        if cfg.probes.seq_len < 2:
            raise ConfigError("probes.seq_len", "must be >= 2 (position 0 is always dropped from statistics)")
        for key in ("log_spaced_until", "every"):
            value = cfg.probes.schedule[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"probes.schedule.{key}", f"must be an integer >= 0, got {value!r}")
        _dry_run_probes(model, enabled)

    return _resume_point(cfg)


def _dry_run_probes(model: ModelConfig, probes: dict[str, dict[str, Any]]) -> None:
    """Run the enabled probes once on a tiny model with the configured depth, heads, norm and activation,
    so that a bad probe option value (a horizon mode, a fit range past the last layer) fails here with the
    probe's own message, naming its config section, before any data or training compute."""
    from residual_dynamics.convert import to_transformer_lens
    from residual_dynamics.model import Transformer
    from residual_dynamics.probes.registry import run_probes

    tiny = dataclasses.replace(model, d_model=4 * model.n_heads, d_head=4, d_mlp=16, d_vocab=16, n_ctx=8)
    bridge = to_transformer_lens(Transformer(tiny))
    tokens = torch.arange(16).reshape(2, 8)
    for name, options in probes.items():
        try:
            run_probes(bridge, tokens, {name: options})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"probes.{name}", str(exc)) from None


def _resume_point(cfg: DictConfig) -> Optional[tuple[str, int]]:
    """(checkpoint path, its global step) to resume from, or None for a fresh run. ``ckpt_path=last`` with
    no last.ckpt yet is a fresh run (so the same command can requeue a SLURM job)."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        path = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            log.warning("ckpt_path=last but %s does not exist yet: starting a fresh run", path)
            return None
    else:
        path = Path(cfg.ckpt_path)
    return str(path), _check_checkpoint(path, cfg)


def _check_checkpoint(path: Path, cfg: DictConfig) -> int:
    """A checkpoint must exist, load, and describe the same model as the config. Returns its global step."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found (ckpt_path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise DataError(f"{path}: not a Lightning checkpoint of this project (no state_dict / global_step)")
    saved = dict(ckpt.get("hyper_parameters", {}).get("model", {}))
    wanted = OmegaConf.to_container(cfg.model, resolve=True)
    for key, value in wanted.items():
        if key in ("name", "d_vocab"):
            continue
        if key in saved and saved[key] != value:
            raise ConfigError(f"model.{key}", f"{value!r} differs from the checkpoint's {saved[key]!r} ({path})")
    return int(ckpt["global_step"])


def _wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id)
    os.replace(tmp, path)
    return run_id


def make_logger(cfg: DictConfig, run_dir: Path):
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        job_type=cfg.logger.job_type,
        tags=list(cfg.logger.tags),
        name=str(cfg.run_name),
        save_dir=str(run_dir),
        id=_wandb_run_id(run_dir),
        resume="allow",
        mode=resolve_wandb_mode(cfg.logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train per ``cfg`` (an already-composed config with ``paths.run_dir`` resolved). Returns the paths."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.utilities import rank_zero_only

    from residual_dynamics.callbacks import ProbeCallback, probe_steps
    from residual_dynamics.data.datamodule import TokenDataModule
    from residual_dynamics.lit import LitTransformer
    from residual_dynamics.probes.registry import early_probes, enabled_probes
    from residual_dynamics.tracking import ProbeReporter

    resume = validate(cfg)
    ckpt_path, resume_step = resume if resume is not None else (None, 0)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"

    L.seed_everything(cfg.seed, workers=True)
    data = TokenDataModule(cfg.data, cfg.tokenizer, cfg.paths.cache_dir, seq_len=cfg.data.seq_len,
                           batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
    data.prepare_data()
    data.setup("fit")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("d_vocab") is None:
        model_cfg["d_vocab"] = data.vocab_size
    elif model_cfg["d_vocab"] < data.vocab_size:
        raise ConfigError("model.d_vocab", f"{model_cfg['d_vocab']} < the tokenizer's {data.vocab_size} tokens")
    max_steps = cfg.trainer.max_steps
    lit = LitTransformer(model_cfg, OmegaConf.to_container(cfg.optim, resolve=True), max_steps,
                         compile=cfg.trainer.compile)

    logger = make_logger(cfg, run_dir)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.trainer.ckpt_every, save_last=True, save_top_k=-1),
        RichProgressBar(),
    ]
    probes = enabled_probes(cfg.probes)
    probe_callback = None
    if probes:
        wandb_run = logger.experiment if cfg.logger.kind == "wandb" else None
        reporter = ProbeReporter(run_dir, wandb_run=wandb_run,
                                 meta={"run": str(cfg.run_name), "model": cfg.model.name})
        if ckpt_path is not None and rank_zero_only.rank == 0:  # rows after the resumed step are recomputed
            reporter.results.truncate_from(resume_step + 1)
        schedule = probe_steps(max_steps, cfg.probes.schedule.log_spaced_until, cfg.probes.schedule.every,
                               cfg.probes.schedule.at_end)
        probe_callback = ProbeCallback(data.probe_batch(cfg.probes.batch_size, cfg.probes.seq_len), probes,
                                       schedule, reporter, at_end=cfg.probes.schedule.at_end,
                                       every=cfg.probes.schedule.every, early=early_probes(cfg.probes))
        callbacks.append(probe_callback)

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=cfg.trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.data.val_batches,
        log_every_n_steps=cfg.trainer.log_every,
        gradient_clip_val=cfg.optim.grad_clip,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    wandb_dir = None
    try:
        fit_started = time.perf_counter()
        trainer.fit(lit, datamodule=data, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - fit_started
        if cfg.logger.kind == "wandb":
            wandb_dir = Path(logger.experiment.dir).parent
    finally:
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()  # each multirun job gets its own W&B run
    paths = {
        "run_dir": run_dir,
        "checkpoints": ckpt_dir,
        "results": run_dir / "results.jsonl",
        "figures": run_dir / "figures",
        "wandb": wandb_dir,
        "global_step": trainer.global_step,
        "fit_seconds": fit_seconds,
        "probe_seconds": probe_callback.seconds if probe_callback else 0.0,
    }
    if trainer.is_global_zero:
        _print_summary(paths, cfg)
    return paths


def _print_summary(paths: dict[str, Any], cfg: DictConfig) -> None:
    print(f"\nTrained to step {paths['global_step']}.")
    print(f"  run directory : {paths['run_dir']}")
    print(f"  checkpoints   : {paths['checkpoints']} (resume: run_name={cfg.run_name} ckpt_path=last)")
    if paths["wandb"] is not None:
        print(f"  W&B run       : {paths['wandb']}")
        if resolve_wandb_mode(cfg.logger.mode) == "offline":
            print(f"                  offline; upload with: wandb sync {paths['wandb']}")
    print(f"  probe results : {paths['results']}")
    print(f"  figures       : {paths['figures']}")
    if paths["probe_seconds"]:
        train_seconds = paths["fit_seconds"] - paths["probe_seconds"]
        print(f"  time          : {paths['fit_seconds']:.0f} s in trainer.fit, of which probes "
              f"{paths['probe_seconds']:.1f} s ({100 * paths['probe_seconds'] / max(train_seconds, 1e-9):.1f}% "
              "of training)")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
