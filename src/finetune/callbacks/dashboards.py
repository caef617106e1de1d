"""TensorBoard images a researcher would rather look at than read, written at a bounded rate."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from finetune.data.features import FeatureBatch
from finetune.plots import confusion_matrix_figure, figure_to_array, image_grid_figure, per_class_figure

log = logging.getLogger(__name__)


class Dashboards(L.Callback):
    """At the start: a grid of training images as the model sees them after augmentation, and the model graph.
    Every `every_n_epochs` validation epochs (and the last): the confusion matrix, per-class precision and recall,
    sample validation images with their predicted and true classes, and a precision-recall curve per class.
    The per-class views need at most `max_classes` classes; beyond that, scripts/evaluate.py draws them once.
    """

    def __init__(self, every_n_epochs: int = 1, images: int = 16, max_classes: int = 30, graph: bool = True):
        self.every_n_epochs, self.images, self.max_classes, self.graph = every_n_epochs, images, max_classes, graph
        self._active = False
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._samples: torch.Tensor | None = None
        self._shown_training_batch = False

    @staticmethod
    def _writer(trainer: L.Trainer):
        if trainer.global_rank != 0:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return logger.experiment if logger is not None else None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.graph and self._writer(trainer) is not None:
            size = int(pl_module.hparams.preprocessing["image_size"])
            example = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=pl_module.device)
            mode = pl_module.training
            try:
                pl_module.eval()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TensorBoard's add_graph traces with the deprecated torch.jit
                    self._writer(trainer).add_graph(pl_module, example)
            except Exception as e:  # a backbone torch.jit cannot trace still trains
                log.warning("The model graph could not be traced for TensorBoard: %s", str(e).splitlines()[0])
            finally:
                pl_module.train(mode)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        writer = self._writer(trainer)
        if self._shown_training_batch or writer is None or isinstance(batch, FeatureBatch):
            return
        self._shown_training_batch = True
        images, labels = batch
        n = min(self.images, len(images))
        grid = image_grid_figure([_hwc(x) for x in images[:n]], [target_text(pl_module, y) for y in labels[:n]],
                                 title="Training images after augmentation, as the model sees them")
        writer.add_image("train/augmented_images", figure_to_array(grid), trainer.global_step, dataformats="HWC")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        self._active = not trainer.sanity_checking and ((epoch + 1) % self.every_n_epochs == 0 or last)
        self._logits, self._labels, self._samples = [], [], None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if not self._active or not isinstance(outputs, dict):
            return
        self._logits.append(outputs["logits"].float())
        self._labels.append(outputs["labels"])
        if self._samples is None and not isinstance(batch, FeatureBatch):
            self._samples = batch[0][: self.images].cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._active or not self._logits:
            return
        pl_module.task.draw_validation(self, trainer, pl_module)  # class_views, label_views or value_views

    def class_views(self, trainer, pl_module) -> None:
        """One class per image: predictions on a grid, the confusion matrix, precision and recall per class."""
        logits = pl_module.all_gather(torch.cat(self._logits)).reshape(-1, len(pl_module.classes))
        labels = pl_module.all_gather(torch.cat(self._labels)).reshape(-1)
        writer = self._writer(trainer)
        if writer is None:
            return
        step, classes = trainer.global_step, pl_module.classes
        probs = logits.softmax(1).cpu().numpy()
        labels_np = labels.cpu().numpy()
        predicted = probs.argmax(1)

        if self._samples is not None:
            n = len(self._samples)
            sample_pred = predicted[:n]
            titles = [f"predicted {classes[p]} ({probs[i, p]:.2f})\ntrue {classes[labels_np[i]]}"
                      for i, p in enumerate(sample_pred)]
            colours = ["darkgreen" if p == labels_np[i] else "firebrick" for i, p in enumerate(sample_pred)]
            grid = image_grid_figure([_hwc(x) for x in self._samples], titles, colours, title="Validation predictions")
            writer.add_image("val/predictions", figure_to_array(grid), step, dataformats="HWC")

        k = len(classes)
        if k > self.max_classes:
            return
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (labels_np, predicted), 1)
        writer.add_image("val/confusion_matrix", figure_to_array(confusion_matrix_figure(matrix, classes)), step,
                         dataformats="HWC")
        true_positive = np.diag(matrix).astype(np.float64)
        precision = np.divide(true_positive, matrix.sum(0), out=np.zeros(k), where=matrix.sum(0) > 0)
        recall = np.divide(true_positive, matrix.sum(1), out=np.zeros(k), where=matrix.sum(1) > 0)
        writer.add_image("val/per_class", figure_to_array(per_class_figure(precision, recall, classes)), step,
                         dataformats="HWC")
        for c, name in enumerate(classes):
            writer.add_scalar(f"val_per_class/precision/{name}", precision[c], step)
            writer.add_scalar(f"val_per_class/recall/{name}", recall[c], step)
            writer.add_pr_curve(f"val_pr_curve/{name}", labels_np == c, probs[:, c], step)


    def _gathered(self, trainer, pl_module) -> tuple | None:
        """The validation epoch's outputs and targets from every rank, as numpy; None off rank zero."""
        width = pl_module.task.head_width(pl_module.classes, binary=False)
        logits = pl_module.all_gather(torch.cat(self._logits)).reshape(-1, width)
        labels = pl_module.all_gather(torch.cat(self._labels)).reshape(len(logits), -1)
        writer = self._writer(trainer)
        if writer is None:
            return None
        return writer, pl_module.outputs(logits).cpu().numpy(), labels.float().cpu().numpy()

    def label_views(self, trainer, pl_module) -> None:
        """Multi-label: a precision-recall curve per label."""
        gathered = self._gathered(trainer, pl_module)
        if gathered is not None:
            writer, outputs, targets = gathered
            for k, name in list(enumerate(pl_module.classes))[:self.max_classes]:
                writer.add_pr_curve(f"val_pr_curve/{name}", targets[:, k] > 0.5, outputs[:, k], trainer.global_step)

    def value_views(self, trainer, pl_module) -> None:
        """Regression: predicted against true, and the residuals."""
        gathered = self._gathered(trainer, pl_module)
        if gathered is not None:
            from finetune.plots import regression_figure

            writer, outputs, targets = gathered
            figure = regression_figure(outputs[:, 0], targets[:, 0], pl_module.classes[0])
            writer.add_image("val/predicted_vs_true", figure_to_array(figure), trainer.global_step, dataformats="HWC")


