"""Stop training when the loss turns NaN or infinite, before a broken model is checkpointed."""

from __future__ import annotations

import lightning as L
import torch

from finetune.errors import NonFiniteLoss


class StopOnNonFiniteLoss(L.Callback):
    """Raises NonFiniteLoss within `check_every` steps of the first non-finite loss, and always before validation
    (so before any checkpoint of that epoch is written). The flag lives on the device; reading it is the only
    host sync, once every `check_every` steps.
    """

    def __init__(self, check_every: int = 8):
        self.check_every = check_every
        self._flag: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach())
        self._flag = bad if self._flag is None else self._flag | bad
        if trainer.global_step % self.check_every == 0:
            self._check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # The step that makes the weights NaN can have a finite loss itself (an infinite learning rate, say); with
        # one step an epoch the next training loss comes only after this epoch's checkpoints. The validation loss
        # of the new weights says it first, before those checkpoints are written (they run after this hook).
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None or bool(torch.isfinite(loss)):
            return
        self._flag = torch.ones((), dtype=torch.bool)
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self._flag is None or not bool(self._flag):
            return
        last = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.filename == "last"), "")
        kept = f" The last good checkpoint is {last}." if last else " No checkpoint had been written yet."
        raise NonFiniteLoss(
            f"The loss became NaN or infinite (epoch {trainer.current_epoch}, by step {trainer.global_step}); "
            f"training stopped.{kept} Try a lower schedule.lr or trainer.gradient_clip_val=1.0."
        )
