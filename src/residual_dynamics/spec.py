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
import pickle
import re
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
from residual_dynamics.probes import logit_lens, sublayer_ablation
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import DEFAULT_MAX_MEMORY, parse_bytes
from residual_dynamics.probes.registry import PROBE_NAMES, PROBES, check_options
from residual_dynamics.reporting.logger import LoggerConfig
from residual_dynamics.training.callbacks import ProbeSchedule
from residual_dynamics.training.model import ModelConfig
from residual_dynamics.training.optim import OptimConfig
from residual_dynamics.training.guards import DivergenceConfig
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
class SublayerAblationSection(sublayer_ablation.Options):
    enabled: bool = True
    early: bool = False  # one forward per chunk of sublayers: only at the full steps


@dataclass
class LogitLensSection(logit_lens.Options):
    enabled: bool = True
    early: bool = False  # two forwards and one unembedding per layer: only at the full steps


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
    # memory budget of each probe's own memory ("2GB", "512MiB" or bytes); sets the chunk sizes of the probes
    # with a ``max_memory`` option (their section's own value, when not null, wins)
    max_memory: str = DEFAULT_MAX_MEMORY
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    residual_norms: ResidualNormsSection = field(default_factory=ResidualNormsSection)
    weight_norms: WeightNormsSection = field(default_factory=WeightNormsSection)
    activation_rates: ActivationRatesSection = field(default_factory=ActivationRatesSection)
    layer_horizon: LayerHorizonSection = field(default_factory=LayerHorizonSection)
    cleanup: CleanupSection = field(default_factory=CleanupSection)
    sublayer_ablation: SublayerAblationSection = field(default_factory=SublayerAblationSection)
    logit_lens: LogitLensSection = field(default_factory=LogitLensSection)

    def enabled(self) -> dict[str, Any]:
        """{probe name: its Options} of the enabled probes, in registry order."""
        out = {}
        for name in PROBE_NAMES:
            section = getattr(self, name, None)
            if section is None or not section.enabled:
                continue
            options_cls = PROBES[name].Options
            values = {f.name: getattr(section, f.name) for f in dataclasses.fields(options_cls)}
            if "max_memory" in values and values["max_memory"] is None:
                values["max_memory"] = self.max_memory
            out[name] = options_cls(**values)
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
        parse_bytes(self.max_memory, "probes.max_memory")
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
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
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


def job_run_name(default: str) -> str:
    """``run_name`` of conf/config.yaml: ``default`` (the launch time) for a single run; in a multirun
    (``-m``), ``<sweep folder>_<job number>[_<overrides>]``, e.g.
    ``2026-01-02_03-04-05_1_model.n_heads=4``, so that every job has its own W&B name and ``run`` value
    in results.jsonl (and a SLURM requeue of the job gets the same name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return default
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return default
    return f"{Path(str(hc.sweep.dir)).name}_{job_dir_name(hc.job.num, hc.job.override_dirname)}"


#: the longest job folder name (file systems allow 255 bytes; W&B names should stay readable)
JOB_DIR_MAX = 120


def job_dir_name(num: Any, override_dirname: Any) -> str:
    """``hydra.sweep.subdir`` of conf/config.yaml: ``<job number>_<overrides>`` ('/' replaced), and when
    that is longer than :data:`JOB_DIR_MAX` characters, its start and a hash of the whole, so that a
    sweep with many overrides still gets distinct, valid folder names."""
    import hashlib

    overrides = str(override_dirname or "").replace("/", "_")
    name = f"{num}_{overrides}" if overrides else f"{num}"
    if len(name) > JOB_DIR_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:JOB_DIR_MAX - 9]}-{digest}"
    return name


def register() -> None:
    """Store the schemas in Hydra's ConfigStore and the ``job_run_name`` resolver (done on import;
    idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="probe_schema", node=ProbeConfig)
    OmegaConf.register_new_resolver("job_run_name", job_run_name, replace=True)
    OmegaConf.register_new_resolver("job_dir_name", job_dir_name, replace=True)


register()


# --------------------------------------------------------------------------- the parsed specs


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, checked before any compute: its file, step, and the tokenizer
    fingerprint and vocabulary size it was trained with (None in checkpoints that predate them)."""

    path: str
    step: int
    tokenizer_fingerprint: Optional[str] = None
    d_vocab: Optional[int] = None


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
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)


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
        """The enabled probes' Options, checked against the loaded model's architecture. A null
        ``probes.residual_norms.fit_layers`` takes the model's ``fit_layers`` (conf/pretrained/*.yaml, e.g.
        gpt2-xl's [5, 41]), checked against the layer count as ``model.fit_layers``."""
        probes = self.probes_config.validated(arch, n_ctx)
        norms = probes.get("residual_norms")
        if norms is not None and norms.fit_layers is None and self.model.fit_layers is not None:
            from residual_dynamics.probes.common import check_layer_pair

            check_layer_pair(list(self.model.fit_layers), "model.fit_layers", arch.n_layers)
            probes["residual_norms"] = dataclasses.replace(norms, fit_layers=list(self.model.fit_layers))
        return probes


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
        resume=None, config=OmegaConf.to_container(cfg, resolve=True), divergence=raw.divergence.validated(),
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


