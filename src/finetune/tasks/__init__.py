"""What a model learns (task=): one class per image, any number of labels per image, or a number per image. One
object per task (finetune.tasks.multiclass, multilabel, regression) holds everything that differs between them; the
rest of the package asks the task instead of comparing its name. TASKS is the table the config check, the builders
and the docs read; task_of reads a stored name back.

Front half: imports nothing heavy; `check` is the task's part of the pre-flight check (finetune.checks)."""

from __future__ import annotations

from typing import Any

from finetune.errors import ConfigError
from finetune.tasks.base import Task
from finetune.tasks.multiclass import MULTICLASS
from finetune.tasks.multilabel import MULTILABEL
from finetune.tasks.regression import REGRESSION

TASKS = {task.name: task for task in (MULTICLASS, MULTILABEL, REGRESSION)}

__all__ = ["TASKS", "Task", "MULTICLASS", "MULTILABEL", "REGRESSION", "task_of", "of_target_column", "objective",
           "better", "check", "agrees"]


def task_of(task: str | Task | None) -> Task:
    """The task a name stands for (None: one class per image, the default); a Task as it is."""
    if isinstance(task, Task):
        return task
    return TASKS[task or MULTICLASS.name]


def of_target_column(task: Task | None, column: str) -> Task:
    """The task of a reader given dataset.target_column=`column`, a number to regress; a DataError where task= says
    another."""
    if task not in (None, REGRESSION):
        from finetune.errors import DataError

        raise DataError(f"dataset.target_column={column} is a target to regress, and task={task}: give "
                        "task=regression (or leave task out), or dataset.label_column for labels")
    return REGRESSION


def objective(metrics: dict) -> float | None:
    """What a run returns to a Hydra sweeper that maximises (Optuna: hparams_search=lr_optuna): the best value of the
    task's monitored metric, negated where lower is better (-val/mae_best)."""
    task = task_of(metrics.get("task"))
    best = metrics.get(f"{task.monitor}_best")
    return None if best is None else (best if task.mode == "max" else -best)


def better(mode: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` (None: nothing yet) for a metric that improves towards `mode`."""
    return best is None or (value > best if mode == "max" else value < best)


def check(cfg: Any, reader_tasks: tuple[str, ...]) -> None:
    """task= and the keys that depend on it, as far as the config alone says (the data can infer the task later);
    `reader_tasks`: the tasks the dataset's reader reads labels of."""
    from finetune.errors import suggest

    name = cfg.get("task")
    if name is not None and name not in TASKS:
        raise ConfigError(f"task={name} is not a task; known: {', '.join(TASKS)}{suggest(str(name), list(TASKS))}")
    loss = cfg.head.get("loss")
    every = sorted({loss for t in TASKS.values() for loss in t.losses})
    if loss is not None and loss not in every:
        raise ConfigError(f"head.loss={loss} is not a loss; known: {', '.join(every)} (or null: the task's own)")
    read = reader_tasks  # the names of the tasks dataset=NAME reads labels of (its reader's record)
    if name is not None and name not in read:
        raise ConfigError(f"task={name}: dataset={cfg.dataset.name} reads one class per image; {name} labels are "
                          f"read from dataset=table or dataset=hf")
    if name is not None:
        agrees(task_of(name), cfg)
    elif len(read) == 1:  # a reader of one task: its keys are checked now
        agrees(task_of(read[0]), cfg)


def agrees(task: Task, cfg: Any) -> None:
    """The keys that only one task can use, for `task` (given, or inferred from the data): one line each."""
    loss = cfg.head.get("loss")
    if loss is not None and loss not in task.losses:
        raise ConfigError(f"head.loss={loss} is not for task={task.name}: it trains with "
                          f"{' or '.join(task.losses)}")
    given = task.refused(cfg)
    if given:
        key, why = given[0]
        raise ConfigError(f"{key} {why}: it is for task={MULTICLASS.name}, and this run is task={task.name} "
                          f"({task.reads}); leave it out")
