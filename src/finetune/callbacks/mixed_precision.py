"""fp16 mixed precision: count the optimizer steps GradScaler skips because gradients overflowed."""

from __future__ import annotations

import lightning as L
import torch


class CountSkippedSteps(L.Callback):
    """GradScaler skips the optimizer step of a batch whose fp16 gradients overflowed, and lowers its scale. The
    count of such steps is kept on the device and logged once per epoch as train/skipped_steps (total so far):
    a few at the start are normal; many mean the loss scale cannot settle."""

    def __init__(self) -> None:
        self._before: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None

    @staticmethod
    def _scale(trainer: L.Trainer) -> torch.Tensor | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return getattr(scaler, "_scale", None) if scaler is not None else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        scale = self._scale(trainer)
        self._before = scale.clone() if scale is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        scale = self._scale(trainer)
        if self._before is None or scale is None:
            return
        step = (scale < self._before).sum()
        self.skipped = step if self.skipped is None else self.skipped + step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.skipped is not None:
            pl_module.log("train/skipped_steps", self.skipped.float(), on_epoch=True, reduce_fx="max")
