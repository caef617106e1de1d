"""Runs on clusters: resume=auto, SLURM jobs that submitit requeues, and torchrun's processes in one run directory."""

import csv
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from support import (
    CONF,
    FAST,
    compose,
    given,
    second_checkpoint,
    sigterm_after_first_checkpoint,
    start_process,
)
from support.recipes import PROBE_THEN_UNFREEZE

from finetune.errors import ConfigError
from finetune.runconfig import continue_or_start
from finetune.trainer import build_trainer
from finetune.training import run


def start(cwd, *args, module=None):
    return start_process("train", *args, cwd=cwd, python=("-m", *module) if module else ())


def hydra_config(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.config  # noqa: F401

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", return_hydra_config=True, overrides=list(overrides))


def files(run_dir):
    """Every file of a run with its modification time, but Hydra's own (.hydra/, rewritten by each command) and the
    log (each command appends to it)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.mark.slow
def test_the_same_command_with_resume_auto_continues_the_killed_run_then_says_it_is_finished(tmp_path, shapes, caplog):
    """What a requeued job does: the same command again, in the same directory."""
    run_dir = tmp_path / "job"
    args = ["dataset=image_folder", f"dataset.root={shapes}", *PROBE_THEN_UNFREEZE, "dataset.batch_size=4",
            "schedule.epochs=6", "schedule.freeze_epochs=1", "logger=csv", "resume=auto"]
    first = start(tmp_path, *args, f"hydra.run.dir={run_dir}")
    epoch_steps, output = sigterm_after_first_checkpoint(first, run_dir)
    assert "holds no run yet; starting a fresh one" in output
    assert f"Continue with resume={run_dir}" in output  # what the SIGTERM's message tells a user to do
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at > epoch_steps
    config = (run_dir / "config.yaml").read_text()

    again = start(tmp_path, *args, f"hydra.run.dir={run_dir}")
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert f"holds a run; continuing it from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    assert f"(global step {stopped_at})" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 6 and metrics["global_step"] == 6 * epoch_steps  # went on, not from step 0
    assert (run_dir / "config.yaml").read_text() == config and "resume: null" in config  # the same run, unchanged
    assert not (tmp_path / "outputs").exists()  # and no run directory of its own beside it

    before = files(run_dir)
    cfg = compose(run_dir, *args)  # a third time, after it finished (in this process: what the script runs)
    with caplog.at_level("INFO", logger="finetune"):
        assert run(cfg, overrides=given(cfg)) == metrics
    assert f"resume=auto: {run_dir} holds a finished run (metrics.json), so there is nothing to do" in caplog.text
    assert files(run_dir) == before  # nothing trained or written again


def test_resume_auto_in_a_directory_without_a_run_starts_a_fresh_one(tmp_path):
    assert hydra_config("resume=auto").hydra.run.dir.startswith("outputs/runs/")  # not a folder called "auto"
    run_dir = tmp_path / "fresh"
    (run_dir / "checkpoints").mkdir(parents=True)  # a job stopped before its first checkpoint leaves this much
    (run_dir / "config.yaml").write_text("seed: 1\n")
    cfg = compose(run_dir, "resume=auto")
    assert continue_or_start(cfg) is None and cfg.resume is None  # a fresh run (the subprocess test above trains one)


def test_resume_auto_never_writes_over_checkpoints_it_cannot_continue(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"resume=auto: .* holds best.ckpt but no last.ckpt to continue from.*"
                                          r"`cp .*best.ckpt .*last.ckpt`"):
        run(compose(run_dir, "resume=auto"), overrides=["resume=auto"])
    assert (run_dir / "checkpoints" / "best.ckpt").read_bytes() == b"weights"


def test_slurm_launcher_requeues_jobs_that_continue_in_their_own_directory(tmp_path, monkeypatch):
    """hydra/launcher=slurm, through hydra-submitit-launcher's own launch(): the sbatch file submitit writes (time
    limit, its signal before it, requeue), max_num_timeout, resume=auto in every job, and submitit's checkpoint hook
    re-running the same job, pickled as submitit pickles it, in the same directory."""
    import cloudpickle
    import submitit
    from hydra.utils import get_class
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.chdir(tmp_path)
    cfg = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                       "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                       "hydra.launcher.timeout_min=720", "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=64",
                       "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = get_class(params.pop("_target_"))(**params)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # srun is on clusters, not here
    submitted = {}

    class Submitted:
        def results(self):
            return [None]

    def map_array(executor, function, *args):
        submitted.update(executor=executor._executor, function=function, args=list(zip(*args)))
        return [Submitted() for _ in args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.launch([["schedule.lr=1e-3"], ["schedule.lr=3e-3"]], initial_job_idx=0)

    executor = submitted["executor"]
    assert executor.max_num_timeout == 20  # time-limit kills requeue, up to 20 times
    text = executor._make_submission_file_text("python scripts/train.py", "job")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in text, line
    assert cfg.trainer.num_nodes * cfg.trainer.devices == 8 == params["nodes"] * params["tasks_per_node"]

    assert cfg.resume is None  # here, where the sweep is submitted; in the jobs (SUBMITIT_EXECUTOR=slurm):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert hydra_config().resume == "auto" and hydra_config("resume=outputs/runs/x").resume == "outputs/runs/x"

    job = submitted["args"][0]
    sweep_dir = str(cfg.hydra.sweep.dir)
    time.sleep(0.01)  # a run_name resolved again now would be another folder
    delayed = cloudpickle.loads(cloudpickle.dumps(submitted["function"].checkpoint(*job)))
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert type(delayed.function) is type(launcher) and delayed.args[:4] == job[:4]  # the same job again...
    assert str(delayed.function.config.hydra.sweep.dir) == sweep_dir  # ...in the same directory


def test_on_slurm_lightning_leaves_requeueing_to_submitit(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from finetune.cluster import cluster_plugins

    assert cluster_plugins() == []  # not on SLURM: Lightning picks its environment as usual
    cfg = compose(tmp_path, *FAST, "logger=none")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    environment = build_trainer(cfg, tmp_path)._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


def test_a_job_that_submitit_will_not_requeue_again_ends_in_one_line():
    from submitit.core.utils import UncompletedJobError

    from finetune.callbacks.preemption import RequeueAtBatchBoundary
    from finetune.errors import NotRequeued

    def submitits_handler(signum, frame):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    hold = RequeueAtBatchBoundary()
    hold._submitit, hold.held = submitits_handler, signal.SIGUSR2  # as after a signal held while training
    with pytest.raises(NotRequeued, match=r"^Stopped near the time limit and not requeued \(Job not requeued because: "
                                          r"timed-out too many times. See hydra.launcher.max_num_timeout\): last.ckpt"):
        hold.requeue("last.ckpt holds that step")


def test_a_held_signal_with_no_batch_boundary_in_time_is_handed_to_submitit_at_the_deadline(monkeypatch):
    import time

    from finetune.callbacks.preemption import RequeueAtBatchBoundary

    handed = []
    hold = RequeueAtBatchBoundary()
    hold._submitit, hold._training, hold.deadline_s = lambda signum, frame: handed.append(signum), True, 0.2
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)  # the SIGTERM to Lightning: no batch boundary comes
    hold._hold(signal.SIGUSR2, None)
    assert handed == [] and hold.held == signal.SIGUSR2
    time.sleep(0.6)
    assert handed == [signal.SIGUSR2] and hold.held is None  # requeued by the deadline, once
    hold.requeue("last.ckpt")  # the boundary after all: nothing is handed twice
    assert handed == [signal.SIGUSR2]


def test_torchrun_processes_name_the_run_after_the_rendezvous_id(monkeypatch):
    from finetune.cluster import torchrun_arguments

    assert torchrun_arguments(["dataset=digits"]) == []  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_arguments([]) == []
    assert hydra_config().hydra.run.dir == "outputs/runs/torchrun-3f2a"
    assert hydra_config("resume=outputs/runs/x").hydra.run.dir == "outputs/runs/x/resumed/torchrun-3f2a"
    assert hydra_config("resume=auto").hydra.run.dir == "outputs/runs/torchrun-3f2a"
    assert hydra_config().hydra.sweep.dir == "outputs/sweeps/torchrun-3f2a"
    monkeypatch.setenv("RANK", "3")  # leaves .hydra/ to rank 0 and logs beside its train.log
    assert torchrun_arguments([]) == ["hydra.output_subdir=null", "hydra.job.name=train_rank3"]

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default with a static rendezvous
    with pytest.raises(ConfigError, match="without a rendezvous id.*--rdzv-id=JOB_ID.*or hydra.run.dir=DIR"):
        torchrun_arguments(["dataset=digits"])
    assert torchrun_arguments(["hydra.run.dir=/shared/run"]) == ["hydra.output_subdir=null",
                                                                 "hydra.job.name=train_rank3"]


def descendants(pid):
    """The processes started by `pid`, and by them, ..., from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += children.get(todo[-1], [])
        todo = todo[:-1] + children.get(todo[-1], [])
    return found


