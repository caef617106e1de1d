"""The dataset pipeline, between a reader and the loaders: read (the task given, or inferred and said), the run's
split file where it has one, dataset.limit_per_class, the integrity scan (skipped.csv), the duplicate check and the
seeded stratified split (duplicates.csv), the refusals of a split that could not measure a class, and split.csv.
The DataModule calls prepare; evaluate uses its steps (a run's split file, the integrity scan); file names come from
finetune.rundir."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from finetune import rundir
from finetune.data.duplicates import Duplicates, conflicts, find_duplicates, image_hashes, report
from finetune.data.integrity import scan
from finetune.data.readers import read_dataset
from finetune.data.samples import DataError, Source
from finetune.data.splits import SPLITS, read_split, stratified_split, write_split
from finetune.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A dataset ready for its loaders: the samples kept, each one's split, and the duplicate groups found (in the
    dataset before any drop; None where a split file gave the split)."""

    source: Source
    splits: np.ndarray
    duplicates: tuple[Duplicates, Source] | None = None


def prepare(d, run_dir: Path, seed: int, task: Task | None = None, split_file: Path | None = None,
            moved: tuple[str, str] | None = None, draft: int | None = None) -> Prepared:
    """Read the dataset config `d` for `task` (None: as the data says), scan, split and record it in `run_dir`. With a
    `split_file` (a resumed run's, or dataset.split_file) its split is kept: no hashing, no re-split; `moved` = (old
    folder, new folder) where the dataset moved since. `draft`: the size the integrity scan decodes at."""
    source = read_dataset(d, task)
    if task is None:
        log.info("task=%s, inferred from the data (%s); task=... on the command line says otherwise",
                 source.task, source.task.reads)
    if split_file is not None:
        hint = (f"; the run's dataset was in {moved[0]}, and dataset.root={moved[1]} does not hold the same "
                f"images below it" if moved else "")
        source = apply_split_file(source, split_file, moved=moved, hint=hint)  # its splits
    if d.get("limit_per_class"):
        source = _limit_per_class(source, d.limit_per_class, seed)
    source = drop_unusable(source, d.root, d.max_pixels, d.max_bad_fraction, run_dir / rundir.SKIPPED,
                           workers=d.num_workers, draft=draft)
    duplicates = None
    if split_file is not None:
        splits = np.array(source.splits)
    else:
        source, splits, duplicates = split(source, d, seed, run_dir)
    for name in ("train", "val"):
        if not (splits == name).any():
            raise DataError(f"the {name} split is empty: {len(source)} images are too few for "
                            f"dataset.val_fraction={d.val_fraction}, test_fraction={d.test_fraction}")
    _record_split(run_dir / rundir.SPLIT, source, splits)
    log.info("Dataset %s: %s images, %s\n%s", d.name, f"{len(source):,}", source.task.describe(source),
             source.task.count_table(source, {s: np.flatnonzero(splits == s) for s in SPLITS}))
    return Prepared(source, splits, duplicates)


def split(source: Source, d, seed: int, run_dir: Path) -> tuple[Source, np.ndarray, tuple[Duplicates, Source]]:
    """The seeded stratified split (a fold of it with dataset.folds), with the groups of duplicates kept on one side
    (dataset.dedup=group) or reduced to one image (drop); duplicates.csv reports them, skipped.csv the dropped. The
    samples kept, their splits and the duplicates found."""
    dedup = d.get("dedup", "group")
    duplicates = find_duplicates(image_hashes(source, _common_root(source.paths, d.root), d.max_pixels,
                                              workers=d.num_workers), d.get("dedup_threshold", 12))
    keep = duplicates.kept(source.splits) if dedup == "drop" else np.arange(len(source))
    groups = None if dedup == "keep" else duplicates.group_ids()[keep]
    kept = subset(source, keep)
    splits = stratified_split(kept.labels, d.val_fraction, d.test_fraction, seed, official=kept.splits,
                              groups=groups, folds=d.get("folds"), fold=d.get("fold", 0),
                              multilabel=kept.task.stratify(kept))
    every = np.full(len(source), "dropped", dtype=object)
    every[keep] = splits
    _report_duplicates(duplicates, source, every, run_dir)
    if kept.task.one_class_per_image:  # the checks below are of classes
        if d.get("folds"):
            refuse_folds_that_leave_classes_unvalidated(kept, splits, int(d.folds), int(d.get("fold", 0)))
        if groups is not None:
            plain = stratified_split(kept.labels, d.val_fraction, d.test_fraction, seed, official=kept.splits,
                                     folds=d.get("folds"), fold=d.get("fold", 0))
            refuse_classes_the_groups_left_unmeasured(kept, splits, plain, groups, run_dir)
    return kept, splits, (duplicates, source)


