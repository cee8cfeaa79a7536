"""The shared results schema: metric keys, JSONL rows, crash-safety of the results file, W&B mode."""

import math
from dataclasses import dataclass

import pytest

from residual_dynamics.errors import ConfigError

from residual_dynamics.training.callbacks import ProbeSchedule
from residual_dynamics.probes.common import Record, position_mask
from residual_dynamics.reporting.results import ResultsFile, metric_key, parse_metric_key, rows, scalars
from residual_dynamics.reporting.logger import resolve_wandb_mode


@dataclass
class Fake:
    recs: list

    def records(self):
        return self.recs


def test_metric_keys():
    """The probe family first (one W&B section each), then the layer/head suffix; parsed back to the record."""
    cases = {
        Record("resid_norm/resid_post", 1.0, layer=3): "resid_norm/resid_post/L03",
        Record("W_OV", 1.0, layer=2, head=5): "W_OV/L02H05",
        Record("W_OV_folded", 1.0, layer=12, head=24): "W_OV_folded/L12H24",
        Record("growth_rate", 1.0): "growth_rate",
        Record("horizon/k_eff", 1.0): "horizon/k_eff",
        Record("horizon/loss_increase/k02", 1.0): "horizon/loss_increase/k02",
        Record("cleanup/writer_score/mlp", 1.0, layer=1): "cleanup/writer_score/mlp/L01",
        Record("cleanup/writer_score/embed", 1.0): "cleanup/writer_score/embed",
        Record("mlp_act_rate/tokens", 1.0, layer=0): "mlp_act_rate/tokens/L00",
    }
    probes = {"resid_norm": "residual_norms", "W_OV": "weight_norms", "W_OV_folded": "weight_norms",
              "growth_rate": "residual_norms", "horizon": "layer_horizon", "cleanup": "cleanup",
              "mlp_act_rate": "activation_rates"}
    for record, key in cases.items():
        assert metric_key(record) == key
        assert parse_metric_key(key) == (probes[key.split("/")[0]], record.name, record.layer, record.head)
    for key in ("train/loss", "trainer/global_step", "probe_figures/norm_vs_layer", "W_OV/vs_layer_table",
                "probe/growth_rate"):
        assert parse_metric_key(key) is None, key


def test_rows_and_scalars_agree():
    results = {"a": Fake([Record("x", 2.0, layer=1), Record("y", float("nan"))])}
    out = rows(results, step=7, meta={"run": "r"})
    assert out == [
        {"step": 7, "probe": "a", "name": "x", "layer": 1, "head": None, "value": 2.0, "run": "r"},
        {"step": 7, "probe": "a", "name": "y", "layer": None, "head": None, "value": None, "run": "r"},
    ]
    s = scalars(results, "head")
    assert s["x/L01"] == 2.0 and math.isnan(s["y"])
    assert scalars(results, "layer") == scalars(results, "summary") and set(scalars(results, "layer")) == {"y"}


def test_results_file_survives_a_torn_line_and_truncates_on_resume(tmp_path):
    f = ResultsFile(tmp_path / "results.jsonl")
    f.append([{"step": s, "value": s} for s in (0, 1, 2, 4)])
    with open(f.path, "a") as raw:
        raw.write('{"step": 8, "val')  # a crash in the middle of a write
    assert [r["step"] for r in f.read()] == [0, 1, 2, 4]
    f.truncate_from(2)
    assert [r["step"] for r in f.read()] == [0, 1]
    assert f.path.read_text().endswith("\n") and not (tmp_path / "results.jsonl.tmp").exists()


def test_probe_schedule():
    schedule = ProbeSchedule(600, 64, 200)
    assert schedule.steps == [0, 1, 2, 4, 8, 16, 32, 200, 400, 600]
    assert [s for s in schedule.steps if schedule.is_full(s)] == [200, 400, 600]
    assert ProbeSchedule(10, 4, 0, at_end=False).steps == [0, 1, 2]
    assert ProbeSchedule(5, 64, 200).steps == [0, 1, 2, 4, 5]


def test_position_mask_drops_position_zero_and_padding():
    import torch

    tokens = torch.zeros(2, 4, dtype=torch.long)
    mask = position_mask(tokens, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    with pytest.raises(ValueError):
        position_mask(torch.zeros(2, 1, dtype=torch.long))


def test_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"  # the environment wins
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="WANDB_MODE"):  # online without credentials: never a login prompt
        resolve_wandb_mode("auto")