def command_line(pid):
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_job_that_submitit_requeues_continues_from_the_batch_it_stopped_at(tmp_path, shapes):
    """SLURM's time limit, simulated by submitit's local executor, which requeues a job on submitit's signal (USR2) as
    on SLURM: the job stops at the next batch boundary and writes last.ckpt there, submitit's checkpoint hook requeues
    it, and the requeued job (resume=auto, as in every submitit job) continues from that step to the planned epochs."""
    sweep = tmp_path / "sweep"
    driver = start(tmp_path, "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "dataset=image_folder",
                   f"dataset.root={shapes}", *PROBE_THEN_UNFREEZE, "dataset.batch_size=4", "schedule.epochs=5",
                   "schedule.freeze_epochs=1", "logger=none")
    job_dir = sweep / "0"
    epoch_steps = second_checkpoint(job_dir / "checkpoints" / "last.ckpt", driver)  # then mid-epoch
    job = next(p for p in descendants(driver.pid) if "submitit.core._submit" in command_line(p))
    os.kill(job, signal.SIGUSR2)
    output = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, output[-3000:]

    log = (job_dir / "train.log").read_text()
    assert "holds no run yet; starting a fresh one" in log and "holds a run; continuing it from" in log
    resumed_at = int(re.search(r"Resuming from \S+last.ckpt \(global step (\d+)\)", log).group(1))
    assert resumed_at > epoch_steps  # saved where the signal stopped it, not only at the end of an epoch
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 5 and metrics["global_step"] == 5 * epoch_steps
    job_output = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert "Calling checkpoint method" in job_output and "Requeued job" in job_output  # submitit's own hook did it
    assert ",completed," in (sweep / "summary.csv").read_text()


