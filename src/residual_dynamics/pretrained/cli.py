"""Probe a pretrained model: ``python -m residual_dynamics.probe model=<name> [overrides]``.

``model=`` names a file of ``conf/pretrained/`` (gpt2 ... gpt2-xl, distilgpt2, pythia-70m/160m, opt-125m,
gpt-neo-125m, smollm2-135m, smollm2_offline, local, gguf); ``model.path=``, ``model.gguf=`` and
``model.revision=step<N>`` (Pythia checkpoints) refine it. The run is logged like a training
checkpoint: W&B (``job_type=pretrained``, the model name as group, the same ``probe/...`` keys against
``trainer/global_step``), ``<run_dir>/results.jsonl`` and the same PNG figures, so pretrained and
trained curves overlay. A multirun over ``model.revision`` gives a training-dynamics curve of a
released model.

Provenance (``reporting.provenance``): the fingerprint of the probed weights, the revision and its hub
commit go into every results row, the W&B config and summary (``provenance/...``); in a multirun (``-m``)
every job registers its fingerprint in ``<sweep dir>/weight_fingerprints.jsonl`` and a job whose weights
equal an earlier job's under another name is warned about. While probing, a rich progress bar runs over
the probes (and their chunks); the wall time of each is printed, logged to W&B (``probe_seconds/<probe>``)
and written to the results rows (``probe_seconds``). Prompts: the shipped set, ``prompts.file=`` (.txt or
.jsonl) or ``prompts.source=corpus``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.reporting.reporter import STEP_KEY, ProbeReporter
from residual_dynamics.spec import CONF_DIR, ProbeRunSpec, parse_probe

log = logging.getLogger("residual_dynamics.probe")


def x_axis_step(spec: ProbeRunSpec) -> int:
    """The step to log against: ``step`` if set, else N of a ``step<N>`` revision, else 0."""
    if spec.step is not None:
        return int(spec.step)
    match = re.fullmatch(r"step(\d+)", str(spec.model.revision or ""))
    return int(match.group(1)) if match else 0


def prompt_texts(spec: ProbeRunSpec) -> list[str]:
    """The shipped prompt set, the prompts of ``prompts.file``, or held-out documents of the configured corpus."""
    if spec.prompts.source == "default":
        from residual_dynamics.pretrained.prompts import load_prompts

        return load_prompts()[: spec.prompts.n]
    if spec.prompts.source == "file":
        from residual_dynamics.pretrained.prompts import read_prompt_file

        return read_prompt_file(spec.prompts.file, spec.prompts.text_field, spec.prompts.n)
    from residual_dynamics.data.corpus import open_corpus

    data = spec.data
    texts = []
    for held_out, text in open_corpus(data, spec.cache_dir).split_documents(data.val_period):
        if held_out and text.strip():
            texts.append(text)
            if len(texts) == spec.prompts.n:
                break
    if not texts:
        raise DataError(f"the {data.name} corpus has no held-out documents to use as prompts")
    return texts


def probe_stages(probes: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The probes grouped as they run, in order: the activation-only probes (those with a pass builder)
    together, as ``run_probes`` fuses them into ONE forward (stage name ``a+b``), then every other probe on
    its own. Each stage is timed and drawn as one step of the progress bar."""
    from residual_dynamics.probes.registry import PROBES

    fused = {name: options for name, options in probes.items() if PROBES[name].pass_builder is not None}
    stages = [("+".join(fused), fused)] if fused else []
    return stages + [(name, {name: options}) for name, options in probes.items() if name not in fused]


def run(cfg: DictConfig, registry: Optional[Path] = None) -> dict[str, Any]:
    """Parse ``cfg`` once and probe the model it names (``registry``: see :func:`probe`)."""
    return probe(parse_probe(cfg), registry=registry)


