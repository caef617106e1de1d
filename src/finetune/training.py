"""finetune.training.run: one training run, from a composed config to a tested best checkpoint and metrics.json.

The decisions before it (which run, a valid config) are finetune.runconfig's; the Trainer is finetune.trainer's."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from finetune import loggers, rundir
from finetune.callbacks.dashboards import hyperparameters, log_class_counts, log_duplicate_groups, log_hparams
from finetune.callbacks.preemption import RequeueAtBatchBoundary
from finetune.checkpoints import AtomicCheckpointIO, remove_leftovers
from finetune.data.datamodule import ImageDataModule
from finetune.data.transforms import Preprocessing, resolve_preprocessing
from finetune.errors import ConfigError, FinetuneError, Interrupted, Preempted, UnsafeCheckpoint
from finetune.models.backbone import architecture, backbone_blocks, create_backbone
from finetune.models.module import ImageModule, load_checkpoint
from finetune.runconfig import Plan, command_line_overrides, gives, is_rank_zero, plan, record_resume, save_config
from finetune.schedule import Schedule
from finetune.tasks import agrees, task_of
from finetune.trainer import build_trainer, compile_model, refuse_multirun_with_ddp

log = logging.getLogger(__name__)

def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train and test as `cfg` says; write everything into its run directory; return the final metrics.

    `overrides` (default: this Hydra command line's) are applied to a resumed run's saved config, and say whether
    schedule.lr was given (then tune.lr_find does not replace it). The scripts make the plan first, before they
    import this module (finetune.runconfig), and call run_plan.
    """
    overrides = command_line_overrides() if overrides is None else overrides
    return run_plan(plan(cfg, overrides), overrides)


def run_plan(plan: Plan, overrides: list[str]) -> dict:
    """The run `plan` (finetune.runconfig) decided on: train, test, calibrate, and record it."""
    if plan.finished is not None:
        return plan.finished
    refuse_multirun_with_ddp(plan.cfg.trainer)
    run_dir = Path(plan.cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_rank_zero():  # the other processes of a DDP or torchrun run write into rank 0's directory
        return _run(plan, overrides)
    with rundir.held(run_dir, " ".join(overrides)):
        return _run(plan, overrides)


def _run(plan: Plan, overrides: list[str]) -> dict:
    cfg, resuming = plan.cfg, plan.resuming
    run_dir = Path(cfg.run_dir)
    log.info("Run directory: %s", run_dir)
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    if not resuming:
        save_config(cfg, run_dir / rundir.CONFIG)
    remove_leftovers(run_dir / rundir.CHECKPOINTS)
    remove_lr_find_copies(run_dir)  # of a learning-rate finder killed before it cleaned up (9 MB)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Model first: missing pretrained weights or a bad backbone name fail before the dataset is read.
    backbone = create_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.weights, cfg.head.pool)
    for warning in Schedule(_plain(cfg.schedule), len(backbone_blocks(backbone))).warnings():  # checks its phases
        log.warning("schedule: %s", warning)
    preprocessing = resolve_preprocessing(backbone, cfg.dataset.image_size, cfg.dataset.crop_pct)
    data = build_data(cfg, preprocessing, run_dir, split_file=run_dir / rundir.SPLIT if resuming else None,
                      moved=moved_dataset(run_dir, cfg) if resuming else None)
    data.prepare_data()
    data.setup("fit")
    agrees(data.task, cfg)  # a task the data said: the keys only another task uses are refused
    model = build_model(cfg, backbone, data, preprocessing)
    if cfg.trainer.get("compile"):
        compile_model(model)

    trainer = build_trainer(cfg, run_dir, data, resuming=resuming)
    log.info("task=%s: the best checkpoint is the epoch of the %s %s", data.task,
             "highest" if model.task.mode == "max" else "lowest", model.task.monitor)
    ckpt_path = None
    if resuming:
        ckpt_path = rundir.last(run_dir)
        step = check_resumable(ckpt_path, data.classes, cfg.backbone.name)
        record_resume(cfg, plan.changes)  # only once the run can go on: a refused resume leaves its run as it was
        log.info("Resuming from %s (global step %d)", ckpt_path, step)
    else:
        if cfg.tune.lr_find:
            find_learning_rate(trainer, model, data, cfg, run_dir, given=gives(overrides, "schedule.lr"))
        log_hparams(trainer, cfg, preprocessing.image_size, data.task)
        log_class_counts(trainer, data)
        log_duplicate_groups(trainer, data)
    with loggers.ended(trainer, run_dir, cfg.logger.log_model):
        loggers.start(trainer, run_dir, None if resuming else
                      hyperparameters(cfg, preprocessing.image_size, str(trainer.precision), data.task))
        fit(trainer, model, data, run_dir, ckpt_path)
        phases = model.schedule.gains()  # before testing loads the best checkpoint, whose history ends at its epoch
        metrics = test_best(trainer, model, data, run_dir)
        metrics["phases"] = phases
        if trainer.is_global_zero:  # before the trackers close: an uploaded best.ckpt holds its temperature
            # a temperature, or thresholds, that predict and the export decide by; nothing for a number
            after = AfterTraining(cfg, run_dir, data, trainer.strategy.root_device)
            metrics.update(data.task.fit_after_training(after))
            write_model_card(cfg, model, data, metrics, run_dir)
            # Last: resume=auto takes a run with metrics.json for finished, so it is written once all else is done.
            rundir.write_json(run_dir / rundir.METRICS, metrics)
    task = data.task
    tested = task.test_line(metrics)
    if tested is not None:
        log.info("%s. Run directory: %s", tested, run_dir)
    else:
        best = metrics.get(f"{task.monitor}_best")
        log.info("No test split, no test figures; %s_best %s. Run directory: %s", task.monitor,
                 f"{best:.4f}" if best is not None else "none", run_dir)
    for line in loggers.hints(cfg.logger, run_dir):
        log.info("%s", line)
    # Let this run's model, data and trainer go (they hold reference cycles), so a sweep's jobs do not add up.
    del trainer, model, data, backbone
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics


