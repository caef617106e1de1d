"""The dataset readers (dataset.name), one module per family: class folders, the named layouts, label tables and
Hugging Face datasets. Each reader is a record (samples.Reader: what reads it, the tasks it reads labels of, its own
keys, the values of dataset.target, whether it reads a label file, its check); READERS is the one table the config
check, read_source and the docs read."""

from __future__ import annotations

from finetune.data.readers import folders, hf, layouts, table
from finetune.data.samples import (  # noqa: F401 (what a reader's user needs beside it)
    DUPLICATE_IDS,
    DataError,
    Reader,
    Source,
    is_image_file,
)
from finetune.tasks import TASKS, Task, task_of

READERS: dict[str, Reader] = {**layouts.READERS, **folders.READERS, **table.READERS, **hf.READERS}


def reader_tasks(name: str) -> tuple[str, ...]:
    """The names of the tasks dataset=`name` reads labels of (every task, for a name that is no reader's: the config
    check says so on its own)."""
    reader = READERS.get(name)
    return tuple(t.name for t in (reader.tasks if reader else TASKS.values()))


def read_dataset(d, task: str | Task | None = None) -> Source:
    """read_source with the keys of a `dataset` config; `task` (task=) as given, or None: as the data says."""
    reader = READERS.get(d.name)
    return read_source(d.name, d.root, d.get("target"), duplicate_ids=d.get("duplicate_ids") or "refuse", task=task,
                       **{key: d.get(key) for key in (reader.own_keys if reader else ())})


def read_source(name: str, root: str | None, target: str | None = None, duplicate_ids: str = "refuse",
                task: str | Task | None = None, **own: str | None) -> Source:
    """Read dataset `name` from `root`, labels of `task` (given, or None: as the data says); a DataError if it has fewer
    than two classes with images (labels in use; values of the target)."""
    if name not in READERS:
        from finetune.errors import suggest

        known = ", ".join(READERS)
        raise DataError(f"dataset.name={name} has no reader; known: {known}.{suggest(name, list(READERS))}")
    reader = READERS[name]
    if target is not None and target not in reader.targets:
        options = f"one of {', '.join(reader.targets)}" if reader.targets else "not used (leave it null)"
        raise DataError(f"dataset.target={target}: for dataset={name} it is {options}")
    task = None if task is None else task_of(task)
    if task is not None and task not in reader.tasks:
        raise DataError(f"task={task}: dataset={name} reads one class per image; {task} labels are read from "
                        f"dataset=table or dataset=hf")
    options = {"target": target} if target is not None else {}
    if reader.label_file:
        options["duplicate_ids"] = duplicate_ids
    if len(reader.tasks) > 1:
        options["task"] = task
    source = reader.read(root, **options, **own)
    source.task.check_read(source, f"dataset.root={root}" if name != "hf" else f"dataset.path={own.get('path')}")
    return source
