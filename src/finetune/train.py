"""finetune.train.run: one training run, from a composed config to a tested best checkpoint and metrics.json."""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from finetune import loggers
from finetune.callbacks.dashboards import Dashboards
from finetune.callbacks.mixed_precision import CountSkippedSteps
from finetune.callbacks.nonfinite import StopOnNonFiniteLoss
from finetune.callbacks.preemption import Interrupted, Preempted, RequeueAtBatchBoundary, SaveOnPreemption
from finetune.callbacks.schedule import EMA, ApplySchedule, SummaryOfTheFirstEpoch
from finetune.checkpoints import AtomicCheckpointIO, remove_leftovers
from finetune.cluster import cluster_plugins
from finetune.config import CONF, OWN_TRAINER_KEYS, ConfigError, FinetuneError, TrainConfig, validate
from finetune.data.datamodule import ImageDataModule
from finetune.data.transforms import Preprocessing, resolve_preprocessing
from finetune.models.backbone import architecture, backbone_blocks, create_backbone
from finetune.models.classifier import Classifier, UnsafeCheckpoint, load_checkpoint
from finetune.schedule import Schedule, use_scratch_when_nothing_to_protect
from finetune.stats import accuracy_interval

log = logging.getLogger(__name__)

# The metrics each run reports in TensorBoard's HPARAMS tab, to compare the runs of a sweep.
HPARAM_METRICS = ("val/acc", "val/acc_best", "val/loss", "train/loss", "test/acc", "test/loss")
GROUPS = ("dataset", "backbone", "head", "schedule", "augment", "trainer", "logger", "callbacks", "debug", "experiment",
          "hparams_search")


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train and test as `cfg` says; write everything into its run directory; return the final metrics.

    `overrides` (default: this Hydra command line's) are applied to a resumed run's saved config, and say whether
    schedule.lr was given (then tune.lr_find does not replace it).
    """
    overrides = _command_line_overrides() if overrides is None else overrides
    if cfg.get("resume") == "auto":
        finished = continue_or_start(cfg)
        if finished is not None:
            return finished
    resuming = cfg.get("resume") is not None
    if resuming:
        cfg = resume_config(cfg, overrides)
    else:
        use_scratch_when_nothing_to_protect(cfg, overrides)
    cfg = validate(cfg)
    refuse_multirun_with_ddp(cfg.trainer)
    run_dir = Path(cfg.run_dir)
    if not resuming:
        refuse_a_finished_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("Run directory: %s", run_dir)
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    if not resuming:
        _save_config(cfg, run_dir / "config.yaml")
    remove_leftovers(run_dir / "checkpoints")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Model first: missing pretrained weights or a bad backbone name fail before the dataset is read.
    backbone = create_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.weights, cfg.head.pool)
    for warning in Schedule(_plain(cfg.schedule), len(backbone_blocks(backbone))).warnings():  # checks its phases
        log.warning("schedule: %s", warning)
    preprocessing = resolve_preprocessing(backbone, cfg.dataset.image_size, cfg.dataset.crop_pct)
    data = build_data(cfg, preprocessing, run_dir, split_file=run_dir / "split.csv" if resuming else None)
    data.prepare_data()
    data.setup("fit")
    model = build_model(cfg, backbone, data, preprocessing)
    if cfg.trainer.get("compile"):
        compile_model(model)

    trainer = build_trainer(cfg, run_dir, data, resuming=resuming)
    ckpt_path = None
    if resuming:
        ckpt_path = run_dir / "checkpoints" / "last.ckpt"
        step = check_resumable(ckpt_path, data.classes, cfg.backbone.name)
        log.info("Resuming from %s (global step %d)", ckpt_path, step)
    else:
        if cfg.tune.lr_find:
            find_learning_rate(trainer, model, data, cfg, run_dir, given=_gives(overrides, "schedule.lr"))
        log_hparams(trainer, cfg, preprocessing.image_size)
        log_class_counts(trainer, data)
        log_duplicate_groups(trainer, data)
    with loggers.ended(trainer, run_dir, cfg.logger.log_model):
        loggers.start(trainer, run_dir, None if resuming else hyperparameters(cfg, preprocessing.image_size))
        fit(trainer, model, data, run_dir, ckpt_path)
        phases = model.schedule.gains()  # before testing loads the best checkpoint, whose history ends at its epoch
        metrics = test_best(trainer, model, data, run_dir)
        metrics["phases"] = phases
        if trainer.is_global_zero:  # before the trackers close: an uploaded best.ckpt holds its temperature
            if cfg.calibrate:
                metrics.update(calibrate_best(run_dir, data, trainer.strategy.root_device))
            write_model_card(cfg, model, data, metrics, run_dir)
        # Last: resume=auto takes a run with metrics.json for finished, so it is written once all else is done.
        _write_json(run_dir / "metrics.json", metrics)
    log.info("Test accuracy %.4f (best checkpoint). Run directory: %s", metrics.get("test/acc", float("nan")), run_dir)
    for line in loggers.hints(cfg.logger, run_dir):
        log.info("%s", line)
    # Let this run's model, data and trainer go (they hold reference cycles), so a sweep's jobs do not add up.
    del trainer, model, data, backbone
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics


def fit(trainer: L.Trainer, model: Classifier, data: ImageDataModule, run_dir: Path, ckpt_path: Path | None) -> None:
    """trainer.fit, with SIGTERM (pre-emption) and Ctrl-C turned into messages that say how to continue."""
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except SIGTERMException:
        kept = f"the checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} holds that step. Continue with resume={run_dir}"
        for callback in trainer.callbacks:
            if isinstance(callback, RequeueAtBatchBoundary):
                callback.requeue(f"stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; {kept}")
        raise Preempted(f"Stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; {kept}") \
            from None
    except SystemExit as e:  # Lightning's sys.exit(1) once it has caught a KeyboardInterrupt (Ctrl-C)
        if not trainer.interrupted or not isinstance(e.__context__, KeyboardInterrupt):
            raise  # another exit (submitit's, having requeued the job) goes on as it is
        last = run_dir / "checkpoints" / "last.ckpt"
        kept = f"{last} holds the last whole epoch; continue with resume={run_dir}" if last.is_file() else \
            "no checkpoint had been written yet"
        raise Interrupted(f"Interrupted (Ctrl-C) in epoch {trainer.current_epoch}. Nothing was lost: {kept}") \
            from None


def continue_or_start(cfg: DictConfig) -> dict | None:
    """resume=auto: continue the run that cfg.run_dir holds (a requeued SLURM job runs again in its own directory; so
    does the same command with hydra.run.dir=DIR), start a fresh one where it holds none; cfg.resume says which.
    A finished run (metrics.json) is not trained again: its metrics are returned, and the command ends well (a requeue
    that comes after the run finished has nothing left to do)."""
    run_dir = Path(cfg.run_dir)
    metrics, last = run_dir / "metrics.json", run_dir / "checkpoints" / "last.ckpt"
    if metrics.is_file():
        log.info("resume=auto: %s holds a finished run (metrics.json), so there is nothing to do: it is not trained "
                 "again. To train it longer: resume=%s schedule.epochs=N", run_dir, run_dir)
        return json.loads(metrics.read_text())
    if last.is_file():
        log.info("resume=auto: %s holds a run; continuing it from %s", run_dir, last)
        cfg.resume = str(run_dir)
        return None
    others = sorted(run_dir.glob("checkpoints/*.ckpt"))
    if others:
        raise ConfigError(f"resume=auto: {run_dir} holds {', '.join(p.name for p in others)} but no {last.name} to "
                          f"continue from, and a fresh run would overwrite it: `cp {others[0]} {last}` continues "
                          f"from that checkpoint's epoch; or give the new run another hydra.run.dir")
    log.info("resume=auto: %s holds no run yet; starting a fresh one", run_dir)
    cfg.resume = None
    return None


def refuse_a_finished_run(run_dir: Path) -> None:
    """A fresh run never writes over a run directory that already holds one (hydra.run.dir=an earlier run)."""
    import os

    if int(os.environ.get("LOCAL_RANK", 0)) > 0:  # a DDP worker started by rank 0, in rank 0's own directory
        return
    held = [p.name for p in (run_dir / "metrics.json", *sorted(run_dir.glob("checkpoints/*.ckpt"))) if p.is_file()]
    if held:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}), which a new run would overwrite: "
                          f"continue it with resume={run_dir}, or give the new run another hydra.run.dir")


def check_resumable(last: Path, classes: list[str], backbone: str) -> int:
    """Open last.ckpt as resume will (refusing one that would run code, before Lightning opens it), and check it is
    this run's: the same class names and backbone; return its global step. If it is damaged, say which intact
    checkpoint can take its place."""
    try:
        checkpoint = load_checkpoint(last)
        hp = checkpoint.get("hyper_parameters", {})
        theirs = list(hp.get("classes", [])), hp.get("backbone_config", {}).get("name")
        if theirs != (list(classes), backbone):
            raise ConfigError(f"{last} is not this run's checkpoint: it holds {theirs[1]} for {len(theirs[0])} classes "
                              f"({', '.join(theirs[0][:5])}{', ...' if len(theirs[0]) > 5 else ''}), the run is "
                              f"{backbone} for {len(classes)} ({', '.join(classes[:5])}"
                              f"{', ...' if len(classes) > 5 else ''}); resume only a run's own checkpoint")
        return int(checkpoint.get("global_step", 0))
    except (UnsafeCheckpoint, ConfigError):
        raise
    except FinetuneError as e:
        for other in sorted(last.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
            if other == last:
                continue
            try:
                load_checkpoint(other)
            except FinetuneError:
                continue
            raise FinetuneError(f"{e}. {other} is intact: continue from it with `cp {other} {last}` and the same "
                                f"resume= again (its epoch is where training goes on)") from None
        raise FinetuneError(f"{e}, and the run has no other intact checkpoint: start a new run") from None


def build_data(cfg: DictConfig, preprocessing: Preprocessing, run_dir: Path,
               split_file: Path | None = None) -> ImageDataModule:
    """The run's ImageDataModule (not yet set up), with the frozen-backbone feature cache if the schedule asks."""
    s = cfg.schedule
    return ImageDataModule(cfg.dataset, cfg.augment, preprocessing, cfg.seed, run_dir, split_file=split_file,
                           cache_features=s.cache_features, feature_views=s.cache_views, ema=s.ema is not None)


def build_model(cfg: DictConfig, backbone: torch.nn.Module, data: ImageDataModule,
                preprocessing: Preprocessing) -> Classifier:
    """The Classifier for `backbone` on the classes of `data` (set up), as `cfg` describes it."""
    return Classifier(
        backbone,
        classes=data.classes,
        backbone_config={**_plain(cfg.backbone), **architecture(backbone, cfg.backbone.name)},
        head_config=_plain(cfg.head),
        schedule=_plain(cfg.schedule),
        preprocessing=preprocessing.as_dict(),
        class_weights=data.class_weights() if cfg.dataset.balance == "weights" else None,
        mix={"mixup": cfg.augment.mixup, "cutmix": cfg.augment.cutmix},
    )


def compile_model(model: Classifier) -> None:
    """torch.compile the backbone and the head in place (nn.Module.compile): parameter names, and so checkpoints,
    stay exactly as without it. The training step around them (metrics, logging) stays eager, so the compiled
    graphs are the network alone; they are recompiled once when the backbone unfreezes."""
    model.backbone.compile()
    model.head.compile()
    log.info("torch.compile: backbone and head compile on their first batch (this takes a while once)")


def refuse_multirun_with_ddp(trainer: DictConfig) -> None:
    """Lightning's DDP starts its worker processes by re-running this command line, which breaks a Hydra multirun
    on the local launcher: refuse that combination before any work."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
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


def find_learning_rate(trainer: L.Trainer, model: Classifier, data: ImageDataModule, cfg: DictConfig, run_dir: Path,
                       given: bool) -> float:
    """Lightning's learning-rate finder: plot it to RUN_DIR/lr_find.png and, unless schedule.lr was given on the
    command line, train with its suggestion."""
    from lightning.pytorch.tuner import Tuner

    t = cfg.tune
    epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(epochs, t.steps)  # the finder counts steps; small datasets need epochs more
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=data, min_lr=t.min_lr, max_lr=t.max_lr,
                                        num_training=t.steps, early_stop_threshold=t.early_stop_threshold,
                                        update_attr=False)
    finally:
        trainer.fit_loop.max_epochs = epochs
    suggestion = finder.suggestion() if finder is not None else None
    if finder is not None:
        figure = finder.plot(suggest=suggestion is not None, show=False)
        figure.savefig(run_dir / "lr_find.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(figure)
    if any(p.get("lr") is not None for p in cfg.schedule.phases or []):
        log.warning("The phases of schedule=%s set their own learning rates: the finder's suggestion applies only "
                    "to phases without one", cfg.schedule.name)
    if suggestion is None:
        log.warning("The learning-rate finder made no suggestion; keeping schedule.lr=%s", cfg.schedule.lr)
        return cfg.schedule.lr
    if given:
        log.info("Learning-rate finder suggests %.3g (plot: %s); keeping schedule.lr=%s from the command line",
                 suggestion, run_dir / "lr_find.png", cfg.schedule.lr)
        return cfg.schedule.lr
    log.info("Learning-rate finder suggests %.3g (plot: %s): training with schedule.lr=%.3g", suggestion,
             run_dir / "lr_find.png", suggestion)
    cfg.schedule.lr = float(suggestion)
    model.hparams.schedule["lr"] = float(suggestion)
    model.schedule = Schedule(model.hparams.schedule, model.schedule.blocks)
    _save_config(cfg, run_dir / "config.yaml")
    return float(suggestion)


def _gives(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def build_trainer(cfg: DictConfig, run_dir: Path, data: ImageDataModule | None = None,
                  resuming: bool = False) -> L.Trainer:
    """A Lightning Trainer with finetune's callbacks and the loggers cfg.logger switches on (a resumed run continues
    its tracker runs), and `cfg.trainer` passed through; `data`'s frozen-feature cache joins the callbacks."""
    s = cfg.schedule
    # Two savers: Lightning's save_last writes last.ckpt only in epochs that also write a new best, so on its own
    # it would leave resume an old epoch. The first ModelCheckpoint is the trainer's `checkpoint_callback`.
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/acc", mode="max",
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
        SaveOnPreemption(checkpoints / "last.ckpt"),
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
        callbacks.append(EarlyStopping("val/acc", mode="max", patience=cfg.callbacks.early_stopping_patience))
    callbacks += [instantiate(extra) for extra in cfg.callbacks.extra]
    if cfg.callbacks.progress_bar:
        callbacks.append(ProgressBar(refresh_rate=10))  # reading the live loss is a host sync: not every step

    kwargs = {k: v for k, v in _plain(cfg.trainer).items() if k not in OWN_TRAINER_KEYS}
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


