"""Probe overhead on the default training job: wall time spent in ProbeCallback / the rest of trainer.fit.

    python benchmarks/bench_probe_overhead.py                    # the default job, as `python -m residual_dynamics.train`
    python benchmarks/bench_probe_overhead.py trainer.max_steps=200   # any Hydra overrides

Runs the default job once, in this process, with W&B offline into a temporary directory, and prints the
time spent probing (model conversion, every enabled probe, results file, figures and W&B logging) as a
share of the training time measured in the same run. Target (issue #3): <= 5% at the default cadence.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from residual_dynamics.training.train import run

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_DIR"] = tmp
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.run_dir={tmp}/run", "run_name=bench", *sys.argv[1:]])
        out = run(cfg)
    probe, fit = out["probe_seconds"], out["fit_seconds"]
    print(f"\nsteps={out['global_step']}  fit={fit:.1f}s  probes={probe:.1f}s  "
          f"training without probes={fit - probe:.1f}s")
    print(f"probe overhead: {100 * probe / (fit - probe):.1f}% of training wall time  (target <= 5%)")


if __name__ == "__main__":
    main()
