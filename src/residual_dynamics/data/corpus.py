"""Text corpora: an ordered stream of documents plus a stable identity that keys every cache.

Sources (``data.name``):

* ``embedded``: the docstrings of the Python standard library (one document per module, in sorted
  path order, read with ``ast`` so nothing is imported) followed by the ``pydoc_data.topics`` help
  pages (one document per topic, sorted). About 2.2 MB of English on every Python install, no network.
  Extracted once and cached under ``<cache_dir>/corpus/``.
* ``text_files``: every ``.txt`` file (one document) and ``.jsonl`` line (one document, the
  ``data.text_field`` value) matching ``data.pattern`` below ``data.path``, in sorted path order.
* ``openwebtext``: Parquet files read by :func:`iter_parquet_documents` (``datasets``, streaming), by
  default the hub's Parquet conversion of ``Skylion007/openwebtext``; ``data.data_files`` may point at
  local Parquet files instead, which go through the same function.

The held-out split is by documents: document ``i`` (counting non-empty documents only) is held out
when ``i % val_period == 0`` (see :attr:`DataSettings.val_period`), so the split is spread evenly over
the corpus, deterministic, and decided while streaming.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from residual_dynamics.data.cache import atomic_write_bytes, build_lock, remove_stale_temporaries, stable_hash
from residual_dynamics.data.config import DataSettings, local_parquet_files, text_files
from residual_dynamics.errors import DataError

log = logging.getLogger(__name__)

_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "__pycache__"}
_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Corpus:
    """An ordered, re-readable stream of documents.

    ``identity`` is a JSON-serialisable description of the exact content (a checksum, or file names,
    sizes and modification times); its hash :attr:`key` keys the tokenizer and shard caches.
    ``location`` says in config terms where the documents come from (``data.path=...``), for errors.
    """

    name: str
    identity: dict
    read: Callable[[], Iterable[str]]
    location: str = ""

    @property
    def key(self) -> str:
        return stable_hash(self.identity)

    def documents(self) -> Iterator[str]:
        """The non-empty documents, in order."""
        for doc in self.read():
            if doc and not doc.isspace():
                yield doc

    def split_documents(self, val_period: int) -> Iterator[tuple[bool, str]]:
        """``(is_val, document)`` pairs: every ``val_period``-th document, the first included, is held out."""
        for i, doc in enumerate(self.documents()):
            yield i % val_period == 0, doc

    def train_documents(self, val_period: int) -> Iterator[str]:
        return (doc for is_val, doc in self.split_documents(val_period) if not is_val)


def open_corpus(data: DataSettings, cache_dir: Path) -> Corpus:
    """The corpus named by validated settings (see :meth:`DataSettings.from_cfg`)."""
    if data.name == "embedded":
        return embedded_corpus(Path(cache_dir))
    if data.name == "text_files":
        return text_files_corpus(Path(data.path), data.pattern, data.text_field)
    return parquet_corpus(data.data_files, data.text_field, data.max_documents)


# --- embedded: Python standard library docstrings + pydoc topics --------------------------------------


def stdlib_documents() -> list[str]:
    """One document per standard-library module (its docstrings in source order), then the pydoc topics."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [doc for doc in (_module_docstrings(path) for path in _stdlib_sources(root)) if doc]
    topics = pydoc_data.topics.topics
    return docs + [topics[name] for name in sorted(topics)]


def _stdlib_sources(root: Path) -> list[Path]:
    """Sorted ``.py`` files of the standard library proper (no tests, no site-packages)."""
    sources = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        top = parts[0].removesuffix(".py")
        if top in sys.stdlib_module_names and not _SKIPPED_STDLIB_DIRS.intersection(parts):
            sources.append(path)
    return sorted(sources, key=lambda p: p.relative_to(root).as_posix())


