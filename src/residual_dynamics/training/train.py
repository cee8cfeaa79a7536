"""Train a small transformer from the Hydra config: ``python -m residual_dynamics.train [overrides]``.

With no arguments it trains the default 4-layer model on the embedded corpus (offline, CPU) for a few
minutes, probes it at scheduled steps, and prints where the checkpoints, the W&B run, the results file
and the figures are, the command that resumes the run and, offline, the ``wandb sync`` commands. The
config is parsed once, at the entry point, into a typed :class:`~residual_dynamics.spec.RunSpec` (every
value validated before any data or model work); from there on only typed objects are passed down.

What a run guarantees (each piece is documented where it lives):

- **one process per run directory**: rank 0 holds ``<run_dir>/.lock`` (:mod:`.rundir`) before writing
  anything there; a second run on the same directory fails at once, naming the holder;
- **checkpoints**: written atomically and fsynced, loaded with ``weights_only=True`` (:mod:`.checkpoint`);
  ``ckpt_path=last`` resumes bit-identically; a damaged ``last.ckpt`` names the newest intact one and
  ``ckpt_path=last_good`` falls back to it; the checkpoint's tokenizer fingerprint and vocabulary must
  match the data's (else the resume is refused before anything is written);
- **divergence**: a non-finite loss, gradient norm or weight stops the run with an error naming the step,
  exit status 1, before that step is applied or checkpointed (:mod:`.guards`); loss spikes are logged;
- **nothing lost on resume**: results rows after the checkpoint are replaced only as this session
  recomputes them (:class:`~residual_dynamics.reporting.results.ResultsFile`), and W&B ends as one
  history (:mod:`.wandb_resume`);
- **DDP / sweeps / SLURM**: every rank trains the same job in the same directory (:mod:`.cluster`); only
  rank 0 writes W&B, results and figures; the token cache is built by one process while the others wait.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import lightning as L
from omegaconf import DictConfig

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.spec import CONF_DIR, DamagedCheckpoint, RunSpec, parse_train
from residual_dynamics.training.guards import Diverged

log = logging.getLogger("residual_dynamics.train")


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Parse ``cfg`` (an already-composed config with ``paths.run_dir`` resolved) and train. Returns the paths."""
    return train(parse_train(cfg), callbacks=callbacks)


def _rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _command_text(command: Optional[Sequence[str]], spec: RunSpec, ckpt_path: str) -> str:
    from residual_dynamics.training.cluster import hydra_value

    if command is None:
        command = [sys.executable, "-m", "residual_dynamics.train", f"run_name={hydra_value(spec.run_name)}",
                   f"hydra.run.dir={hydra_value(spec.run_dir.resolve())}"]
    return shlex.join([part for part in command if not part.startswith("ckpt_path=")]
                      + [f"ckpt_path={hydra_value(ckpt_path)}"])


def _data_context(spec: RunSpec) -> str:
    data = spec.data
    if data.name == "text_files":
        return f"data.path={data.path}"
    if data.name == "openwebtext":
        return f"data.data_files={list(data.data_files or ())}"
    return "data=embedded"


class _SyncJournal(L.Callback):
    """Before a checkpoint at step S is written: the W&B journal gets the row Lightning logs for batch S - 1
    right after (when that step logs), and is fsynced, so it holds every row logged before S."""

    def __init__(self, history, guard):
        self.history, self.guard = history, guard

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not trainer.is_global_zero:
            return
        step = int(checkpoint["global_step"])
        if self.guard.last_batch and step >= 1 and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            self.history.journal_batch(self.guard.last_batch, step - 1)
        self.history.sync()


