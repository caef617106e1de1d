"""schedule.ema: the exponential moving average of the weights that validation, checkpoints and test see."""

from __future__ import annotations

import itertools

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights (and BatchNorm statistics), updated after every
    optimizer step: validation, and so the best checkpoint, see the average, which checkpoints hold as their
    `state_dict` (the live weights beside it, for resuming). Testing or evaluating a checkpoint then uses the average
    (Lightning's callback would load the live weights back into the model whenever a checkpoint is loaded)."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def reset_average(self, pl_module: L.LightningModule) -> None:
        """Start the average again from the model's current weights (a phase that starts from restored weights)."""
        if self._average_model is None:
            return
        average = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
        for mine, current in zip(average, itertools.chain(pl_module.parameters(), pl_module.buffers())):
            mine.data.copy_(current.data)
