"""Hydra's submitit launchers (``hydra/launcher=submitit_slurm`` / ``submitit_local``) with requeue = resume.

(Part of residual-dynamics; it lives in the ``hydra_plugins`` namespace because Hydra instantiates
launchers only from there.)

:class:`SlurmLauncher` and :class:`LocalLauncher` are hydra-submitit-launcher's launchers whose
``checkpoint`` -- which submitit calls when SLURM preempts the job, or before its time limit when
``max_num_timeout`` allows a requeue -- resubmits the job with ``ckpt_path=last``
(:func:`residual_dynamics.training.cluster.requeue_overrides`): the requeued job resumes from its own last
checkpoint (or starts fresh when it had written none), in the same run directory under the same run name
(``ckpt_path`` is not part of the job's folder name). conf/hydra/launcher/*.yaml select them.
"""

from __future__ import annotations

import logging
from typing import Any

import submitit
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from residual_dynamics.training.cluster import requeue_overrides

log = logging.getLogger(__name__)


class _RequeueWithResume:
    def checkpoint(self, sweep_overrides, *args: Any, **kwargs: Any) -> Any:
        overrides = requeue_overrides(sweep_overrides)
        log.warning("job preempted or timed out: requeued with %s", " ".join(overrides))
        return submitit.helpers.DelayedSubmission(self, overrides, *args, **kwargs)


class SlurmLauncher(_RequeueWithResume, submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher; a requeued job resumes with ``ckpt_path=last``."""


class LocalLauncher(_RequeueWithResume, submitit_launcher.LocalLauncher):
    """hydra-submitit-launcher's local launcher: the same code path as SLURM, on this machine."""