def fit(trainer: L.Trainer, model: ImageModule, data: ImageDataModule, run_dir: Path, ckpt_path: Path | None) -> None:
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
        last = rundir.last(run_dir)
        kept = f"{last} holds the last whole epoch; continue with resume={run_dir}" if last.is_file() else \
            "no checkpoint had been written yet"
        raise Interrupted(f"Interrupted (Ctrl-C) in epoch {trainer.current_epoch}. Nothing was lost: {kept}") \
            from None


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
               split_file: Path | None = None, moved: tuple[str, str] | None = None) -> ImageDataModule:
    """The run's ImageDataModule (not yet set up), with the frozen-backbone feature cache if the schedule asks.
    `moved`: (old folder, new folder) of a resumed run whose dataset.root changed, for its split.csv's paths."""
    s = cfg.schedule
    return ImageDataModule(cfg.dataset, cfg.augment, preprocessing, cfg.seed, run_dir, split_file=split_file,
                           split_moved=moved, cache_features=s.cache_features, feature_views=s.cache_views,
                           ema=s.ema is not None, task=task_of(cfg.task) if cfg.get("task") else None)


def moved_dataset(run_dir: Path, cfg: DictConfig) -> tuple[str, str] | None:
    """(the run's dataset folder, the one this resume gives) where resume= comes with another dataset.root: the
    dataset moved, and split.csv's images are looked for below the new folder."""
    saved = OmegaConf.load(run_dir / rundir.CONFIG).dataset.get("root")
    if saved is None or cfg.dataset.get("root") is None:
        return None
    old, new = Path(saved).expanduser(), Path(cfg.dataset.root).expanduser()
    return (str(old), str(new)) if old != new else None