def test_best(trainer: L.Trainer, model: Classifier, data: ImageDataModule, run_dir: Path) -> dict:
    """Test the best checkpoint (the current weights when there is none): the metrics for metrics.json."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    best_score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best_score is not None:
        metrics["val/acc_best"] = float(best_score)
    metrics["epochs"] = trainer.current_epoch
    metrics["global_step"] = trainer.global_step
    metrics["best_checkpoint"] = str(Path(best).relative_to(run_dir)) if best else None
    metrics["test_images"] = len(data.indices("test")) or len(data.indices("val"))
    metrics["val_images"] = len(data.indices("val"))
    # 95% Wilson intervals: how far the accuracies could be from the truth on sets this small
    metrics["test/acc_ci95"] = accuracy_interval(metrics.get("test/acc"), metrics["test_images"])
    metrics["val/acc_best_ci95"] = accuracy_interval(metrics.get("val/acc_best"), metrics["val_images"])
    return metrics


def calibrate_best(run_dir: Path, data: ImageDataModule, device: torch.device) -> dict:
    """Fit the best checkpoint's temperature on the validation split and store it in best.ckpt, where evaluate,
    predict and export read it; the test NLL and ECE before and after, for metrics.json."""
    from finetune.calibration import can_fit_temperature, ece, fit_temperature, nll
    from finetune.models.classifier import load_classifier

    best = run_dir / "checkpoints" / "best.ckpt"
    if not best.is_file() or not len(data.indices("val")):
        return {}
    model = load_classifier(best).to(device)
    val_logits, val_labels = split_logits(model, data, "val", device)
    temperature = fit_temperature(val_logits, val_labels)
    test_logits, test_labels = split_logits(model, data, "test" if len(data.indices("test")) else "val", device)
    before, after = test_logits.softmax(1).numpy(), (test_logits / temperature).softmax(1).numpy()
    labels = test_labels.numpy()
    checkpoint = load_checkpoint(best)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "temperature": temperature}
    AtomicCheckpointIO().save_checkpoint(checkpoint, best)  # as every checkpoint: whole, or the old one stays
    result = {"val/temperature": temperature, "test/nll_before": nll(before, labels),
              "test/nll_after": nll(after, labels), "test/ece_before": ece(before, labels),
              "test/ece_after": ece(after, labels)}
    if not can_fit_temperature(val_logits, val_labels):
        log.info("Calibration: every one of the %d validation images is classified right, so no temperature can be "
                 "fitted (the NLL only falls as T goes to 0): T stays 1", len(val_labels))
    else:
        log.info("Calibration: temperature %.3f fitted on %d validation images; test NLL %.4f -> %.4f, ECE %.4f -> "
                 "%.4f (stored in %s)", temperature, len(val_labels), result["test/nll_before"],
                 result["test/nll_after"], result["test/ece_before"], result["test/ece_after"], best)
    return result


def split_logits(model: Classifier, data: ImageDataModule, split: str,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's float32 logits for `split`'s images (evaluation transform), and their labels, on the CPU."""
    loader = data.plain_loader(data.dataset(split, train_transforms=False))
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            images, y = data.decode(batch, False, device)
            logits.append(model(images.to(device)).float().cpu())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def write_model_card(cfg: DictConfig, model: Classifier, data: ImageDataModule, metrics: dict, run_dir: Path) -> None:
    """RUN_DIR/model_card.md: the backbone, data, schedule, test metrics, use and limits of this run's model."""
    from finetune.model_card import train_card

    skipped = run_dir / "skipped.csv"
    passed_over = max(len(skipped.read_text().splitlines()) - 1, 0) if skipped.is_file() else 0
    text = train_card(cfg, data.classes, data.class_counts(), metrics, model.hparams.backbone_config,
                      model.hparams.preprocessing, sum(p.numel() for p in model.parameters()), passed_over, run_dir)
    tmp = run_dir / "model_card.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "model_card.md")


