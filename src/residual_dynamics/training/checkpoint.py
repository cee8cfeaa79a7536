"""Checkpoint files: written atomically, read without running code, and the intact ones found.

:class:`SafeCheckpointIO` is the Lightning ``CheckpointIO`` of every training run:

- **save**: ``torch.save`` into a temporary file beside the target, fsync, ``os.replace`` onto the
  target, fsync the directory. A kill or a full disk at any moment leaves the previous file whole (a
  reader never sees a half-written ``last.ckpt``); only a ``.<name>.<random>.tmp`` file can be left
  behind, and the next run removes those;
- **load**: always ``torch.load(..., weights_only=True)``, whatever the caller (Lightning's resume in
  ``trainer.fit(ckpt_path=...)`` included) or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks: a pickle that
  would run code on load is refused instead.

:class:`StepCheckpoint` writes a checkpoint of a step that also validates *after* that validation, so a
resume from it neither skips nor repeats the validation (Lightning's ModelCheckpoint writes it before, and a
kill in between loses that step's validation for good: the resumed run does not redo it).

:func:`intact_checkpoints` lists the checkpoints of a run directory that load, newest step first (used to
name a good checkpoint when ``last.ckpt`` is damaged, and by ``ckpt_path=last_good``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` via a temporary file in the same directory, fsynced, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced saves and ``weights_only=True`` loads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        if "://" in str(path):  # a remote filesystem: Lightning's own (non-atomic) writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        if map_location is None:
            map_location = "cpu"
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a ``step<N>.ckpt`` file name, else None."""
    stem = Path(path).stem
    return int(stem[4:]) if stem.startswith("step") and stem[4:].isdigit() else None


def intact_checkpoints(ckpt_dir: Path, exclude: tuple[Path, ...] = (), limit: Optional[int] = 1) -> list[tuple[Path, int]]:
    """Up to ``limit`` (None: all) checkpoints of ``ckpt_dir`` that load safely, as (path, global_step),
    newest step first; ``step<N>.ckpt`` files are tried newest first and ``exclude`` is skipped."""
    from residual_dynamics.errors import DataError
    from residual_dynamics.spec import load_checkpoint

    ckpt_dir = Path(ckpt_dir)
    candidates = sorted((p for p in ckpt_dir.glob("step*.ckpt") if checkpoint_step(p) is not None
                         and p not in exclude), key=checkpoint_step, reverse=True)
    found = []
    for path in candidates:
        try:
            found.append((path, int(load_checkpoint(path)["global_step"])))
        except DataError:
            continue
        if limit is not None and len(found) >= limit:
            break
    return found


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=...)`` whose checkpoint of a step at which validation runs
    (``step % val_every == 0``) is written at the end of that validation instead of before it (Lightning's
    own deferral, ``_defer_save_until_validation``); a deferral still pending when training ends is written
    then."""

    def __init__(self, val_every: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_every = int(val_every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (self._every_n_train_steps >= 1 and step % self._every_n_train_steps == 0 and self.val_every >= 1
                and step % self.val_every == 0 and trainer.enable_validation
                and not self._should_skip_saving_checkpoint(trainer)):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._defer_save_until_validation and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            self._defer_save_until_validation = False