def target_text(model, target: torch.Tensor) -> str:
    """A training image's target as its grid's title: its class, its labels, or its number."""
    return model.task.target_text(model.classes, target)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)


# --- the run summary: what the run is, in TensorBoard's HPARAMS, TEXT and IMAGES tabs ------------------------

def hparam_metrics(task) -> tuple[str, ...]:
    """The metrics each run of `task` (finetune.tasks) reports in TensorBoard's HPARAMS tab, to compare the runs of a
    sweep: its monitored metric, the losses and its test figures (val/acc, val/acc_best, val/loss, train/loss,
    test/acc, test/loss for one class per image)."""
    from finetune.tasks import task_of

    t = task_of(task)
    return (t.monitor, f"{t.monitor}_best", "val/loss", "train/loss", *t.logged_test(), "test/loss")


def hyperparameters(cfg, image_size: int, precision: str, task=None) -> dict:
    """The hyperparameters that compare the runs of a sweep: TensorBoard's HPARAMS, MLflow's params, W&B's config."""
    from finetune.tasks import task_of

    return {
        "dataset": cfg.dataset.name, "backbone": cfg.backbone.name, "pretrained": cfg.backbone.pretrained,
        "head": cfg.head.name, "dropout": cfg.head.dropout, "image_size": image_size,
        "batch_size": cfg.dataset.batch_size, "augment": cfg.augment.name, "seed": cfg.seed,
        "task": task_of(task or cfg.get("task")).name, "loss": str(cfg.head.get("loss")),
        "precision": precision,
        **{f"schedule.{k}": (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in cfg.schedule.items()},
    }


def log_hparams(trainer: L.Trainer, cfg, image_size: int, task=None) -> None:
    """Write this run's hyperparameters and metric names for TensorBoard's HPARAMS tab.

    Lightning's log_hyperparams would also log a placeholder value for every metric at step 0, which then shows
    in the curves; the summaries written here only name the metrics, whose values TensorBoard reads from the run.
    """
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0:
        return
    from torch.utils.tensorboard.summary import hparams

    params = hyperparameters(cfg, image_size, str(trainer.precision), task)
    writer = tensorboard.experiment._get_file_writer()  # reopened if the learning-rate finder's fit closed it
    for summary in hparams(params, {m: 0.0 for m in hparam_metrics(task)}):
        writer.add_summary(summary)
    writer.flush()


def log_class_counts(trainer: L.Trainer, data) -> None:
    """The images per class in each split, as a table in TensorBoard's TEXT tab."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0:
        return
    table = data.task.markdown_counts(data.source, {s: data.indices(s) for s in ("train", "val", "test")})
    tensorboard.experiment.add_text("dataset/class_counts", table)


def log_duplicate_groups(trainer: L.Trainer, data, groups: int = 6, per_group: int = 4,
                         size: int = 96) -> None:
    """A few groups of duplicates (label conflicts first), one row of images each, in TensorBoard's IMAGES tab."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None or trainer.global_rank != 0 or data.duplicates is None or not data.duplicates[0].groups:
        return
    from finetune.data.dataset import load_image
    from finetune.data.duplicates import is_conflict

    duplicates, source = data.duplicates
    shown = sorted(duplicates.groups, key=lambda m: not is_conflict(m, source))[:groups]
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
