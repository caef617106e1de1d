"""ImageDataModule: source reader -> integrity scan -> duplicate check -> seeded stratified split, duplicates kept on
one side (split.csv, duplicates.csv) -> decode -> transforms -> DataLoaders."""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchvision.transforms import v2

from finetune.data import download as downloads
from finetune.data.cache import ImageCache, default_cache_dir, open_or_build
from finetune.data.dataset import EpochShuffle, ImageDataset, collate_raw, decode_on_device, init_worker
from finetune.data.duplicates import Duplicates, conflicts, find_duplicates, image_hashes, report
from finetune.data.features import FrozenFeatures
from finetune.data.integrity import scan
from finetune.data.sources import DataError, Source, read_dataset
from finetune.data.splits import SPLITS, read_split, stratified_split, write_split
from finetune.data.transforms import Preprocessing, eval_transform, train_transform
from finetune.tasks import Task

log = logging.getLogger(__name__)


class ImageDataModule(L.LightningDataModule):
    """Everything between a dataset folder and batches of uint8 images with their labels.

    `features` (schedule.cache_features) is asked first for the training and validation loaders: in the epochs in
    which the schedule keeps the whole backbone frozen it gives loaders of cached features (FeatureBatch) instead.
    """

    def __init__(self, dataset, augment, preprocessing: Preprocessing, seed: int, run_dir: str | Path,
                 split_file: str | Path | None = None, cache_features: bool = False, feature_views: int = 0,
                 ema: bool = False, split_moved: tuple[str, str] | None = None, task: Task | None = None):
        super().__init__()
        self.task_given = task  # task=, or None: as the data says (self.task once set up)
        self.cfg, self.augment, self.preprocessing, self.seed = dataset, augment, preprocessing, seed
        self.run_dir = Path(run_dir)
        split_file = split_file or dataset.get("split_file")
        self.split_file = Path(split_file) if split_file else None
        self.split_moved = split_moved
        self.source: Source | None = None
        self.duplicates: tuple[Duplicates, Source] | None = None  # the groups found, in the dataset before any drop
        self.splits: np.ndarray | None = None
        self.failed: torch.Tensor | None = None
        self.cache: ImageCache | None = None
        self.decode_on_device = False  # dataset.decode=device, for datasets of files
        self.features = FrozenFeatures(self, feature_views, ema) if cache_features else None
        self._device_transforms: dict[bool, v2.Compose] = {}
        self._loaders: dict[str, DataLoader] = {}
        self._prepared = False

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def task(self) -> Task:
        return self.source.task

    def prepare_data(self) -> None:
        """dataset.download=true: fetch the dataset unless it is already complete in dataset.root."""
        if self._prepared or not self.cfg.download:
            return
        self._prepared = True
        root = Path(self.cfg.root).expanduser()
        if downloads.is_downloaded(root, self.cfg.name):
            return
        if not downloads.has_partial_download(root, self.cfg.name):
            try:
                read_dataset(self.cfg)
                log.info("dataset=%s is already in %s: not downloading", self.cfg.name, root)
                return
            except DataError:
                pass
        downloads.download(self.cfg.name, root)

    def setup(self, stage: str | None = None) -> None:
        """Read, scan, split and record the dataset once; later calls (Lightning makes them) do nothing."""
        if self.source is not None:
            return
        d = self.cfg
        source = read_dataset(d, self.task_given)
        if self.task_given is None:
            log.info("task=%s, inferred from the data (%s); task=... on the command line says otherwise",
                     source.task, source.task.reads)
        if self.split_file is not None:
            moved = self.split_moved
            hint = (f"; the run's dataset was in {moved[0]}, and dataset.root={moved[1]} does not hold the same "
                    f"images below it" if moved else "")
            source = apply_split_file(source, self.split_file, moved=self.split_moved, hint=hint)  # its splits
        if d.get("limit_per_class"):
            source = _limit_per_class(source, d.limit_per_class, self.seed)
        source = drop_unusable(source, d.root, d.max_pixels, d.max_bad_fraction, self.run_dir / "skipped.csv",
                               workers=d.num_workers, draft=self.preprocessing.image_size)
        if self.split_file is not None:  # the split is given: no hashing, no re-split
            splits = np.array(source.splits)
        else:
            source, splits = self._split(source)
        for split in ("train", "val"):
            if not (splits == split).any():
                raise DataError(f"the {split} split is empty: {len(source)} images are too few for "
                                f"dataset.val_fraction={d.val_fraction}, test_fraction={d.test_fraction}")
        self.source, self.splits = source, splits
        self.failed = torch.zeros(len(source), dtype=torch.bool).share_memory_()  # files failing from now on
        _record_split(self.run_dir / "split.csv", source, splits)
        log.info("Dataset %s: %s images, %s\n%s", d.name, f"{len(source):,}", source.task.describe(source),
                 self.class_count_table())
        if d.get("cache"):
            self.cache = self._open_cache()
        if d.get("decode") == "device":
            self.decode_on_device = source.images is None
            if not self.decode_on_device:
                log.info("dataset.decode=device: %s is already decoded in memory; nothing to decode", d.name)

    def _split(self, source: Source) -> tuple[Source, np.ndarray]:
        """The seeded stratified split (a fold of it with dataset.folds), with the groups of duplicates kept on one
        side (dataset.dedup=group) or reduced to one image (drop); duplicates.csv reports them, skipped.csv the dropped.
        """
        d = self.cfg
        dedup = d.get("dedup", "group")
        duplicates = find_duplicates(image_hashes(source, _common_root(source.paths, d.root), d.max_pixels,
                                                  workers=d.num_workers), d.get("dedup_threshold", 12))
        keep = duplicates.kept(source.splits) if dedup == "drop" else np.arange(len(source))
        groups = None if dedup == "keep" else duplicates.group_ids()[keep]
        kept = subset(source, keep)
        splits = stratified_split(kept.labels, d.val_fraction, d.test_fraction, self.seed, official=kept.splits,
                                  groups=groups, folds=d.get("folds"), fold=d.get("fold", 0),
                                  multilabel=kept.task.stratify(kept))
        every = np.full(len(source), "dropped", dtype=object)
        every[keep] = splits
        _report_duplicates(duplicates, source, every, self.run_dir)
        self.duplicates = (duplicates, source)
        if not kept.task.one_class_per_image:  # the checks below are of classes
            return kept, splits
        if d.get("folds"):
            refuse_folds_that_leave_classes_unvalidated(kept, splits, int(d.folds), int(d.get("fold", 0)))
        if groups is not None:
            plain = stratified_split(kept.labels, d.val_fraction, d.test_fraction, self.seed, official=kept.splits,
                                     folds=d.get("folds"), fold=d.get("fold", 0))
            refuse_classes_the_groups_left_unmeasured(kept, splits, plain, groups, self.run_dir)
        return kept, splits

    @property
    def cache_size(self) -> int:
        """The short side of the cached images: dataset.cache_size, or the evaluation resize (image_size / crop_pct),
        so that evaluation from the cache is exactly evaluation from the files."""
        pre = self.preprocessing
        return int(self.cfg.get("cache_size") or pre.resize_size)

    def _open_cache(self) -> ImageCache | None:
        if self.source.images is not None:
            log.info("dataset.cache=true: %s is already decoded in memory; nothing to cache", self.cfg.name)
            return None
        directory = Path(self.cfg.cache_dir).expanduser() if self.cfg.get("cache_dir") else \
            default_cache_dir(self.cfg.root)
        return open_or_build(self.source.paths, directory, self.cfg.name, self.cache_size,
                             self.preprocessing.interpolation, self.cfg.max_pixels, workers=self.cfg.num_workers)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class (multilabel: with each label; regression: all of them) in each split."""
        return {s: self.task.counts(self.source, self.indices(s)) for s in SPLITS}

    def target_stats(self) -> dict[str, float]:
        """Regression: the target's mean and standard deviation on the training split, by which the model standardises
        it (a constant target: 1)."""
        values = self.source.targets[self.indices("train")].astype(np.float64)
        std = float(values.std())
        return {"mean": float(values.mean()), "std": std if std > 0 else 1.0}

    def class_weights(self) -> list[float]:
        """n / (k * n_c) from the training split: the loss weights that make every class count the same."""
        counts = np.array(self.class_counts()["train"], dtype=np.float64)
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        return weights.tolist()

    def class_count_table(self) -> str:
        return self.task.count_table(self.source, {s: self.indices(s) for s in SPLITS})

    def dataset(self, split: str, train_transforms: bool | None = None) -> ImageDataset:
        train = split == "train" if train_transforms is None else train_transforms
        pre = self.preprocessing
        transform = train_transform(pre, self.augment) if train else eval_transform(pre)
        # Decode JPEGs no larger than the transform can use: the resize target, or for a random resized crop
        # of scale s the size at which the smallest crop still has image_size pixels across.
        if train and self.augment.crop == "random_resized":
            draft = math.ceil(pre.image_size / math.sqrt(self.augment.crop_scale[0]))
        else:
            draft = pre.resize_size
        return ImageDataset(self.source, self.indices(split), transform, draft=draft, max_pixels=self.cfg.max_pixels,
                            cache=self.cache, raw=self.decode_on_device, failed=self.failed,
                            skipped_csv=self.run_dir / "skipped.csv")

    def device_transform(self, train: bool) -> v2.Compose:
        """What the workers would do after decoding, on uint8 tensors on the device (dataset.decode=device)."""
        if train not in self._device_transforms:
            pre = self.preprocessing
            self._device_transforms[train] = \
                train_transform(pre, self.augment, tensors=True) if train else eval_transform(pre, tensors=True)
        return self._device_transforms[train]

    def decode(self, batch, train: bool, device: torch.device):
        """A batch of the raw loaders as uint8 images on `device`; other batches as they are."""
        items, labels = batch
        if not isinstance(items, list):
            return batch
        return decode_on_device(items, self.device_transform(train), device), labels

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not self.decode_on_device or self.trainer is None:
            return batch
        return self.decode(batch, self.trainer.training, self.trainer.strategy.root_device)

    def sampler(self, labels: np.ndarray, train: bool):
        if not train:
            return None
        if self.cfg.get("balance") == "sampler":
            per_sample = 1.0 / np.bincount(labels)[labels]
            return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double), len(labels),
                                         generator=torch.Generator().manual_seed(self.seed))
        return EpochShuffle(range(len(labels)), self.seed)

    def pin(self) -> bool:
        return self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"

    def _loader(self, split: str) -> DataLoader:
        """The image loader of `split`: made once, so that its persistent workers live for the whole run."""
        if split in self._loaders:
            return self._loaders[split]
        dataset = self.dataset(split)
        train = split == "train"
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler(self.source.labels[dataset.indices], train),
            drop_last=train and len(dataset) > self.cfg.batch_size,  # no batch of one for BatchNorm
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin(),
            collate_fn=collate_raw if dataset.raw else None,
            worker_init_fn=init_worker if workers > 0 else None,
        )
        self._loaders[split] = loader
        return loader

    def plain_loader(self, dataset: ImageDataset) -> DataLoader:
        """`dataset` in order, in batches, with this module's workers: for a pass over it outside training."""
        return DataLoader(dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                          pin_memory=self.pin(), generator=torch.Generator(),  # leaves the global RNG alone
                          collate_fn=collate_raw if dataset.raw else None,
                          worker_init_fn=init_worker if self.cfg.num_workers > 0 else None)

    def _features_or_images(self, split: str) -> DataLoader:
        loader = self.features.loader(split) if self.features is not None else None
        return loader if loader is not None else self._loader(split)

    def train_dataloader(self) -> DataLoader:
        return self._features_or_images("train")

    def val_dataloader(self) -> DataLoader:
        return self._features_or_images("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if len(self.indices("test")) else "val")


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
                        f"{run_dir / 'duplicates.csv'}")


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
    counts = report(duplicates, source, splits, run_dir / "duplicates.csv")
    if counts["dropped"]:
        with open(run_dir / "skipped.csv", "a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for members in duplicates.groups:
                kept = next(j for j in members if splits[j] != "dropped")
                writer.writerows([source.paths[j], f"duplicate of {source.paths[kept]} (dataset.dedup=drop)"]
                                 for j in members if splits[j] == "dropped")
    log.info("Duplicates: %d duplicate groups (%d exact, %d near) holding %d images; %d label conflicts; %d "
             "official-test leaks%s; listed in %s", counts["groups"], counts["exact"], counts["near"],
             counts["images"], counts["conflicts"], counts["leaks"],
             f"; {counts['dropped']} dropped (skipped.csv)" if counts["dropped"] else "", run_dir / "duplicates.csv")
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
