"""The hypothesis spec (``conf/analysis/<name>.yaml``) and the root config of ``python -m residual_dynamics.analyze``.

:class:`HypothesisSpec` is a Hydra structured config: each YAML file in ``conf/analysis/`` is an instance, so
unknown keys and wrongly typed values are rejected when Hydra composes. :func:`validate` then checks what a
type cannot (``test`` one of trend/scaling/compare, ``at`` forms, a trend's expected sign ...) before any data
are read, raising :class:`~residual_dynamics.errors.ConfigError` named after the field, e.g.
``analysis.test: must be one of trend, scaling, compare, got 'foo'``.

Fields of a hypothesis
----------------------
name        its name (the output folder ``<first input>/analysis/<name>/``).
test        ``trend`` (is y monotone in x?), ``scaling`` (y = a x^b or a e^(b x)) or ``compare``
            (categorical ``factors``: cell means and differences between levels).
x           a config field (dotted, as in ``.hydra/config.yaml``: ``model.n_heads``); trend and scaling.
factors     config fields (compare), e.g. ``[model.normalization_type, optim.decay_norm_params]``.
y           a metric name of the results file (``growth_rate``, ``horizon/k_eff``, ``resid_norm/resid_post``;
            ``<probe>/<name>`` or the W&B key ``probe/<name>`` also work).
reduce      per-layer metrics: ``last | first | mean | max | min | sum | layer=<n>`` (required for them).
head_reduce per-head metrics: ``mean | max | min | sum | head=<n>`` (default mean).
statistic   a per-run statistic over training instead of a value at ``at``: ``argmax_step``,
            ``argmin_step``, ``argmax_tokens``, ``argmin_tokens``, ``max``, ``min``, ``mean``.
at          ``final`` | ``curve`` (the test at every step) | ``{step: N}`` | ``{tokens: T}`` |
            ``{last_fraction: f}`` (mean over the last fraction f of training); strings ``step=N``,
            ``tokens=T``, ``last_fraction=f`` work too.
unit        the replicate field (``seed``): bootstrap strata are x values, pairs in compare match on it.
expected    trend / scaling: ``+`` or ``-`` (the sign the hypothesis predicts); compare: ``differ``
            (default), or ``+`` / ``-`` for every level minus its baseline.
alpha, confidence   the test level and the CI level.
log_x       trend: regress y on log(x).
model       scaling: ``power`` (log-log OLS) or ``exp`` (log-linear OLS).
extrapolate_to      scaling: predict y at this x, with its CI.
baseline    compare: the reference level per factor (default: the first level in sorted order).
where       keep only runs whose config matches, e.g. ``{model.normalization_type: LN}``.
profile     the per-layer metric of the layer-profile figure (default: y when per-layer, else
            ``resid_norm/resid_post``).
n_resamples, permutations, rng_seed   bootstrap resamples, permutation resamples, their RNG seed.
include_incomplete  also analyse runs that stopped before trainer.max_steps (they are listed either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from residual_dynamics.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
TESTS = ("trend", "scaling", "compare")
REDUCES = ("last", "first", "mean", "max", "min", "sum")
HEAD_REDUCES = ("mean", "max", "min", "sum")
STATISTICS = ("argmax_step", "argmin_step", "argmax_tokens", "argmin_tokens", "max", "min", "mean")
SCALING_MODELS = ("power", "exp")
SOURCES = ("files", "wandb")
AT_KINDS = ("final", "curve", "step", "tokens", "last_fraction")
SIGNS = {"+": 1, "increasing": 1, "positive": 1, "-": -1, "decreasing": -1, "negative": -1,
         "differ": 0, "any": 0, "!=": 0}


@dataclass
class HypothesisSpec:
    """One hypothesis (``conf/analysis/<name>.yaml``); see the module doc for every field."""

    name: str = MISSING
    description: str = ""
    test: str = MISSING
    x: Optional[str] = None
    factors: list[str] = field(default_factory=list)
    y: str = MISSING
    reduce: Optional[str] = None
    head_reduce: str = "mean"
    statistic: Optional[str] = None
    at: Any = "final"
    unit: str = "seed"
    expected: Optional[str] = None
    alpha: float = 0.05
    confidence: float = 0.95
    log_x: bool = False
    model: str = "power"
    extrapolate_to: Optional[float] = None
    baseline: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)
    profile: Optional[str] = None
    n_resamples: int = 9999
    permutations: int = 9999
    rng_seed: int = 0
    include_incomplete: bool = False


@dataclass
class WandbSettings:
    """Where runs are read from (``source=wandb``) and where the analysis run goes."""

    log: bool = True                 # write the job_type=analysis W&B run
    project: str = "residual-dynamics"
    entity: Optional[str] = None
    group: Optional[str] = None      # null = the runs' logger.group (reading from the API: no group filter)
    mode: str = "auto"               # auto | online | offline | disabled (auto: online only with credentials)


@dataclass
class AnalyzeConfig:
    """Root config of ``python -m residual_dynamics.analyze`` (``conf/analyze.yaml``)."""

    analysis: HypothesisSpec = field(default_factory=HypothesisSpec)
    inputs: list[str] = field(default_factory=list)
    source: str = "files"            # files (run dirs) | wandb (W&B API online, offline run dirs otherwise)
    output_dir: Optional[str] = None  # null = <first input>/analysis/<analysis.name>
    wandb: WandbSettings = field(default_factory=WandbSettings)
    strict: bool = False             # a failed or incomplete run is an error instead of a line in the report
    progress: bool = True            # progress bar while loading runs
    figures: bool = True


def register() -> None:
    ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)


register()


# --------------------------------------------------------------------------- parsed forms


@dataclass(frozen=True)
class At:
    kind: str               # final | curve | step | tokens | last_fraction
    value: Optional[float] = None

    def label(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class Reduce:
    how: str                # last | first | mean | max | min | sum | index
    index: Optional[int] = None
    key: str = "layer"      # layer | head

    def label(self) -> str:
        return self.how if self.index is None else f"{self.key}={self.index}"


@dataclass(frozen=True)
class Hypothesis:
    """A validated :class:`HypothesisSpec` with its fields parsed."""

    name: str
    description: str
    test: str
    x: Optional[str]
    factors: tuple[str, ...]
    y: str
    reduce: Optional[Reduce]
    head_reduce: Reduce
    statistic: Optional[str]
    at: At
    unit: str
    sign: Optional[int]
    alpha: float
    confidence: float
    log_x: bool
    model: str
    extrapolate_to: Optional[float]
    baseline: Mapping[str, Any]
    where: Mapping[str, Any]
    profile: Optional[str]
    n_resamples: int
    permutations: int
    rng_seed: int
    include_incomplete: bool

    @property
    def y_label(self) -> str:
        label = self.y
        if self.reduce is not None:
            label += f" [{self.reduce.label()}]" if self.reduce.index is not None else f" [{self.reduce.how} over layers]"
        if self.statistic:
            label = f"{self.statistic}({label})"
        return label

    @property
    def needs_x(self) -> bool:
        return self.test in ("trend", "scaling")


# --------------------------------------------------------------------------- validation


def _parse_at(value: Any) -> At:
    f = "analysis.at"
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        text = value.strip()
        if text in ("final", "curve"):
            return At(text)
        if "=" in text:
            key, _, number = text.partition("=")
            value = {key.strip(): number.strip()}
        else:
            raise ConfigError(f, f"must be final, curve, step=N, tokens=T or last_fraction=f, got {value!r}")
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ConfigError(f, f"a mapping must have exactly one of step, tokens, last_fraction, got {value}")
        (key, number), = value.items()
        if key not in ("step", "tokens", "last_fraction"):
            raise ConfigError(f, f"unknown key {key!r}: use step, tokens or last_fraction")
        try:
            number = float(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{f}.{key}", f"must be a number, got {number!r}") from None
        if key == "last_fraction" and not 0 < number <= 1:
            raise ConfigError(f"{f}.last_fraction", f"must be in (0, 1], got {number}")
        if key != "last_fraction" and number < 0:
            raise ConfigError(f"{f}.{key}", f"must be >= 0, got {number}")
        return At(key, number)
    raise ConfigError(f, f"must be final, curve, step=N, tokens=T or last_fraction=f, got {value!r}")


def _parse_reduce(value: Optional[str], field_name: str, allowed: Sequence[str], index_key: str) -> Optional[Reduce]:
    if value is None:
        return None
    text = str(value).strip()
    if text in allowed:
        return Reduce(text)
    if text.startswith(index_key + "="):
        number = text[len(index_key) + 1:]
        if number.lstrip("-").isdigit():
            return Reduce("index", int(number), index_key)
    raise ConfigError(field_name, f"must be one of {', '.join(allowed)} or {index_key}=<n>, got {value!r}")


def validate(spec: HypothesisSpec | DictConfig | Mapping[str, Any]) -> Hypothesis:
    """Check a hypothesis spec field by field (no data are read). Returns the parsed :class:`Hypothesis`."""
    if not isinstance(spec, HypothesisSpec):
        base = OmegaConf.structured(HypothesisSpec)
        try:
            spec = OmegaConf.to_object(OmegaConf.merge(base, spec))
        except Exception as exc:  # omegaconf validation / missing values
            key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
            raise ConfigError(f"analysis.{key}", str(exc).splitlines()[0]) from None
    for name in ("name", "test", "y"):
        value = getattr(spec, name)
        if value is MISSING or value in (None, "", "???"):
            raise ConfigError(f"analysis.{name}", "is required")
    if spec.test not in TESTS:
        raise ConfigError("analysis.test", f"must be one of {', '.join(TESTS)}, got {spec.test!r}")
    factors = tuple(spec.factors or ())
    if spec.test in ("trend", "scaling"):
        if not spec.x:
            raise ConfigError("analysis.x", f"is required by test={spec.test} (a config field, e.g. model.n_heads)")
        if factors:
            raise ConfigError("analysis.factors", f"is for test=compare; test={spec.test} uses analysis.x")
    else:
        if not factors:
            raise ConfigError("analysis.factors", "test=compare needs at least one categorical config field")
        if len(set(factors)) != len(factors):
            raise ConfigError("analysis.factors", f"lists a field twice: {list(factors)}")
        if spec.x:
            raise ConfigError("analysis.x", "test=compare uses analysis.factors, not x")
    if spec.statistic is not None and spec.statistic not in STATISTICS:
        raise ConfigError("analysis.statistic", f"must be null or one of {', '.join(STATISTICS)}, "
                                                f"got {spec.statistic!r}")
    at = _parse_at(spec.at)
    if spec.statistic is not None and at.kind != "final":
        raise ConfigError("analysis.at", f"statistic={spec.statistic} summarises the whole training run; "
                                         f"at must stay final, got {at.label()}")
    if at.kind == "curve" and spec.test == "compare":
        raise ConfigError("analysis.at", "curve (a test at every step) is for trend and scaling; compare takes "
                                         "final, step=N, tokens=T or last_fraction=f")
    reduce = _parse_reduce(spec.reduce, "analysis.reduce", REDUCES, "layer")
    head_reduce = _parse_reduce(spec.head_reduce, "analysis.head_reduce", HEAD_REDUCES, "head")
    if head_reduce is None:
        raise ConfigError("analysis.head_reduce", f"must be one of {', '.join(HEAD_REDUCES)} or head=<n>")
    sign = None
    if spec.expected is not None:
        if str(spec.expected) not in SIGNS:
            raise ConfigError("analysis.expected", f"must be one of {', '.join(SIGNS)}, got {spec.expected!r}")
        sign = SIGNS[str(spec.expected)]
    if spec.test == "trend" and sign in (None, 0):
        raise ConfigError("analysis.expected", "test=trend needs the expected sign of the trend: + or -")
    if spec.test == "scaling" and sign == 0:
        raise ConfigError("analysis.expected", "test=scaling takes + or - (the sign of the exponent) or null")
    if spec.test == "compare" and sign is None:
        sign = 0
    if not 0 < spec.alpha < 1:
        raise ConfigError("analysis.alpha", f"must be in (0, 1), got {spec.alpha}")
    if not 0 < spec.confidence < 1:
        raise ConfigError("analysis.confidence", f"must be in (0, 1), got {spec.confidence}")
    if spec.model not in SCALING_MODELS:
        raise ConfigError("analysis.model", f"must be one of {', '.join(SCALING_MODELS)}, got {spec.model!r}")
    if spec.extrapolate_to is not None:
        if spec.test != "scaling":
            raise ConfigError("analysis.extrapolate_to", "only test=scaling extrapolates")
        if not math.isfinite(spec.extrapolate_to) or (spec.model == "power" and spec.extrapolate_to <= 0):
            raise ConfigError("analysis.extrapolate_to", f"must be a finite x (> 0 for a power law), "
                                                         f"got {spec.extrapolate_to}")
    if spec.log_x and spec.test != "trend":
        raise ConfigError("analysis.log_x", "is a trend option (scaling chooses the model with analysis.model)")
    if spec.n_resamples < 99:
        raise ConfigError("analysis.n_resamples", f"must be >= 99, got {spec.n_resamples}")
    if spec.permutations < 99:
        raise ConfigError("analysis.permutations", f"must be >= 99, got {spec.permutations}")
    if not spec.unit:
        raise ConfigError("analysis.unit", "is required (the replicate field, normally seed)")
    for key in spec.baseline:
        if key not in factors:
            raise ConfigError(f"analysis.baseline.{key}", f"is not one of the factors {list(factors)}")
    return Hypothesis(
        name=str(spec.name), description=str(spec.description or ""), test=spec.test, x=spec.x, factors=factors,
        y=str(spec.y), reduce=reduce, head_reduce=head_reduce, statistic=spec.statistic, at=at, unit=spec.unit,
        sign=sign, alpha=float(spec.alpha), confidence=float(spec.confidence), log_x=bool(spec.log_x),
        model=spec.model, extrapolate_to=spec.extrapolate_to, baseline=dict(spec.baseline),
        where=dict(spec.where), profile=spec.profile, n_resamples=int(spec.n_resamples),
        permutations=int(spec.permutations), rng_seed=int(spec.rng_seed),
        include_incomplete=bool(spec.include_incomplete))


def validate_root(cfg: AnalyzeConfig) -> None:
    if cfg.source not in SOURCES:
        raise ConfigError("source", f"must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
    if cfg.source == "files" and not cfg.inputs:
        raise ConfigError("inputs", "no run directories given: inputs=[outputs/multirun/<timestamp>, ...]")
    if cfg.wandb.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError("wandb.mode", f"must be one of auto, online, offline, disabled, got {cfg.wandb.mode!r}")


# --------------------------------------------------------------------------- loading without Hydra's compose


def hypothesis_file(name: str) -> Path:
    """``conf/analysis/<name>.yaml``, or ``name`` itself when it is a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = CONF_DIR / "analysis" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "analysis").glob("*.yaml"))
        raise ConfigError("analysis", f"no hypothesis {name!r}: known are {', '.join(known)} "
                                      f"(files in {CONF_DIR / 'analysis'}), or give a path to a YAML file")
    return path


def load_config(hypothesis: str, inputs: Sequence[str] = (), overrides: Sequence[str] = (),
                **fields: Any) -> AnalyzeConfig:
    """The root config as ``python -m residual_dynamics.analyze analysis=<hypothesis> inputs=[...]`` would
    compose it, without Hydra's compose API (usable inside a running Hydra app, e.g. a callback).
    ``overrides`` are dotlist strings (``analysis.alpha=0.01``); ``fields`` set root fields directly."""
    cfg = OmegaConf.structured(AnalyzeConfig)
    root = OmegaConf.load(CONF_DIR / "analyze.yaml")
    for key in ("defaults", "hydra"):
        root.pop(key, None)
    hyp = OmegaConf.load(hypothesis_file(hypothesis))
    try:
        cfg = OmegaConf.merge(cfg, root, {"analysis": hyp})
        if inputs:
            cfg.inputs = [str(p) for p in inputs]
        for key, value in fields.items():
            OmegaConf.update(cfg, key, value, merge=isinstance(value, Mapping))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from None
    return OmegaConf.to_object(cfg)
