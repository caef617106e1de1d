"""Callbacks the tests plug in through callbacks.extra (as a user would) to watch a run from the inside."""

from __future__ import annotations

import lightning as L
import torch


class FreezeRecorder(L.Callback):
    """Records, for every optimizer step: the epoch, which backbone parameters got a gradient, whether the
    backbone's modules were in train mode (and which BatchNorm layers), the first and last BatchNorm's running mean,
    and the learning rate of each group."""

    instances: list[FreezeRecorder] = []

    def __init__(self):
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}
        FreezeRecorder.instances.append(self)

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        backbone = pl_module.backbone
        bn = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.steps.append({
            "epoch": trainer.current_epoch,
            "with_grad": [name for name, p in backbone.named_parameters() if p.grad is not None],
            "modules_training": [name for name, m in backbone.named_modules() if m.training],
            "bn_running_mean": bn[0].running_mean.detach().clone(),
            "bn_last_running_mean": bn[-1].running_mean.detach().clone(),
            "bn_training": [name for name, m in backbone.named_modules()
                            if isinstance(m, torch.nn.BatchNorm2d) and m.training],
            "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
        })


class PoisonHead(L.Callback):
    """Sets the head's weights to NaN at the start of epoch `epoch`, so the loss turns NaN from then on."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.head.parameters():
                    p.fill_(float("nan"))


class RankWeights(L.Callback):
    """Writes, at the end of every training epoch, each rank's backbone checksum and frozen state to
    RUN_DIR/rank<R>.json: under DDP all ranks must hold identical weights."""

    def on_train_epoch_end(self, trainer, pl_module):
        import json
        from pathlib import Path

        params = list(pl_module.backbone.parameters())
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                  "sum": float(torch.cat([p.detach().flatten() for p in params]).double().sum()),
                  "first": [float(x) for x in params[0].detach().flatten()[:5]],
                  "trainable": sum(p.requires_grad for p in params)}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        history = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(history + [record]))


class BatchKinds(L.Callback):
    """Records, per training and validation batch, the epoch and the number of dimensions of the inputs:
    4 for images, 2 for cached backbone features."""

    instances: list[BatchKinds] = []

    def __init__(self):
        self.train: list[tuple[int, int]] = []
        self.val: list[tuple[int, int]] = []
        BatchKinds.instances.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((trainer.current_epoch, batch[0].ndim))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append((trainer.current_epoch, batch[0].ndim))


class HeadRecorder(L.Callback):
    """Records the head's last linear weights: after every optimizer step, at the end of every validation (before the
    schedule may restore other weights) and at the start of every training epoch."""

    instances: list[HeadRecorder] = []

    def __init__(self):
        self.after_step: list[torch.Tensor] = []
        self.validated: dict[int, torch.Tensor] = {}
        self.val_acc: dict[int, float] = {}
        self.epoch_start: dict[int, torch.Tensor] = {}
        HeadRecorder.instances.append(self)

    @staticmethod
    def _weights(pl_module) -> torch.Tensor:
        return pl_module.head[-1].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(self._weights(pl_module))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated[trainer.current_epoch] = self._weights(pl_module)
            self.val_acc[trainer.current_epoch] = float(trainer.callback_metrics["val/acc"])

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start[trainer.current_epoch] = self._weights(pl_module)


class SigtermAt(L.Callback):
    """Acts as if SIGTERM arrived after optimizer step `step`: Lightning's SIGTERMException at that batch boundary,
    so the run saves last.ckpt in the middle of an epoch and stops, as a pre-empted job does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if trainer.global_step == self.step:
            raise SIGTERMException()


class Boom(L.Callback):
    """An error finetune has no message for: raised when training starts."""

    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("boom: something nobody foresaw")


class SigtermInValidation(L.Callback):
    """Acts as if SIGTERM arrived during the validation at the end of epoch `epoch` (after its first batch): Lightning's
    SIGTERMException at that validation batch boundary, as a job pre-empted while it validates gets. Once per
    process, so that the resumed run (which keeps its callbacks) finishes."""

    fired = False

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not trainer.sanity_checking and trainer.current_epoch == self.epoch and not SigtermInValidation.fired:
            SigtermInValidation.fired = True
            raise SIGTERMException()
