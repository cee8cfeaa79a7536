"""One W&B history per run, across kills and resumes.

Three things make a killed-and-resumed run end as one W&B history with no duplicated and no missing row:

1. **W&B's step encodes the training step.** Rows are logged with an explicit W&B ``step`` derived from
   ``trainer/global_step`` (the x-axis every chart uses): a probe (or any row about the weights after
   ``s`` optimizer steps) at ``2 s``, Lightning's metrics of batch ``g`` (``train/loss``, ``val/loss``
   logged at ``trainer/global_step = g``) and the loss-spike flags at ``2 g + 3``. This is monotone in
   the order Lightning logs (batch ``g``: the probe of the weights after it, ``2 g + 2``, comes before the
   batch's own ``train/loss``, ``2 g + 3``), and it makes a checkpoint at step ``S`` one W&B step:
   everything logged before it is at ``<= 2 S + 1``, everything a resumed session logs is above.
   :class:`WandbHistory` emits rows in step order (a row is sent once a later one arrives).
2. **A local journal.** Every row's scalars also go to ``<run_dir>/wandb_history.jsonl`` (flushed at each
   row, fsynced whenever a checkpoint is written): W&B keeps the last rows of a killed process in memory
   (an offline run killed with SIGKILL loses its last ~10 s; the last row is committed only when the next
   step is logged), the journal does not.
3. **Rewind, then replay.** A resumed run (checkpoint at step ``S``) reads back what the earlier sessions'
   W&B folders really hold (:func:`durable_last_step`: the newest W&B step ``L`` of their stitched
   history), starts W&B with ``resume_from="<id>?_step=R"``, ``R = min(2 S + 1, L)`` (W&B's *rewind*: the
   run keeps its rows up to ``R`` and continues at ``R + 1``; the rows after ``R`` that the killed session
   logged are archived), and first re-logs the journal's rows of the W&B steps ``R + 1 .. 2 S + 1``
   (scalars; the images and tables of those rows are not replayed). When no earlier session left a
   durable row, it starts the same run id with ``resume="allow"`` and replays the journal up to ``2 S + 1``.

Offline, each session writes its own folder ``<run_dir>/wandb/offline-run-<time>-<id>``; a rewound one
records its branch point (``<id>``, ``_step``, ``R``) in its run record, and ``wandb sync`` applies it.
Syncing the folders *in order*, one ``wandb sync`` each (:func:`sync_commands`, printed at the end of
every run), gives the one history; ``wandb sync --append`` is not needed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from residual_dynamics.reporting import wandb_log

log = logging.getLogger(__name__)

JOURNAL = "wandb_history.jsonl"
STEP_KEY = "trainer/global_step"
_RESUMED = "_resumed_from"  # journal header of a session: rows after this step were superseded

# W&B's transaction log (run-<id>.wandb): a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
# LevelDB-log records (crc32c:4, length:2, type:1, payload); FULL=1, FIRST=2, MIDDLE=3, LAST=4. Each
# reassembled payload is a wandb_internal_pb2.Record.


@dataclass(frozen=True)
class ResumePlan:
    """How W&B starts for this session: ``init`` are the extra ``wandb.init`` arguments, ``replay_after``
    the W&B step after which the journal is re-logged (up to ``resume_step``, the W&B step of the
    checkpoint), None when nothing is replayed."""

    init: dict
    replay_after: Optional[int]
    resume_step: Optional[int]


def probe_wandb_step(step: int) -> int:
    """The W&B step of a row about the weights after ``step`` optimizer steps (a probe)."""
    return 2 * int(step)


def batch_wandb_step(step: int) -> int:
    """The W&B step of Lightning's metrics logged at ``trainer/global_step = step`` (batch ``step``)."""
    return 2 * int(step) + 3


def checkpoint_wandb_step(step: int) -> int:
    """The last W&B step a session logs before its checkpoint at ``step``: probes up to ``step``, batches
    before it."""
    return 2 * int(step) + 1


