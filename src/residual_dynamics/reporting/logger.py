"""The ``logger`` config group and the W&B mode: online only with credentials, never a login prompt.

``logger.mode: auto`` (the default) runs W&B online when an API key (``WANDB_API_KEY``) or a ``wandb login``
(``~/.netrc``) is present and offline otherwise; offline runs land in ``<run_dir>/wandb/offline-run-*`` and
can be uploaded later with ``wandb sync <that dir>``. ``WANDB_MODE`` in the environment wins over the
config, and is validated like it. ``online`` without credentials is a config error at once (W&B would
otherwise stop at its login prompt, or fail after the data were prepared).
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from typing import Optional

from residual_dynamics.errors import ConfigError

MODES = ("auto", "online", "offline", "disabled")
KINDS = ("wandb", "csv", "none")
DETAILS = ("summary", "layer", "head")
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str = "auto") -> str:
    """online / offline / disabled, from ``mode`` and ``WANDB_MODE``. Never online without credentials:
    that is a :class:`ConfigError` naming ``logger.mode`` (or ``WANDB_MODE``), so nothing hangs on a login."""
    if mode not in MODES:
        raise ConfigError("logger.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    field_name = "logger.mode"
    env = os.environ.get("WANDB_MODE")
    if env:
        if env not in ENV_MODES:
            raise ConfigError("WANDB_MODE", f"environment variable must be one of {', '.join(ENV_MODES)}, "
                                            f"got {env!r}")
        mode, field_name = ENV_MODES[env], "WANDB_MODE"
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    if mode == "online" and not has_wandb_credentials():
        raise ConfigError(field_name, "online needs W&B credentials and none were found: run `wandb login` or "
                                      "set WANDB_API_KEY, or use logger.mode=offline (upload later with "
                                      "`wandb sync`) or logger.mode=auto")
    return mode


@dataclass
class LoggerConfig:
    """The ``logger`` config group: where training metrics go (probe results always go to results.jsonl).

    kind:     wandb | csv | none.
    mode:     W&B mode, auto | online | offline | disabled (see the module doc).
    detail:   how much probe detail becomes W&B scalar keys (``reporting.results.scalar_detail``):
              summary = model-level scalars only (``growth_rate``, ``horizon/k_eff``, ...); layer (default)
              = these + the residual norm after each layer (``resid_norm/resid_post/Lxx``); head = every
              record (per layer, per head, per clean-up node). Whatever the detail, the per-layer / head /
              node records also go into one W&B table per probe family, and the results file keeps
              everything.
    """

    kind: str = "wandb"
    project: str = "residual-dynamics"
    entity: Optional[str] = None
    mode: str = "auto"
    group: Optional[str] = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    detail: str = "layer"

    def validated(self) -> "LoggerConfig":
        """Check every field; returns self. ``wandb_mode`` then gives the resolved mode."""
        if self.kind not in KINDS:
            raise ConfigError("logger.kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.mode not in MODES:  # checked even when WANDB_MODE overrides it
            raise ConfigError("logger.mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.detail not in DETAILS:
            raise ConfigError("logger.detail", f"must be one of {', '.join(DETAILS)}, got {self.detail!r}")
        if not self.project:
            raise ConfigError("logger.project", "must be a non-empty string")
        if self.kind == "wandb":
            resolve_wandb_mode(self.mode)
        return self

    @property
    def wandb_mode(self) -> Optional[str]:
        return resolve_wandb_mode(self.mode) if self.kind == "wandb" else None
