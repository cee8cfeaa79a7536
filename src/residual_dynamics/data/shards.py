"""Packed token shards: the tokenized corpus as two flat memmap files, ``train.bin`` and ``val.bin``.

Each document is encoded without special tokens and followed by the end-of-text token, and the
documents of a split are concatenated in corpus order. Token ids are stored as uint16 while the
vocabulary fits (at most 65536 ids), else uint32 (``data.shard_dtype: auto``), or as configured.

Layout: ``<cache_dir>/shards/<key>/{train.bin,val.bin,manifest.json}``, where ``key`` hashes the corpus
identity, the tokenizer definition, the split and the dtype. Every file is written atomically and the
manifest, written last, records each shard's token count, byte size and sha256, and the fingerprint of
the tokenizer that made them (:func:`~residual_dynamics.data.tokenizer.tokenizer_fingerprint`, also
stored in every checkpoint, so a resume with another tokenizer is refused). On load all of these are
checked; a missing, truncated or corrupted shard (or manifest) is logged as a warning and rebuilt.

Building an entry holds its :func:`~residual_dynamics.data.cache.build_lock`: of several processes that
need the same shards (DDP ranks, sweep jobs on one cache) one builds them and the others wait and load
them. The builder first removes the temporary files a killed build left there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerFast

from residual_dynamics.data.cache import (AtomicFile, atomic_write_bytes, build_lock, remove_stale_temporaries,
                                          sha256_file, stable_hash)
from residual_dynamics.data.config import UINT16_MAX_VOCAB
from residual_dynamics.data.corpus import Corpus
from residual_dynamics.data.tokenizer import document_encoder, tokenizer_fingerprint
from residual_dynamics.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest records the tokenizer fingerprint
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_ENCODE_BATCH = 256

T = TypeVar("T")


def resolve_shard_dtype(shard_dtype: str, vocab_size: int) -> np.dtype:
    """The storage dtype for ``data.shard_dtype`` (auto | uint16 | uint32) and a vocabulary size."""
    if shard_dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)
    if shard_dtype == "uint16" and vocab_size > UINT16_MAX_VOCAB:
        raise ConfigError(
            "data.shard_dtype",
            f"uint16 holds at most {UINT16_MAX_VOCAB} token ids, the tokenizer has {vocab_size}; use auto or uint32",
        )
    return np.dtype(shard_dtype)


@dataclass(frozen=True)
class TokenShards:
    """Verified shards on disk. ``n_tokens`` and ``n_documents`` are per split."""

    directory: Path
    dtype: np.dtype
    vocab_size: int
    eot_id: int
    n_tokens: dict[str, int]
    n_documents: dict[str, int]
    tokenizer_fingerprint: str = ""

    def path(self, split: str) -> Path:
        return self.directory / f"{split}.bin"

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, memory-mapped read-only."""
        return np.memmap(self.path(split), dtype=self.dtype, mode="r")


def build_or_load_shards(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, val_period: int, shard_dtype: str, cache_dir: Path
) -> TokenShards:
    """Load the cached shards for this corpus, tokenizer and split if they verify, else (re)build them."""
    vocab_size = len(tokenizer)
    dtype = resolve_shard_dtype(shard_dtype, vocab_size)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = stable_hash(
        {
            "format": FORMAT_VERSION,
            "corpus": corpus.identity,
            "tokenizer": fingerprint,
            "val_period": val_period,
            "dtype": dtype.name,
        }
    )
    directory = Path(cache_dir) / "shards" / key
    manifest = _load_manifest(directory, key, fingerprint, quiet=True)
    if manifest is None:
        with build_lock(directory):  # another process may be building the same shards: wait for it
            manifest = _load_manifest(directory, key, fingerprint)
            if manifest is None:
                remove_stale_temporaries(directory)
                manifest = _build(corpus, tokenizer, val_period, dtype, directory, key)
    return TokenShards(
        directory=directory,
        dtype=np.dtype(manifest["dtype"]),
        vocab_size=manifest["vocab_size"],
        eot_id=manifest["eot_id"],
        n_tokens={s: manifest["splits"][s]["n_tokens"] for s in SPLITS},
        n_documents={s: manifest["splits"][s]["n_documents"] for s in SPLITS},
        tokenizer_fingerprint=manifest["tokenizer_fingerprint"],
    )


