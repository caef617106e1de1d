"""The fine-tuning schedule: phases -> parameter groups, each group's learning rate at every step, what trains when.

A schedule is a list of phases. Each says how long it lasts (epochs, or until val/acc stops improving), what
trains (the head alone, the last N blocks of the backbone in timm's block grouping, or all of it) and at which
rates (the head's; the backbone's as a ratio of it, optionally decaying block by block towards the input). Every
consumer asks this module: the ImageModule for its optimizer and learning-rate scheduler, the ApplySchedule callback
for what trains at each epoch, the frozen-feature cache for the epochs in which the whole backbone is frozen.
`schedule.freeze_epochs`, `unfreeze` and `backbone_lr_ratio` are the shorthand for the common two phases.
Light to import (the pre-flight check reads its tables and `check`): torch loads when an optimizer is made.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.errors import ConfigError

if TYPE_CHECKING:
    import torch.nn as nn

log = logging.getLogger(__name__)


# schedule.optimizer: the torch.optim class and the config keys it takes besides lr and weight decay.
OPTIMIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "adamw": ("AdamW", ()),
    "adam": ("Adam", ()),
    "sgd": ("SGD", ("momentum",)),
}


def _cosine(t: int, total: int, steps_per_epoch: int, s: dict) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def _step(t: int, total: int, steps_per_epoch: int, s: dict) -> float:
    return s["gamma"] ** (t // (s["step_size"] * steps_per_epoch))


def _constant(t: int, total: int, steps_per_epoch: int, s: dict) -> float:
    return 1.0


# schedule.scheduler: the decay after the warm-up, as a factor of the peak rate at step t of `total` steps.
SCHEDULERS = {"cosine": _cosine, "step": _step, "constant": _constant}
# schedule.decay_over: one decay over the whole run, or a fresh warm-up and decay in every phase.
DECAY_OVER = ("run", "phase")
# What a phase trains besides the head: `head` (nothing else), `all`, or a whole number N (the last N blocks).
TRAIN_WORDS = ("head", "all")
# schedule.bn: BatchNorm in the blocks that train. frozen: normalised with the pretrained running statistics, which
# stay as they are (inference mode; scale and shift still learn); train: with each batch's statistics, the running
# averages updated. frozen keeps the features the head was trained on (README: Fine-tuning, measured).
BN_MODES = ("frozen", "train")


def with_defaults(config: dict) -> dict:
    """A `schedule` config as plain data with every key: the schema's default (finetune.config.ScheduleConfig, where
    each is stated once) for each key it does not give."""
    from finetune.config import ScheduleConfig, defaults

    return {**defaults(ScheduleConfig), **dict(config)}


def _phase_defaults() -> dict:
    from finetune.config import PhaseConfig, defaults

    return defaults(PhaseConfig)


@dataclass(frozen=True)
class Phase:
    """One phase as configured: `epochs` None means until the end of the run."""

    index: int
    train: str | int
    epochs: int | None
    lr: float
    backbone_lr_ratio: float
    patience: int | None

    def describe(self, blocks: int) -> str:
        if self.train == "head":
            return "the head alone"
        if self.train == "all" or self.train == blocks:
            return f"the head and all {blocks} blocks of the backbone"
        return f"the head and the last {self.train} of {blocks} blocks"


def phases_of(s: Any) -> list[dict]:
    """The phases `schedule` config `s` asks for, as plain dicts: schedule.phases, or the two-phase shorthand
    (freeze_epochs with the head alone, then `unfreeze` until the end)."""
    if s.get("phases"):
        return [dict(p) for p in s["phases"]]
    phases = []
    freeze = s.get("freeze_epochs") or 0
    if freeze > 0:
        phases.append({"train": "head", "epochs": freeze})
    unfreeze = s.get("unfreeze")
    phases.append({"train": "all" if unfreeze is None else unfreeze, "epochs": None})
    return phases


class Schedule:
    """The schedule of one run for a backbone of `blocks` blocks: its phases, and the phase boundaries passed so far.

    Where a phase ended early (patience) its end is recorded in `ends`, saved in every checkpoint, so that
    the state at any epoch, and so a resumed run, is a function of the epoch and the boundaries already passed.
    """

    def __init__(self, config: dict, blocks: int, monitor: str = "val/acc", mode: str = "max"):
        self.config = with_defaults(config)
        self.blocks = blocks
        self.monitor, self.mode = monitor, mode  # the validation metric that ends phases early (finetune.tasks)
        s = self.config
        self.epochs: int = s["epochs"]
        self.layer_decay: float = s["layer_decay"]
        self.decay_over: str = s["decay_over"]
        self.restore_best: bool = s["restore_best"]
        self.bn: str = s["bn"]
        self.phases: list[Phase] = []
        for i, p in enumerate(phases_of(s)):
            p = {**_phase_defaults(), **p}
            train = p["train"]
            if isinstance(train, int) and not isinstance(train, bool) and train > blocks:
                raise ConfigError(f"{self._key(i, 'train')}={train}, but this backbone has {blocks} blocks (timm's "
                                  f"grouping): train at most {blocks}, or all")
            lr, ratio = p["lr"], p["backbone_lr_ratio"]
            self.phases.append(Phase(i, train, p["epochs"], s["lr"] if lr is None else lr,
                                     s["backbone_lr_ratio"] if ratio is None else ratio, p["patience"]))
        # State: where phases ended early, the current phase's best val/acc, the phase whose start restored weights,
        # and every validated epoch's val/acc (what each phase gained, said at the end of the run).
        self.ends: dict[int, int] = {}
        self.history: dict[int, float] = {}
        self.best: float | None = None
        self.best_epoch: int = -1
        self.tracking: int = -1
        self.restored: int = 0

    def _key(self, index: int, key: str) -> str:
        if self.config.get("phases"):
            return f"schedule.phases[{index}].{key}"
        return "schedule.freeze_epochs" if key == "epochs" else "schedule.unfreeze"

    # --- state, saved in checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"ends": {str(k): v for k, v in self.ends.items()}, "best": self.best, "best_epoch": self.best_epoch,
                "tracking": self.tracking, "restored": self.restored,
                "history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ends = {int(k): int(v) for k, v in state.get("ends", {}).items()}
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch", -1)
        self.tracking, self.restored = state.get("tracking", -1), state.get("restored", 0)
        self.history = {int(k): float(v) for k, v in state.get("history", {}).items()}

    # --- phases over epochs ----------------------------------------------------------------------------------

    def bounds(self) -> list[tuple[int, int]]:
        """(first epoch, end epoch) of every phase, given the early ends so far; phases past the run are empty."""
        bounds, start = [], 0
        for phase in self.phases:
            end = self.ends.get(phase.index, start + phase.epochs if phase.epochs is not None else self.epochs)
            end = min(max(end, start), self.epochs)
            bounds.append((start, end))
            start = end
        return bounds

    def phase_at(self, epoch: int) -> Phase | None:
        """The phase that epoch `epoch` belongs to; None after the last phase has ended."""
        for phase, (start, end) in zip(self.phases, self.bounds()):
            if start <= epoch < end:
                return phase
        return None

    def trained_blocks(self, epoch: int) -> int:
        """How many of the backbone's last blocks train at `epoch` (0: frozen, `blocks`: all of it); past the
        schedule's end, what its last phase trained."""
        return self._trained(self.phase_at(epoch) or self.phases[-1])

    def _trained(self, phase: Phase) -> int:
        if phase.train == "head":
            return 0
        return self.blocks if phase.train == "all" else int(phase.train)

    def backbone_frozen(self, epoch: int) -> bool:
        return self.trained_blocks(epoch) == 0

    def backbone_trained_before(self, epoch: int) -> bool:
        """Whether any block of the backbone has trained in an epoch before `epoch`."""
        return any(self._trained(p) > 0 and start < min(end, epoch)
                   for p, (start, end) in zip(self.phases, self.bounds()))

    def warnings(self) -> list[str]:
        """What in this schedule cannot be what the user meant: phases that never run, a backbone never trained."""
        messages = []
        for phase, (start, end) in zip(self.phases, self.bounds()):
            if end <= start:
                early = any(p.patience for p in self.phases[:phase.index])
                messages.append(f"phase {phase.index + 1} ({phase.describe(self.blocks)}) starts after "
                                f"schedule.epochs={self.epochs} and never runs"
                                + (", unless an earlier phase ends early" if early else ""))
        running = [p for p, (start, end) in zip(self.phases, self.bounds()) if end > start]
        if not any(self._trained(p) for p in running) and not any(p.patience for p in self.phases):
            fewer = "a phase that trains it" if self.config.get("phases") else "fewer schedule.freeze_epochs"
            messages.append(f"the backbone stays frozen for all schedule.epochs={self.epochs} epochs (more epochs, "
                            f"or {fewer}, let it train)")
        warmup = self.config["warmup_epochs"]
        if warmup > self.epochs:
            messages.append(f"schedule.warmup_epochs={warmup:g} is longer than schedule.epochs={self.epochs}: the "
                            f"learning rate never reaches its peak")
        return messages

    # --- ending phases early (patience) -----------------------------------------------------------------------

    def observe(self, epoch: int, val_acc: float) -> str | None:
        """Record epoch `epoch`'s value of the monitored metric (val/acc); end its phase after it when the phase's
        patience has run out. Returns why the phase ended, or None."""
        from finetune.tasks import better

        phase = self.phase_at(epoch)
        self.history[epoch] = float(val_acc)
        if phase is None:
            return None
        if self.tracking != phase.index:
            self.tracking, self.best, self.best_epoch = phase.index, None, -1
        if better(self.mode, val_acc, self.best):
            self.best, self.best_epoch = val_acc, epoch
            return None
        start, end = self.bounds()[phase.index]
        if phase.patience is not None and epoch - self.best_epoch >= phase.patience and epoch + 1 < end:
            self.ends[phase.index] = epoch + 1
            return (f"{self.monitor} has not improved for {phase.patience} epochs (best {self.best:.4f} at epoch "
                    f"{self.best_epoch})")
        return None

    def gains(self) -> list[dict]:
        """What each phase that ran gave, from the val/acc of its validated epochs: at its end, its best, and how much
        its best adds to the best of the phases before it (what the best checkpoint owes it)."""
        rows, best_before = [], None
        for phase, (start, end) in zip(self.phases, self.bounds()):
            seen = [(e, v) for e, v in sorted(self.history.items()) if start <= e < end]
            if not seen:
                continue
            pick = max if self.mode == "max" else min
            best = pick(v for _, v in seen)
            rows.append({"phase": phase.index + 1, "train": phase.train, "epochs": [start, end - 1],
                         f"{self.monitor}_end": seen[-1][1], f"{self.monitor}_best": best,
                         "gain": None if best_before is None else best - best_before})
            best_before = best if best_before is None else pick(best_before, best)
        return rows

    def describe_gains(self) -> list[str]:
        """`gains` as the lines the log ends training with."""
        lines = []
        for row in self.gains():
            phase = self.phases[row["phase"] - 1]
            first, last = row["epochs"]
            gain = "" if row["gain"] is None else (
                f"; {row['gain']:+.4f} on the best of the phases before" if self.mode == "max" and row["gain"] else
                f"; {row['gain']:+.4f} against the best of the phases before (lower is better: "
                f"{'better' if row['gain'] < 0 else 'worse'})" if row["gain"] else
                "; no better than the phases before")
            lines.append(f"phase {row['phase']} (epochs {first}-{last}, {phase.describe(self.blocks)}): {self.monitor} "
                         f"{row[self.monitor + '_end']:.4f} at its end, best {row[self.monitor + '_best']:.4f}{gain}")
        return lines

    # --- parameter groups and rates ---------------------------------------------------------------------------

    def parameter_groups(self, backbone: nn.Module, head: nn.Module) -> list[dict]:
        """The optimizer's named parameter groups, input side first, the head last; all of them from the first step.

        One group `backbone` (or, with layer_decay < 1, one `backbone.<block>` per block of timm's grouping) and one
        `head`; with schedule.norm_bias_decay=false (the default, timm's and torchvision's convention) biases,
        normalisation parameters and the model's own no_weight_decay() names go into `.no_decay` twins without
        weight decay. Each group records the top block it holds (`block`; None for the head) for its rates.
        """
        from finetune.models.backbone import parameter_blocks

        s = self.config
        decay, split = s["weight_decay"], not s["norm_bias_decay"]
        skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
        per_block = self.layer_decay != 1.0
        block_of = parameter_blocks(backbone)
        groups: dict[str, dict] = {}

        def add(prefix: str, block: int | None, name: str, param: nn.Parameter) -> None:
            no_decay = split and (param.ndim <= 1 or name.endswith(".bias") or name in skip)
            key = prefix + (f".{block}" if per_block and block is not None else "") + (".no_decay" if no_decay else "")
            group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": 0.0 if no_decay else decay,
                                            "block": block if per_block or block is None else self.blocks - 1})
            group["params"].append(param)

        for name, param in backbone.named_parameters():
            add("backbone", block_of[name], name, param)
        for name, param in head.named_parameters():
            add("head", None, name, param)
        order = sorted(groups.values(), key=lambda g: (g["block"] is None, g["block"] or 0))
        return order

    def rate(self, block: int | None, step: int, steps_per_epoch: int) -> float:
        """The learning rate at optimizer step `step` of a group holding backbone block `block` (None: the head).

        0 while the group does not train; else its phase's peak (the head's lr, or lr * backbone_lr_ratio *
        layer_decay ** (blocks above it)), warmed up linearly over warmup_epochs from the step the group started
        training, times the scheduler's decay over the run (or over the phase, with decay_over=phase).
        """
        epoch = step // steps_per_epoch
        phase = self.phase_at(epoch)
        if phase is None:
            phase = self.phases[-1]
        if block is not None and block < self.blocks - self._trained(phase):
            return 0.0
        if block is None:
            peak = phase.lr
        else:
            peak = phase.lr * phase.backbone_lr_ratio * self.layer_decay ** (self.blocks - 1 - block)
        bounds = self.bounds()
        phase_start, phase_end = bounds[phase.index]
        start = self._training_since(block, phase.index, bounds)
        if self.decay_over == "phase":
            start = max(start, phase_start)
            t, total = step - phase_start * steps_per_epoch, max(1, (phase_end - phase_start) * steps_per_epoch)
        else:
            t, total = step, max(1, self.epochs * steps_per_epoch)
        warmup = self.config["warmup_epochs"] * steps_per_epoch
        factor = min(1.0, (step - start * steps_per_epoch + 1) / warmup) if warmup > 0 else 1.0
        factor *= SCHEDULERS[self.config["scheduler"]](t, total, steps_per_epoch, self.config)
        return peak * factor

    def _training_since(self, block: int | None, index: int, bounds: list[tuple[int, int]]) -> int:
        """The first epoch of the unbroken run of phases, up to phase `index`, in which the group trains."""
        start = bounds[index][0]
        for phase in reversed(self.phases[:index]):
            trains = block is None or block >= self.blocks - self._trained(phase)
            if not trains or bounds[phase.index][1] <= bounds[phase.index][0]:
                break
            start = bounds[phase.index][0]
        return start

    def optimizer(self, backbone: nn.Module, head: nn.Module, steps_per_epoch: int):
        """The optimizer over `parameter_groups` and the PhaseLR scheduler that sets every group's rate per step."""
        import torch

        name, extra = OPTIMIZERS[self.config["optimizer"]]
        groups = self.parameter_groups(backbone, head)
        optimizer = getattr(torch.optim, name)(groups, lr=self.config["lr"], **{k: self.config[k] for k in extra})
        return optimizer, PhaseLR(optimizer, self, steps_per_epoch)


