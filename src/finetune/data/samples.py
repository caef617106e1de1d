"""What every reader returns: labelled samples (Source), the error of a dataset that cannot be read, and what the
readers share. Imports nothing of the package but its errors, so that any reader module can build on it."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.data.sources")  # the readers' messages, under one name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(FinetuneError):
    """A dataset that cannot be read as configured."""


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
    task: str = "multiclass"
    targets: np.ndarray | None = None  # multilabel: (N, K) float32 0/1; regression: (N,) float32

    def __len__(self) -> int:
        return len(self.paths)

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


def warn_classes_missing_from_train(classes: list[str], labels: list[int], splits: list[str],
                                    root: str | None) -> None:
    """A class with images only in the official val/ or test/ folder cannot be learnt: say so before training."""
    counts = {name: {} for name in classes}
    for label, split in zip(labels, splits):
        counts[classes[label]][split] = counts[classes[label]].get(split, 0) + 1
    for name, where in counts.items():
        if not where.get("train"):
            found = ", ".join(f"{n} in {s}/" for s, n in sorted(where.items()))
            log.warning("dataset.root=%s: class %r has no training images (only %s): the model cannot learn it, and "
                        "each of its images will count as an error", root, name, found)


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def is_number(value) -> bool:
    """Whether a label is a finite number: an int or float, or a string written as one ("3", "2.0", "-1e3")."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return isinstance(value, str) and _NUMBER.fullmatch(value.strip()) is not None


def is_whole(value) -> bool:
    """Whether a number (is_number) is a whole one."""
    if isinstance(value, int):
        return True
    number = float(value)
    return number == int(number)


def label_name(value) -> str:
    """A class's name as the readers give it: a name stripped of spaces; a whole number written plainly, so that 1,
    1.0, "01" and " 1" are one class (ints exactly, however large)."""
    if isinstance(value, bool):
        return str(value)
    if is_number(value) and is_whole(value):
        if isinstance(value, int):
            return str(value)
        text = str(value).strip()
        return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else str(int(float(text)))
    return str(value).strip()


def class_order(names) -> list[str]:
    """Class names in order: numerically when they are all whole numbers, else alphabetically."""
    names = set(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def label_text(source: Source, j: int) -> str:
    """Sample j's label as split.csv and the reports write it: its class, its labels joined by '|' (multilabel), or its
    target (regression, as 9 significant digits of its float32 value)."""
    if source.task == "regression":
        return written(float(source.targets[j]))
    if source.task == "multilabel":
        return written(tuple(name for name, on in zip(source.classes, source.targets[j]) if on))
    return source.classes[source.labels[j]]


def written(value) -> str:
    """A label as a reader found it (a class name, a tuple of names, a float) as split.csv and messages write it."""
    if isinstance(value, tuple):
        return "|".join(value)
    return f"{value:.9g}" if isinstance(value, float) else value


def quantile_strata(values: np.ndarray) -> np.ndarray:
    """A stratum per regression target: its quantile bin (up to 10 bins, about 20 samples each at least), so that a
    seeded stratified split gives each split the whole range of the target."""
    bins = max(1, min(10, len(values) // 20))
    if bins == 1:
        return np.zeros(len(values), dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def rarest_label(targets: np.ndarray) -> np.ndarray:
    """A stratum per multi-label sample: its rarest label (the class counts and anything else that needs one class per
    image count it there); -1 where it has none."""
    frequency = targets.sum(0)
    rank = np.where(targets > 0, frequency[None, :], np.inf)
    return np.where(np.isfinite(rank).any(1), rank.argmin(1), -1).astype(np.int64)


def labelled(task: str, paths: list[str], values: list, splits: list[str] | None,
             passed_over: list[tuple[str, str]], column: str, root: str | None) -> Source:
    """The Source of `paths` with `values` as a reader found them for `task`: a class name each (multiclass), a tuple
    of names each (multilabel) or a float each (regression, the target of column `column`)."""
    if task == "regression":
        targets = np.array(values, dtype=np.float32)
        return Source([column], paths, quantile_strata(targets), splits=splits, passed_over=passed_over,
                      task=task, targets=targets)
    if task == "multilabel":
        classes = class_order(name for names in values for name in names)
        index = {name: i for i, name in enumerate(classes)}
        targets = np.zeros((len(paths), len(classes)), dtype=np.float32)
        for j, names in enumerate(values):
            targets[j, [index[name] for name in names]] = 1
        return Source(classes, paths, rarest_label(targets), splits=splits, passed_over=passed_over, task=task,
                      targets=targets)
    classes = class_order(values)
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[name] for name in values]
    if splits is not None:
        warn_classes_missing_from_train(classes, labels, splits, root)
    return Source(classes, paths, np.array(labels, dtype=np.int64), splits=splits, passed_over=passed_over)
