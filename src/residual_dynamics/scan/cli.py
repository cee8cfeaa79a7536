"""``python -m residual_dynamics.scan``: the injection-coefficient scan on a pretrained model or a trained
checkpoint.

* ``model=<name>`` (a file of conf/pretrained/, default ``smollm2_offline``; ``model.path=`` etc. refine it)
  loads a pretrained model through :func:`residual_dynamics.pretrained.loading.load_pretrained`;
* ``checkpoint=<run_dir>/checkpoints/<step>.ckpt`` scans a model trained by ``python -m
  residual_dynamics.train`` instead: the checkpoint is loaded with ``weights_only=True``, its model rebuilt
  from ``hyper_parameters["model"]`` and converted to a bridge; its tokenizer is the training run's,
  found through the ``data`` and ``tokenizer`` sections of ``<run_dir>/.hydra/config.yaml`` in the token
  cache (the run's ``paths.cache_dir``, else this command's).

Everything that needs no model is checked first (:func:`~residual_dynamics.scan.spec.parse_scan`), the
rest (layer, logit tokens, vector file) once the model is loaded and before any forward. Outputs: see
:mod:`residual_dynamics.scan.report`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.scan.spec import ScanRunSpec, check_against_model, load_vector, parse_scan
from residual_dynamics.spec import CONF_DIR

log = logging.getLogger("residual_dynamics.scan")


@dataclasses.dataclass
class Loaded:
    bridge: Any
    tokenizer: Any
    name: str
    prepend_bos: bool
    n_ctx: int
    step: int


def run_config_of(checkpoint: Path) -> Path:
    """``<run_dir>/.hydra/config.yaml`` of a checkpoint at ``<run_dir>/checkpoints/<name>.ckpt``."""
    return checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"


def training_tokenizer(checkpoint: Path, fallback_cache: Path):
    """The tokenizer a training run used: its ``data`` / ``tokenizer`` config sections, loaded from (or, for
    a trained BPE missing from the cache, retrained deterministically into) the token cache."""
    from residual_dynamics.data.config import DataSettings, TokenizerSettings, validate_data_config
    from residual_dynamics.data.corpus import open_corpus
    from residual_dynamics.data.tokenizer import load_tokenizer

    path = run_config_of(checkpoint)
    if not path.is_file():
        raise DataError(f"{path}: the training run's config is missing; the scan needs it to find the tokenizer "
                        f"of {checkpoint} (a checkpoint must stay in <run_dir>/checkpoints/)")
    try:
        run_cfg = OmegaConf.load(path)
        sections = {key: OmegaConf.to_container(run_cfg[key], resolve=True) for key in ("data", "tokenizer")}
    except Exception as exc:
        raise DataError(f"{path}: cannot read its data / tokenizer sections ({type(exc).__name__}: {exc})") from None
    try:
        cache_dir = Path(OmegaConf.to_container(run_cfg.paths, resolve=True)["cache_dir"]).expanduser()
    except Exception:  # an interpolation that needs Hydra's runtime
        cache_dir = fallback_cache
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataSettings), sections["data"]))
    tok_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerSettings), sections["tokenizer"]))
    data, tokenizer = validate_data_config(data_cfg, tok_cfg, data_cfg.seq_len)
    return load_tokenizer(tokenizer, open_corpus(data, cache_dir), data.val_period, cache_dir)


def load_checkpoint_model(checkpoint: Path, cache_dir: Path) -> Loaded:
    from residual_dynamics.spec import load_checkpoint
    from residual_dynamics.training.convert import to_transformer_lens
    from residual_dynamics.training.model import ModelConfig, Transformer

    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("hyper_parameters", {}).get("model")
    if not isinstance(saved, dict):
        raise DataError(f"{checkpoint}: no hyper_parameters['model'] to rebuild the model from")
    try:
        model_cfg = ModelConfig(**saved)
    except TypeError as exc:
        raise DataError(f"{checkpoint}: hyper_parameters['model'] does not fit ModelConfig ({exc})") from None
    model_cfg.validate("checkpoint.model")
    model = Transformer(model_cfg)
    state = {key[len("model."):]: value for key, value in ckpt["state_dict"].items() if key.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{checkpoint}: its state_dict does not fit its model config ({str(exc).splitlines()[0]})") from None
    tokenizer = training_tokenizer(checkpoint, cache_dir)
    from residual_dynamics.data.tokenizer import tokenizer_fingerprint

    saved_fingerprint = (ckpt.get("hyper_parameters", {}).get("data") or {}).get("tokenizer_fingerprint")
    if saved_fingerprint is not None and saved_fingerprint != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{checkpoint}: the tokenizer found through {run_config_of(checkpoint)} is not the one the "
                        "model was trained with (its fingerprint differs from the checkpoint's)")
    if len(tokenizer) > model.cfg.d_vocab:
        raise DataError(f"{checkpoint}: the run's tokenizer has {len(tokenizer)} tokens, more than the model's "
                        f"d_vocab={model.cfg.d_vocab}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bridge = to_transformer_lens(model.to(device).eval())
    # the training windows run across documents separated by <|endoftext|>: prompts start with it
    return Loaded(bridge, tokenizer, f"{model_cfg.name}@step{int(ckpt['global_step'])}", True, model_cfg.n_ctx,
                  int(ckpt["global_step"]))


def load_model(spec: ScanRunSpec) -> Loaded:
    if spec.checkpoint is not None:
        return load_checkpoint_model(spec.checkpoint, spec.cache_dir)
    from residual_dynamics.pretrained.loading import load_pretrained

    bridge, tokenizer, info = load_pretrained(spec.model)
    return Loaded(bridge, tokenizer, info.name, info.prepend_bos, info.n_ctx, 0)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Parse ``cfg`` once and scan."""
    return scan(parse_scan(cfg))