class PhaseLR:
    """Sets each parameter group's learning rate to what the schedule says for the current step, every step.

    The rate is a function of the step and the schedule alone (not of the rates before), so a resumed run, whose
    optimizer was saved with the rates of its last step (and perhaps another schedule.epochs), is put right the
    moment its state is loaded. Its state is the step count only; the schedule's own state is in the checkpoint.
    It is not one of torch's LRSchedulers (nothing here needs their chaining): the ImageModule's
    `lr_scheduler_step` steps it, as Lightning asks of schedulers of one's own.
    """

    def __init__(self, optimizer, schedule: Schedule, steps_per_epoch: int):
        self.optimizer, self.schedule, self.steps_per_epoch = optimizer, schedule, steps_per_epoch
        self.last_epoch = 0  # torch's name for the scheduler's step count
        self._step_count = 1
        self.refresh()

    def step(self) -> None:
        self.last_epoch += 1
        self._step_count += 1
        self.refresh()

    def get_lr(self) -> list[float]:
        return [self.schedule.rate(g.get("block"), self.last_epoch, self.steps_per_epoch)
                for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        self.refresh()

    def refresh(self) -> None:
        """Set every group's rate for the current step (after a load, or after the phase boundaries moved)."""
        rates = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self._last_lr = rates


def check(s: Any) -> None:
    """Check what the schema's types cannot say about `schedule` config `s`; ConfigError naming the key."""
    def ok(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    ok(s.optimizer in OPTIMIZERS, f"schedule.optimizer must be one of {', '.join(OPTIMIZERS)} (got {s.optimizer})")
    ok(s.bn in BN_MODES, f"schedule.bn must be one of {', '.join(BN_MODES)} (got {s.bn})")
    ok(s.scheduler in SCHEDULERS, f"schedule.scheduler must be one of {', '.join(SCHEDULERS)} (got {s.scheduler})")
    ok(s.decay_over in DECAY_OVER, f"schedule.decay_over must be one of {', '.join(DECAY_OVER)} (got {s.decay_over})")
    ok(0 < s.layer_decay <= 1, f"schedule.layer_decay must be in (0, 1] (got {s.layer_decay})")
    ok(s.ema is None or 0 < s.ema < 1, f"schedule.ema is the average's decay per step, in (0, 1), e.g. 0.999; "
                                       f"null for off (got {s.ema})")
    if s.phases:
        for key in ("freeze_epochs", "unfreeze"):
            ok(s[key] is None, f"schedule.{key}={s[key]} and schedule.phases are both set: {key} is the shorthand "
                               f"for two phases; set it to null, or say it in schedule.phases")
    else:
        ok(s.freeze_epochs is not None and s.freeze_epochs >= 0,
           f"schedule.freeze_epochs must be >= 0 (got {s.freeze_epochs})")
    for i, p in enumerate(phases_of(s)):
        where = f"schedule.phases[{i}]"
        train = p.get("train")
        whole = isinstance(train, int) and not isinstance(train, bool) and train >= 1
        if not s.phases:
            if p.get("epochs") is None:  # the shorthand's second phase: what `unfreeze` trains
                ok(train == "all" or whole, f"schedule.unfreeze must be 'all' or a number of blocks >= 1 "
                                            f"(got {train})")
            continue
        ok(train in TRAIN_WORDS or whole, f"{where}.train must be head, all or a number of blocks >= 1 (got {train})")
        epochs = p.get("epochs")
        ok(epochs is None or epochs >= 1, f"{where}.epochs must be >= 1, or null for the rest of the run "
                                          f"(got {epochs})")
        ok(epochs is not None or i == len(s.phases) - 1,
           f"{where}.epochs is null (the rest of the run), so the phases after it would never run: only the last "
           f"phase can be open-ended")
        for key in ("lr", "backbone_lr_ratio"):
            value = p.get(key)
            ok(value is None or (math.isfinite(value) and value > 0), f"{where}.{key} must be > 0 (got {value})")
        patience = p.get("patience")
        ok(patience is None or patience >= 1, f"{where}.patience must be >= 1 or null (got {patience})")