@pytest.mark.slow
def test_the_processes_torchrun_starts_write_one_run_directory(tmp_path, shapes):
    process = start(tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *FAST, "trainer=ddp",
                    "trainer.devices=2", "schedule.epochs=2", "schedule.freeze_epochs=1", "dataset.val_fraction=0.2",
                    "dataset.test_fraction=0.2", module=["torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["runs"]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")  # one, not one per process
    run_dir = runs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert (run_dir / "train_rank1.log").is_file()  # rank 1 logs beside rank 0
    assert len(list(tmp_path.rglob("checkpoints"))) == 1


@pytest.mark.slow
def test_a_sweep_under_torchrun_runs_each_job_as_one_ddp_run_and_rank_0_reports_it(tmp_path, shapes):
    """Issue 22 item 14: -m under torchrun was refused because Lightning would re-run the command for DDP's workers;
    under torchrun it starts none. Each job is one run of the two processes, one summary."""
    process = start(tmp_path, "-m", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "trainer=ddp",
                    "trainer.devices=2", "schedule.epochs=1", "schedule.freeze_epochs=0", "schedule.lr=1e-3,3e-3",
                    "dataset.val_fraction=0.2", "dataset.test_fraction=0.2", "calibrate=false",
                    module=["torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    sweeps = list((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.startswith("torchrun-")
    rows = list(csv.DictReader(open(sweeps[0] / "summary.csv")))
    assert len(rows) == 2 and {lr for r in rows for lr in r["overrides"].split() if lr.startswith("schedule.lr=")} \
        == {"schedule.lr=0.001", "schedule.lr=0.003"}
    assert all(r["status"] == "completed" for r in rows)
    for job in ("0", "1"):
        assert sorted(p.name for p in (sweeps[0] / job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        assert json.loads((sweeps[0] / job / "metrics.json").read_text())["epochs"] == 1
        assert (sweeps[0] / job / "train_rank1.log").is_file()  # rank 1 ran the job beside rank 0
