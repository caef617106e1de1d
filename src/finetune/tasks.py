"""What a model learns (task=): one class per image, any number of labels per image, or a number per image. The
table every part that depends on it reads: the metric that picks the best checkpoint, the loss, the test figures.

Front half: imports nothing heavy; `check` is the task's part of the pre-flight check (finetune.checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    monitor: str  # the validation metric that picks the best checkpoint, ends phases early and stops early
    mode: str  # max | min: which way the monitored metric improves
    losses: tuple[str, ...]  # head.loss: the first is the default
    headline: tuple[str, ...]  # the test figures the log, the model card and the sweep summary show, in order
    reads: str  # what the labels are, for messages
    figure: str  # the headline figure's name in words: the model card's, the export's measurement


TASKS = {
    "multiclass": Task("multiclass", "val/acc", "max", ("cross_entropy",), ("test/acc", "test/balanced_acc"),
                       "one class per image", "accuracy"),
    "multilabel": Task("multilabel", "val/map", "max", ("bce",),
                       ("test/map", "test/f1_macro", "test/f1_micro"), "any number of labels per image", "mAP"),
    "regression": Task("regression", "val/mae", "min", ("mse", "huber"), ("test/mae", "test/rmse", "test/r2"),
                       "a number per image", "MAE"),
}


def task_of(name: str | None) -> Task:
    return TASKS[name or "multiclass"]


def objective(metrics: dict) -> float | None:
    """What a run returns to a Hydra sweeper that maximises (Optuna: hparams_search=lr_optuna): the best value of the
    task's monitored metric, negated where lower is better (-val/mae_best)."""
    task = task_of(metrics.get("task"))
    best = metrics.get(f"{task.monitor}_best")
    return None if best is None else (best if task.mode == "max" else -best)


def better(mode: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` (None: nothing yet) for a metric that improves towards `mode`."""
    return best is None or (value > best if mode == "max" else value < best)


def check(cfg: Any) -> None:
    """task= and the keys that depend on it, as far as the config alone says (the data can infer the task later)."""
    from finetune.errors import suggest

    task = cfg.get("task")
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task} is not a task; known: {', '.join(TASKS)}{suggest(str(task), list(TASKS))}")
    loss = cfg.head.get("loss")
    every = sorted({name for t in TASKS.values() for name in t.losses})
    if loss is not None and loss not in every:
        raise ConfigError(f"head.loss={loss} is not a loss; known: {', '.join(every)} (or null: the task's own)")
    from finetune.data.sources import ANY_TASK

    if task not in (None, "multiclass") and cfg.dataset.name not in ANY_TASK:
        raise ConfigError(f"task={task}: dataset={cfg.dataset.name} reads one class per image; {task} labels are "
                          f"read from dataset=table or dataset=hf")
    if task is not None:
        agrees(task_of(task), cfg)
    elif cfg.dataset.name not in ANY_TASK:  # its readers read one class per image
        agrees(task_of("multiclass"), cfg)


def agrees(task: Task, cfg: Any) -> None:
    """The keys that only one task can use, for `task` (given, or inferred from the data): one line each."""
    loss = cfg.head.get("loss")
    if loss is not None and loss not in task.losses:
        raise ConfigError(f"head.loss={loss} is not for task={task.name}: it trains with "
                          f"{' or '.join(task.losses)}")
    if task.name == "multiclass":
        return
    given = [(f"augment.{key}={cfg.augment[key]}", "mixes labels of one class per image") for key in ("mixup", "cutmix")
             if cfg.augment.get(key)]
    if cfg.dataset.get("balance") not in (None, "none"):
        given.append((f"dataset.balance={cfg.dataset.balance}", "evens out classes"))
    if cfg.schedule.get("label_smoothing"):
        given.append((f"schedule.label_smoothing={cfg.schedule.label_smoothing}", "smooths one class per image"))
    if cfg.head.get("binary"):
        given.append(("head.binary=true", "is one output for two classes"))
    if given:
        key, why = given[0]
        raise ConfigError(f"{key} {why}: it is for task=multiclass, and this run is task={task.name} "
                          f"({task.reads}); leave it out")
