"""The previous release's two-phase recipe, kept as a reference that the schedule's shorthand (`freeze_epochs`,
`unfreeze`, `backbone_lr_ratio`) must reproduce exactly when both run on one machine, one after the other.

It is that release's own code, as it stood before the schedule became an object of phases (commit 486ba2c^):
two parameter groups (backbone, head), each with weight decay on every parameter, their rates set per step by
torch's LambdaLR; the whole backbone frozen (eval mode, no gradient) for `freeze_epochs`, then all of it or its
last `unfreeze` blocks training (BatchNorm included). Plugged into a run with
`callbacks.extra=[{_target_: support.reference.PreviousRelease}]`, it replaces the optimizer the schedule builds
and puts the backbone in the state that release gave it each epoch, after the schedule's own callback has run."""

from __future__ import annotations

import math
from types import MethodType

import lightning as L
import torch
import torch.nn as nn

from finetune.models.backbone import backbone_blocks


def lr_factor(step: int, steps_per_epoch: int, schedule: dict, start_epoch: int = 0) -> float:
    """Multiplier of a group's peak learning rate at optimizer step `step`: 0 before `start_epoch` (the group is
    frozen), then a linear warm-up over `warmup_epochs` from that point, times the decay of `scheduler` over the
    whole run (cosine to 0, step, or constant)."""
    start = start_epoch * steps_per_epoch
    if step < start:
        return 0.0
    warmup = schedule["warmup_epochs"] * steps_per_epoch
    factor = min(1.0, (step - start + 1) / warmup) if warmup > 0 else 1.0
    total = max(1, schedule["epochs"] * steps_per_epoch)
    if schedule["scheduler"] == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif schedule["scheduler"] == "step":
        factor *= schedule["gamma"] ** (step // (schedule["step_size"] * steps_per_epoch))
    return factor


def configure_optimizers(self):
    """The previous release's ImageModule.configure_optimizers (`self`: the run's ImageModule)."""
    s = self.hparams.schedule
    groups = [
        {"name": "backbone", "params": list(self.backbone.parameters()), "lr": s["lr"] * s["backbone_lr_ratio"]},
        {"name": "head", "params": list(self.head.parameters()), "lr": s["lr"]},
    ]
    if s["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    elif s["optimizer"] == "adam":
        optimizer = torch.optim.Adam(groups, lr=s["lr"], weight_decay=s["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups, lr=s["lr"], weight_decay=s["weight_decay"])
    steps_per_epoch = self._steps_per_epoch()
    freeze = s["freeze_epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        lambda step: lr_factor(step, steps_per_epoch, s, start_epoch=freeze),  # backbone: 0 while frozen
        lambda step: lr_factor(step, steps_per_epoch, s),  # head
    ])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}


def apply(backbone: nn.Module, epoch: int, freeze_epochs: int, unfreeze: str | int) -> None:
    """The previous release's BackboneFreeze.apply: `backbone` in the state that `epoch` calls for."""
    if epoch >= freeze_epochs and unfreeze == "all":
        backbone.train()
        backbone.requires_grad_(True)
        return
    backbone.eval()
    backbone.requires_grad_(False)
    for p in backbone.parameters():
        p.grad = None
    if epoch >= freeze_epochs:
        for block in backbone_blocks(backbone)[-int(unfreeze):]:
            for name in block:
                module = backbone.get_submodule(name)
                module.train()
                module.requires_grad_(True)


class PreviousRelease(L.Callback):
    """The previous release's optimizer, rates and freezing in place of the schedule's (see the module)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the strategy asks the module for its optimizer
        pl_module.configure_optimizers = MethodType(configure_optimizers, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = pl_module.hparams.schedule
        apply(pl_module.backbone, trainer.current_epoch, s["freeze_epochs"], s["unfreeze"] or "all")