def drop_unusable(source: Source, root: str | None, max_pixels: int, max_bad_fraction: float, skipped_csv: Path,
                  workers: int = 0, draft: int | None = None) -> Source:
    """The samples of `source` whose files decode (integrity scan); skipped_csv lists the others and what the
    reader passed over. A DataError, with the report written, when more than max_bad_fraction are bad."""
    skipped = list(source.passed_over)
    if source.images is not None or not len(source):
        _write_skipped(skipped_csv, skipped)
        return source
    result = scan(source.paths, _common_root(source.paths, root), max_pixels, workers=workers, draft=draft)
    skipped += result.bad
    _write_skipped(skipped_csv, skipped)
    bad = result.bad_paths
    if bad:
        reasons = Counter(reason.split(":")[0] for _, reason in result.bad)
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        fraction = len(bad) / len(source.paths)
        log.warning("Integrity scan: skipped %d of %s images (%s); the list is in %s", len(bad),
                    f"{len(source.paths):,}", summary, skipped_csv)
        if fraction > max_bad_fraction:
            raise DataError(f"{len(bad)} of {len(source.paths)} images ({fraction:.1%}) cannot be used ({summary}), "
                            f"more than dataset.max_bad_fraction={max_bad_fraction}: see {skipped_csv}")
    if source.passed_over:
        log.info("%d other files (not images, or named but missing) were passed over; see %s",
                 len(source.passed_over), skipped_csv)
    return subset(source, np.array([j for j, p in enumerate(source.paths) if p not in bad], dtype=np.int64))


def subset(source: Source, keep: np.ndarray) -> Source:
    return Source(source.classes, [source.paths[j] for j in keep], source.labels[keep],
                  images=None if source.images is None else source.images[keep],
                  splits=None if source.splits is None else [source.splits[j] for j in keep],
                  passed_over=source.passed_over, task=source.task,
                  targets=None if source.targets is None else source.targets[keep])


def refuse_folds_that_leave_classes_unvalidated(source: Source, splits: np.ndarray, folds: int, fold: int) -> None:
    """A DataError where fold `fold` of `folds` has no validation image of some class: more folds than the class has
    images outside the test split (dataset.folds=1000 left 2 validation images)."""
    pool = splits != "test"
    empty = [name for c, name in enumerate(source.classes)
             if (source.labels[pool] == c).any() and not ((source.labels == c) & (splits == "val")).any()]
    if empty:
        fewest = min(int(((source.labels == c) & pool).sum()) for c in range(len(source.classes))
                     if ((source.labels == c) & pool).any())
        raise DataError(f"dataset.folds={folds}: fold {fold} has no validation images of {', '.join(empty[:5])}"
                        f"{', ...' if len(empty) > 5 else ''} ({int((splits == 'val').sum())} validation images in "
                        f"all): the smallest class has {fewest} images outside the test split, so at most "
                        f"dataset.folds={max(2, fewest)}")


def refuse_classes_the_groups_left_unmeasured(source: Source, splits: np.ndarray, plain: np.ndarray,
                                              groups: np.ndarray, run_dir: Path) -> None:
    """A DataError naming each class that the split without duplicate groups (`plain`) gives validation or test
    images and the split with them (`splits`) does not: its images are near copies of each other, each group went
    to train whole, and its accuracy would not be measured (val and test would cover the other classes only)."""
    lost = []
    for c, name in enumerate(source.classes):
        members = source.labels == c
        for split in ("val", "test"):
            if (plain[members] == split).any() and not (splits[members] == split).any():
                in_groups = len(np.unique(groups[members]))
                lost.append(f"class '{name}' has no {split} images: its {int(members.sum())} images are "
                            f"{in_groups} group{'s' if in_groups != 1 else ''} of near copies, each kept whole in "
                            f"train")
                break
    if lost:
        raise DataError(f"{'; '.join(lost)} (dataset.dedup=group), so its accuracy would not be measured: "
                        f"dataset.dedup=keep splits copies like any images, a lower dataset.dedup_threshold groups "
                        f"fewer of them, or add distinct images of the class; the groups are in "
                        f"{run_dir / rundir.DUPLICATES}")


