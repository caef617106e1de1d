"""Lightning's model summary of the model as it really trains in its first epoch."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary


class SummaryOfTheFirstEpoch(ModelSummary):
    """Lightning's model summary, printed when training starts (after ApplySchedule has put the model in its first
    epoch's state) instead of when fit starts: its trainable parameters and modules in train mode are the ones that
    really train, not every one of them before a frozen epoch."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
