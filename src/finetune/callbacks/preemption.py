"""Pre-emption: SIGTERM saves last.ckpt at the next batch boundary, and the run exits for resume=RUN_DIR."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.config import FinetuneError


class Preempted(FinetuneError):
    """The run was stopped by SIGTERM after saving a checkpoint; exit status 143, as for a process SIGTERM ends."""

    exit_code = 143


class Interrupted(FinetuneError):
    """Ctrl-C during training: Lightning stops it; the checkpoints written so far stay. Exit status 130, as for a
    process SIGINT ends."""

    exit_code = 130


class SaveOnPreemption(L.Callback):
    """Lightning turns SIGTERM (what clusters send before pre-empting a job) into a SIGTERMException at the next
    batch boundary, on every rank; this writes last.ckpt there, so resume=RUN_DIR continues from that step.
    Only SIGTERM saves: a checkpoint after any other error (a NaN loss, say) could hold a broken model."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path)
