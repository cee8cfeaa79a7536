"""``ProbeCallback``: runs the enabled probes at scheduled steps of training and reports the results.

It only schedules, converts, calls probes and logs: the model is converted with
``to_transformer_lens`` (a copy; training is not touched), the probes run on a fixed held-out probe batch,
and ``ProbeReporter`` sends the results to W&B and the results file; the PNG figures are redrawn at the
full steps of the :class:`ProbeSchedule` (the checkpoint cadence by default) and at the end, not at every early log-spaced probe. Under DDP only
rank 0 probes. Hooks exist only inside the probe calls, so training steps carry no probe overhead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import lightning as L
import torch

from residual_dynamics.training.convert import to_transformer_lens
from residual_dynamics.probes.registry import run_probes
from residual_dynamics.reporting.provenance import weight_fingerprint
from residual_dynamics.reporting.reporter import ProbeReporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSchedule:
    """When probes run during training, from the ``probes.schedule`` config and ``trainer.max_steps``.

    Steps: 0, the log-spaced steps 1, 2, 4, ... below ``log_spaced_until``, every multiple of ``every``
    (by default ``trainer.ckpt_every``, so that every full probe step has a checkpoint to replay), and
    ``max_steps`` when ``at_end``. A *full* step (a multiple of ``every`` after 0, or the end) runs every
    enabled probe and redraws the figures; the other steps run only the probes marked ``early``.
    """

    max_steps: int
    log_spaced_until: int = 64
    every: int = 200
    at_end: bool = True

    @property
    def steps(self) -> list[int]:
        steps = {0}
        s = 1
        while s < min(self.log_spaced_until, self.max_steps):
            steps.add(s)
            s *= 2
        if self.every > 0:
            steps.update(range(self.every, self.max_steps + 1, self.every))
        if self.at_end:
            steps.add(self.max_steps)
        return sorted(x for x in steps if x <= self.max_steps)

    def is_full(self, step: int) -> bool:
        return step >= self.max_steps or (self.every > 0 and step > 0 and step % self.every == 0)


class ProbeCallback(L.Callback):
    """Probes at the steps of ``schedule``. A full step runs every probe in ``probes`` and redraws the
    figures; the other (early, log-spaced) steps run only the probes in ``early`` and skip the figures, so
    dense early sampling stays cheap. ``probes`` maps probe names to their Options."""

    def __init__(self, tokens: torch.Tensor, probes: Mapping[str, Any], schedule: ProbeSchedule,
                 reporter: ProbeReporter, early: Optional[set[str]] = None):
        self.tokens = tokens
        self.probes = dict(probes)
        self.schedule = schedule
        self.steps = set(schedule.steps)
        self.reporter = reporter
        self.early = set(probes) if early is None else set(early)
        self.seconds = 0.0  # wall time spent probing in this session, for the overhead benchmark
        self._earlier_seconds = 0.0  # probe time of the sessions before a resume (from the checkpoint)
        self._done: set[int] = set()
        self._fingerprints: dict[str, int] = {}  # weight fingerprint -> first step probed with it

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule, last: bool = False) -> None:
        step = trainer.global_step
        if step in self._done or not trainer.is_global_zero or not self.probes:
            return
        full = last or self.schedule.is_full(step)
        probes = self.probes if full else {n: o for n, o in self.probes.items() if n in self.early}
        if not probes:
            return
        start = time.perf_counter()
        bridge = to_transformer_lens(pl_module.model)
        results = run_probes(bridge, self.tokens.to(pl_module.device), probes)
        fingerprint = weight_fingerprint(bridge)  # which weights these rows describe (reporting.provenance)
        if fingerprint in self._fingerprints:
            log.warning("step %d: the weights are identical to those of step %d (fingerprint %s): training "
                        "did not change them", step, self._fingerprints[fingerprint], fingerprint[:16])
        self._fingerprints.setdefault(fingerprint, step)
        self.reporter.report(results, step, draw=full, provenance={"weights_sha256": fingerprint})
        self._done.add(step)
        self.seconds += time.perf_counter() - start

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0 and 0 in self.steps:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.schedule.at_end:  # also covers a run stopped before max_steps
            self._probe(trainer, pl_module, last=True)

    def state_dict(self) -> dict:
        # the probe time of every session so far; ``seconds`` stays this session's (it is compared with this
        # session's trainer.fit time: a resumed run must not count the earlier sessions' probes against it)
        return {"seconds": self._earlier_seconds + self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self._earlier_seconds = float(state.get("seconds", 0.0))

    @property
    def total_seconds(self) -> float:
        """Probe time over every session of the run (this one included)."""
        return self._earlier_seconds + self.seconds