def probe(spec: ProbeRunSpec, registry: Optional[Path] = None, progress: bool = True) -> dict[str, Any]:
    """Load, probe and report the model of ``spec``.

    registry: the weight-fingerprint registry of the multirun this job belongs to (``<sweep dir>/
              weight_fingerprints.jsonl``, given by the entry point under ``-m``); a job whose weights equal
              those of an earlier job of the sweep under another name gets a warning (``reporting.provenance``).
    progress: draw the rich progress bar (the stages are timed either way).
    """
    from residual_dynamics.heap import bound_heap
    from residual_dynamics.pretrained.loading import load_pretrained
    from residual_dynamics.pretrained.prompts import tokenize_prompts
    from residual_dynamics.probes.arch import Arch
    from residual_dynamics.probes.registry import run_probes
    from residual_dynamics.reporting import provenance as prov
    from residual_dynamics.reporting.progress import ProbeProgress

    bound_heap()  # freed activations go back to the system (residual_dynamics.heap)
    bridge, tokenizer, info = load_pretrained(spec.model)
    arch = Arch.of(bridge)
    probes = spec.check_probes(arch, info.n_ctx)
    texts = prompt_texts(spec)
    tokens, attention_mask = tokenize_prompts(tokenizer, texts, max_len=min(spec.prompts.max_len, info.n_ctx),
                                              prepend_bos=info.prepend_bos)
    device = next(bridge.parameters()).device
    tokens, attention_mask = tokens.to(device), attention_mask.to(device)
    step = x_axis_step(spec)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    provenance = {"weights_sha256": prov.weight_fingerprint(bridge), "revision": info.revision,
                  "commit": prov.hub_commit(info.model_dir)}
    identical = None
    if registry is not None:
        entry = {**provenance, "label": prov.model_label(info), "job": str(run_dir)}
        identical = prov.identical_weights_message(entry, prov.register_fingerprint(registry, entry))
        if identical:
            log.warning("%s", identical)

    wandb_run = None
    if spec.logger.kind == "wandb":
        import wandb

        wandb_run = wandb.init(
            project=spec.logger.project, entity=spec.logger.entity, group=spec.logger.group,
            job_type=spec.logger.job_type, tags=list(spec.logger.tags), name=spec.run_name, dir=str(run_dir),
            mode=spec.logger.wandb_mode,
            config={**spec.config, "model_info": dataclasses.asdict(info), "provenance": provenance},
        )
        # the same x-axis as Lightning's WandbLogger, so pretrained points sit on the training curves
        wandb_run.define_metric(STEP_KEY)
        wandb_run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        if identical:
            wandb_run.summary["provenance/identical_weights"] = identical
    try:
        stages = probe_stages(probes)
        results: dict[str, Any] = {}
        with torch.no_grad(), ProbeProgress([name for name, _ in stages], enabled=progress) as bars:
            for name, stage in stages:
                with bars.stage(name):
                    results.update(run_probes(bridge, tokens, stage, attention_mask=attention_mask, arch=arch))
        results = {name: results[name] for name in probes}
        seconds = {probe_name: bars.seconds[name] for name, stage in stages for probe_name in stage}
        reporter = ProbeReporter(run_dir, wandb_run=wandb_run, pretrained=True, detail=spec.logger.detail,
                                 meta={"run": spec.run_name, "model": info.name})
        pngs = reporter.report(results, step, provenance=provenance, probe_seconds=seconds)
        wandb_dir = Path(wandb_run.dir).parent if wandb_run is not None else None
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    for name, result in results.items():
        note = getattr(result, "note", None)
        if note:
            print(f"  note ({name}): {note}")
    print(f"\nProbed {info.name} ({info.architecture}, {info.n_layers} layers) on {tokens.shape[0]} prompts "
          f"at step {step}.")
    print(f"  run directory : {run_dir}")
    if wandb_dir is not None:
        print(f"  W&B run       : {wandb_dir}")
    print(f"  probe results : {reporter.results.path}")
    for path in pngs.values():
        print(f"  figure        : {path}")
    print(f"  weights       : sha256 {provenance['weights_sha256'][:16]}"
          + (f", revision {info.revision}" if info.revision else "")
          + (f", commit {provenance['commit']}" if provenance["commit"] else ""))
    if identical:
        print(f"  WARNING       : {identical}")
    print(f"  probe time    : {sum(bars.seconds.values()):.1f} s (model load {info.load_seconds:.1f} s)")
    width = max((len(name) for name, _ in stages), default=0)
    for name, _ in stages:
        shared = " (one shared forward)" if "+" in name else ""
        print(f"    {name:{width}s} {bars.seconds[name]:8.2f} s{shared}")
    return {"run_dir": run_dir, "results": results, "wandb": wandb_dir, "figures": pngs, "info": info,
            "provenance": provenance, "identical_weights": identical, "probe_seconds": dict(bars.seconds)}


def _model_group_argv(argv: list[str]) -> list[str]:
    """``model=<name>`` selects the ``pretrained@model`` config group (``model.<field>=`` stays as is)."""
    return ["pretrained@model=" + a[len("model="):] if a.startswith("model=") else a for a in argv]


def sweep_registry() -> Optional[Path]:
    """``<sweep dir>/weight_fingerprints.jsonl`` when this Hydra job is part of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from residual_dynamics.reporting.provenance import REGISTRY_FILE

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir) / REGISTRY_FILE


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="probe")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg, registry=sweep_registry())
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


def main(argv: Optional[list[str]] = None) -> None:
    sys.argv = [sys.argv[0], *_model_group_argv(list(sys.argv[1:] if argv is None else argv))]
    _main()


if __name__ == "__main__":
    main()
