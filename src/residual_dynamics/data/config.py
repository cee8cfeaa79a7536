"""Parsing and validation of the ``data`` and ``tokenizer`` config groups, before any compute.

Each group is parsed into a frozen dataclass; every bad value raises :class:`ConfigError` naming the
dotted field (``data.path``, ``tokenizer.vocab_size``, ...). The defaults below mirror
``conf/data/*.yaml`` and ``conf/tokenizer/*.yaml`` so that plain dicts with only the fields that matter
(as in tests) work too.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from residual_dynamics.errors import ConfigError

DATA_NAMES = ("embedded", "text_files", "openwebtext")
TOKENIZER_NAMES = ("bpe", "gpt2")
SHARD_DTYPES = ("auto", "uint16", "uint32")
TEXT_SUFFIXES = (".txt", ".jsonl")
UINT16_MAX_VOCAB = 65536
BYTE_LEVEL_ALPHABET = 256
"""A byte-level BPE vocabulary holds at least the 256 byte symbols, plus the end-of-text token."""


def to_plain_dict(cfg: Any, group: str) -> dict:
    """A DictConfig (resolved) or mapping as a plain dict; anything else is a ConfigError on ``group``."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(group, f"expected a mapping, got {type(cfg).__name__}")


def _check_fields(cfg: dict, group: str, known: set[str]) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")


