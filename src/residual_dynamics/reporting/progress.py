"""Progress bars and wall times of probe runs, and the hook through which a probe reports its chunks.

* :func:`chunk_progress` -- a probe that works in chunks (over writers, positions or horizon values) may
  call ``chunk_progress(done, total)`` after each chunk. It costs one context-variable read when nothing
  listens (training, tests), and it never changes what a probe computes.
* :class:`ProbeProgress` -- the display of ``python -m residual_dynamics.probe``: a rich progress bar over
  the probe stages, a second one over the chunks of the running stage (shown once the stage reports a
  chunk), and the wall time of every stage (:attr:`ProbeProgress.seconds`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, Sequence

ProgressHook = Callable[[int, int], None]  # (chunks done, chunks in all)
_HOOK: ContextVar[Optional[ProgressHook]] = ContextVar("residual_dynamics_chunk_progress", default=None)


def chunk_progress(done: int, total: int) -> None:
    """Report that ``done`` of ``total`` chunks of the running probe are finished (no-op unless a
    :func:`progress_hook` listens)."""
    hook = _HOOK.get()
    if hook is not None:
        hook(done, total)


@contextmanager
def progress_hook(hook: Optional[ProgressHook]) -> Iterator[None]:
    """Route :func:`chunk_progress` calls made inside the block to ``hook``."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


class ProbeProgress:
    """A progress display over named probe stages, timing each one.

        with ProbeProgress(["residual_norms", "cleanup"]) as progress:
            with progress.stage("residual_norms"):
                ...
        progress.seconds  # {"residual_norms": 1.2, "cleanup": 3.4}

    ``enabled=False`` times the stages without drawing. The bars go to stderr (a terminal redraws them in
    place; a file or pipe gets the final state once, when the display stops).
    """

    def __init__(self, stages: Sequence[str], *, enabled: bool = True, console=None):
        self.stages = list(stages)
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self._console = console
        self._progress = None
        self._overall = self._chunks = None

    def __enter__(self) -> "ProbeProgress":
        if self.enabled and self.stages:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self._console or Console(stderr=True))
            self._progress.start()
            self._overall = self._progress.add_task("probes", total=len(self.stages))
            self._chunks = self._progress.add_task("", total=None, visible=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``; its :func:`chunk_progress` calls drive the chunk bar."""
        progress = self._progress
        if progress is not None:
            progress.update(self._overall, description=f"probes: {name}")
            progress.update(self._chunks, visible=False, completed=0, total=None)

        def on_chunk(done: int, total: int) -> None:
            if progress is not None:
                progress.update(self._chunks, description=f"  {name} chunks", completed=done, total=total,
                                visible=True, refresh=True)

        started = time.perf_counter()
        try:
            with progress_hook(on_chunk):
                yield
        finally:
            self.seconds[name] = time.perf_counter() - started
            if progress is not None:
                progress.update(self._chunks, visible=False)
                progress.advance(self._overall)
                progress.update(self._overall, description="probes")