class DamagedCheckpoint(DataError):
    """``last.ckpt`` does not load; ``intact`` is the newest earlier checkpoint that does, (path, step)."""

    def __init__(self, message: str, path: Path, intact: Optional[tuple[Path, int]]):
        self.path, self.intact = path, intact
        super().__init__(message)


def _resume_point(ckpt_path: Optional[str], spec: RunSpec) -> Optional[Resume]:
    """The checkpoint to resume from, or None for a fresh run.

    - ``null``: a fresh run; refused when the run directory already holds checkpoints (that would mix two
      runs in one directory: resume it, or use another run_name);
    - ``last``: ``<run_dir>/checkpoints/last.ckpt``. With no checkpoint at all yet it is a fresh run (so the
      same command can start and requeue a SLURM job); with no last.ckpt but an intact ``step<N>.ckpt``
      (a kill between the two writes) the newest of those. A last.ckpt that does not load raises
      :class:`DamagedCheckpoint`, naming the newest intact earlier checkpoint;
    - ``last_good``: like ``last``, but falls back to that intact checkpoint (with a warning);
    - a path to a ``.ckpt`` file.
    """
    from residual_dynamics.training.checkpoint import intact_checkpoints

    ckpt_dir = spec.run_dir / "checkpoints"
    if ckpt_path is None:
        existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        if existing:
            raise ConfigError("ckpt_path", f"null (a fresh run), but {spec.run_dir} already holds {len(existing)} "
                                           "checkpoint(s) of a run: resume it with ckpt_path=last, or start a new "
                                           "run under another run_name")
        return None
    if ckpt_path not in ("last", "last_good"):
        path = Path(ckpt_path).expanduser()
        return _checked_resume(path, spec.model)
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        intact = intact_checkpoints(ckpt_dir)
        if not intact:
            log.warning("ckpt_path=%s but %s does not exist yet: starting a fresh run", ckpt_path, last)
            return None
        log.warning("ckpt_path=%s: %s does not exist; resuming from the newest intact checkpoint %s (step %d)",
                    ckpt_path, last, *intact[0])
        return _checked_resume(intact[0][0], spec.model)
    try:
        return _checked_resume(last, spec.model)
    except DataError as exc:
        intact = intact_checkpoints(ckpt_dir, exclude=(last,))
        if ckpt_path == "last_good" and intact:
            log.warning("ckpt_path=last_good: %s; resuming from the newest intact checkpoint %s (step %d)",
                        exc, *intact[0])
            return _checked_resume(intact[0][0], spec.model)
        if intact:
            hint = (f"the newest intact checkpoint is {intact[0][0]} (step {intact[0][1]}): resume from it with "
                    "ckpt_path=last_good")
        else:
            hint = f"no earlier checkpoint in {ckpt_dir} loads either: start a new run under another run_name"
        raise DamagedCheckpoint(f"{exc}; {hint}", last, intact[0] if intact else None) from None


def _checked_resume(path: Path, model: ModelConfig) -> Resume:
    ckpt = load_checkpoint(path)
    _check_model(ckpt, path, model)
    hparams = ckpt.get("hyper_parameters", {})
    data = dict(hparams.get("data", {}) or {})
    d_vocab = dict(hparams.get("model", {}) or {}).get("d_vocab")
    return Resume(str(path), int(ckpt["global_step"]), tokenizer_fingerprint=data.get("tokenizer_fingerprint"),
                  d_vocab=d_vocab)


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint of this project, loaded with ``weights_only=True`` (no code from the file
    runs). A file that is not one raises DataError naming it."""
    import torch

    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found (ckpt_path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a pickle that wants to build objects (run code) on load
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        raise DataError(f"{path}: refused: not a plain checkpoint, it asks to run "
                        f"{found.group(0) if found else 'code'} when loaded (only tensors and containers are "
                        "loaded, with torch.load(weights_only=True))") from None
    except Exception as exc:  # truncated or not a torch file
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise DataError(f"{path}: not a Lightning checkpoint of this project (no state_dict / global_step)")
    return ckpt


def check_checkpoint(path: Path, model: ModelConfig) -> int:
    """A checkpoint must exist, load safely, and describe the same model as the config. Returns its step."""
    return _checked_resume(Path(path), model).step


def _check_model(ckpt: dict, path: Path, model: ModelConfig) -> None:
    saved = dict(ckpt.get("hyper_parameters", {}).get("model", {}))
    for key, value in dataclasses.asdict(model).items():
        if key in ("name", "d_vocab"):
            continue
        if key in saved and saved[key] != value:
            raise ConfigError(f"model.{key}", f"{value!r} differs from the checkpoint's {saved[key]!r} ({path})")
