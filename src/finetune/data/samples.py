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
    """

    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    splits: list[str] | None = None
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files the reader did not take

    def __len__(self) -> int:
        return len(self.paths)


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
