"""Runs on more than one process: DDP ranks that re-run exactly their job, and SLURM/submitit requeues.

**DDP.** Lightning's DDP (``strategy=ddp``) starts ranks 1..N-1 by re-running the command line of rank 0.
Under Hydra that command is a multirun's (``-m`` with the whole sweep; Lightning issue 11300, Hydra issue
2070): each rank would start the sweep again, in stray output directories. :class:`JobDDPStrategy`
starts them with the command of *this job* instead (:func:`job_command`: its own overrides, its
``run_name``, ``hydra.run.dir`` = its run directory, ``hydra.output_subdir=null`` so no rank rewrites the
job's ``.hydra`` folder), so every rank trains the same job in the same directory. When a cluster
environment starts the ranks itself (SLURM ``srun``, torchrun), nothing is started.

**Submitit** (:mod:`hydra_plugins.residual_dynamics_launcher.launchers`): a requeued job gets
:func:`requeue_overrides`, i.e. ``ckpt_path=last``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

# overrides a job command sets itself (the rest of the job's overrides are passed on unchanged)
_OWN_KEYS = ("run_name", "ckpt_path", "paths.run_dir", "hydra.run.dir", "hydra.output_subdir", "hydra.job.name")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


_SAFE = re.compile(r"^[A-Za-z0-9_./:@+-]*$")


def hydra_value(value: Any) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted (a job's run name and
    folder hold ``=``, ``,`` and brackets from its overrides)."""
    text = str(value)
    return text if _SAFE.match(text) else '"' + text.replace('"', '\\"') + '"'


def job_command(run_name: str, run_dir: Path, ckpt_path: Optional[str] = "last",
                module: str = "residual_dynamics.train") -> Optional[list[str]]:
    """The command line that runs this Hydra job again as a single run, in its run directory: the job's
    config sources and overrides, ``run_name``, ``hydra.run.dir`` and ``ckpt_path`` (omitted when None).
    None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    command = [sys.executable, "-m", module]
    for source in hc.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            command += ["--config-dir", source.path]
    if hc.job.config_name and hc.job.config_name != "config":
        command += ["--config-name", hc.job.config_name]
    command += [o for o in hc.overrides.task if _override_key(o) not in _OWN_KEYS]
    command += [f"run_name={hydra_value(run_name)}", f"hydra.run.dir={hydra_value(Path(run_dir).resolve())}"]
    if ckpt_path is not None:
        command.append(f"ckpt_path={hydra_value(ckpt_path)}")
    return command


def ddp_strategy(name: str, command: Optional[Sequence[str]], cwd: Optional[str] = None):
    """``trainer.strategy`` as Lightning's name (str), or a :class:`JobDDPStrategy` for a popen DDP
    strategy when the job command is known."""
    entry = StrategyRegistry[name] if name in StrategyRegistry else None
    if command is None or entry is None or entry["strategy"] is not DDPStrategy:
        return name
    params = dict(entry["init_params"])
    if params.get("start_method", "popen") != "popen":
        return name
    return JobDDPStrategy(command=list(command), cwd=cwd, **params)


class JobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, starting ranks 1..N-1 with the job command."""

    def __init__(self, cluster_environment, num_processes: int, num_nodes: int, command: list[str],
                 cwd: Optional[str]):
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.command, self.cwd = command, cwd

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command = self.command + ["hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{local_rank}"]
            self.procs.append(subprocess.Popen(command, env=env, cwd=self.cwd))


class JobDDPStrategy(DDPStrategy):
    """DDP whose extra ranks run this job's own command (see the module docstring)."""

    def __init__(self, command: list[str], cwd: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._job_command, self._job_cwd = command, cwd

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = JobScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes,
                                           self._job_command, self._job_cwd)


def requeue_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a requeued job: the same, with ``ckpt_path=last`` (it resumes its own last
    checkpoint, or starts fresh when it wrote none)."""
    return [o for o in overrides if _override_key(o) != "ckpt_path"] + ["ckpt_path=last"]
