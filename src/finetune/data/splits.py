"""Seeded, stratified train/val/test splits, and the split.csv file that records them (path,label,split)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     official: list[str] | None = None, groups: np.ndarray | None = None,
                     folds: int | None = None, fold: int = 0, multilabel: np.ndarray | None = None) -> np.ndarray:
    """'train' / 'val' / 'test' per sample: each class divided in the given fractions, the same for the same seed.

    Where the dataset has an official split, its test (and val) samples keep it and only its training samples
    are divided; `test_fraction` then applies only when the dataset has no official test split.
    `groups` (an id per sample: duplicates share one) keeps each group on one side: a group is assigned as one
    unit, counted in the class most of its images have. With `folds`=K, everything outside the test split (the
    same test split as without folds, for the same seed) is divided into K stratified folds and fold `fold` is
    the validation split. `multilabel` (0/1 rows, a sample's labels) divides by iterative stratification instead
    (iterative_split), so that each label, the rare ones first, is divided in the given fractions.
    """
    if multilabel is not None:
        return _multilabel_split(multilabel, val_fraction, test_fraction, seed, official, groups, folds, fold)
    rng = np.random.default_rng(seed)
    out = np.array(official if official is not None else ["train"] * len(labels), dtype=object)
    has_test = official is not None and "test" in out
    has_val = official is not None and "val" in out
    if folds:
        out[out == "val"] = "train"  # the folds take the validation split's place
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    for members in _units_by_class(np.flatnonzero(out == "train"), labels, groups):
        units = [members[i] for i in rng.permutation(len(members))]
        n = sum(len(u) for u in units)
        n_test = 0 if has_test else _share(n, test_fraction)
        n_val = 0 if has_val or folds else _share(n - n_test, val_fraction / (1 - (0 if has_test else test_fraction)))
        taken = {"test": 0, "val": 0}
        for unit in units:
            for split, target in (("test", n_test), ("val", n_val)):
                # the unit goes here while it brings the count no further past the target than it is short of it
                # and at least one image of the class stays in train
                if taken[split] < target and taken[split] + len(unit) - target <= target - taken[split] \
                        and taken["test"] + taken["val"] + len(unit) < n:
                    out[unit] = split
                    taken[split] += len(unit)
                    break
    if folds:
        out[kfold(np.flatnonzero(out == "train"), labels, groups, folds, rng) == fold] = "val"
    return out.astype(str)


def kfold(pool: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int,
          rng: np.random.Generator) -> np.ndarray:
    """A fold number for every sample (-1 outside `pool`): each class of the pool dealt over the folds, a group as
    one unit, larger units first, each to the fold that holds the fewest images of that class so far (of all
    classes, where that ties: small classes do not all fill the first folds and leave the last ones empty)."""
    fold_of = np.full(len(labels), -1)
    totals = np.zeros(folds, dtype=np.int64)
    for members in _units_by_class(pool, labels, groups):
        units = [members[i] for i in rng.permutation(len(members))]
        counts = np.zeros(folds, dtype=np.int64)
        for unit in sorted(units, key=len, reverse=True):  # a stable sort: equal sizes stay in the shuffled order
            f = min(range(folds), key=lambda k: (counts[k], totals[k]))
            fold_of[unit] = f
            counts[f] += len(unit)
            totals[f] += len(unit)
    return fold_of


def _units_by_class(pool: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> list[list[np.ndarray]]:
    """The samples of `pool` as units (one per group, in the order of their first sample), listed per class (in label
    order); a group whose images carry different labels counts in its most common one."""
    members: dict[int, list[int]] = {}
    for j in pool:
        members.setdefault(int(groups[j]), []).append(int(j))
    by_class: dict[int, list[np.ndarray]] = {}
    for unit in members.values():
        unit = np.array(unit, dtype=np.int64)
        label = int(labels[unit[0]]) if len(unit) == 1 else int(np.bincount(labels[unit]).argmax())
        by_class.setdefault(label, []).append(unit)
    return [by_class[label] for label in sorted(by_class)]


def _multilabel_split(targets: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                      official: list[str] | None, groups: np.ndarray | None, folds: int | None,
                      fold: int) -> np.ndarray:
    """stratified_split for multi-label samples: the same rules (official splits kept, groups whole, the folds of what
    is outside the test split, that test split the same as without folds), each division by iterative_split."""
    rng = np.random.default_rng(seed)
    out = np.array(official if official is not None else ["train"] * len(targets), dtype=object)
    has_test = official is not None and "test" in out
    has_val = official is not None and "val" in out
    groups = np.arange(len(targets)) if groups is None else np.asarray(groups)
    pool = np.flatnonzero(out == "train")
    test = 0 if has_test else test_fraction
    val = 0 if has_val else val_fraction
    if test or val:  # as without folds: the folds divide what this leaves outside the test split
        side = iterative_split(targets, pool, groups, [test, val, 1 - test - val], rng)
        out[pool[side == 0]], out[pool[side == 1]] = "test", "val"
    if folds:
        out[out == "val"] = "train"  # the folds take the validation split's place
        pool = np.flatnonzero(out == "train")
        side = iterative_split(targets, pool, groups, [1 / folds] * folds, rng)
        out[pool[side == fold]] = "val"
    return out.astype(str)


def iterative_split(targets: np.ndarray, pool: np.ndarray, groups: np.ndarray, fractions: list[float],
                    rng: np.random.Generator) -> np.ndarray:
    """Which part (an index into `fractions`) each sample of `pool` goes to: iterative stratification (Sechidis et al.,
    2011), a group of duplicates as one unit. The label with the fewest samples still to place goes first: each unit
    that has it goes to the part that wants most of that label (then most samples, then at random). A unit without
    labels goes where most samples are wanted. Rare labels so reach every part that their count allows."""
    members: dict[int, list[int]] = {}
    for j in pool:
        members.setdefault(int(groups[j]), []).append(int(j))
    units = [np.array(m, dtype=np.int64) for m in members.values()]
    unit_targets = np.array([targets[u].sum(0) for u in units]).reshape(len(units), targets.shape[1])
    sizes = np.array([len(u) for u in units], dtype=np.float64)
    fractions = np.asarray(fractions, dtype=np.float64)
    wanted_labels = fractions[:, None] * unit_targets.sum(0)[None, :]
    wanted = fractions * sizes.sum()
    part = np.full(len(units), -1)
    left = set(range(len(units)))
    while left:
        open_units = np.array(sorted(left))
        counts = unit_targets[open_units].sum(0)
        labels = np.flatnonzero(counts > 0)
        if len(labels):
            rarest = labels[counts[labels] == counts[labels].min()]
            label = int(rng.choice(rarest))
            chosen = open_units[unit_targets[open_units, label] > 0]
        else:
            label, chosen = None, open_units
        for u in chosen[rng.permutation(len(chosen))]:
            options = np.flatnonzero(fractions > 0)
            if label is not None:
                options = options[wanted_labels[options, label] == wanted_labels[options, label].max()]
            options = options[wanted[options] == wanted[options].max()]
            p = int(rng.choice(options))
            part[u] = p
            wanted_labels[p] -= unit_targets[u]
            wanted[p] -= sizes[u]
            left.discard(int(u))
    out = np.full(len(targets), -1)
    for u, unit in enumerate(units):
        out[unit] = part[u]
    return out[pool]


def _share(n: int, fraction: float) -> int:
    """round(n * fraction), but at least one sample when the fraction is non-zero and the class can spare it."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def write_split(path: Path, paths: list[str], labels: list[str], splits: np.ndarray) -> None:
    """split.csv: each sample's path, its label as Source.label_text writes it, and its split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        writer.writerows(zip(paths, labels, splits))
    tmp.replace(path)


def read_split(path: Path) -> list[tuple[str, str, str]]:
    """(path, class name, split) rows of a split.csv."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["path", "label", "split"]:
            raise ValueError(f"{path} is not a split file: its header must be path,label,split")
        return [(row["path"], row["label"], row["split"]) for row in reader]
