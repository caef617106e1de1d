"""Keep the backbone frozen for the first epochs, then train all of it or its last N blocks."""

from __future__ import annotations

import logging

import lightning as L
import torch.nn as nn

from finetune.config import ConfigError
from finetune.models.backbone import backbone_blocks

log = logging.getLogger(__name__)


class BackboneFreeze(L.Callback):
    """Frozen (eval mode: BatchNorm statistics and dropout fixed; no gradient) while epoch < freeze_epochs.

    Then `unfreeze="all"` trains the whole backbone, `unfreeze=N` its last N blocks (the rest stays frozen and in
    eval mode, as Keras does with layers set not trainable). The backbone's learning rate is scheduled by the
    Classifier: 0 while frozen, then warmed up to backbone_lr_ratio * lr. The state is a function of the epoch
    alone, set at the start of every training epoch, so a run resumed from any checkpoint is in the right state.
    Parameters keep requires_grad=True until the first epoch starts, so DDP registers all of them for gradient
    synchronisation when it wraps the model.
    """

    def __init__(self, freeze_epochs: int, unfreeze: str | int = "all"):
        self.freeze_epochs = freeze_epochs
        self.unfreeze = unfreeze

    def trainable_modules(self, backbone: nn.Module, epoch: int) -> list[str] | None:
        """Names of the backbone modules that train at `epoch`; None means all of them."""
        if epoch < self.freeze_epochs:
            return []
        if self.unfreeze == "all":
            return None
        blocks = backbone_blocks(backbone)
        if self.unfreeze > len(blocks):
            raise ConfigError(f"schedule.unfreeze={self.unfreeze}, but this backbone has {len(blocks)} blocks")
        return [name for block in blocks[-self.unfreeze:] for name in block]

    def apply(self, backbone: nn.Module, epoch: int) -> None:
        """Put `backbone` in the state that `epoch` calls for."""
        names = self.trainable_modules(backbone, epoch)
        if names is None:
            backbone.train()
            backbone.requires_grad_(True)
            return
        backbone.eval()
        backbone.requires_grad_(False)
        for p in backbone.parameters():
            p.grad = None
        for name in names:
            module = backbone.get_submodule(name)
            module.train()
            module.requires_grad_(True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # fail before training if N is more blocks than there are
            self.trainable_modules(pl_module.backbone, self.freeze_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.apply(pl_module.backbone, epoch)
        if self.freeze_epochs > 0 and epoch in (0, self.freeze_epochs):  # say when the state changes
            total = sum(p.numel() for p in pl_module.backbone.parameters())
            trainable = sum(p.numel() for p in pl_module.backbone.parameters() if p.requires_grad)
            state = "frozen" if trainable == 0 else f"unfrozen ({self.unfreeze} blocks)"
            log.info("Epoch %d: backbone %s, %s of %s parameters train", epoch, state, f"{trainable:,}", f"{total:,}")
