"""The typed config of ``python -m residual_dynamics.scan``: Hydra structured configs and their parsing.

``conf/scan.yaml`` is an instance of :class:`ScanConfig` (registered as ``scan_schema``); the ``scan``
group (``conf/scan/*.yaml``) of :class:`ScanSettings`. :func:`parse_scan` turns the composed config into
a frozen :class:`ScanRunSpec`, checking every value that needs no model (types, ranges, files) and raising
``ConfigError`` naming the full field; :func:`check_against_model` checks the rest -- the layer against
the model's depth, the logit tokens against its tokenizer, the position against the prompt -- once the
model is loaded and before any forward runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from residual_dynamics.errors import ConfigError
from residual_dynamics.pretrained.loading import PretrainedSpec
from residual_dynamics.reporting.logger import LoggerConfig
from residual_dynamics.scan.cluster import METHODS
from residual_dynamics.scan.core import POSITIONS
from residual_dynamics.spec import PathsConfig, _to_object

VECTOR_SUFFIXES = (".pt", ".npy")


@dataclass
class VectorConfig:
    """``scan.vector``: the steering vector and where it goes.

    prompts:   two strings; the vector is resid_pre(layer) of the first minus that of the second (ActAdd),
               the shorter padded on the right with the space token. Ignored when ``file`` is set.
    file:      a saved vector instead: ``.pt`` (a tensor, loaded with weights_only=True) or ``.npy``
               (allow_pickle=False), of shape [d_model] or [n, d_model].
    layer:     the block whose resid_pre the vector is read at and added to; null = n_layers // 4 (ActAdd
               works best in the early layers).
    positions: front (row j at position j, ActAdd) | all (a one-row vector at every position).
    """

    prompts: List[str] = field(default_factory=lambda: [" Love", " Hate"])
    file: Optional[str] = None
    layer: Optional[int] = None
    positions: str = "front"


@dataclass
class CoefficientsConfig:
    """``scan.coefficients``: ``n`` coefficients evenly spaced in [start, stop], one per copy of the prompt."""

    start: float = -10.0
    stop: float = 10.0
    n: int = 128


@dataclass
class ClusteringConfig:
    """``scan.clustering``: see :mod:`residual_dynamics.scan.cluster`."""

    method: str = "kmeans"
    n_clusters: int = 4
    min_range: float = 0.02
    seed: int = 0


@dataclass
class ScanSettings:
    """The ``scan`` group.

    prompt:       the input text (the model's BOS convention applies), repeated once per coefficient.
    vector, coefficients, clustering: see their classes.
    logit_tokens: two strings, each exactly one token: the attribution is to logit[t1] - logit[t2].
    position:     the scored position of the prompt (negative: from the end).
    neurons:      split every MLP into its neurons.
    top_k:        components drawn in colour and labelled in the figure and the W&B line plot.
    max_batch:    most copies per forward (null: all in one).
    """

    prompt: str = "I hate you because"
    vector: VectorConfig = field(default_factory=VectorConfig)
    coefficients: CoefficientsConfig = field(default_factory=CoefficientsConfig)
    logit_tokens: List[str] = field(default_factory=lambda: [" love", " hate"])
    position: int = -1
    neurons: bool = False
    top_k: int = 8
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    max_batch: Optional[int] = None


@dataclass
class ScanConfig:
    """Root of ``python -m residual_dynamics.scan`` (conf/scan.yaml)."""

    model: PretrainedSpec = MISSING
    checkpoint: Optional[str] = None
    scan: ScanSettings = MISSING
    logger: LoggerConfig = MISSING
    run_name: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


def register() -> None:
    ConfigStore.instance().store(name="scan_schema", node=ScanConfig)


register()


@dataclass(frozen=True)
class ScanRunSpec:
    """Everything the scan needs, validated. ``checkpoint`` set: a trained run's .ckpt (``model`` unused)."""

    model: Optional[PretrainedSpec]
    checkpoint: Optional[Path]
    settings: ScanSettings
    logger: LoggerConfig
    run_name: str
    run_dir: Path
    cache_dir: Path
    config: dict


def _int(value: Any, name: str, minimum: int, optional: bool = False, why: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}{' or null' if optional else ''}"
                                f"{f' ({why})' if why else ''}, got {value!r}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _two_strings(value: Any, name: str, what: str) -> list[str]:
    items = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else None
    if items is None or len(items) != 2 or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(name, f"must be two non-empty strings ({what}), got {value!r}")
    if items[0] == items[1]:
        raise ConfigError(name, f"the two strings must differ, got {value!r}")
    return items


def validate_settings(settings: ScanSettings, prefix: str = "scan") -> ScanSettings:
    """Check every field that needs no model; returns ``settings``."""
    if not isinstance(settings.prompt, str) or not settings.prompt.strip():
        raise ConfigError(f"{prefix}.prompt", f"must be a non-empty string, got {settings.prompt!r}")
    vector = settings.vector
    if vector.file is None:
        _two_strings(vector.prompts, f"{prefix}.vector.prompts", "the positive and the negative prompt")
    else:
        path = Path(vector.file).expanduser()
        if path.suffix not in VECTOR_SUFFIXES:
            raise ConfigError(f"{prefix}.vector.file", f"{path} must be a .pt or .npy file")
        if not path.is_file():
            raise ConfigError(f"{prefix}.vector.file", f"file {path} does not exist")
    _int(vector.layer, f"{prefix}.vector.layer", 0, optional=True)
    if vector.positions not in POSITIONS:
        raise ConfigError(f"{prefix}.vector.positions", f"must be one of {list(POSITIONS)}, got {vector.positions!r}")
    coefficients = settings.coefficients
    start = _number(coefficients.start, f"{prefix}.coefficients.start")
    stop = _number(coefficients.stop, f"{prefix}.coefficients.stop")
    _int(coefficients.n, f"{prefix}.coefficients.n", 2, why="an empty coefficient range has nothing to scan")
    if not start < stop:
        raise ConfigError(f"{prefix}.coefficients.stop", f"the coefficient range [{start}, {stop}] is empty: "
                                                         f"stop must be > start")
    _two_strings(settings.logit_tokens, f"{prefix}.logit_tokens", "the tokens of the logit difference")
    if isinstance(settings.position, bool) or not isinstance(settings.position, int):
        raise ConfigError(f"{prefix}.position", f"must be an integer, got {settings.position!r}")
    if not isinstance(settings.neurons, bool):
        raise ConfigError(f"{prefix}.neurons", f"must be true or false, got {settings.neurons!r}")
    _int(settings.top_k, f"{prefix}.top_k", 1)
    _int(settings.max_batch, f"{prefix}.max_batch", 1, optional=True)
    clustering = settings.clustering
    if clustering.method not in METHODS:
        raise ConfigError(f"{prefix}.clustering.method", f"must be one of {list(METHODS)}, got {clustering.method!r}")
    _int(clustering.n_clusters, f"{prefix}.clustering.n_clusters", 1)
    min_range = _number(clustering.min_range, f"{prefix}.clustering.min_range")
    if not 0 <= min_range < 1:
        raise ConfigError(f"{prefix}.clustering.min_range", f"must be in [0, 1), got {clustering.min_range!r}")
    _int(clustering.seed, f"{prefix}.clustering.seed", 0)
    return settings


def parse_scan(cfg: DictConfig) -> ScanRunSpec:
    """Parse and validate the scan config once, before anything is loaded."""
    raw: ScanConfig = _to_object(cfg, ScanConfig)
    checkpoint = None
    model = None
    if raw.checkpoint is not None:
        checkpoint = Path(raw.checkpoint).expanduser()
        if not checkpoint.is_file():
            raise ConfigError("checkpoint", f"file {checkpoint} does not exist")
        if checkpoint.suffix != ".ckpt":
            raise ConfigError("checkpoint", f"{checkpoint} is not a Lightning .ckpt file")
    else:
        model = raw.model.validated()
    settings = validate_settings(raw.scan)
    logger = raw.logger.validated()
    if not raw.run_name or "/" in raw.run_name:
        raise ConfigError("run_name", f"must be a non-empty name without '/', got {raw.run_name!r}")
    return ScanRunSpec(model=model, checkpoint=checkpoint, settings=settings, logger=logger, run_name=raw.run_name,
                       run_dir=Path(raw.paths.run_dir), cache_dir=Path(raw.paths.cache_dir).expanduser(),
                       config=OmegaConf.to_container(cfg, resolve=True))


@dataclass(frozen=True)
class Resolved:
    """The settings turned into what the scan function takes, for one model and tokenizer."""

    layer: int
    logit_tokens: tuple[int, int]
    prompt_tokens: list[int]
    vector_tokens: Optional[tuple[list[int], list[int]]]  # (positive, negative) ids, when from prompts
    pad_id: Optional[int]  # the space token ActAdd pads with


def single_token(tokenizer, text: str, name: str) -> int:
    """The id of ``text`` if it is exactly one token of ``tokenizer``, else a ConfigError naming ``name``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(name, f"{text!r} is {len(ids)} tokens {pieces} in this model's tokenizer, not one; "
                                "give strings that are one token each (often with a leading space, e.g. ' good')")
    return int(ids[0])


def check_against_model(settings: ScanSettings, n_layers: int, tokenizer, prepend_bos: bool, n_ctx: int,
                        prefix: str = "scan") -> Resolved:
    """Check the settings that need the model (its depth, tokenizer and context); no forward runs."""
    layer = n_layers // 4 if settings.vector.layer is None else settings.vector.layer
    if not 0 <= layer < n_layers:
        raise ConfigError(f"{prefix}.vector.layer", f"{layer} is out of range: this model has {n_layers} layers "
                                                    f"(0..{n_layers - 1})")
    t1, t2 = (single_token(tokenizer, text, f"{prefix}.logit_tokens") for text in settings.logit_tokens)
    bos = [tokenizer.bos_token_id] if prepend_bos else []
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ConfigError("model.prepend_bos", "the tokenizer has no BOS token to prepend")
    prompt = bos + tokenizer(settings.prompt, add_special_tokens=False)["input_ids"]
    if len(prompt) > n_ctx:
        raise ConfigError(f"{prefix}.prompt", f"is {len(prompt)} tokens, longer than the model's context {n_ctx}")
    position = settings.position
    if not -len(prompt) <= position < len(prompt):
        raise ConfigError(f"{prefix}.position", f"{position} is outside the prompt of {len(prompt)} tokens")
    vector_tokens = pad_id = None
    if settings.vector.file is None:
        positive, negative = (bos + tokenizer(text, add_special_tokens=False)["input_ids"]
                              for text in settings.vector.prompts)
        if len(positive) != len(negative):
            pad_id = single_token(tokenizer, " ", f"{prefix}.vector.prompts")
        n_rows = max(len(positive), len(negative))
        vector_tokens = (positive, negative)
        if settings.vector.positions == "front" and n_rows > len(prompt):
            raise ConfigError(f"{prefix}.vector.prompts", f"the steering prompts are {n_rows} tokens, longer than "
                                                          f"the prompt ({len(prompt)}): ActAdd adds them at its front")
        if settings.vector.positions == "all" and n_rows != 1:
            raise ConfigError(f"{prefix}.vector.positions", f"'all' adds a one-row vector at every position, but "
                                                            f"the steering prompts are {n_rows} tokens; use front")
    return Resolved(layer=layer, logit_tokens=(t1, t2), prompt_tokens=prompt, vector_tokens=vector_tokens,
                    pad_id=pad_id)


def load_vector(path: Path, d_model: int, name: str = "scan.vector.file"):
    """A saved steering vector as a float tensor [n, d_model]: ``.pt`` with ``weights_only=True``, ``.npy``
    with ``allow_pickle=False`` (no code from the file runs). A bad file raises DataError naming it."""
    import numpy as np
    import torch

    from residual_dynamics.errors import DataError

    try:
        if path.suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            value = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise DataError(f"{path}: not a readable vector file ({name}; {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DataError(f"{path}: expected a floating-point tensor ({name}), got {type(value).__name__}"
                        f"{'' if not isinstance(value, torch.Tensor) else ' of dtype ' + str(value.dtype)}")
    vector = value.reshape(1, -1) if value.dim() == 1 else value
    if vector.dim() != 2 or vector.shape[-1] != d_model:
        raise DataError(f"{path}: expected a vector of shape [d_model={d_model}] or [n, {d_model}] ({name}), "
                        f"got {tuple(value.shape)}")
    if not torch.isfinite(vector).all():
        raise DataError(f"{path}: the vector has non-finite entries ({name})")
    return vector.float()
