"""Test-wide setup: no network, W&B offline into temporary directories, one shared data cache."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """W&B never reaches its servers: offline mode, its files and settings in this test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # an in-process wandb.init publishes its service socket here; a CLI subprocess inheriting it would share
    # that service, which keeps the run id of a killed subprocess "in use" for a resume
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A token/tokenizer cache shared by the tests of one session (built once, small vocabulary)."""
    return tmp_path_factory.mktemp("rd_cache")
