"""How labels are read and written, whatever the task: numbers and names, the order of classes, the strata a split
keeps in proportion. The lowest layer under the tasks and the readers; imports nothing of the package but its
errors."""

from __future__ import annotations

import logging
import math
import re

import numpy as np

log = logging.getLogger("finetune.data.readers")  # the readers' messages, under one name


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
