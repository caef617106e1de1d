"""ImageDataModule: source reader -> integrity scan -> seeded stratified split (split.csv) -> decode -> transforms
-> DataLoaders."""

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
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from finetune.data import download as downloads
from finetune.data.images import open_rgb
from finetune.data.integrity import scan
from finetune.data.sources import DataError, Source, read_source
from finetune.data.splits import SPLITS, read_split, stratified_split, write_split
from finetune.data.transforms import Preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)


def load_image(source: Source, j: int, max_pixels: int, draft: int | None = None) -> Image.Image:
    """Sample j of `source` as an upright RGB image: from its pixels in memory, or decoded from its file."""
    if source.images is not None:
        return Image.fromarray(source.images[j])
    return open_rgb(source.paths[j], max_pixels=max_pixels, draft=draft)


class ImageDataset(Dataset):
    """Samples `indices` of `source`, decoded to RGB and transformed to uint8 CHW tensors."""

    def __init__(self, source: Source, indices: np.ndarray, transform, draft: int | None = None,
                 max_pixels: int = 100_000_000):
        self.source, self.indices, self.transform = source, indices, transform
        self.draft, self.max_pixels = draft, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        return load_image(self.source, self.indices[i], self.max_pixels, self.draft)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # A file the integrity scan passed can still fail later (replaced or deleted during training): the
        # epoch goes on with a neighbouring image in its place, and the log says which file failed.
        for attempt in range(10):
            k = (i + attempt) % len(self)
            try:
                return self.transform(self.load(k)), int(self.source.labels[self.indices[k]])
            except Exception as e:
                log.warning("Could not load %s (%s); using another image in its place",
                            self.source.paths[self.indices[k]], e)
        raise DataError(f"10 images in a row around {self.source.paths[self.indices[i]]} could not be loaded")


class ImageDataModule(L.LightningDataModule):
    """Everything between a dataset folder and batches of uint8 images with their labels."""

    def __init__(self, dataset, augment, preprocessing: Preprocessing, seed: int, run_dir: str | Path,
                 split_file: str | Path | None = None):
        super().__init__()
        self.cfg, self.augment, self.preprocessing, self.seed = dataset, augment, preprocessing, seed
        self.run_dir = Path(run_dir)
        split_file = split_file or dataset.get("split_file")
        self.split_file = Path(split_file) if split_file else None
        self.source: Source | None = None
        self.splits: np.ndarray | None = None
        self._prepared = False

    @property
    def classes(self) -> list[str]:
        return self.source.classes

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
                read_source(self.cfg.name, self.cfg.root, self.cfg.get("target"))
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
        source = read_source(d.name, d.root, d.get("target"))
        if self.split_file is not None:
            source = apply_split_file(source, self.split_file)  # its splits become source.splits
        if d.get("limit_per_class"):
            source = _limit_per_class(source, d.limit_per_class, self.seed)
        source = drop_unusable(source, d.root, d.max_pixels, d.max_bad_fraction, self.run_dir / "skipped.csv",
                               workers=d.num_workers, draft=self.preprocessing.image_size)
        if self.split_file is not None:
            splits = np.array(source.splits)
        else:
            splits = stratified_split(source.labels, d.val_fraction, d.test_fraction, self.seed,
                                      official=source.splits)
        for split in ("train", "val"):
            if not (splits == split).any():
                raise DataError(f"the {split} split is empty: {len(source)} images are too few for "
                                f"dataset.val_fraction={d.val_fraction}, test_fraction={d.test_fraction}")
        self.source, self.splits = source, splits
        _record_split(self.run_dir / "split.csv", source, splits)
        log.info("Dataset %s: %s images, %d classes\n%s", d.name, f"{len(source):,}", len(source.classes),
                 self.class_count_table())

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class in each split."""
        k = len(self.classes)
        return {s: np.bincount(self.source.labels[self.indices(s)], minlength=k).tolist() for s in SPLITS}

    def class_weights(self) -> list[float]:
        """n / (k * n_c) from the training split: the loss weights that make every class count the same."""
        counts = np.array(self.class_counts()["train"], dtype=np.float64)
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        return weights.tolist()

    def class_count_table(self) -> str:
        counts = self.class_counts()
        width = max(len(c) for c in self.classes + ["class"])
        lines = [f"  {'class':<{width}}  {'train':>7} {'val':>7} {'test':>7}"]
        for i, name in enumerate(self.classes):
            lines.append(f"  {name:<{width}}  " + " ".join(f"{counts[s][i]:>7}" for s in SPLITS))
        return "\n".join(lines)

    def dataset(self, split: str, train_transforms: bool | None = None) -> ImageDataset:
        train = split == "train" if train_transforms is None else train_transforms
        pre = self.preprocessing
        transform = train_transform(pre, self.augment) if train else eval_transform(pre)
        # Decode JPEGs no larger than the transform can use: the resize target, or for a random resized crop
        # of scale s the size at which the smallest crop still has image_size pixels across.
        if train and self.augment.crop == "random_resized":
            draft = math.ceil(pre.image_size / math.sqrt(self.augment.crop_scale[0]))
        else:
            draft = math.floor(pre.image_size / pre.crop_pct)
        return ImageDataset(self.source, self.indices(split), transform, draft=draft, max_pixels=self.cfg.max_pixels)

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        train = split == "train"
        workers = self.cfg.num_workers
        sampler = None
        if train and self.cfg.get("balance") == "sampler":
            labels = self.source.labels[dataset.indices]
            per_sample = 1.0 / np.bincount(labels)[labels]
            sampler = WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double), len(dataset),
                                            generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.cfg.batch_size,  # no batch of one for BatchNorm
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

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
                  passed_over=source.passed_over)


def apply_split_file(source: Source, split_file: Path) -> Source:
    """The samples of `source` named in `split_file`, with its splits; every one of them must still be there."""
    if not split_file.is_file():
        raise DataError(f"split file {split_file}: no such file")
    rows = read_split(split_file)
    position = {path: i for i, path in enumerate(source.paths)}
    missing = [path for path, _, _ in rows if path not in position]
    if missing:
        raise DataError(f"{len(missing)} images of {split_file} are not in the dataset any more, e.g. {missing[0]}")
    keep = np.array([position[path] for path, _, _ in rows], dtype=np.int64)
    wrong = [path for (path, label, _), j in zip(rows, keep) if source.classes[source.labels[j]] != label]
    if wrong:
        raise DataError(f"{len(wrong)} images of {split_file} have another class now, e.g. {wrong[0]}")
    if len(keep) < len(source):
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
def _record_split(path: Path, source: Source, splits: np.ndarray) -> None:
    write_split(path, source.paths, source.labels, source.classes, splits)


@rank_zero_only
def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