def scan(spec: ScanRunSpec) -> dict[str, Any]:
    from residual_dynamics.probes.arch import Arch
    from residual_dynamics.scan import report
    from residual_dynamics.scan.cluster import cluster_profiles
    from residual_dynamics.scan.core import (actadd_vector, coefficient_range, injection_scan, mlp_post_hook,
                                             unsupported)

    settings = spec.settings
    loaded = load_model(spec)
    bridge = loaded.bridge
    arch = Arch.of(bridge)
    reason = unsupported(arch)
    if reason is not None:
        raise ConfigError("checkpoint" if spec.checkpoint is not None else "model", reason)
    if settings.neurons and arch.has_mlp and any(mlp_post_hook(l) not in bridge.hook_dict for l in range(arch.n_layers)):
        raise ConfigError("scan.neurons", "this model's bridge has no MLP hidden-activation hooks "
                                          "(blocks.*.mlp.hook_post) to split the MLPs into neurons")
    resolved = check_against_model(settings, arch.n_layers, loaded.tokenizer, loaded.prepend_bos, loaded.n_ctx)
    device = next(bridge.parameters()).device
    tokens = torch.tensor([resolved.prompt_tokens], dtype=torch.long, device=device)
    if settings.vector.file is not None:
        vector = load_vector(Path(settings.vector.file).expanduser(), arch.d_model).to(device)
        rows = vector.shape[0]
        if settings.vector.positions == "all" and rows != 1:
            raise ConfigError("scan.vector.positions", f"'all' adds a one-row vector everywhere; the file has {rows}")
        if settings.vector.positions == "front" and rows > tokens.shape[1]:
            raise ConfigError("scan.vector.file", f"the vector has {rows} rows, more than the prompt's "
                                                  f"{tokens.shape[1]} tokens")
    else:
        positive, negative = resolved.vector_tokens
        vector = actadd_vector(bridge, positive, negative, resolved.layer,
                               resolved.pad_id if resolved.pad_id is not None else 0, arch)
    coefficients = coefficient_range(settings.coefficients.start, settings.coefficients.stop, settings.coefficients.n)
    result = injection_scan(bridge, tokens, vector, layer=resolved.layer, coefficients=coefficients,
                            logit_tokens=resolved.logit_tokens, position=settings.position,
                            positions=settings.vector.positions, neurons=settings.neurons,
                            max_batch=settings.max_batch, arch=arch)
    c = settings.clustering
    clusters = cluster_profiles(result.attribution.numpy(), n_clusters=c.n_clusters, method=c.method,
                                min_range=c.min_range, seed=c.seed)

    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"run": spec.run_name, "model": loaded.name}
    paths = report.write_tables(result, clusters, run_dir, loaded.step, meta)
    t1, t2 = settings.logit_tokens
    a, b = settings.vector.prompts if settings.vector.file is None else (Path(settings.vector.file).name, "")
    title = (f"{loaded.name}: {a!r}{' - ' + repr(b) if b else ''} at layer {resolved.layer}, "
             f"logit({t1!r}) - logit({t2!r}) on {settings.prompt!r}")
    png = report.figure(result, clusters, run_dir / "figures" / "scan.png", top_k=settings.top_k, title=title)
    wandb_dir = None
    if spec.logger.kind == "wandb":
        import wandb

        wandb_run = wandb.init(project=spec.logger.project, entity=spec.logger.entity,
                               group=spec.logger.group or loaded.name, job_type=spec.logger.job_type,
                               tags=list(spec.logger.tags), name=spec.run_name, dir=str(run_dir),
                               mode=spec.logger.wandb_mode, config=spec.config)
        try:
            report.log_wandb(wandb_run, result, clusters, png, settings.top_k, loaded.step)
            wandb_dir = Path(wandb_run.dir).parent
        finally:
            wandb_run.finish()
    error = float((result.total - result.logit_diff).abs().max())
    print(f"\nScanned {loaded.name}: {len(result.coefficients)} coefficients in [{coefficients[0]:g}, "
          f"{coefficients[-1]:g}] at layer {resolved.layer}, {len(result.components)} components, "
          f"{clusters.n_clusters} clusters (max |sum of attributions - logit difference| = {error:.2e}).")
    print(f"  run directory : {run_dir}")
    if wandb_dir is not None:
        print(f"  W&B run       : {wandb_dir}")
    for name, path in paths.items():
        print(f"  {name:<13} : {path}")
    print(f"  figure        : {png}")
    return {"run_dir": run_dir, "result": result, "clusters": clusters, "figure": png, "paths": paths,
            "wandb": wandb_dir, "resolved": resolved}


def _model_group_argv(argv: list[str]) -> list[str]:
    """``model=<name>`` selects the ``pretrained@model`` config group (``model.<field>=`` stays as is)."""
    return ["pretrained@model=" + a[len("model="):] if a.startswith("model=") else a for a in argv]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="scan")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None


def main(argv: Optional[list[str]] = None) -> None:
    sys.argv = [sys.argv[0], *_model_group_argv(list(sys.argv[1:] if argv is None else argv))]
    _main()


if __name__ == "__main__":
    main()
