"""Runs on clusters: SLURM jobs that submitit requeues, and torchrun's processes agreeing on one run directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from finetune.errors import ConfigError


def under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_run_id() -> str | None:
    """torchrun's rendezvous id when this process is one of several it started, else None. Every process of the run
    has the same one, on every node, and keeps it when torchrun restarts them; `--standalone` (and a single-node
    torchrun without an endpoint) makes a new random one per run. None also where it is torchrun's default, "none",
    which names no run in particular."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return run_id if under_torchrun() and run_id not in ("", "none") else None


def torchrun_arguments(argv: Sequence[str]) -> list[str]:
    """Hydra overrides that make the processes of one torchrun run share one run directory: all name it after the
    rendezvous id (conf/hydra/default.yaml, `run_name`), and those of ranks after the first leave .hydra/ to rank 0
    and log to train_rankN.log beside its train.log. ConfigError when torchrun gives no id to name it after and the
    command line gives no hydra.run.dir (hydra.sweep.dir with -m)."""
    if not under_torchrun():
        return []
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv}
    if torchrun_run_id() is None and not given & {"hydra.run.dir", "hydra.sweep.dir"}:
        raise ConfigError("torchrun started these processes without a rendezvous id, so they cannot agree on one run "
                          "directory (each would name its own after its clock): give torchrun --rdzv-id=JOB_ID (the "
                          "same on every node), or hydra.run.dir=DIR on a filesystem every node sees")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        return []
    extra = ["hydra.output_subdir=null"]
    if "hydra.job.name" not in given:
        extra.append(f"hydra.job.name=train_rank{rank}")
    return extra


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
