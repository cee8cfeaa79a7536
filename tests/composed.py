"""Compose the real Hydra configs in tests, through the structured-config schemas (as the CLIs do)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

import residual_dynamics.spec  # noqa: F401  (registers the schemas in Hydra's ConfigStore)

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(config_name: str = "config", overrides=()):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def pretrained_model(name: str):
    """The typed ``model`` node of the probe CLI for conf/pretrained/<name>.yaml (a DictConfig)."""
    return composed("probe", [f"pretrained@model={name}"]).model


def group_node(group: str, name: str):
    """The typed node of a training config group option, e.g. ``group_node("data", "openwebtext")``."""
    return composed("config", [f"{group}={name}"])[group]
