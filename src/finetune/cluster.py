"""Runs on clusters: SLURM jobs that submitit requeues."""

from __future__ import annotations

import os
from typing import Any


def in_submitit_job() -> bool:
    """Whether this process is a job that submitit runs (hydra/launcher=slurm, submitit_slurm or submitit_local),
    which SLURM may stop and requeue."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster this runs on. On SLURM: Lightning's SLURM environment without its own
    auto-requeue, so that submitit alone requeues a job (hydra/launcher=slurm). Lightning's would, on SIGUSR1, save
    an hpc_ckpt_N.ckpt from inside the signal handler, wherever the step is, and call `scontrol requeue` beside
    submitit's; and when the requeued job starts, Lightning prefers any hpc_ckpt in the run directory over the
    checkpoint finetune asks for, even for a fresh run. finetune's pre-emption path instead stops at the next batch
    boundary and writes last.ckpt, which resume=auto continues from."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