def build_model(cfg: DictConfig, backbone: torch.nn.Module, data: ImageDataModule,
                preprocessing: Preprocessing) -> ImageModule:
    """The ImageModule for `backbone` on the classes of `data` (set up), as `cfg` describes it."""
    return ImageModule(
        backbone,
        classes=data.classes,
        backbone_config={**_plain(cfg.backbone), **architecture(backbone, cfg.backbone.name)},
        head_config=_plain(cfg.head),
        schedule=_plain(cfg.schedule),
        preprocessing=preprocessing.as_dict(),
        class_weights=data.class_weights() if cfg.dataset.balance == "weights" else None,
        mix={"mixup": cfg.augment.mixup, "cutmix": cfg.augment.cutmix},
        task=data.task.name,  # a checkpoint holds plain data: the name, which task_of reads back
        target_stats=data.task.target_stats(data),
    )


def remove_lr_find_copies(run_dir: Path) -> None:
    """The copies of the model (.lr_find_*.ckpt) that Lightning's learning-rate finder keeps while it runs."""
    for leftover in run_dir.glob(".lr_find_*.ckpt"):
        leftover.unlink(missing_ok=True)


def find_learning_rate(trainer: L.Trainer, model: ImageModule, data: ImageDataModule, cfg: DictConfig, run_dir: Path,
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
        remove_lr_find_copies(run_dir)  # Lightning's own copy of the model, if it was stopped
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
    model.schedule = Schedule(model.hparams.schedule, model.schedule.blocks, monitor=model.task.monitor,
                              mode=model.task.mode)
    save_config(cfg, run_dir / rundir.CONFIG)
    return float(suggestion)


def test_best(trainer: L.Trainer, model: ImageModule, data: ImageDataModule, run_dir: Path) -> dict:
    """Test the best checkpoint (the current weights when there is none): the metrics for metrics.json."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if len(data.indices("test")):
        results = trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False)
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    else:  # the validation split chose the best checkpoint: its figures would be no test of it
        log.warning("This run has no test split (dataset.test_fraction=0), so it reports no test figures; %s_best "
                    "is measured on the images that chose the best checkpoint and is optimistic. For a held-out "
                    "figure: dataset.test_fraction=0.1", model.task.monitor)
        metrics = {}
    best_score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    monitor = model.task.monitor
    if best_score is not None:
        metrics[f"{monitor}_best"] = float(best_score)
    metrics["epochs"] = trainer.current_epoch
    metrics["global_step"] = trainer.global_step
    metrics["best_checkpoint"] = str(Path(best).relative_to(run_dir)) if best else None
    metrics["test_images"] = len(data.indices("test"))
    metrics["val_images"] = len(data.indices("val"))
    metrics["task"] = model.task.name
    metrics.update(model.task.test_extras(metrics))
    return metrics


@dataclass
class AfterTraining:
    """What a task can fit on the validation split once training has ended (finetune.tasks: fit_after_training asks
    for its own), stored in the best checkpoint."""

    cfg: DictConfig
    run_dir: Path
    data: ImageDataModule
    device: torch.device

    def temperature(self) -> dict:
        """calibrate=true: the temperature of the class probabilities."""
        return calibrate_best(self.run_dir, self.data, self.device) if self.cfg.calibrate else {}

    def thresholds(self) -> dict:
        """A threshold per label."""
        return fit_thresholds_of_best(self.run_dir, self.data, self.device)


def fit_thresholds_of_best(run_dir: Path, data: ImageDataModule, device: torch.device) -> dict:
    """Multi-label: fit each label's threshold (its best F1) on the validation split and store them in best.ckpt, where
    evaluate, predict and export read them; the test split's F1 (macro, micro) at them, and its per-label figures."""
    from finetune.models.module import load_module
    from finetune.scores import fit_thresholds, multilabel_scores

    best = rundir.best(run_dir)
    if not best.is_file() or not len(data.indices("val")):
        return {}
    model = load_module(best).to(device)
    val_logits, val_targets = split_logits(model, data, "val", device)
    thresholds = fit_thresholds(val_logits.sigmoid().numpy(), val_targets.numpy())
    checkpoint = load_checkpoint(best)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "thresholds": thresholds}
    AtomicCheckpointIO().save_checkpoint(checkpoint, best)
    result: dict = {"val/thresholds": dict(zip(data.classes, [round(t, 4) for t in thresholds]))}
    if len(data.indices("test")):
        test_logits, test_targets = split_logits(model, data, "test", device)
        scores = multilabel_scores(test_logits.sigmoid().numpy(), test_targets.numpy(), thresholds, data.classes)
        result.update({"test/f1_macro": scores["f1_macro"], "test/f1_micro": scores["f1_micro"],
                       "test/label_frequency": scores["label_frequency"], "test/per_label": scores["per_label"]})
        log.info("Thresholds fitted per label on %d validation images (stored in %s); test F1 macro %.4f, micro "
                 "%.4f", len(val_targets), best, scores["f1_macro"], scores["f1_micro"])
    else:
        log.info("Thresholds fitted per label on %d validation images (stored in %s); no test split to measure them "
                 "on", len(val_targets), best)
    return result