def _int_field(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def local_parquet_files(patterns: tuple[str, ...]) -> list[str]:
    """The sorted local files matched by the non-remote ``patterns`` (remote ones are left out)."""
    return sorted({f for p in patterns if not _is_remote(p) for f in glob.glob(p, recursive=True)})


@dataclass
class DataSettings:
    """The ``data`` config group (a Hydra structured config: conf/data/*.yaml are its instances).

    Common: ``name`` (one of :data:`DATA_NAMES`), ``val_fraction`` (share of documents held out: every
    ``round(1 / val_fraction)``-th document, the first included), ``val_batches``, ``shard_dtype``.
    ``seq_len``, ``batch_size`` and ``num_workers`` shape the batches of
    :class:`~residual_dynamics.data.datamodule.TokenDataModule`.
    text_files: ``path`` (directory), ``pattern`` (glob below it), ``text_field`` (jsonl key).
    openwebtext: ``dataset`` (hub name), ``data_files`` (Parquet paths or globs, local or ``hf://``;
    None means the hub's Parquet conversion of ``dataset``), ``max_documents``, ``text_field``.
    """

    name: str = "embedded"
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.05
    val_batches: int = 8
    shard_dtype: str = "auto"
    num_workers: int = 0
    path: Optional[str] = None
    pattern: str = "**/*"
    text_field: str = "text"
    dataset: str = "Skylion007/openwebtext"
    data_files: Any = None  # a path, glob or list of them (str or list)
    max_documents: Optional[int] = None

    @property
    def val_period(self) -> int:
        """Every ``val_period``-th document (indices 0, val_period, 2 * val_period, ...) is held out."""
        return round(1 / self.val_fraction)

    @classmethod
    def from_cfg(cls, data_cfg: Any) -> "DataSettings":
        cfg = to_plain_dict(data_cfg, "data")
        _check_fields(cfg, "data", {f.name for f in fields(cls)})
        s = cls(**cfg)
        if s.name not in DATA_NAMES:
            raise ConfigError("data.name", f"unknown data source {s.name!r} (known: {', '.join(DATA_NAMES)})")
        _int_field(s.seq_len, "data.seq_len", 1)
        _int_field(s.batch_size, "data.batch_size", 1)
        _int_field(s.val_batches, "data.val_batches", 1)
        _int_field(s.num_workers, "data.num_workers", 0)
        if isinstance(s.val_fraction, bool) or not isinstance(s.val_fraction, (int, float)) or not (
            0 < s.val_fraction <= 0.5
        ):
            raise ConfigError("data.val_fraction", f"must be in (0, 0.5], got {s.val_fraction!r}")
        if s.shard_dtype not in SHARD_DTYPES:
            raise ConfigError("data.shard_dtype", f"must be one of {', '.join(SHARD_DTYPES)}, got {s.shard_dtype!r}")
        if not isinstance(s.text_field, str) or not s.text_field:
            raise ConfigError("data.text_field", f"must be a non-empty string, got {s.text_field!r}")
        if s.name == "text_files":
            s = s._checked_text_files()
        if s.name == "openwebtext":
            s = s._checked_openwebtext()
        return s

    def _checked_text_files(self) -> "DataSettings":
        if not self.path:
            raise ConfigError("data.path", "required for data=text_files: a directory of .txt or .jsonl files")
        root = Path(os.path.expanduser(str(self.path))).resolve()
        if root.is_file():
            raise ConfigError(
                "data.path", f"{str(root)!r} is a file; data=text_files reads the .txt / .jsonl files below a "
                f"directory: use data.path={str(root.parent)!r} data.pattern={root.name!r}"
            )
        if not root.is_dir():
            raise ConfigError("data.path", f"directory {str(root)!r} does not exist")
        if not text_files(root, self.pattern):
            raise ConfigError(
                "data.path", f"no .txt or .jsonl files matching data.pattern={self.pattern!r} in {str(root)!r}"
            )
        return replace(self, path=str(root))

    def _checked_openwebtext(self) -> "DataSettings":
        if self.max_documents is not None:
            _int_field(self.max_documents, "data.max_documents", 1)
        if self.data_files is None:
            if not isinstance(self.dataset, str) or self.dataset.count("/") != 1:
                raise ConfigError("data.dataset", f"must be a hub dataset name 'owner/name', got {self.dataset!r}")
            return replace(self, data_files=(f"hf://datasets/{self.dataset}@refs/convert/parquet/*/*train/*.parquet",))
        patterns = (self.data_files,) if isinstance(self.data_files, str) else tuple(self.data_files)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError("data.data_files", f"must be a path, glob or list of them, got {self.data_files!r}")
        patterns = tuple(p if _is_remote(p) else str(Path(os.path.expanduser(p)).absolute()) for p in patterns)
        for p in patterns:
            if not _is_remote(p) and not glob.glob(p, recursive=True):
                raise ConfigError("data.data_files", f"no file matches {p!r}")
        return replace(self, data_files=patterns)


def text_files(root: Path, pattern: str) -> list[Path]:
    """The sorted ``.txt`` / ``.jsonl`` files below ``root`` that match ``pattern``."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix in TEXT_SUFFIXES)


@dataclass
class TokenizerSettings:
    """The ``tokenizer`` config group: ``name`` (bpe | gpt2), ``vocab_size`` (bpe), ``path`` (gpt2)."""

    name: str = "bpe"
    vocab_size: int = 4096
    path: str = "gpt2"

    @classmethod
    def from_cfg(cls, tokenizer_cfg: Any) -> "TokenizerSettings":
        cfg = to_plain_dict(tokenizer_cfg, "tokenizer")
        _check_fields(cfg, "tokenizer", {f.name for f in fields(cls)})
        s = cls(**cfg)
        if s.name not in TOKENIZER_NAMES:
            raise ConfigError(
                "tokenizer.name", f"unknown tokenizer {s.name!r} (known: {', '.join(TOKENIZER_NAMES)})"
            )
        if s.name == "bpe":
            _int_field(s.vocab_size, "tokenizer.vocab_size", BYTE_LEVEL_ALPHABET + 1)
        if s.name == "gpt2":
            if not isinstance(s.path, str) or not s.path:
                raise ConfigError("tokenizer.path", f"must be a hub name or a local directory, got {s.path!r}")
            looks_local = s.path.startswith(("/", "./", "../", "~"))
            if looks_local and not Path(os.path.expanduser(s.path)).is_dir():
                raise ConfigError("tokenizer.path", f"local tokenizer directory {s.path!r} does not exist")
        return s


def validate_data_config(data_cfg: Any, tokenizer_cfg: Any, seq_len: int) -> tuple[DataSettings, TokenizerSettings]:
    """Check the data and tokenizer config without compute; raise ConfigError naming the bad field.

    Returns the parsed settings. The shard dtype is checked against the vocabulary size where that is
    known from the config alone (``tokenizer=bpe``); for ``tokenizer=gpt2`` it is checked once loaded.
    """
    data = DataSettings.from_cfg(data_cfg)
    tokenizer = TokenizerSettings.from_cfg(tokenizer_cfg)
    _int_field(seq_len, "data.seq_len", 1)
    if data.shard_dtype == "uint16" and tokenizer.name == "bpe" and tokenizer.vocab_size > UINT16_MAX_VOCAB:
        raise ConfigError(
            "data.shard_dtype",
            f"uint16 holds at most {UINT16_MAX_VOCAB} token ids, tokenizer.vocab_size is {tokenizer.vocab_size}; "
            "use auto or uint32",
        )
    return data, tokenizer
