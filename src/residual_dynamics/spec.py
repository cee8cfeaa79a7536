"""The typed run spec: Hydra structured configs for every config group, parsed once at the entry point.

Each config group of ``conf/`` has a dataclass schema, registered in Hydra's ConfigStore; the YAML files
are its instances. Hydra therefore rejects unknown keys (``+foo=1`` too) and values of the wrong type
(``optim.lr=abc``) when it composes, naming the key, before any of our code runs:

==============  ==========================================================
group           schema
==============  ==========================================================
model           :class:`residual_dynamics.training.model.ModelConfig`
optim           :class:`residual_dynamics.training.optim.OptimConfig`
data            :class:`residual_dynamics.data.config.DataSettings`
tokenizer       :class:`residual_dynamics.data.config.TokenizerSettings`
trainer         :class:`residual_dynamics.training.trainer.TrainerConfig`
logger          :class:`residual_dynamics.reporting.logger.LoggerConfig`
probes          :class:`ProbesConfig` (one section per probe: the probe's ``Options`` + enabled/early)
pretrained      :class:`residual_dynamics.pretrained.loading.PretrainedSpec` (``model`` of the probe CLI)
prompts         :class:`residual_dynamics.pretrained.prompts.PromptsConfig`
==============  ==========================================================

:func:`parse_train` turns the composed config into one frozen :class:`RunSpec` (and
:func:`parse_probe` into a :class:`ProbeRunSpec`), checking every value against what it may be --
including the cross-field checks (``data.seq_len <= model.n_ctx``), the probe options against the
configured architecture (``Options.check(arch)``, no probe runs), the Lightning Trainer's knobs, the W&B
mode and the resume checkpoint -- and raising :class:`ConfigError` naming the full field. Nothing below
the entry points reads a DictConfig: they hand the typed parts down.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from residual_dynamics.data.config import DataSettings, TokenizerSettings, validate_data_config
from residual_dynamics.errors import ConfigError, DataError
from residual_dynamics.pretrained.loading import PretrainedSpec
from residual_dynamics.pretrained.prompts import PromptsConfig
from residual_dynamics.probes import activation_rates, cleanup, layer_horizon, residual_norms, weight_norms
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.registry import PROBE_NAMES, PROBES, check_options
from residual_dynamics.reporting.logger import LoggerConfig
from residual_dynamics.training.callbacks import ProbeSchedule
from residual_dynamics.training.model import ModelConfig
from residual_dynamics.training.optim import OptimConfig
from residual_dynamics.training.trainer import TrainerConfig

log = logging.getLogger(__name__)

#: The Hydra config directory of a source checkout (the entry points give Hydra this absolute path).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


# --------------------------------------------------------------------------- probes group


@dataclass
class ResidualNormsSection(residual_norms.Options):
    enabled: bool = True
    early: bool = True


@dataclass
class WeightNormsSection(weight_norms.Options):
    enabled: bool = True
    early: bool = True


@dataclass
class ActivationRatesSection(activation_rates.Options):
    enabled: bool = True
    early: bool = True


@dataclass
class LayerHorizonSection(layer_horizon.Options):
    enabled: bool = True
    early: bool = False  # K + 1 forward passes: only at the full steps of the schedule


@dataclass
class CleanupSection(cleanup.Options):
    enabled: bool = True
    early: bool = False


@dataclass
class ScheduleConfig:
    """``probes.schedule``: steps 0, 1, 2, 4, ... below ``log_spaced_until``, then every ``every`` steps
    (default ``trainer.ckpt_every``: every full probe step has a checkpoint), and at the end."""

    log_spaced_until: int = 64
    every: int = 200
    at_end: bool = True


@dataclass
class ProbesConfig:
    """The ``probes`` group: the probe batch, the schedule and one section per probe. A section holds the
    probe's ``Options`` (``src/residual_dynamics/probes/<name>.py``), ``enabled``, and ``early`` (also run
    at the log-spaced early steps, else only at the full steps)."""

    batch_size: int = 16
    seq_len: int = 128
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    residual_norms: ResidualNormsSection = field(default_factory=ResidualNormsSection)
    weight_norms: WeightNormsSection = field(default_factory=WeightNormsSection)
    activation_rates: ActivationRatesSection = field(default_factory=ActivationRatesSection)
    layer_horizon: LayerHorizonSection = field(default_factory=LayerHorizonSection)
    cleanup: CleanupSection = field(default_factory=CleanupSection)

    def enabled(self) -> dict[str, Any]:
        """{probe name: its Options} of the enabled probes, in registry order."""
        out = {}
        for name in PROBE_NAMES:
            section = getattr(self, name, None)
            if section is None or not section.enabled:
                continue
            options_cls = PROBES[name].Options
            out[name] = options_cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(options_cls)})
        return out

    def early(self) -> frozenset[str]:
        return frozenset(name for name in self.enabled() if getattr(self, name).early)

    def validated(self, arch: Arch, n_ctx: Optional[int]) -> dict[str, Any]:
        """Check the probe batch, the schedule and every enabled probe's options against ``arch``."""
        enabled = self.enabled()
        if not enabled:
            return enabled
        _int_at_least(self.batch_size, "probes.batch_size", 1)
        _int_at_least(self.seq_len, "probes.seq_len", 2, "position 0 is always dropped from statistics")
        if n_ctx is not None and self.seq_len > n_ctx:
            raise ConfigError("probes.seq_len", f"{self.seq_len} is longer than model.n_ctx={n_ctx}")
        _int_at_least(self.schedule.log_spaced_until, "probes.schedule.log_spaced_until", 0)
        _int_at_least(self.schedule.every, "probes.schedule.every", 0)
        for name, options in enabled.items():
            check_options(name, options, arch)
        return enabled