def run_folders(run_dir: Path, run_id: str) -> list[Path]:
    """This run's W&B folders (offline or online) under ``<run_dir>/wandb``, oldest first."""
    root = Path(run_dir) / "wandb"
    if not root.is_dir():
        return []
    folders = [p for p in root.glob(f"*run-*-{run_id}") if p.is_dir() and not p.is_symlink()]
    return sorted(folders, key=lambda p: p.name.split("-run-", 1)[1])


def folder_history(folder: Path) -> tuple[Optional[int], list[int]]:
    """(the rewind point recorded in the folder's run record or None, the W&B steps of its history rows)."""
    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        return None, []
    branch, steps = None, []
    for record in wandb_log.records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.branch_point.run and record.run.branch_point.metric == "_step":
            branch = int(record.run.branch_point.value)
        elif kind == "history":
            if record.history.HasField("step"):
                steps.append(int(record.history.step.num))
            else:
                for item in record.history.item:
                    if item.key == "_step":
                        steps.append(int(json.loads(item.value_json)))
    return branch, steps


def stitched_steps(folders: list[Path]) -> list[int]:
    """The W&B steps the folders give once synced in order (each rewind keeps the steps up to its point)."""
    steps: list[int] = []
    for folder in folders:
        branch, own = folder_history(folder)
        if branch is not None:
            steps = [s for s in steps if s <= branch]
        steps.extend(own)
    return steps


def durable_last_step(run_dir: Path, run_id: str) -> Optional[int]:
    """The newest W&B step that the earlier sessions' folders really hold, or None when they hold none."""
    steps = stitched_steps(run_folders(run_dir, run_id))
    return max(steps) if steps else None


def plan_resume(run_dir: Path, run_id: str, resume_step: Optional[int]) -> ResumePlan:
    """The W&B start of a session that resumes from a checkpoint at ``resume_step`` (None: a fresh run)."""
    if resume_step is None:
        return ResumePlan(init={}, replay_after=None, resume_step=None)
    end = checkpoint_wandb_step(resume_step)
    last = durable_last_step(run_dir, run_id)
    if last is None:
        return ResumePlan(init={}, replay_after=-1, resume_step=end)
    rewind = min(end, last)
    return ResumePlan(init={"resume": None, "resume_from": f"{run_id}?_step={rewind}"}, replay_after=rewind,
                      resume_step=end)


def sync_commands(run_dir: Path, run_id: str) -> list[str]:
    """The ``wandb sync`` commands that upload this run's offline folders as one history, in order."""
    return [f"wandb sync {folder}" for folder in run_folders(run_dir, run_id) if folder.name.startswith("offline-")]


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) or value is None


