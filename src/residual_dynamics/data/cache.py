"""Small helpers for the on-disk caches: stable keys, checksums and atomic writes.

Every cache file is written to a temporary name in its final directory and moved into place with
``os.replace``, so a reader sees either the old complete file or the new complete file, never a partial one.
A build that is killed half-way leaves only such temporary files (``.<name>.<random>.tmp``);
:func:`remove_stale_temporaries` deletes them once the builder holds the entry's :func:`build_lock`.

:func:`build_lock` serializes the processes that build the same cache entry (the ranks of a DDP job, the
jobs of a sweep sharing one cache): the first builds it, the others wait on the lock and then load what
it built, instead of building it again side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class AtomicFile:
    """A binary file written under a temporary name and moved to ``path`` on :meth:`commit`.

    Tracks the byte count and sha256 of what was written. Use as a context manager: leaving the block
    without commit (e.g. on an exception) deletes the temporary file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.nbytes += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._file.closed:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; return its sha256."""
    with AtomicFile(path) as f:
        f.write(data)
        f.commit()
    return f.sha256


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<path>.lock`` (created if needed) for the block.

    A process that finds the lock taken logs that it waits, then blocks until the holder is done. The lock
    is released when the block ends or the process dies (the kernel drops flocks of dead processes), so a
    killed builder never leaves a stale lock behind.
    """
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.perf_counter()
            log.info("waiting for %s: another process is building this cache entry", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("got %s after %.1f s", lock_path, time.perf_counter() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(directory: Path, prefix: str = ".") -> int:
    """Delete the temporary files and directories (``<prefix>*.tmp``) that killed builds left in
    ``directory``. Call it only while holding the :func:`build_lock` of everything written there, so no
    live builder's file is removed. Returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for stale in directory.glob(f"{prefix}*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.warning("removed %d temporary file(s) that an interrupted cache build left in %s", removed, directory)
    return removed
