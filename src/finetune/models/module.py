"""ImageModule: the LightningModule holding backbone + head for any task (finetune.tasks: classes, labels or a
number per image), its steps, metrics, and optimizer/schedule."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from torchmetrics import MaxMetric, Metric, MinMetric
from torchmetrics.regression import R2Score

from finetune import rundir
from finetune.config import HeadConfig, defaults
from finetune.data.features import FeatureBatch
from finetune.errors import FinetuneError, UnsafeCheckpoint
from finetune.models.backbone import backbone_blocks, rebuild_backbone
from finetune.models.heads import create_head
from finetune.models.metrics import BatchMean
from finetune.schedule import Schedule
from finetune.tasks import task_of


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) NCHW RGB images to the backbone's input; mean and std are pre-scaled by 255.
    Channels-last, like the backbone's weights: faster convolutions on GPUs and on CPUs alike (about twice as
    fast for MobileNetV2 training on a 2-core CPU)."""
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def two_class_logits(logit: torch.Tensor) -> torch.Tensor:
    """A binary head's one logit z as [0, z]: softmax gives [1 - sigmoid(z), sigmoid(z)], cross-entropy is BCE."""
    return torch.cat([torch.zeros_like(logit), logit], dim=1)


class ImageModule(L.LightningModule):
    """timm backbone (pooled features) -> head -> logits, fed uint8 images that it normalises on its own device.

    Everything needed to rebuild it (class names, backbone and head config, preprocessing) is in its
    hyperparameters, as plain containers, so a checkpoint alone is enough for evaluation, prediction and export.
    """

    def __init__(self, backbone: nn.Module, classes: list[str], backbone_config: dict, head_config: dict,
                 schedule: dict, preprocessing: dict, class_weights: list[float] | None = None,
                 mix: dict | None = None, temperature: float = 1.0, task: str | None = None,
                 target_stats: dict | None = None, thresholds: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.classes = list(classes)
        # what it learns (finetune.tasks): the loss, the metrics, the metric that picks the best checkpoint
        self.task = task_of(task)
        # regression: the training split's target mean and std; the head predicts the standardised target
        stats = target_stats or {"mean": 0.0, "std": 1.0}
        self.target_mean, self.target_std = float(stats["mean"]), float(stats["std"])
        # multilabel: per-label thresholds fitted on the validation split after training (finetune.calibration)
        self.thresholds = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
        # fitted on the validation split after training (finetune.calibration): probabilities are softmax(z / T)
        self.temperature = float(temperature)
        self.backbone = backbone.to(memory_format=torch.channels_last)
        # A binary head has one logit, expanded by two_class_logits: everything downstream sees two classes.
        head_config = {**defaults(HeadConfig), **head_config}
        self.binary = bool(head_config["binary"])
        if self.binary and len(classes) != 2:
            raise FinetuneError(f"head.binary=true needs two classes; this dataset has {len(classes)}")
        self.head = create_head(head_config["name"], backbone.num_features, self.task.head_width(classes, self.binary),
                                hidden=head_config["hidden"], dropout=head_config["dropout"])
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtraction and one division on uint8 input.
        self.register_buffer("mean", torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        # how the backbone is fine-tuned: parameter groups, their rates, what trains when (finetune.schedule)
        self.schedule = Schedule(schedule, blocks=len(backbone_blocks(self.backbone)), monitor=self.task.monitor,
                                 mode=self.task.mode)
        self.criterion = self.task.criterion(head_config.get("loss"), class_weights,
                                             self.schedule.config["label_smoothing"])
        self.train_loss, self.val_loss, self.test_loss = BatchMean(), BatchMean(), BatchMean()
        self.last_loss: torch.Tensor | None = None  # the latest training loss, on the device
        self.monitor_best = MaxMetric() if self.task.mode == "max" else MinMetric()  # val/acc_best, val/map_best, ...
        for name, metric in self.task.metrics(self.classes).items():  # val_acc, val_map, test_mae, ...
            setattr(self, name, metric)
        self.mix = self.task.mixer(self.classes, mix)  # augment.mixup / cutmix: soft targets of one class per image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for RGB images, NCHW, uint8 (or float) in 0..255."""
        return self.classify(self.normalize(images))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.classify_features(self.backbone(x))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for the backbone's pooled features (regression: the standardised target)."""
        return two_class_logits(self.head(features)) if self.binary else self.head(features)

    def outputs(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """What the model says, from its logits (finetune.tasks: class probabilities, softmax of logits / T; label
        probabilities; the target in its units, (N, 1))."""
        t = self.temperature if temperature is None else temperature
        return self.task.outputs(logits.float(), t, self.target_mean, self.target_std)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.criterion, logits, targets, self)

    def _update(self, metric: Metric, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Feed one batch to a metric of this task, as that metric reads it."""
        self.task.update(metric, logits, targets, self)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if isinstance(batch, FeatureBatch):  # cached features of the frozen backbone (schedule.cache_features)
            logits, targets = self.classify_features(batch.features), labels
        else:
            x, targets = self.normalize(images), labels
            if self.mix is not None:
                x, targets = self.mix(x, labels)  # soft targets; accuracy is still counted against the true labels
            logits = self.classify(x)
        loss = self._loss(logits, targets)
        # Metrics accumulate on the device and are computed and logged once per epoch (on_train_epoch_end): no
        # host sync, and none of self.log's per-call bookkeeping, in the step.
        self.train_loss.update(loss.detach(), weight=len(labels))
        for name in self._stage_metrics("train")[1:]:
            self._update(getattr(self, name), logits, labels)
        self.last_loss = loss.detach()  # for the progress bar, which reads it only when it redraws
        return loss

    def _evaluate(self, batch, stage: str) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = self.classify_features(inputs) if isinstance(batch, FeatureBatch) else self(inputs)
        loss = self._loss(logits, labels)
        for name in self._stage_metrics(stage):
            metric = getattr(self, name)
            metric.update(loss, weight=len(labels)) if name.endswith("_loss") else self._update(metric, logits, labels)
        return {"logits": logits.detach(), "labels": labels}  # for the dashboards; Lightning keeps none of it

    def _stage_metrics(self, stage: str) -> list[str]:
        return self.task.stage_metrics(stage, self.classes)

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """Compute (across all ranks), log and reset `stage`'s metrics; return the values."""
        values = {}
        for name in self._stage_metrics(stage):
            metric = getattr(self, name)
            if metric.update_count == 0 or (isinstance(metric, R2Score) and int(metric.total) < 2):
                continue  # nothing seen; R^2 of fewer than two images is undefined
            key = f"{stage}/{name[len(stage) + 1:]}"
            values[key] = metric.compute()
            self.log(key, values[key], prog_bar=key == self.task.monitor)
            metric.reset()
        return values

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    def on_train_start(self) -> None:
        """Start (or resume) with the best value of the monitored metric (val/acc, val/map, val/mae) so far."""
        self.monitor_best.reset()  # forget the sanity check's validation
        best = self.trainer.checkpoint_callback.best_model_score if self.trainer.checkpoint_callback else None
        if best is not None and torch.isfinite(best):
            self.monitor_best.update(best.to(self.device))

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        monitor = self.task.monitor
        if not self.trainer.sanity_checking and monitor in values:
            self.monitor_best.update(values[monitor])
            self.log(f"{monitor}_best", self.monitor_best.compute())

    def configure_optimizers(self):
        optimizer, scheduler = self.schedule.optimizer(self.backbone, self.head, self._steps_per_epoch())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step()  # PhaseLR: the schedule's rates, a scheduler of finetune's own (finetune.schedule)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["schedule_state"] = self.schedule.state_dict()  # the phase boundaries passed so far

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "schedule_state" in checkpoint:
            self.schedule.load_state_dict(checkpoint["schedule_state"])

    def _steps_per_epoch(self) -> int:
        total = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        return max(1, math.ceil(total / epochs)) if math.isfinite(total) else 1


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (as resume= takes it): its checkpoints/best.ckpt; `~` expanded."""
    path = Path(path).expanduser()
    if path.is_dir():
        best = rundir.best(path)
        if not best.is_file():
            raise FinetuneError(f"{path} is a folder without checkpoints/best.ckpt: give a checkpoint file "
                                f"(ckpt=RUN_DIR/checkpoints/last.ckpt) or a finetune run directory")
        return best
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, so no code in the file ever runs.
    A missing, empty, truncated or foreign file is one clear FinetuneError naming it."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise FinetuneError(f"{path} is empty (0 bytes): a save that never finished, or a copy that failed")
    if not zipfile.is_zipfile(path):
        raise FinetuneError(f"{path} is not a PyTorch checkpoint ({size:,} bytes that are not the zip archive "
                            f"torch.save writes): truncated, or another kind of file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise UnsafeCheckpoint(f"{path} holds more than weights and plain data, and was not loaded (nothing in it "
                               f"ran): {reason}. Load only checkpoints you trust to be finetune's own.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"{path} is damaged and cannot be read ({reason}): truncated or corrupted on disk") \
            from None


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> ImageModule:
    """A trained ImageModule from a finetune checkpoint alone, in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    hp = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hp or "classes" not in hp:
        raise FinetuneError(f"{path} is not a finetune checkpoint (it has no class names)")
    pool = hp["head_config"].get("pool", "avg")
    backbone = rebuild_backbone(hp["backbone_config"], pool=pool)
    model = ImageModule(backbone, **hp)
    model.load_state_dict(checkpoint["state_dict"])
    broken = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise FinetuneError(f"{path} holds NaN or infinite weights ({broken[0]}, and {len(broken) - 1} more): a model "
                            f"that diverged gives no predictions; use an earlier checkpoint")
    return model.eval()