def apply_split_file(source: Source, split_file: Path, only: str | None = None,
                     moved: tuple[str, str] | None = None, hint: str = "") -> Source:
    """The samples of `source` named in `split_file`, with its splits; every one of them (of split `only`, if given)
    must still be there. `moved` = (old folder, new folder): the dataset was moved, and the paths of split_file
    below the old folder are read below the new one. `hint` ends the message when files are missing."""
    if not split_file.is_file():
        raise DataError(f"split file {split_file}: no such file")
    rows = read_split(split_file)
    if moved is not None:
        old = moved[0].rstrip("/") + "/"
        rows = [(moved[1].rstrip("/") + "/" + path[len(old):] if path.startswith(old) else path, label, split)
                for path, label, split in rows]
    position = {path: i for i, path in enumerate(source.paths)}
    if only is not None:
        elsewhere = sum(1 for path, _, split in rows if split != only and path not in position)
        if elsewhere:
            log.warning("%d images of %s outside its %s split are not in the dataset any more (not needed here)",
                        elsewhere, split_file, only)
        rows = [row for row in rows if row[2] == only]
    missing = [path for path, _, _ in rows if path not in position]
    if missing:
        raise DataError(f"{len(missing)} images of {split_file} are not in the dataset any more, e.g. {missing[0]}"
                        f"{hint}")
    keep = np.array([position[path] for path, _, _ in rows], dtype=np.int64)
    wrong = [path for (path, label, _), j in zip(rows, keep) if source.label_text(j) != label]
    if wrong:
        raise DataError(f"{len(wrong)} images of {split_file} have another "
                        f"{source.task.one_label} now, e.g. {wrong[0]}")
    if len(keep) < len(source) and only is None:
        log.warning("%d images of the dataset are not in %s and are left out", len(source) - len(keep), split_file)
    chosen = subset(source, keep)
    chosen.splits = [split for _, _, split in rows]
    return chosen


def _limit_per_class(source: Source, n: int, seed: int) -> Source:
    """A seeded choice of at most n samples of each class in each official split."""
    rng = np.random.default_rng(seed)
    groups = source.labels.astype(str) if source.splits is None else np.char.add(
        source.labels.astype(str), np.array(["/" + s for s in source.splits]))
    keep = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        keep += sorted(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    return subset(source, np.array(sorted(keep), dtype=np.int64))


def _common_root(paths: list[str], root: str | None) -> Path:
    return Path(root).expanduser() if root else Path(paths[0]).parent


@rank_zero_only
def _report_duplicates(duplicates: Duplicates, source: Source, splits: np.ndarray, run_dir: Path) -> None:
    """duplicates.csv, the dropped images in skipped.csv, and the log's summary and label conflicts."""
    counts = report(duplicates, source, splits, run_dir / rundir.DUPLICATES)
    if counts["dropped"]:
        with open(run_dir / rundir.SKIPPED, "a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for members in duplicates.groups:
                kept = next(j for j in members if splits[j] != "dropped")
                writer.writerows([source.paths[j], f"duplicate of {source.paths[kept]} (dataset.dedup=drop)"]
                                 for j in members if splits[j] == "dropped")
    log.info("Duplicates: %d duplicate groups (%d exact, %d near) holding %d images; %d label conflicts; %d "
             "official-test leaks%s; listed in %s", counts["groups"], counts["exact"], counts["near"],
             counts["images"], counts["conflicts"], counts["leaks"],
             f"; {counts['dropped']} dropped (skipped.csv)" if counts["dropped"] else "", run_dir / rundir.DUPLICATES)
    found = conflicts(duplicates, source)
    if found:
        log.warning("%d groups of duplicates carry different labels (label conflicts), e.g. %s", len(found),
                    "; ".join(found[:3]))
    straddling = [members for members in duplicates.groups
                  if len({s for s in splits[members] if s != "dropped"}) > 1]
    if straddling:  # only dataset.dedup=keep splits a group: copies of one image on both sides of the split
        leaked = sum(1 for members in straddling if "train" in set(splits[members]))
        log.warning("dataset.dedup=keep: %d groups of duplicates straddle splits (%d with images in train and in val "
                    "or test, e.g. %s): their val and test images were in effect seen in training, so val/acc and "
                    "test/acc are optimistic; dataset.dedup=group keeps each group on one side",
                    len(straddling), leaked, ", ".join(source.paths[j] for j in straddling[0][:2]))


@rank_zero_only
def _record_split(path: Path, source: Source, splits: np.ndarray) -> None:
    write_split(path, source.paths, [source.label_text(j) for j in range(len(source))], splits)


@rank_zero_only
def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """skipped.csv: this scan's rows, and the rows of the run's earlier file that only its training could write (files
    that failed while training, duplicates dataset.dedup=drop left out): a resumed run keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        named = {row[0] for row in skipped}
        with open(path, newline="") as f:
            earlier = [tuple(row[:2]) for row in list(csv.reader(f))[1:] if len(row) >= 2]
        skipped = [*skipped, *(row for row in earlier if row[0] not in named and (
            row[1].startswith("failed while training") or row[1].endswith("(dataset.dedup=drop)")))]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
