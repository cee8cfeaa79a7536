"""Train a small transformer from the Hydra config: ``python -m residual_dynamics.train [overrides]``.

With no arguments it trains the default 4-layer model on the embedded corpus (offline, CPU) for a few
minutes, probes it at scheduled steps, and prints where the checkpoints, the W&B run, the results file
and the figures are. The config is parsed once, at the entry point, into a typed
:class:`~residual_dynamics.spec.RunSpec` (every value validated before any data or model work); from
there on only typed objects are passed down.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.spec import CONF_DIR, RunSpec, parse_train

log = logging.getLogger("residual_dynamics.train")


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


def make_logger(spec: RunSpec):
    kind = spec.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(spec.run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=spec.logger.project,
        entity=spec.logger.entity,
        group=spec.logger.group,
        job_type=spec.logger.job_type,
        tags=list(spec.logger.tags),
        name=spec.run_name,
        save_dir=str(spec.run_dir),
        id=_wandb_run_id(spec.run_dir),
        resume="allow",
        mode=spec.logger.wandb_mode,
        config=spec.config,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Parse ``cfg`` (an already-composed config with ``paths.run_dir`` resolved) and train. Returns the paths."""
    return train(parse_train(cfg))


def train(spec: RunSpec) -> dict[str, Any]:
    """Train per the validated ``spec``. Returns the paths and timings."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.utilities import rank_zero_only

    from residual_dynamics.data.datamodule import TokenDataModule
    from residual_dynamics.reporting.reporter import ProbeReporter
    from residual_dynamics.training.callbacks import ProbeCallback
    from residual_dynamics.training.lit import LitTransformer

    ckpt_path, resume_step = (spec.resume.path, spec.resume.step) if spec.resume else (None, 0)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"

    L.seed_everything(spec.seed, workers=True)
    data = TokenDataModule(spec.data, spec.tokenizer, spec.cache_dir, seed=spec.seed)
    data.prepare_data()
    data.setup("fit")
    model_cfg = spec.model
    if model_cfg.d_vocab is None:
        model_cfg = dataclasses.replace(model_cfg, d_vocab=data.vocab_size)
    elif model_cfg.d_vocab < data.vocab_size:
        raise ConfigError("model.d_vocab", f"{model_cfg.d_vocab} < the tokenizer's {data.vocab_size} tokens")
    trainer_cfg = spec.trainer
    lit = LitTransformer(model_cfg, spec.optim, trainer_cfg.max_steps, compile=trainer_cfg.compile)

    logger = make_logger(spec)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=trainer_cfg.ckpt_every, save_last=True, save_top_k=-1),
        RichProgressBar(),
    ]
    probe_callback = None
    if spec.probes:
        wandb_run = logger.experiment if spec.logger.kind == "wandb" else None
        reporter = ProbeReporter(run_dir, wandb_run=wandb_run, meta={"run": spec.run_name, "model": model_cfg.name})
        if ckpt_path is not None and rank_zero_only.rank == 0:  # rows after the resumed step are recomputed
            reporter.results.truncate_from(resume_step + 1)
        probe_callback = ProbeCallback(data.probe_batch(spec.probe_batch_size, spec.probe_seq_len), spec.probes,
                                       spec.schedule, reporter, early=set(spec.early_probes))
        callbacks.append(probe_callback)

    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        max_steps=trainer_cfg.max_steps,
        max_epochs=-1,
        val_check_interval=trainer_cfg.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=spec.data.val_batches,
        log_every_n_steps=trainer_cfg.log_every,
        gradient_clip_val=spec.optim.grad_clip,
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
        if spec.logger.kind == "wandb":
            wandb_dir = Path(logger.experiment.dir).parent
    finally:
        if spec.logger.kind == "wandb":
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
        _print_summary(paths, spec)
    return paths


def _print_summary(paths: dict[str, Any], spec: RunSpec) -> None:
    print(f"\nTrained to step {paths['global_step']}.")
    print(f"  run directory : {paths['run_dir']}")
    print(f"  checkpoints   : {paths['checkpoints']} (resume: run_name={spec.run_name} ckpt_path=last)")
    if paths["wandb"] is not None:
        print(f"  W&B run       : {paths['wandb']}")
        if spec.logger.wandb_mode == "offline":
            print(f"                  offline; upload with: wandb sync {paths['wandb']}")
    print(f"  probe results : {paths['results']}")
    print(f"  figures       : {paths['figures']}")
    if paths["probe_seconds"]:
        train_seconds = paths["fit_seconds"] - paths["probe_seconds"]
        print(f"  time          : {paths['fit_seconds']:.0f} s in trainer.fit, of which probes "
              f"{paths['probe_seconds']:.1f} s ({100 * paths['probe_seconds'] / max(train_seconds, 1e-9):.1f}% "
              "of training)")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
