"""``ProbeCallback``: runs the enabled probes at scheduled steps of training and reports the results.

It only schedules, converts, calls probes and logs: the model is converted with
``to_transformer_lens`` (a copy; training is not touched), the probes run on a fixed held-out probe batch,
and ``ProbeReporter`` sends the results to W&B and the results file; the PNG figures are redrawn at the
checkpoint cadence and at the end, not at every early log-spaced probe. Under DDP only
rank 0 probes. Hooks exist only inside the probe calls, so training steps carry no probe overhead.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional

import lightning as L
import torch

from residual_dynamics.convert import to_transformer_lens
from residual_dynamics.probes.registry import run_probes
from residual_dynamics.tracking import ProbeReporter


def probe_steps(max_steps: int, log_spaced_until: int, every: int, at_end: bool = True) -> list[int]:
    """Step 0, then log-spaced steps 1, 2, 4, ... below ``log_spaced_until``, then every ``every`` steps,
    and ``max_steps`` when ``at_end``."""
    steps = {0}
    s = 1
    while s < min(log_spaced_until, max_steps):
        steps.add(s)
        s *= 2
    if every > 0:
        steps.update(range(every, max_steps + 1, every))
    if at_end:
        steps.add(max_steps)
    return sorted(x for x in steps if x <= max_steps)


class ProbeCallback(L.Callback):
    """Probes at ``steps``. A *full* step (a multiple of ``every``, the checkpoint cadence, or the end of
    training) runs every enabled probe and redraws the figures; the other (early, log-spaced) steps run
    only the probes in ``early`` and skip the figures, so dense early sampling stays cheap."""

    def __init__(self, tokens: torch.Tensor, probes: Mapping[str, Mapping[str, Any]], steps: list[int],
                 reporter: ProbeReporter, at_end: bool = True, every: int = 0,
                 early: Optional[set[str]] = None):
        self.tokens = tokens
        self.probes = probes
        self.steps = set(steps)
        self.reporter = reporter
        self.at_end = at_end
        self.every = every
        self.early = set(probes) if early is None else set(early)
        self.seconds = 0.0  # wall time spent probing, for the overhead benchmark
        self._done: set[int] = set()

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule, last: bool = False) -> None:
        step = trainer.global_step
        if step in self._done or not trainer.is_global_zero or not self.probes:
            return
        full = last or step >= trainer.max_steps or (self.every > 0 and step > 0 and step % self.every == 0)
        probes = self.probes if full else {n: o for n, o in self.probes.items() if n in self.early}
        if not probes:
            return
        start = time.perf_counter()
        bridge = to_transformer_lens(pl_module.model)
        results = run_probes(bridge, self.tokens.to(pl_module.device), probes)
        self.reporter.report(results, step, draw=full)
        self._done.add(step)
        self.seconds += time.perf_counter() - start

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0 and 0 in self.steps:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_end:  # also covers a run stopped before max_steps
            self._probe(trainer, pl_module, last=True)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state.get("seconds", 0.0))