def _int_at_least(value: Any, field_name: str, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field_name, f"must be an integer >= {minimum}{f' ({why})' if why else ''}, got {value!r}")


# --------------------------------------------------------------------------- roots


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    cache_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class TrainConfig:
    """Root of ``python -m residual_dynamics.train`` (conf/config.yaml)."""

    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataSettings = MISSING
    tokenizer: TokenizerSettings = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    probes: ProbesConfig = MISSING
    seed: int = 0
    run_name: str = MISSING
    ckpt_path: Optional[str] = None
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ProbeConfig:
    """Root of ``python -m residual_dynamics.probe`` (conf/probe.yaml)."""

    model: PretrainedSpec = MISSING
    probes: ProbesConfig = MISSING
    logger: LoggerConfig = MISSING
    data: DataSettings = MISSING
    tokenizer: TokenizerSettings = MISSING
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    step: Optional[int] = None
    run_name: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (done on import; idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="probe_schema", node=ProbeConfig)


register()


# --------------------------------------------------------------------------- the parsed specs


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, checked before any compute."""

    path: str
    step: int


@dataclass(frozen=True)
class RunSpec:
    """Everything a training run needs, typed and validated. Built once by :func:`parse_train`."""

    model: ModelConfig
    optim: OptimConfig
    data: DataSettings
    tokenizer: TokenizerSettings
    trainer: TrainerConfig
    logger: LoggerConfig
    probes: dict[str, Any]  # enabled probe name -> its Options
    early_probes: frozenset[str]
    probe_batch_size: int
    probe_seq_len: int
    schedule: ProbeSchedule
    seed: int
    run_name: str
    run_dir: Path
    cache_dir: Path
    resume: Optional[Resume]
    config: dict  # the resolved config as plain containers, for W&B and checkpoints


@dataclass(frozen=True)
class ProbeRunSpec:
    """Everything ``python -m residual_dynamics.probe`` needs. Built once by :func:`parse_probe`; the
    probe options are checked against the model's architecture once it is loaded (:meth:`check_probes`)."""

    model: PretrainedSpec
    probes_config: ProbesConfig
    logger: LoggerConfig
    data: Optional[DataSettings]
    tokenizer: Optional[TokenizerSettings]
    prompts: PromptsConfig
    step: Optional[int]
    run_name: str
    run_dir: Path
    cache_dir: Path
    config: dict

    def check_probes(self, arch: Arch, n_ctx: Optional[int] = None) -> dict[str, Any]:
        """The enabled probes' Options, checked against the loaded model's architecture."""
        return self.probes_config.validated(arch, n_ctx)