def train(spec: RunSpec, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train per the validated ``spec`` (``callbacks`` are added to the Trainer's). Returns the paths and
    timings. Rank 0 holds the run directory's lock throughout."""
    from residual_dynamics.training.rundir import RunLock

    lock = RunLock(spec.run_dir).acquire() if _rank() == 0 else None
    launch_env = {key: os.environ.get(key) for key in _DDP_ENV}
    try:
        return _train(spec, list(callbacks))
    finally:
        _end_distributed(launch_env)
        if lock is not None:
            lock.release()


# set by a DDP launch in the launching process; restored after the job, so the next job of a multirun
# (the same process) starts its own process group
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _end_distributed(launch_env: dict) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in launch_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _train(spec: RunSpec, extra_callbacks: list[L.Callback]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from residual_dynamics.data.cache import remove_stale_temporaries
    from residual_dynamics.data.datamodule import TokenDataModule
    from residual_dynamics.data.tokenizer import tokenizer_fingerprint
    from residual_dynamics.reporting.reporter import ProbeReporter
    from residual_dynamics.reporting.results import RESULTS_FILE, ResultsFile
    from residual_dynamics.training import cluster
    from residual_dynamics.training.checkpoint import SafeCheckpointIO, StepCheckpoint
    from residual_dynamics.training.callbacks import ProbeCallback
    from residual_dynamics.training.guards import SPIKE_PROBE, DivergenceGuard
    from residual_dynamics.training.lit import LitTransformer
    from residual_dynamics.training.rundir import read_wandb_run_id, wandb_run_id
    from residual_dynamics.training.wandb_resume import (ResumePlan, SteppedRun, WandbHistory, make_logger_class,
                                                         plan_resume, sync_commands)

    rank0 = _rank() == 0
    resume = spec.resume
    ckpt_path, resume_step = (resume.path, resume.step) if resume else (None, None)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    results_path = run_dir / RESULTS_FILE
    # a fresh start in a directory where an earlier attempt died before its first checkpoint: its rows are
    # replaced as this run recomputes them, and it gets a new W&B run (the old one has nothing to resume)
    restart = resume is None and (results_path.exists() or read_wandb_run_id(run_dir) is not None)
    if rank0:
        remove_stale_temporaries(ckpt_dir)  # a kill during a checkpoint write leaves only these
    command = cluster.job_command(spec.run_name, run_dir, ckpt_path=ckpt_path or "null")

    L.seed_everything(spec.seed, workers=True)
    data = TokenDataModule(spec.data, spec.tokenizer, spec.cache_dir, seed=spec.seed)
    try:
        data.prepare_data()
        data.setup("fit")
    except DataError as exc:
        if "data." in str(exc):
            raise
        raise DataError(f"{exc} (the corpus: {_data_context(spec)})") from None
    fingerprint = tokenizer_fingerprint(data.tokenizer)
    model_cfg = spec.model
    if model_cfg.d_vocab is None:
        model_cfg = dataclasses.replace(model_cfg, d_vocab=data.vocab_size)
    elif model_cfg.d_vocab < data.vocab_size:
        raise ConfigError("model.d_vocab", f"{model_cfg.d_vocab} < the tokenizer's {data.vocab_size} tokens")
    if resume is not None:
        _check_resume_data(resume, fingerprint, model_cfg.d_vocab, spec)
    trainer_cfg = spec.trainer
    lit = LitTransformer(model_cfg, spec.optim, trainer_cfg.max_steps, compile=trainer_cfg.compile,
                         tokenizer_fingerprint=fingerprint)

    results = ResultsFile(results_path, resume_after=resume_step if resume else (-1 if restart else None))
    meta = {"run": spec.run_name, "model": model_cfg.name}
    logger, history, run_id = False, None, None
    if spec.logger.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    elif spec.logger.kind == "wandb":
        run_id = wandb_run_id(run_dir, new=restart) if rank0 else read_wandb_run_id(run_dir)
        plan = plan_resume(run_dir, run_id, resume_step) if rank0 else ResumePlan({}, None, None)
        history = WandbHistory(run_dir, plan)
        logger = make_logger_class()(
            history, project=spec.logger.project, entity=spec.logger.entity, group=spec.logger.group,
            job_type=spec.logger.job_type, tags=list(spec.logger.tags), name=spec.run_name,
            save_dir=str(run_dir), id=run_id, mode=spec.logger.wandb_mode, config=spec.config,
            **{"resume": "allow", **plan.init})
    stepped_run = None
    if history is not None and rank0:
        logger.experiment  # noqa: B018  (starts W&B and replays the journal before any new row)
        stepped_run = SteppedRun(history)

    def on_spike(batch: int, loss: float, sigmas: float) -> None:
        results.append([{"step": batch + 1, "probe": SPIKE_PROBE, "name": name, "layer": None, "head": None,
                         "value": value, **meta} for name, value in (("loss_spike", loss),
                                                                      ("loss_spike_sigmas", sigmas))])
        if stepped_run is not None:  # beside that batch's train/loss
            history.log_batch({"train/loss_spike": loss, "train/loss_spike_sigmas": sigmas}, batch)

    checkpointing = StepCheckpoint(val_every=trainer_cfg.val_every, dirpath=str(ckpt_dir), filename="step{step:06d}",
                                   auto_insert_metric_name=False, every_n_train_steps=trainer_cfg.ckpt_every,
                                   save_last=True, save_top_k=-1,
                                   enable_version_counter=False)  # a resumed run rewrites step<N>.ckpt, same weights
    guard = DivergenceGuard(spec.divergence, on_spike=on_spike if rank0 else None)
    callbacks: list[L.Callback] = [checkpointing, guard, RichProgressBar()]
    if history is not None:
        callbacks.append(_SyncJournal(history, guard))
    probe_callback = None
    if spec.probes:
        reporter = ProbeReporter(run_dir, wandb_run=stepped_run, meta=meta, detail=spec.logger.detail)
        reporter.results = results  # the resume-aware file (replaces earlier rows only once recomputed)
        probe_callback = ProbeCallback(data.probe_batch(spec.probe_batch_size, spec.probe_seq_len), spec.probes,
                                       spec.schedule, reporter, early=set(spec.early_probes))
        callbacks.append(probe_callback)
    callbacks += extra_callbacks

    plugins: list[Any] = [SafeCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit requeues a preempted job (hydra_plugins/...launcher), not Lightning
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=cluster.ddp_strategy(trainer_cfg.strategy, command),
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
        plugins=plugins,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    wandb_dir = None
    failed = True
    try:
        fit_started = time.perf_counter()
        try:
            trainer.fit(lit, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError as exc:  # Lightning's own load of ckpt_path refused to run its code
            raise DataError(f"{ckpt_path}: refused: the checkpoint asks to run code when loaded "
                            f"({str(exc).splitlines()[0][:200]}); only tensors and containers are loaded") from None
        except Diverged as exc:
            raise _diverged(exc, guard, resume, ckpt_dir, command, spec) from None
        fit_seconds = time.perf_counter() - fit_started
        if trainer.is_global_zero:
            results.finish_resume()
        if history is not None and history.run is not None:
            wandb_dir = Path(history.run.dir).parent
        failed = False
    finally:
        if history is not None:
            history.close()
            if history.run is not None:
                import wandb

                wandb.finish(exit_code=1 if failed else 0)  # each multirun job gets its own W&B run
    paths = {
        "run_dir": run_dir,
        "checkpoints": ckpt_dir,
        "results": results_path,
        "figures": run_dir / "figures",
        "wandb": wandb_dir,
        "wandb_sync": sync_commands(run_dir, run_id) if run_id and spec.logger.wandb_mode == "offline" else [],
        "resume_command": _command_text(command, spec, "last"),
        "global_step": trainer.global_step,
        "resumed_from": resume_step,
        "fit_seconds": fit_seconds,
        "probe_seconds": probe_callback.seconds if probe_callback else 0.0,
    }
    if trainer.is_global_zero:
        _print_summary(paths)
    return paths


def _check_resume_data(resume, fingerprint: str, d_vocab: int, spec: RunSpec) -> None:
    """A resume must see the tokenizer and vocabulary its checkpoint was trained with."""
    if resume.tokenizer_fingerprint is None:
        log.warning("%s records no tokenizer fingerprint (an older checkpoint): the tokenizer cannot be checked",
                    resume.path)
    elif resume.tokenizer_fingerprint != fingerprint:
        raise DataError(
            f"{resume.path}: the checkpoint was trained with tokenizer {resume.tokenizer_fingerprint}, but the "
            f"tokenizer of this run ({spec.tokenizer.name}, tokenizer.vocab_size={spec.tokenizer.vocab_size}, "
            f"tokenizer.path={spec.tokenizer.path}) is {fingerprint}: resuming would train the model on another "
            "token mapping. Use the checkpoint's tokenizer settings (if its cached tokenizer was edited, delete "
            f"it under {spec.cache_dir / 'tokenizers'} to train it again)")
    if resume.d_vocab is not None and resume.d_vocab != d_vocab:
        raise DataError(f"{resume.path}: the checkpoint's model has d_vocab={resume.d_vocab}, this run's has "
                        f"{d_vocab} (model.d_vocab / the tokenizer's vocabulary): it cannot be resumed with them")


def _diverged(exc: Diverged, guard, resume, ckpt_dir: Path, command, spec: RunSpec) -> Diverged:
    """The divergence error with the last finite checkpoint and the command that resumes from it."""
    saved = guard.last_saved_step if guard.last_saved_step is not None else (resume.step if resume else None)
    if saved is None:
        where = "no checkpoint was written before it"
    else:
        where = (f"the last checkpoint, {ckpt_dir / 'last.ckpt'} (step {saved}), is finite: resume from it with a "
                 f"smaller optim.lr ({spec.optim.lr} now): {_command_text(command, spec, 'last')} optim.lr=...")
    return Diverged(exc.step, f"{exc}; {where}")


def _print_summary(paths: dict[str, Any]) -> None:
    resumed = f" (resumed from step {paths['resumed_from']})" if paths["resumed_from"] is not None else ""
    print(f"\nTrained to step {paths['global_step']}{resumed}.")
    print(f"  run directory : {paths['run_dir']}")
    print(f"  checkpoints   : {paths['checkpoints']}")
    print(f"  resume with   : {paths['resume_command']}")
    if paths["wandb"] is not None:
        print(f"  W&B run       : {paths['wandb']}")
        if paths["wandb_sync"]:
            print("                  offline; upload it as one history, in this order, with:")
            for line in paths["wandb_sync"]:
                print(f"                  {line}")
    print(f"  probe results : {paths['results']}")
    print(f"  figures       : {paths['figures']}")
    if paths["probe_seconds"]:
        train_seconds = paths["fit_seconds"] - paths["probe_seconds"]
        print(f"  time          : {paths['fit_seconds']:.0f} s in trainer.fit, of which probes "
              f"{paths['probe_seconds']:.1f} s ({100 * paths['probe_seconds'] / max(train_seconds, 1e-9):.1f}% "
              "of training)")


# Our conf/hydra/launcher/submitit_*.yaml refine the submitit plugin's configs of the same name; Hydra
# validates them against the plugin's schema and says that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except DamagedCheckpoint as exc:
        message = str(exc)
        if exc.intact is not None:
            from residual_dynamics.training.cluster import job_command

            command = job_command(str(cfg.run_name), Path(str(cfg.paths.run_dir)), ckpt_path="last_good")
            if command:
                message += f"; the command: {shlex.join(command)}"
        log.error("%s", message)
        raise SystemExit(f"error: {message}") from None
    except (ConfigError, DataError, Diverged) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
