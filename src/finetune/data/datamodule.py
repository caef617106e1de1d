"""ImageDataModule: the dataset as the pipeline prepared it (finetune.data.pipeline: reader -> integrity scan ->
duplicate check -> seeded stratified split) -> decode -> transforms -> DataLoaders."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchvision.transforms import v2

from finetune import rundir
from finetune.data import download as downloads
from finetune.data.cache import ImageCache, default_cache_dir, open_or_build
from finetune.data.dataset import EpochShuffle, ImageDataset, collate_raw, decode_on_device, init_worker
from finetune.data.duplicates import Duplicates
from finetune.data.features import FrozenFeatures
from finetune.data.pipeline import prepare
from finetune.data.readers import DataError, Source, read_dataset
from finetune.data.splits import SPLITS
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
        """Read, scan, split and record the dataset once (finetune.data.pipeline); later calls (Lightning makes them)
        do nothing."""
        if self.source is not None:
            return
        d = self.cfg
        prepared = prepare(d, self.run_dir, self.seed, task=self.task_given, split_file=self.split_file,
                           moved=self.split_moved, draft=self.preprocessing.image_size)
        self.source, self.splits, self.duplicates = prepared.source, prepared.splits, prepared.duplicates
        self.failed = torch.zeros(len(self.source), dtype=torch.bool).share_memory_()  # files failing from now on
        if d.get("cache"):
            self.cache = self._open_cache()
        if d.get("decode") == "device":
            self.decode_on_device = self.source.images is None
            if not self.decode_on_device:
                log.info("dataset.decode=device: %s is already decoded in memory; nothing to decode", d.name)

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
                            skipped_csv=self.run_dir / rundir.SKIPPED)

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
