"""The ``trainer`` config group: the Lightning Trainer's knobs, checked against what Lightning accepts
before any data or model work."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch

from residual_dynamics.errors import ConfigError


def _lightning_precisions() -> tuple[str, ...]:
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return tuple(typing.get_args(_PRECISION_INPUT_STR)) + tuple(typing.get_args(_PRECISION_INPUT_STR_ALIAS))


def _lightning_accelerators() -> tuple[str, ...]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def _lightning_strategies() -> tuple[str, ...]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def _positive_int(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")


@dataclass
class TrainerConfig:
    """The ``trainer`` config group (conf/trainer/*.yaml).

    accelerator / devices / strategy / precision: passed to ``lightning.Trainer`` (checked against what the
    installed Lightning accepts). devices: a positive int, -1 (all), ``auto``, or a list of device indices.
    compile: ``torch.compile`` the training forward. max_steps, val_every, ckpt_every, log_every: steps.
    """

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    compile: bool = False
    max_steps: int = 600
    val_every: int = 100
    ckpt_every: int = 200
    log_every: int = 10

    def validated(self) -> "TrainerConfig":
        accelerators = _lightning_accelerators()
        if self.accelerator not in accelerators:
            raise ConfigError("trainer.accelerator", f"must be one of {', '.join(accelerators)}, "
                                                     f"got {self.accelerator!r}")
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", f"{self.accelerator} requested but torch sees no CUDA device; "
                                                     "use trainer=cpu")
        if self.accelerator == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator", "mps requested but it is not available here; use trainer=cpu")
        strategies = _lightning_strategies()
        if self.strategy not in strategies:
            raise ConfigError("trainer.strategy", f"must be one of {', '.join(strategies)}, got {self.strategy!r}")
        precisions = _lightning_precisions()
        if str(self.precision) not in precisions:
            raise ConfigError("trainer.precision", f"must be one of {', '.join(precisions)}, got {self.precision!r}")
        self._check_devices()
        for key in ("max_steps", "val_every", "ckpt_every", "log_every"):
            _positive_int(getattr(self, key), f"trainer.{key}")
        return self

    def _check_devices(self) -> None:
        value = self.devices
        if value == "auto" or value == -1:
            return
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return
        if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            return
        raise ConfigError("trainer.devices", f"must be a positive integer, -1, auto or a list of device indices, "
                                             f"got {value!r}")
