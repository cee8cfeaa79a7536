"""Divergence guards: stop a run whose loss or gradients stop being finite, and flag loss spikes.

:class:`DivergenceGuard` (a Lightning callback) checks every optimizer step, *before* the step is taken:

- the training loss and the global gradient norm (the 2-norm of all gradients, before clipping) must be
  finite. If not, training stops with :class:`Diverged`, which names the step, the loss and the norm; the
  weights of that step are never updated and no checkpoint of it is written, so ``last.ckpt`` stays the
  last finite checkpoint. Under DDP the decision is reduced over the ranks (any rank's non-finite loss
  stops all of them at the same step). With float16 mixed precision a non-finite gradient is the loss
  scaler's business (it skips that step), so only the loss is checked there;
- every checkpoint is checked for non-finite weights before it is written (a finite gradient times a
  huge learning rate can still overflow them): such a checkpoint is not written and training stops.

Loss spikes (:class:`SpikeDetector`): the loss of a step is a spike when it exceeds mean + ``sigmas``
standard deviations of the losses of the ``window`` steps before it (OLMo-core's rule, with 6 and 128 by
default). Spikes do not stop training; each is logged to W&B (``train/loss_spike`` = the loss,
``train/loss_spike_sigmas`` = how many standard deviations above the mean it was) at the
``trainer/global_step`` where Lightning logs that batch's ``train/loss`` (the batch's index ``g``), and
to the results file (``probe: "divergence"``, names ``loss_spike`` / ``loss_spike_sigmas``) at step
``g + 1``, the global step after that batch (so that, like a probe row, a row at step ``t`` was recorded
before the checkpoint of step ``t``). The window is saved in checkpoints, so a resumed run flags the same
steps as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch

from residual_dynamics.errors import ConfigError

log = logging.getLogger(__name__)

SPIKE_PROBE = "divergence"  # the "probe" field of spike rows in results.jsonl


@dataclass
class DivergenceConfig:
    """The ``divergence`` section of conf/config.yaml.

    spike_window: the number of preceding steps whose loss mean and standard deviation define a spike.
    spike_sigmas: a loss above mean + spike_sigmas * std of that window is a spike.
    """

    spike_window: int = 128
    spike_sigmas: float = 6.0

    def validated(self) -> "DivergenceConfig":
        if isinstance(self.spike_window, bool) or not isinstance(self.spike_window, int) or self.spike_window < 2:
            raise ConfigError("divergence.spike_window", f"must be an integer >= 2, got {self.spike_window!r}")
        sigmas = self.spike_sigmas
        if isinstance(sigmas, bool) or not isinstance(sigmas, (int, float)) or not math.isfinite(sigmas) or sigmas <= 0:
            raise ConfigError("divergence.spike_sigmas", f"must be a positive number, got {sigmas!r}")
        return self


class Diverged(RuntimeError):
    """Training stopped because the loss, the gradient norm or the weights stopped being finite."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(message)


class SpikeDetector:
    """Rolling spike rule: ``x_t`` is a spike when ``x_t > mean + sigmas * std`` of the ``window`` values
    before it (population std). Nothing is flagged until ``window`` values have been seen. Every value,
    spikes included, enters the window."""

    def __init__(self, window: int = 128, sigmas: float = 6.0):
        self.window = int(window)
        self.sigmas = float(sigmas)
        self.values: deque[float] = deque(maxlen=self.window)

    def update(self, value: float) -> Optional[float]:
        """Add ``value``; return how many standard deviations above the window mean it is when it is a
        spike, else None."""
        z = None
        if len(self.values) == self.window:
            past = np.asarray(self.values, dtype=np.float64)
            mean, std = float(past.mean()), float(past.std())
            if std > 0 and value > mean + self.sigmas * std:
                z = (value - mean) / std
        self.values.append(float(value))
        return z

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque((float(v) for v in state.get("values", [])), maxlen=self.window)


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]), 2.0)


class DivergenceGuard(L.Callback):
    """See the module docstring. ``on_spike(batch, loss, sigmas)`` reports a spike of the loss of batch
    ``batch`` (0-based; rank 0 only)."""

    def __init__(self, config: DivergenceConfig, on_spike: Optional[Callable[[int, float, float], None]] = None):
        self.config = config
        self.spikes = SpikeDetector(config.spike_window, config.spike_sigmas)
        self.on_spike = on_spike
        self.last_saved_step: Optional[int] = None  # the newest checkpoint this session wrote (all finite)
        self._loss: Optional[torch.Tensor] = None
        self._step_loss: Optional[float] = None
        self.last_batch: dict[str, Any] = {}  # the metrics Lightning will log for the last batch

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._loss is None:
            return
        check_grads = not str(trainer.precision).startswith("16")  # fp16: the grad scaler skips inf steps
        norm = _grad_norm(pl_module.parameters()) if check_grads else torch.zeros(())
        loss, grad_norm = torch.stack([self._loss.float().reshape(()), norm.float().to(self._loss.device)]).tolist()
        bad = not math.isfinite(loss) or not math.isfinite(grad_norm)
        if trainer.world_size > 1:  # the same decision on every rank, or the others would wait forever
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        step = trainer.global_step
        if bad:
            where = " on at least one rank" if trainer.world_size > 1 else ""
            raise Diverged(step, f"training diverged at step {step}: loss = {loss}, gradient norm = {grad_norm} "
                                 f"(not finite{where}); the weights were not updated with it")
        if check_grads:
            pl_module.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        self._step_loss = loss
        # the row Lightning logs for this batch once on_train_batch_end (and its checkpoint) is over:
        # LitTransformer's train/loss and train/lr, this guard's train/grad_norm, Lightning's epoch
        self.last_batch = {"train/loss": loss, "train/lr": float(optimizer.param_groups[0]["lr"]),
                           "epoch": trainer.current_epoch, **({"train/grad_norm": grad_norm} if check_grads else {})}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss, self._step_loss, self._loss = self._step_loss, None, None
        if loss is None:
            return
        sigmas = self.spikes.update(loss)
        if sigmas is not None:
            step = trainer.global_step - 1  # the batch's index: Lightning logs its train/loss at this step
            log.warning("loss spike at step %d: loss %.4g is %.1f standard deviations above the mean of the "
                        "last %d steps", step, loss, sigmas, self.spikes.window)
            if self.on_spike is not None and trainer.is_global_zero:
                self.on_spike(step, loss, sigmas)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        floats = [(name, t) for name, t in checkpoint["state_dict"].items() if torch.is_floating_point(t)]
        finite = torch.stack([torch.isfinite(t).all() for _, t in floats]) if floats else torch.ones(1, dtype=torch.bool)
        if not bool(finite.all()):
            bad = [name for (name, _), ok in zip(floats, finite.tolist()) if not ok]
            step = int(checkpoint["global_step"])
            raise Diverged(step, f"training diverged at step {step}: the weights {', '.join(bad[:5])}"
                                 f"{' ...' if len(bad) > 5 else ''} are not finite; that checkpoint was not written")
        self.last_saved_step = int(checkpoint["global_step"])

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state.get("spikes", {}))