def _reject_unknown_keys(node: Any, prefix: str = "") -> None:
    """Hydra's ``+key=value`` opens the struct flag to append a key; the schema has no such field, so it is
    rejected here, naming the full key and the fields that exist."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        path = f"{prefix}{key}"
        if known is not None and key not in known:
            raise ConfigError(path, f"unknown field; the fields are {', '.join(sorted(known))}")
        if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
            _reject_unknown_keys(node[key], f"{path}.")


def _to_object(cfg: DictConfig, schema: type):
    """The composed config as schema objects (interpolations resolved). An unknown key, a value that is
    still missing or one that does not fit its type becomes a ConfigError naming the full key."""
    _reject_unknown_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from None
    if not isinstance(obj, schema):
        raise ConfigError("config", f"expected a {schema.__name__} config, got {type(obj).__name__}")
    return obj


def parse_train(cfg: DictConfig) -> RunSpec:
    """Parse and validate the training config, top-down, once. Raises ConfigError / DataError."""
    raw: TrainConfig = _to_object(cfg, TrainConfig)
    model = raw.model
    model.validate("model")
    optim = raw.optim
    optim.validate()
    data, tokenizer = validate_data_config(raw.data, raw.tokenizer, raw.data.seq_len)
    if data.seq_len > model.n_ctx:
        raise ConfigError("data.seq_len", f"{data.seq_len} is longer than model.n_ctx={model.n_ctx}")
    if tokenizer.name == "bpe" and model.d_vocab is not None and model.d_vocab < tokenizer.vocab_size:
        raise ConfigError("model.d_vocab", f"{model.d_vocab} is smaller than tokenizer.vocab_size={tokenizer.vocab_size}")
    trainer = raw.trainer.validated()
    logger = raw.logger.validated()
    _int_at_least(raw.seed, "seed", 0)
    probes = raw.probes.validated(Arch.from_model_config(model), model.n_ctx)
    schedule = ProbeSchedule(max_steps=trainer.max_steps, log_spaced_until=raw.probes.schedule.log_spaced_until,
                             every=raw.probes.schedule.every, at_end=raw.probes.schedule.at_end)
    if not raw.run_name or "/" in raw.run_name:
        raise ConfigError("run_name", f"must be a non-empty name without '/', got {raw.run_name!r}")
    run_dir = Path(raw.paths.run_dir)
    spec = RunSpec(
        model=model, optim=optim, data=data, tokenizer=tokenizer, trainer=trainer, logger=logger,
        probes=probes, early_probes=raw.probes.early() if probes else frozenset(),
        probe_batch_size=raw.probes.batch_size, probe_seq_len=raw.probes.seq_len, schedule=schedule,
        seed=raw.seed, run_name=raw.run_name, run_dir=run_dir, cache_dir=Path(raw.paths.cache_dir).expanduser(),
        resume=None, config=OmegaConf.to_container(cfg, resolve=True),
    )
    return dataclasses.replace(spec, resume=_resume_point(raw.ckpt_path, spec))


def parse_probe(cfg: DictConfig) -> ProbeRunSpec:
    """Parse and validate the pretrained-probe config, once, before anything is loaded."""
    raw: ProbeConfig = _to_object(cfg, ProbeConfig)
    model = raw.model.validated()
    prompts = raw.prompts.validated()
    _int_at_least(0 if raw.step is None else raw.step, "step", 0)
    logger = raw.logger.validated()
    data = tokenizer = None
    if prompts.source == "corpus":
        data, tokenizer = validate_data_config(raw.data, raw.tokenizer, prompts.max_len)
    # options that need no architecture are checked now; the rest once the model is loaded
    raw.probes.validated(Arch.unknown(), None)
    return ProbeRunSpec(
        model=model, probes_config=raw.probes, logger=logger, data=data, tokenizer=tokenizer, prompts=prompts,
        step=raw.step, run_name=raw.run_name, run_dir=Path(raw.paths.run_dir),
        cache_dir=Path(raw.paths.cache_dir).expanduser(), config=OmegaConf.to_container(cfg, resolve=True),
    )


# --------------------------------------------------------------------------- resume checkpoint


def _resume_point(ckpt_path: Optional[str], spec: RunSpec) -> Optional[Resume]:
    """The checkpoint to resume from, or None for a fresh run. ``ckpt_path=last`` with no last.ckpt yet is
    a fresh run (so the same command can requeue a SLURM job)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = spec.run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            log.warning("ckpt_path=last but %s does not exist yet: starting a fresh run", path)
            return None
    else:
        path = Path(ckpt_path).expanduser()
    return Resume(str(path), check_checkpoint(path, spec.model))


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint of this project, loaded with ``weights_only=True`` (no code from the file
    runs). A file that is not one raises DataError naming it."""
    import torch

    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found (ckpt_path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or a pickle that wants to run code
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise DataError(f"{path}: not a Lightning checkpoint of this project (no state_dict / global_step)")
    return ckpt


def check_checkpoint(path: Path, model: ModelConfig) -> int:
    """A checkpoint must exist, load safely, and describe the same model as the config. Returns its step."""
    ckpt = load_checkpoint(path)
    saved = dict(ckpt.get("hyper_parameters", {}).get("model", {}))
    for key, value in dataclasses.asdict(model).items():
        if key in ("name", "d_vocab"):
            continue
        if key in saved and saved[key] != value:
            raise ConfigError(f"model.{key}", f"{value!r} differs from the checkpoint's {saved[key]!r} ({path})")
    return int(ckpt["global_step"])
