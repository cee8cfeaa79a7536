"""The run directory: an exclusive lock while a run uses it, and its W&B run id.

:class:`RunLock` holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lock`` from before the first
byte a run writes there until it ends. A second process on the same run directory (the same ``run_name``
started twice, or a SLURM requeue while the old job still runs) fails at once with
:class:`RunDirectoryLocked`, naming the directory and the holder (pid, host, start time, written into the
lock file), instead of writing every results row twice. The kernel drops the lock when the holder dies,
so a killed run never leaves a stale lock. Only global rank 0 takes it (the other DDP ranks of the same
run share the directory). ``flock`` works across hosts on NFSv4 and Lustre mounted with ``flock``; on a
filesystem without it the lock cannot be taken and the run says so.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import secrets
import socket
from pathlib import Path
from typing import Optional

from residual_dynamics.errors import DataError

LOCK_FILE = ".lock"
WANDB_ID_FILE = "wandb_run_id"


class RunDirectoryLocked(DataError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive lock on ``<run_dir>/.lock`` (see the module docstring). Use as a context manager."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirectoryLocked(
                    f"{self.run_dir} is in use by another run ({holder}; lock file {self.path}). Wait for it to "
                    "finish (a SLURM requeue starts only once the old job is gone), or give this run another "
                    "run_name") from None
            raise DataError(f"{self.path}: cannot lock the run directory ({exc}); its filesystem may not "
                            "support flock") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def wandb_run_id(run_dir: Path, new: bool = False) -> str:
    """The W&B run id of this run directory, created once (atomically: of two racing processes one wins
    and both read its id), so a resumed run continues the same W&B run. ``new=True`` replaces it (a run
    that restarts from scratch starts a new W&B run)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if not new and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(run_id)
    if new:
        os.replace(tmp, path)
        return run_id
    try:
        os.link(tmp, path)  # fails if another process created it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def read_wandb_run_id(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / WANDB_ID_FILE
    return path.read_text().strip() if path.exists() else None