def calibrate_best(run_dir: Path, data: ImageDataModule, device: torch.device) -> dict:
    """Fit the best checkpoint's temperature on the validation split and store it in best.ckpt, where evaluate,
    predict and export read it; the test NLL and ECE before and after, for metrics.json."""
    from finetune.calibration import ece, fit_temperature, nll, too_few, why_not_fitted
    from finetune.models.module import load_module

    best = rundir.best(run_dir)
    validation = len(data.indices("val"))
    if not best.is_file() or not validation:
        return {}
    model = load_module(best).to(device)
    reason = too_few(validation)  # then the validation images need not be classified: T stays 1
    temperature = 1.0
    if reason is None:
        val_logits, val_labels = split_logits(model, data, "val", device)
        temperature, reason = fit_temperature(val_logits, val_labels), why_not_fitted(val_logits, val_labels)
    if temperature != model.temperature:  # as every checkpoint: whole, or the old one stays
        checkpoint = load_checkpoint(best)
        checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "temperature": temperature}
        AtomicCheckpointIO().save_checkpoint(checkpoint, best)
    result = {"val/temperature": temperature}
    if len(data.indices("test")):  # how the temperature does on images it was not fitted on
        test_logits, test_labels = split_logits(model, data, "test", device)
        before, after = test_logits.softmax(1).numpy(), (test_logits / temperature).softmax(1).numpy()
        labels = test_labels.numpy()
        result.update({"test/nll_before": nll(before, labels), "test/nll_after": nll(after, labels),
                       "test/ece_before": ece(before, labels), "test/ece_after": ece(after, labels)})
    if reason:
        log.info("Calibration: no temperature fitted, T stays 1: %s", reason)
    elif "test/nll_before" not in result:
        log.info("Calibration: temperature %.3f fitted on %d validation images (stored in %s); no test split to "
                 "measure it on", temperature, validation, best)
    else:
        log.info("Calibration: temperature %.3f fitted on %d validation images; test NLL %.4f -> %.4f, ECE %.4f -> "
                 "%.4f (stored in %s)", temperature, validation, result["test/nll_before"],
                 result["test/nll_after"], result["test/ece_before"], result["test/ece_after"], best)
    return result


def split_logits(model: ImageModule, data: ImageDataModule, split: str,
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


def write_model_card(cfg: DictConfig, model: ImageModule, data: ImageDataModule, metrics: dict, run_dir: Path) -> None:
    """RUN_DIR/model_card.md: the backbone, data, schedule, test metrics, use and limits of this run's model."""
    from finetune.model_card import train_card

    skipped = run_dir / rundir.SKIPPED
    passed_over = max(len(skipped.read_text().splitlines()) - 1, 0) if skipped.is_file() else 0
    text = train_card(cfg, data.classes, data.class_counts(), metrics, model.hparams.backbone_config,
                      model.hparams.preprocessing, sum(p.numel() for p in model.parameters()), passed_over, run_dir,
                      images={split: len(data.indices(split)) for split in ("train", "val", "test")})
    rundir.write_text(run_dir / rundir.MODEL_CARD, text)


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