def _load_manifest(directory: Path, key: str, fingerprint: str, quiet: bool = False) -> Optional[dict]:
    """The manifest if it and every shard it lists verify; None (with a warning if anything was there,
    unless ``quiet``: the check is repeated under the build lock) otherwise."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        problem = _manifest_problem(directory, manifest, key, fingerprint)
    except (ValueError, KeyError, TypeError) as e:
        problem = f"unreadable manifest: {e!r}"
    if problem is None:
        return manifest
    if not quiet:
        log.warning("token shard cache %s is invalid (%s); rebuilding it", directory, problem)
    return None


def _manifest_problem(directory: Path, manifest: dict, key: str, fingerprint: str) -> Optional[str]:
    """Why the manifest or a shard it lists does not verify, or None. Raises KeyError etc. on a malformed manifest."""
    if manifest["format"] != FORMAT_VERSION or manifest["key"] != key:
        return "manifest belongs to another format or key"
    if manifest["tokenizer_fingerprint"] != fingerprint:
        return (f"made with tokenizer {manifest['tokenizer_fingerprint'][:16]}..., the tokenizer now is "
                f"{fingerprint[:16]}...")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        entry = manifest["splits"][split]
        shard = directory / entry["file"]
        if not shard.exists():
            return f"{shard.name} is missing"
        size = shard.stat().st_size
        if size != entry["bytes"] or size != entry["n_tokens"] * itemsize:
            return f"{shard.name} has {size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(shard) != entry["sha256"]:
            return f"{shard.name} does not match its sha256 checksum"
    return None


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _build(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, val_period: int, dtype: np.dtype, directory: Path, key: str
) -> dict:
    log.info("tokenizing the %s corpus into %s", corpus.name, directory)
    encoder = document_encoder(tokenizer)
    eot = tokenizer.eos_token_id
    n_documents = {s: 0 for s in SPLITS}
    with AtomicFile(directory / "train.bin") as train, AtomicFile(directory / "val.bin") as val:
        files = {"train": train, "val": val}
        for batch in _batched(corpus.split_documents(val_period), _ENCODE_BATCH):
            ids: dict[str, list[int]] = {s: [] for s in SPLITS}
            encodings = encoder.encode_batch([doc for _, doc in batch], add_special_tokens=False)
            for (is_val, _), enc in zip(batch, encodings):
                split = "val" if is_val else "train"
                ids[split].extend(enc.ids)
                ids[split].append(eot)
                n_documents[split] += 1
            for split in SPLITS:
                files[split].write(np.array(ids[split], dtype=dtype).tobytes())
        if min(n_documents.values()) == 0:
            raise DataError(
                f"the {corpus.name} corpus ({corpus.location or corpus.name}) has {sum(n_documents.values())} "
                f"non-empty documents; a training and a held-out split need at least 2 (and one in {val_period} "
                "is held out, see data.val_fraction)"
            )
        for f in files.values():
            f.commit()
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "corpus": corpus.identity,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eot_id": eot,
        "splits": {
            s: {
                "file": files[s].path.name,
                "n_tokens": files[s].nbytes // dtype.itemsize,
                "n_documents": n_documents[s],
                "bytes": files[s].nbytes,
                "sha256": files[s].sha256,
            }
            for s in SPLITS
        },
    }
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def fixed_window_starts(n_tokens: int, n: int, length: int) -> np.ndarray:
    """``n`` window starts spread evenly over ``[0, n_tokens - length]`` (first and last included).

    Windows do not overlap when ``n * length <= n_tokens``. A DataError if one window does not fit.
    """
    if n_tokens < length:
        raise DataError(f"a split of {n_tokens} tokens cannot hold a window of {length} tokens")
    return np.linspace(0, n_tokens - length, num=n).astype(np.int64)
