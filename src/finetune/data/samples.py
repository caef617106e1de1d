"""What every reader returns (labelled samples: Source), what a reader is (its record: Reader), and what the readers
share. Imports nothing of the package but its errors and the tasks, so that any reader module can build on it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import DataError  # noqa: F401 (the readers' error, where they have always found it)
from finetune.tasks import MULTICLASS, Task, task_of
from finetune.tasks.labels import (  # noqa: F401 (what the readers share)
    class_order,
    is_number,
    is_whole,
    label_name,
    quantile_strata,
    rarest_label,
    warn_classes_missing_from_train,
    written,
)

log = logging.getLogger("finetune.data.readers")  # the readers' messages, under one name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Source:
    """Labelled samples of one dataset.

    `paths` names each sample: a file, or `NAME#INDEX` for datasets that ship decoded pixels in `images`.
    `splits` holds the dataset's official split per sample ('train', 'val', 'test'), where it has one.
    `task` says what the labels are (finetune.tasks): for multiclass `labels` holds each sample's class; for multilabel
    `targets` holds a 0/1 row per sample over `classes` (its labels) and for regression a number per sample (`classes`
    then names the target), and `labels` holds the stratum the split keeps in proportion (the rarest label; the
    target's quantile bin).
    """

    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    splits: list[str] | None = None
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files the reader did not take
    task: Task = field(default_factory=lambda: task_of(None))
    targets: np.ndarray | None = None  # multilabel: (N, K) float32 0/1; regression: (N,) float32

    def __len__(self) -> int:
        return len(self.paths)

    def label_text(self, j: int) -> str:
        """Sample j's label as split.csv and the reports write it: its class, its labels joined by '|' (multilabel),
        or its target (regression, as 9 significant digits of its float32 value)."""
        return self.task.label_text(self, j)

    def target(self, j: int):
        """What the model learns for sample j: its class (int), its 0/1 row of labels or its number (float32)."""
        return int(self.labels[j]) if self.targets is None else self.targets[j]

    def target_tensor(self, indices: np.ndarray):
        """The targets of samples `indices` as one tensor: int64 classes, or float32 rows or numbers."""
        import torch

        if self.targets is None:
            return torch.as_tensor(self.labels[indices], dtype=torch.long)
        return torch.as_tensor(self.targets[indices], dtype=torch.float32)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


# a split named by a folder, a table cell or a Hugging Face split: which split it is
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
# a column of labels, found by its name (dataset=table, hf)
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target")


def labelled(task: Task, paths: list[str], values: list, splits: list[str] | None,
             passed_over: list[tuple[str, str]], column: str, root: str | None) -> Source:
    """The Source of `paths` with `values` as a reader found them for `task` (its read_cell): a class name each, a tuple
    of names each, or a float each (the target of column `column`)."""
    classes, labels, targets = task.encode(values, column, splits, root)
    return Source(classes, paths, labels, splits=splits, passed_over=passed_over, task=task, targets=targets)

def require_dir(root: str | None, dataset: str) -> Path:
    """The dataset folder, or a DataError saying what is wrong with it."""
    if root is None:
        raise DataError(f"dataset.root is required for dataset={dataset}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset.root={root}: no such directory")
    if not any(path.iterdir()):
        raise DataError(f"dataset.root={root} is empty")
    return path


DUPLICATE_IDS = ("refuse", "first")  # dataset.duplicate_ids: what an id listed twice with two labels does


def one_label_per_id(rows: list[tuple[str, str, str]], file: Path, duplicate_ids: str,
                     passed_over: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(id, label) once per id, from (id, label, FILE:LINE) rows of label files. Repeats with the same label are
    passed over; an id with two labels is a DataError naming them, or keeps its first row (duplicate_ids=first)."""
    first: dict[str, tuple[str, str]] = {}
    conflicts: dict[str, list[str]] = {}
    for image_id, label, line in rows:
        if image_id not in first:
            first[image_id] = (label, line)
            continue
        kept, kept_line = first[image_id]
        if label == kept:
            passed_over.append((line, f"id {image_id} again, as at {kept_line}"))
        else:
            conflicts.setdefault(image_id, [kept]).append(label)
            passed_over.append((line, f"id {image_id} as {label!r}, but {kept!r} at {kept_line} "
                                      "(the first kept: dataset.duplicate_ids=first)"))
    if conflicts:
        examples = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(conflicts.items())[:3])
        if duplicate_ids != "first":
            raise DataError(f"{file} gives {len(conflicts)} ids more than one label ({examples}): the same image "
                            "would be trained and tested under two classes. Fix the file, or keep each id's first "
                            "row with dataset.duplicate_ids=first")
        log.warning("%s gives %d ids more than one label (%s): each keeps its first (dataset.duplicate_ids=first)",
                    file, len(conflicts), examples)
    repeats = len(rows) - len(first)
    if repeats > len(conflicts):
        log.warning("%s lists %d ids more than once; each is taken once (the rows are in skipped.csv)", file, repeats)
    return [(image_id, label) for image_id, (label, _) in first.items()]


@dataclass(frozen=True)
class Reader:
    """A dataset reader (dataset.name): what reads it, the tasks it reads labels of, the dataset keys of its own,
    the values of dataset.target it takes (the first is the default), whether it reads a label file (and so takes
    dataset.duplicate_ids), and the check of its own keys that the pre-flight check runs."""

    read: Callable[..., Source]
    tasks: tuple[Task, ...] = (MULTICLASS,)
    own_keys: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    label_file: bool = False
    check: Callable[..., None] | None = None
