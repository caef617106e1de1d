"""Pre-emption: SIGTERM saves last.ckpt at the next batch boundary, and the run exits for resume=RUN_DIR."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.errors import NotRequeued


class SaveOnPreemption(L.Callback):
    """Lightning turns SIGTERM (what clusters send before pre-empting a job) into a SIGTERMException at the next
    batch boundary, on every rank; this writes last.ckpt there, so resume=RUN_DIR continues from that step. That
    boundary may be one of the validation inside fitting: the checkpoint then holds the epoch's training, and says
    that validation was under way from its first batch (`_validate_again`), so that the resumed run validates the
    epoch whole (the metrics of the batches done are not in a checkpoint) before it trains on. Not in the sanity
    check before training (nothing trained yet). Only SIGTERM saves: a checkpoint after any other error (a NaN loss,
    say) could hold a broken model."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING \
                and not trainer.sanity_checking:
            if trainer.validating:
                _validate_again(trainer.fit_loop.epoch_loop.val_loop.batch_progress)
            trainer.save_checkpoint(self.path)


def _validate_again(progress) -> None:
    """Rewind the progress of the validation under way to "its first batch started, none processed": what Lightning
    (2.6) reads, on restoring, as stopped in the middle of validation (RESTARTED_MID_EVALUATION), which it then runs
    from the batch after the last completed one, here the first. As saved by Lightning, a SIGTERM at a validation
    batch boundary reads as stopped after the epoch's last training batch, and the resumed run skips the epoch's
    validation altogether."""
    current, total = progress.current, progress.total
    total.ready, total.started = total.ready - current.ready + 1, total.started - current.started + 1
    total.processed, total.completed = total.processed - current.processed, total.completed - current.completed
    current.ready, current.started, current.processed, current.completed = 1, 1, 0, 0


class RequeueAtBatchBoundary(L.Callback):
    """In a submitit job (hydra/launcher=slurm), submitit's signal (USR2: `signal_delay_s` before the time limit, and on
    pre-emption where the cluster signals it) makes submitit's handler requeue the job at once, from wherever training
    is: the steps since the last checkpoint would be lost. While the trainer trains, this holds that signal and treats
    it as SIGTERM: training stops at the next batch boundary, on every rank, and SaveOnPreemption writes last.ckpt
    there. Then `requeue()` hands the signal to submitit's handler, which requeues the job (or says why not); the
    requeued job, with resume=auto, continues from that step. Before and after training (loading data, restoring,
    testing) the signal goes to submitit's handler at once: there is nothing newer than last.ckpt to save."""

    # A held signal goes to submitit after this long even if no batch boundary came (the features of a frozen phase
    # being computed, a first torch.compile, a slow save): half of conf/hydra/launcher/slurm.yaml's signal_delay_s,
    # so that the job is still requeued before SLURM kills it at its time limit.
    deadline_s = 60.0

    def __init__(self) -> None:
        self.held: int | None = None
        self._submitit = None
        self._training = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not at on_fit_start: Lightning installs its SIGTERM handler after that (a signal held before would be
        # lost), and puts every handler back as it found it when fitting ends.
        import signal

        from finetune.cluster import in_submitit_job

        if not in_submitit_job():
            return
        from submitit import JobEnvironment

        signum = JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        if callable(handler) and handler != self._hold:
            self._submitit = handler
            signal.signal(signum, self._hold)
        self._training = self._submitit is not None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._training = False

    def _hold(self, signum, frame) -> None:
        import os
        import signal

        if not self._training:
            self._submitit(signum, frame)
            return
        self.held = signum
        signal.signal(signal.SIGALRM, self._deadline)
        signal.setitimer(signal.ITIMER_REAL, self.deadline_s)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's way: stop at the next batch boundary, last.ckpt saved there

    def _deadline(self, signum, frame) -> None:
        """No batch boundary came in time: requeue now (from last.ckpt, the last whole epoch or step checkpoint)."""
        if self.held is not None:
            held, self.held = self.held, None
            self._submitit(held, frame)

    def requeue(self, kept: str) -> None:
        """If training stopped for submitit's signal: hand it to submitit's handler, which requeues the job and exits
        (on the first task of the job; on the others it returns). When submitit does not requeue it (it timed out more
        than hydra.launcher.max_num_timeout times), one line saying so and what was `kept`."""
        if self.held is None:
            return
        import signal

        from submitit.core.utils import UncompletedJobError

        signal.setitimer(signal.ITIMER_REAL, 0)  # the batch boundary came: the deadline is not needed
        signum, self.held = self.held, None
        try:
            self._submitit(signum, None)
        except UncompletedJobError as e:
            raise NotRequeued(f"Stopped near the time limit and not requeued ({e} See hydra.launcher.max_num_timeout): "
                              f"{kept}") from None


