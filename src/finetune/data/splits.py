"""Seeded, stratified train/val/test splits, and the split.csv file that records them (path,label,split)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     official: list[str] | None = None) -> np.ndarray:
    """'train' / 'val' / 'test' per sample: each class divided in the given fractions, the same for the same seed.

    Where the dataset has an official split, its test (and val) samples keep it and only its training samples
    are divided; `test_fraction` then applies only when the dataset has no official test split.
    """
    rng = np.random.default_rng(seed)
    out = np.array(official if official is not None else ["train"] * len(labels), dtype=object)
    has_test = official is not None and "test" in out
    has_val = official is not None and "val" in out
    pool = np.flatnonzero(out == "train")
    for label in np.unique(labels[pool]):
        members = pool[labels[pool] == label]
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = 0 if has_test else _share(n, test_fraction)
        n_val = 0 if has_val else _share(n - n_test, val_fraction / (1 - (0 if has_test else test_fraction)))
        out[members[:n_test]] = "test"
        out[members[n_test:n_test + n_val]] = "val"
    return out.astype(str)


def _share(n: int, fraction: float) -> int:
    """round(n * fraction), but at least one sample when the fraction is non-zero and the class can spare it."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def write_split(path: Path, paths: list[str], labels: np.ndarray, classes: list[str], splits: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(zip(paths, (classes[i] for i in labels), splits))
    tmp.replace(path)


def read_split(path: Path) -> list[tuple[str, str, str]]:
    """(path, class name, split) rows of a split.csv."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["path", "label", "split"]:
            raise ValueError(f"{path} is not a split file: its header must be path,label,split")
        return [(row["path"], row["label"], row["split"]) for row in reader]
