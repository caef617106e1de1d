"""ImageDataModule: source reader -> seeded stratified split (split.csv) -> decode -> transforms -> DataLoaders."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from finetune.data.images import open_rgb
from finetune.data.sources import DataError, Source, read_source
from finetune.data.splits import SPLITS, read_split, stratified_split, write_split
from finetune.data.transforms import Preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Samples `indices` of `source`, decoded to RGB and transformed to uint8 CHW tensors."""

    def __init__(self, source: Source, indices: np.ndarray, transform, draft: int | None = None):
        self.source, self.indices, self.transform, self.draft = source, indices, transform, draft

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        j = self.indices[i]
        if self.source.images is not None:
            return Image.fromarray(self.source.images[j])
        return open_rgb(self.source.paths[j], draft=self.draft)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(i)), int(self.source.labels[self.indices[i]])


class ImageDataModule(L.LightningDataModule):
    """Everything between a dataset folder and batches of uint8 images with their labels."""

    def __init__(self, dataset, augment, preprocessing: Preprocessing, seed: int, run_dir: str | Path,
                 split_file: str | Path | None = None):
        super().__init__()
        self.cfg, self.augment, self.preprocessing, self.seed = dataset, augment, preprocessing, seed
        self.run_dir = Path(run_dir)
        self.split_file = Path(split_file) if split_file else None
        self.source: Source | None = None
        self.splits: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def setup(self, stage: str | None = None) -> None:
        """Read, split and record the dataset once; later calls (Lightning makes them) do nothing."""
        if self.source is not None:
            return
        source = read_source(self.cfg.name, self.cfg.root)
        if self.split_file is not None:
            source, splits = _apply_split_file(source, self.split_file)
        else:
            splits = stratified_split(source.labels, self.cfg.val_fraction, self.cfg.test_fraction, self.seed,
                                      official=source.splits)
        for split in ("train", "val"):
            if not (splits == split).any():
                raise DataError(f"the {split} split is empty: {len(source)} images are too few for "
                                f"dataset.val_fraction={self.cfg.val_fraction}, test_fraction={self.cfg.test_fraction}")
        self.source, self.splits = source, splits
        _record_split(self.run_dir / "split.csv", source, splits)
        log.info("Dataset %s: %d images, %d classes\n%s", self.cfg.name, len(source), len(source.classes),
                 self.class_count_table())

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class in each split."""
        k = len(self.classes)
        return {s: np.bincount(self.source.labels[self.indices(s)], minlength=k).tolist() for s in SPLITS}

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
        return ImageDataset(self.source, self.indices(split), transform, draft=draft)

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        train = split == "train"
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=train,
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


def _apply_split_file(source: Source, split_file: Path) -> tuple[Source, np.ndarray]:
    """The splits recorded in `split_file` for the samples of `source`, which must all still be there."""
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
    subset = Source(source.classes, [source.paths[j] for j in keep], source.labels[keep],
                    images=None if source.images is None else source.images[keep])
    return subset, np.array([split for _, _, split in rows])


@rank_zero_only
def _record_split(path: Path, source: Source, splits: np.ndarray) -> None:
    write_split(path, source.paths, source.labels, source.classes, splits)