def hyperparameters(cfg: DictConfig, image_size: int) -> dict:
    """The hyperparameters that compare the runs of a sweep: TensorBoard's HPARAMS, MLflow's params, W&B's config."""
    return {
        "dataset": cfg.dataset.name, "backbone": cfg.backbone.name, "pretrained": cfg.backbone.pretrained,
        "head": cfg.head.name, "dropout": cfg.head.dropout, "image_size": image_size,
        "batch_size": cfg.dataset.batch_size, "augment": cfg.augment.name, "seed": cfg.seed,
        "precision": resolve_precision(cfg.trainer),
        **{f"schedule.{k}": (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in cfg.schedule.items()},
    }


def log_hparams(trainer: L.Trainer, cfg: DictConfig, image_size: int) -> None:
    """Write this run's hyperparameters and metric names for TensorBoard's HPARAMS tab.

    Lightning's log_hyperparams would also log a placeholder value for every metric at step 0, which then shows
    in the curves; the summaries written here only name the metrics, whose values TensorBoard reads from the run.
    """
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0:
        return
    from torch.utils.tensorboard.summary import hparams

    params = hyperparameters(cfg, image_size)
    writer = tensorboard.experiment._get_file_writer()  # reopened if the learning-rate finder's fit closed it
    for summary in hparams(params, {m: 0.0 for m in HPARAM_METRICS}):
        writer.add_summary(summary)
    writer.flush()


def log_class_counts(trainer: L.Trainer, data: ImageDataModule) -> None:
    """The images per class in each split, as a table in TensorBoard's TEXT tab."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0:
        return
    counts = data.class_counts()
    rows = ["| class | train | val | test |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
             for i, name in enumerate(data.classes)]
    tensorboard.experiment.add_text("dataset/class_counts", "\n".join(rows))


def log_duplicate_groups(trainer: L.Trainer, data: ImageDataModule, groups: int = 6, per_group: int = 4,
                         size: int = 96) -> None:
    """A few groups of duplicates (label conflicts first), one row of images each, in TensorBoard's IMAGES tab."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0 or data.duplicates is None or not data.duplicates[0].groups:
        return
    from finetune.data.datamodule import load_image
    from finetune.data.duplicates import is_conflict

    duplicates, source = data.duplicates
    shown = sorted(duplicates.groups, key=lambda m: not is_conflict(m, source.labels))[:groups]
    grid = np.full((len(shown) * size, per_group * size, 3), 255, dtype=np.uint8)
    for row, members in enumerate(shown):
        for col, j in enumerate(members[:per_group]):
            try:
                image = load_image(source, int(j), data.cfg.max_pixels, draft=size)
            except Exception:  # a file that broke since the scan: its cell stays white
                continue
            image.thumbnail((size, size))
            grid[row * size:row * size + image.height, col * size:col * size + image.width] = np.asarray(image)
    tensorboard.experiment.add_image("dataset/duplicate_groups", grid, 0, dataformats="HWC")


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of run `cfg.resume`, with the single values given on this command line (schedule.epochs=20)."""
    run_dir = Path(cfg.resume).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={cfg.resume}: no such run directory")
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume={cfg.resume}: there is no {last} to resume from (no fresh run was started)")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: {saved_path} is missing, so this is not a finetune run directory")
    saved = OmegaConf.load(saved_path)
    if "schedule" in saved and "norm_bias_decay" not in saved.schedule:
        saved.schedule.norm_bias_decay = True  # a run of a release that decayed every parameter: same groups again
    if "schedule" in saved and "bn" not in saved.schedule:
        saved.schedule.bn = "train"  # a run of a release that always trained BatchNorm: it goes on doing so
    changes = []
    last_of_each = {override.lstrip("+~").partition("=")[0]: override for override in overrides}  # as Hydra: last wins
    for override in last_of_each.values():
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        if key in GROUPS:
            differing = _differences_from_preset(key, value, saved)
            if differing:
                raise ConfigError(f"resume={cfg.resume} continues that run with its own config, and {override} is not "
                                  f"it ({', '.join(differing[:3])}): change single values (schedule.epochs=20), or "
                                  f"start a new run")
            continue  # the same group as the run's own: the same command line again
        unset = object()
        if OmegaConf.select(saved, key, default=unset) == OmegaConf.select(
                OmegaConf.from_dotlist([override.lstrip("+")]), key):
            continue  # the value the run already has
        if key == "schedule.ema":
            raise ConfigError(f"resume={cfg.resume}: schedule.ema cannot change when a run resumes (its checkpoints "
                              f"hold the averaged weights, or not): start a new run")
        changes.append(override.lstrip("+"))
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved, OmegaConf.from_dotlist(changes))
    merged.resume = str(run_dir)
    merged.run_dir = str(run_dir)
    if changes:
        backup = run_dir / f"config.before-resume-{len(list(run_dir.glob('config.before-resume-*.yaml'))) + 1}.yaml"
        _keep_config(saved_path, backup)
        _save_config(merged, saved_path)
        log.info("Resuming with %s; the previous config is kept as %s", ", ".join(changes), backup.name)
    return merged


def _differences_from_preset(group: str, option: str, saved: DictConfig) -> list[str]:
    """Where conf/GROUP/OPTION.yaml differs from the saved run's config, as `key: saved -> preset`; [] when the
    preset is what the run already has."""
    if option.startswith("[") and option.endswith("]"):  # logger=[tensorboard,mlflow]: each of the presets
        return [d for one in option[1:-1].split(",") if one.strip()
                for d in _differences_from_preset(group, one.strip(), saved)]
    path = CONF / group / f"{option}.yaml"
    if option in ("null", "None", ""):
        return []
    if not path.is_file():
        return [f"there is no {group} preset {option}"]
    text = path.read_text()
    preset = OmegaConf.load(path)
    preset.pop("defaults", None)
    base = "" if "@package _global_" in text else f"{group}."
    differing = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            if OmegaConf.is_missing(node, key):  # ??? (dataset.root): the preset leaves it to the command line
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
                continue
            have = OmegaConf.select(saved, f"{prefix}{key}", default=None)
            if OmegaConf.is_list(value):
                value = OmegaConf.to_container(value)
                have = OmegaConf.to_container(have) if OmegaConf.is_list(have) else have
            if have != value:
                differing.append(f"{prefix}{key}: {have} -> {value}")

    walk(preset, base)
    return differing


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


@rank_zero_only
def _save_config(cfg: DictConfig, path: Path) -> None:
    """Written whole or not at all: the other processes of a torchrun run, started with rank 0, may be reading it."""
    tmp = path.with_name(f".{path.name}.tmp")
    OmegaConf.save(cfg, tmp, resolve=True)
    tmp.replace(path)


@rank_zero_only
def _keep_config(path: Path, backup: Path) -> None:
    import shutil

    shutil.copy2(path, backup)


@rank_zero_only
def _write_json(path: Path, data: dict) -> None:
    """Valid JSON: a metric that is not a finite number is written as null, never as NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