def _module_docstrings(path: Path) -> str:
    """The docstrings of a module, its classes and functions, in source order, joined by blank lines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return ""
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DEFINITIONS)), key=lambda n: getattr(n, "lineno", 0))
    return "\n\n".join(doc for doc in (ast.get_docstring(n) for n in nodes) if doc)


def _docs_checksum(docs: list[str]) -> str:
    return hashlib.sha256(json.dumps(docs).encode()).hexdigest()


def embedded_corpus(cache_dir: Path) -> Corpus:
    """The standard-library corpus, extracted once per Python install and cached as checksummed JSON."""
    install = {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}
    path = cache_dir / "corpus" / f"embedded-{stable_hash(install)}.json"
    docs, checksum = _load_embedded(path, quiet=True)
    if docs is None:
        with build_lock(path):  # one process extracts, the others wait and read it
            docs, checksum = _load_embedded(path)
            if docs is None:
                remove_stale_temporaries(path.parent, prefix=f".{path.name}.")
                log.info("extracting the embedded corpus (standard-library docstrings) to %s", path)
                docs = stdlib_documents()
                checksum = _docs_checksum(docs)
                atomic_write_bytes(path, json.dumps({"sha256": checksum, "documents": docs}).encode())
    return Corpus("embedded", {"name": "embedded", "sha256": checksum}, lambda: iter(docs),
                  location="data=embedded: the standard-library docstrings")


def _load_embedded(path: Path, quiet: bool = False) -> tuple[list[str] | None, str | None]:
    """The cached documents and their checksum, or (None, None) when missing or corrupt (with a warning
    unless ``quiet``)."""
    if not path.exists():
        return None, None
    try:
        cached = json.loads(path.read_bytes())
        docs, checksum = cached["documents"], cached["sha256"]
        if _docs_checksum(docs) == checksum:
            return docs, checksum
    except (ValueError, KeyError, TypeError):
        pass
    if not quiet:
        log.warning("embedded corpus cache %s is corrupt; extracting it again", path)
    return None, None


# --- text_files: a directory of .txt / .jsonl --------------------------------------------------------


def text_files_corpus(root: Path, pattern: str, text_field: str) -> Corpus:
    files = text_files(root, pattern)
    identity = {
        "name": "text_files",
        "root": str(root),
        "text_field": text_field,
        "files": [[f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }

    def read() -> Iterator[str]:
        for f in files:
            if f.suffix == ".txt":
                yield _read_utf8(f)
            else:
                yield from _jsonl_texts(f, text_field)

    return Corpus("text_files", identity, read, location=f"data.path={root} data.pattern={pattern}")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from e


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{lineno}: no string field {text_field!r} (set data.text_field)")
        yield record[text_field]


# --- openwebtext: Parquet through `datasets` ---------------------------------------------------------


def parquet_corpus(data_files: tuple[str, ...], text_field: str, max_documents: int | None) -> Corpus:
    identity = {
        "name": "parquet",
        "data_files": list(data_files),
        "local_files": [
            [f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in local_parquet_files(data_files)
        ],
        "text_field": text_field,
        "max_documents": max_documents,
    }
    return Corpus("openwebtext", identity, lambda: iter_parquet_documents(data_files, text_field, max_documents),
                  location=f"data.data_files={list(data_files)}")


def iter_parquet_documents(data_files: Iterable[str], text_field: str, max_documents: int | None) -> Iterator[str]:
    """Stream the ``text_field`` column of Parquet files (local paths/globs or ``hf://`` URLs).

    Uses ``datasets.load_dataset("parquet", ..., streaming=True)``: nothing is downloaded ahead, and at
    most ``max_documents`` rows (None: all) are read. Null texts are skipped by :meth:`Corpus.documents`.
    """
    from datasets import load_dataset

    data_files = list(data_files)
    try:
        ds = load_dataset("parquet", data_files=data_files, split="train", streaming=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open Parquet files {data_files}: {e}") from e
    if ds.features is not None and text_field not in ds.features:
        raise DataError(f"Parquet files {data_files} have no column {text_field!r} (set data.text_field)")
    ds = ds.select_columns([text_field])
    if max_documents is not None:
        ds = ds.take(max_documents)
    for row in ds:
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"Parquet files {data_files}: column {text_field!r} holds {type(text).__name__}, not text")
        yield text