class Journal:
    """``<run_dir>/wandb_history.jsonl``: the scalars of every logged W&B row, one JSON object per line with
    its ``_step``; each session starts with a ``{"_resumed_from": S}`` line (rows after ``S`` written
    before it are superseded). Lines are flushed when written and fsynced by :meth:`sync`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / JOURNAL
        self._file = None

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb+") as f:  # drop a torn last line before appending
                    data = f.read()
                    if not data.endswith(b"\n"):
                        f.truncate(data.rfind(b"\n") + 1)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def start_session(self, resumed_from: Optional[int]) -> None:
        if resumed_from is None:
            if self.path.exists():
                self.path.unlink()
            return
        self._write({_RESUMED: int(resumed_from)})

    def write(self, payload: Mapping[str, Any], step: int) -> None:
        row = {k: v for k, v in payload.items() if _scalar(v)}
        row["_step"] = int(step)
        self._write(row)

    def _write(self, row: Mapping[str, Any]) -> None:
        f = self._open()
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def rows(self) -> list[dict]:
        """The journal's rows as they stand after every session's supersession, in logging order."""
        if not self.path.exists():
            return []
        out: list[dict] = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line
                    break
                if _RESUMED in row:
                    out = [r for r in out if r["_step"] <= row[_RESUMED]]
                else:
                    out.append(row)
        return out


class WandbHistory:
    """The W&B run of this session with the journal: every row reaches W&B through :meth:`log_at`, which
    sends rows in W&B-step order (a row waits until a later step arrives, or :meth:`flush`)."""

    def __init__(self, run_dir: Path, plan: ResumePlan):
        self.journal = Journal(run_dir)
        self.plan = plan
        self.run = None
        self._pending: dict[int, dict] = {}
        self._sent = -1  # the last W&B step sent

    def attach(self, run) -> None:
        """Start logging to ``run`` (the wandb Run), replaying the journal's rows the plan asks for."""
        self.run = run
        self._sent = int(getattr(run, "starting_step", 0) or 0) - 1
        replay = []
        if self.plan.replay_after is not None:
            replay = [row for row in self.journal.rows()
                      if self.plan.replay_after < row["_step"] <= self.plan.resume_step]
        self.journal.start_session(self.plan.resume_step)
        for row in replay:
            self.log_at(row.pop("_step"), row)
        if replay:
            log.info("re-logged %d W&B rows (steps up to %s) from %s that the earlier session had not written",
                     len(replay), self.plan.resume_step, self.journal.path)

    def log_at(self, wandb_step: int, payload: Mapping[str, Any]) -> None:
        wandb_step = int(wandb_step)
        if wandb_step <= self._sent:
            log.warning("W&B row at step %d comes after step %d was sent; it is dropped", wandb_step, self._sent)
            return
        self.journal.write(payload, wandb_step)
        self._pending.setdefault(wandb_step, {}).update(payload)
        for step in sorted(s for s in self._pending if s < wandb_step):
            self._send(step)

    def journal_batch(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write Lightning's row of batch ``step`` to the journal before Lightning logs it (it does so only
        after that batch's checkpoint is written); Lightning's own row, identical, follows."""
        self.journal.write({**metrics, STEP_KEY: int(step)}, batch_wandb_step(step))

    def _send(self, step: int) -> None:
        self.run.log(self._pending.pop(step), step=step)
        self._sent = step

    def log_batch(self, metrics: Mapping[str, Any], step: int) -> None:
        """Lightning's metrics logged at ``trainer/global_step = step``."""
        self.log_at(batch_wandb_step(step), {**metrics, STEP_KEY: int(step)})

    def log_probe(self, payload: Mapping[str, Any], step: int) -> None:
        """A row about the weights after ``step`` optimizer steps."""
        self.log_at(probe_wandb_step(step), {**payload, STEP_KEY: int(step)})

    def flush(self) -> None:
        for step in sorted(self._pending):
            self._send(step)

    def sync(self) -> None:
        self.journal.sync()

    def close(self) -> None:
        if self.run is not None:
            self.flush()
        self.journal.close()


class SteppedRun:
    """A wandb Run for code that logs its own W&B rows (the probe reporter): ``log`` goes through
    :meth:`WandbHistory.log_probe` at the row's ``trainer/global_step``; everything else is the run's."""

    def __init__(self, history: WandbHistory):
        self._history = history

    def log(self, payload: Mapping[str, Any], step: Optional[int] = None, **_: Any) -> None:
        self._history.log_probe(payload, payload[STEP_KEY] if step is None else step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._history.run, name)


def make_logger_class():
    """:class:`StepWandbLogger`, defined lazily (Lightning's WandbLogger imports wandb)."""
    from lightning.fabric.utilities.logger import _add_prefix
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class StepWandbLogger(WandbLogger):
        """Lightning's WandbLogger, logging every row through a :class:`WandbHistory`
        (:meth:`WandbHistory.log_batch`); the history attaches to the run when it is created (rank 0)."""

        def __init__(self, history: WandbHistory, **kwargs: Any):
            super().__init__(**kwargs)
            self.history = history

        @property
        def experiment(self):
            run = super().experiment  # rank 0: the wandb Run; other ranks: Lightning's dummy
            if rank_zero_only.rank == 0 and self.history.run is None:
                self.history.attach(run)
            return run

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
            metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
            self.experiment  # noqa: B018  (creates the run and attaches the history)
            metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
            if step is None:  # Lightning always gives one while fitting; else the newest step seen
                step = max([self.history._sent, *self.history._pending], default=0) // 2
            self.history.log_batch(metrics, step)

    return StepWandbLogger

