"""Apply the fine-tuning schedule to the model: what trains at every epoch, early phase ends, best-weight restores."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch.nn as nn

from finetune.callbacks.ema import EMA
from finetune.models.backbone import backbone_blocks, parameter_blocks
from finetune.schedule import PhaseLR, Schedule

log = logging.getLogger(__name__)


def apply_trainable(backbone: nn.Module, trained: int, bn: str) -> None:
    """Let the last `trained` blocks of `backbone` train (train mode, gradients) and freeze the rest: eval mode, so
    BatchNorm statistics and dropout stay fixed (as Keras does with layers that are not trainable), and no gradient.
    With bn=frozen, the BatchNorm layers of the blocks that train stay in eval mode too: normalised with the
    pretrained statistics, which stay as they are, while their scale and shift learn (Keras' `training=False`)."""
    blocks = backbone_blocks(backbone)
    first = max(len(blocks) - trained, 0)
    backbone.eval()
    block_of = parameter_blocks(backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad_(block_of[name] >= first)
        if not param.requires_grad:
            param.grad = None
    if trained >= len(blocks):
        backbone.train()
    else:
        for names in blocks[first:]:
            for name in names:
                backbone.get_submodule(name).train()
    if bn == "frozen":
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class ApplySchedule(L.Callback):
    """Puts the model in the state its schedule (`pl_module.schedule`) gives each epoch, and moves through the phases.

    The state is set at the start of every training epoch and once when training starts, so a run resumed from any
    checkpoint (Lightning does not start the epoch again when it resumes mid-epoch) is in the right state. All
    parameters keep requires_grad=True until then, after DDP has wrapped the model, so DDP registers every one of
    them for gradient averaging. After each validation a phase with `patience` may end; the boundary is recorded in
    the schedule, whose state every checkpoint carries. With restore_best, a new phase starts from the best weights
    so far (best.ckpt): loaded when its first epoch starts, after the last epoch's checkpoints are written (the
    frozen-feature cache computes its features lazily, at the first batch, so from the restored backbone).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the loops are restored (on_fit_start comes before): the epoch a resumed run is really at
        schedule: Schedule = pl_module.schedule
        apply_trainable(pl_module.backbone, schedule.trained_blocks(trainer.current_epoch), schedule.bn)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        schedule: Schedule = pl_module.schedule
        epoch = trainer.current_epoch
        phase = schedule.phase_at(epoch)
        if schedule.restore_best and phase is not None and phase.index > schedule.restored:
            # here, not at the end of the last epoch: Lightning writes that epoch's checkpoints after its
            # on_train_epoch_end hooks, and best.ckpt must be up to date and hold the weights its score belongs to
            self._restore_best(trainer, pl_module, phase.index)
        apply_trainable(pl_module.backbone, schedule.trained_blocks(epoch), schedule.bn)
        if phase is None or schedule.bounds()[phase.index][0] != epoch:
            return
        start, end = schedule.bounds()[phase.index]
        trained = schedule.trained_blocks(epoch)
        rates = f"head lr {phase.lr:.3g}"
        if trained:
            top = phase.lr * phase.backbone_lr_ratio
            bottom = top * schedule.layer_decay ** (trained - 1)
            rates += f", backbone {top:.3g}" + (f" (top block) to {bottom:.3g}" if bottom != top else "")
        params = sum(p.numel() for p in pl_module.backbone.parameters())
        trainable = sum(p.numel() for p in pl_module.backbone.parameters() if p.requires_grad)
        patience = f", or until {schedule.monitor} has not improved for {phase.patience}" if phase.patience else ""
        log.info("Epoch %d: phase %d of %d (epochs %d-%d%s): %s train, %s; %s of %s backbone parameters train",
                 epoch, phase.index + 1, len(schedule.phases), start, end - 1, patience,
                 phase.describe(schedule.blocks), rates, f"{trainable:,}", f"{params:,}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the checkpoints of this epoch are written (Lightning runs checkpoint callbacks last), so that they
        # hold the phase boundary decided here
        schedule: Schedule = pl_module.schedule
        value = trainer.callback_metrics.get(schedule.monitor)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        phase = schedule.phase_at(epoch)
        why = schedule.observe(epoch, float(value))
        if why is None:
            return
        following = schedule.phase_at(epoch + 1)
        after = f"phase {following.index + 1} starts at epoch {epoch + 1}" if following else "the run ends"
        log.info("Phase %d ends after epoch %d: %s; %s", phase.index + 1, epoch, why, after)
        for config in trainer.lr_scheduler_configs:  # the next step's rate already set belongs to the new phase
            if isinstance(config.scheduler, PhaseLR):
                config.scheduler.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        schedule: Schedule = pl_module.schedule
        if schedule.phase_at(epoch + 1) is None and epoch + 1 < min(schedule.epochs, trainer.max_epochs or 0):
            log.info("The last phase has ended: the run stops after epoch %d", epoch)
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = pl_module.schedule.describe_gains()
        if len(lines) > 1:
            log.info("What each phase gained:\n  %s", "\n  ".join(lines))

    def _restore_best(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int) -> None:
        """Load the best weights so far (best.ckpt) to start phase `index`; the optimizer's moments start afresh."""
        from finetune.models.module import load_checkpoint

        schedule: Schedule = pl_module.schedule
        schedule.restored = index
        saver = trainer.checkpoint_callback
        path = saver.best_model_path if saver else ""
        if not path or not Path(path).is_file():
            log.info("Phase %d starts from the current weights: no best checkpoint has been written yet", index + 1)
            return
        pl_module.load_state_dict(load_checkpoint(path, map_location=pl_module.device)["state_dict"])
        for callback in trainer.callbacks:
            if isinstance(callback, EMA):
                callback.reset_average(pl_module)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        score = f" ({schedule.monitor} {float(saver.best_model_score):.4f})" if saver.best_model_score is not None \
            else ""
        log.info("Phase %d starts from the best weights so far: %s%s", index + 1, path, score)
