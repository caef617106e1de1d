"""Building the Trainer of a run: its callbacks, loggers, precision, compile and strategy, from the run's config."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import DictConfig, OmegaConf

from finetune import loggers, rundir
from finetune.callbacks.dashboards import Dashboards
from finetune.callbacks.ema import EMA
from finetune.callbacks.mixed_precision import CountSkippedSteps
from finetune.callbacks.nonfinite import StopOnNonFiniteLoss
from finetune.callbacks.preemption import RequeueAtBatchBoundary, SaveOnPreemption
from finetune.callbacks.schedule import ApplySchedule
from finetune.callbacks.summary import SummaryOfTheFirstEpoch
from finetune.checkpoints import AtomicCheckpointIO
from finetune.cluster import cluster_plugins
from finetune.errors import ConfigError, suggest

log = logging.getLogger(__name__)

# Keys of conf/trainer that finetune resolves itself instead of handing them to lightning.Trainer as they are.
OWN_TRAINER_KEYS = ("precision", "compile")


def check(trainer: DictConfig) -> None:
    """The `trainer` config: every key an argument of lightning.Trainer or one of finetune's own, a GPU that
    exists; one line naming the key."""
    import inspect

    from lightning.pytorch import Trainer

    def ok(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    known = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        ok(key in known or key in OWN_TRAINER_KEYS,
           f"trainer.{key} is not an argument of lightning.Trainer.{suggest(key, known)}")
    for key in ("max_epochs", "min_epochs"):
        ok(key not in trainer, f"trainer.{key}: set the number of epochs with schedule.epochs")
    if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda"):
            ok(torch.cuda.is_available(), f"trainer.accelerator={trainer.accelerator}, but this machine has no CUDA "
                                      f"GPU that PyTorch can use: trainer=cpu (or trainer.accelerator=auto)")


def build_trainer(cfg: DictConfig, run_dir: Path, data=None, resuming: bool = False) -> L.Trainer:
    """A Lightning Trainer with finetune's callbacks and the loggers cfg.logger switches on (a resumed run continues
    its tracker runs), and `cfg.trainer` passed through; `data`'s frozen-feature cache joins the callbacks."""
    s = cfg.schedule
    # Two savers: Lightning's save_last writes last.ckpt only in epochs that also write a new best, so on its own
    # it would leave resume an old epoch. The first ModelCheckpoint is the trainer's `checkpoint_callback`.
    from finetune.tasks import task_of

    checkpoints = run_dir / rundir.CHECKPOINTS
    task = task_of(data.task if data is not None and data.source is not None else cfg.get("task"))
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=task.monitor, mode=task.mode,
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    every = cfg.checkpoint.every_n_steps
    callbacks: list[L.Callback] = [
        ApplySchedule(),
        # Lightning's summary, after ApplySchedule: what trains in the first epoch (Lightning adds none beside it)
        *([SummaryOfTheFirstEpoch()] if cfg.trainer.get("enable_model_summary", True) else []),
        # checked at least at every step that may be saved, so no NaN model is written
        StopOnNonFiniteLoss(check_every=math.gcd(8, every) if every else 8),
        SaveOnPreemption(rundir.last(run_dir)),
        RequeueAtBatchBoundary(),  # in a submitit job: its requeue signal stops at a batch, as SIGTERM does
        best, last,
    ]
    if s.ema is not None:
        callbacks.append(EMA(decay=s.ema))
    if data is not None and data.features is not None:
        callbacks.append(data.features)
    if every:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="last", monitor=None, save_top_k=1,
                                         every_n_train_steps=every, enable_version_counter=False))
    chosen = loggers.build(cfg, run_dir, resuming)
    if chosen:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    dashboards = cfg.callbacks.dashboards
    if cfg.logger.tensorboard and dashboards.enabled:
        callbacks.append(Dashboards(dashboards.every_n_epochs, dashboards.images, dashboards.max_classes,
                                    dashboards.graph))
    if cfg.callbacks.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(task.monitor, mode=task.mode, patience=cfg.callbacks.early_stopping_patience))
    callbacks += [instantiate(extra) for extra in cfg.callbacks.extra]
    if cfg.callbacks.progress_bar:
        callbacks.append(ProgressBar(refresh_rate=10))  # reading the live loss is a host sync: not every step

    kwargs = {k: v for k, v in _plain(cfg.trainer).items() if k not in OWN_TRAINER_KEYS}
    steps = _steps_per_epoch(cfg, data)
    if steps and kwargs.get("log_every_n_steps", 50) > steps:  # else a short run logs no step at all (no rates)
        kwargs["log_every_n_steps"] = steps
    kwargs["precision"] = resolve_precision(cfg.trainer)
    if kwargs["precision"].startswith("16"):
        callbacks.append(CountSkippedSteps())
    if kwargs.get("profiler") == "simple":
        kwargs["profiler"] = SimpleProfiler(dirpath=run_dir, filename="profile")
    return L.Trainer(
        max_epochs=s.epochs,
        default_root_dir=run_dir,
        callbacks=callbacks,
        logger=chosen or False,
        enable_progress_bar=cfg.callbacks.progress_bar,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        **kwargs,
    )


def _steps_per_epoch(cfg: DictConfig, data) -> int | None:
    """Optimizer steps in a training epoch of `data` (set up), on one device; None where it is not known."""
    if data is None or getattr(data, "splits", None) is None:
        return None
    images = len(data.indices("train"))
    batch = int(cfg.dataset.batch_size) * int(cfg.trainer.get("accumulate_grad_batches") or 1)
    return max(1, images // batch if images > batch else 1)


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the latest training loss, read only when it redraws (every `refresh_rate`
    steps), and without the logger version number, which names nothing here."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loss = getattr(pl_module, "last_loss", None)
        if trainer.training and loss is not None:
            metrics = {"loss": f"{loss.item():.3g}", **metrics}
        return metrics


def resolve_precision(trainer: DictConfig) -> str:
    """trainer.precision, or when null: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, 32 on CPU."""
    if trainer.get("precision") is not None:
        return str(trainer.precision)
    on_gpu = torch.cuda.is_available() and trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def compile_model(model: L.LightningModule) -> None:
    """torch.compile the backbone and the head in place (nn.Module.compile): parameter names, and so checkpoints,
    stay exactly as without it. The training step around them (metrics, logging) stays eager, so the compiled
    graphs are the network alone; they are recompiled once when the backbone unfreezes."""
    model.backbone.compile()
    model.head.compile()
    log.info("torch.compile: backbone and head compile on their first batch (this takes a while once)")


def refuse_multirun_with_ddp(trainer: DictConfig) -> None:
    """Lightning's DDP starts its worker processes by re-running this command line, which breaks a Hydra multirun
    on the local launcher: refuse that combination before any work. Under torchrun it holds not: torchrun started
    every process already, each runs the sweep's jobs in the same order, and Lightning starts none."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from finetune.cluster import under_torchrun

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or under_torchrun():
        return
    strategy = str(trainer.get("strategy", "auto"))
    if "ddp" not in strategy or "spawn" in strategy or _processes(trainer) <= 1:
        return
    if "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", "")):
        raise ConfigError("-m (a sweep) with trainer=ddp on more than one device: Lightning starts DDP's workers by "
                          "re-running the command, which would start the whole sweep again in each. Run the jobs "
                          "one at a time, or send the sweep to SLURM with hydra/launcher=slurm (README)")


def _processes(trainer: DictConfig) -> int:
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    on_gpu = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return max(1, torch.cuda.device_count() if on_gpu else 1) * nodes




def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)
