"""What one image is to training: loaded (drafted JPEG decoding, EXIF orientation), transformed, or sent as JPEG
bytes to be decoded on the device; the collate for such batches; the epoch's order; the loader workers' start."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, RandomSampler

from finetune.data.cache import ImageCache
from finetune.data.images import open_rgb
from finetune.data.samples import DataError, Source

log = logging.getLogger(__name__)


def load_image(source: Source, j: int, max_pixels: int, draft: int | None = None) -> Image.Image:
    """Sample j of `source` as an upright RGB image: from its pixels in memory, or decoded from its file."""
    if source.images is not None:
        return Image.fromarray(source.images[j])
    return open_rgb(source.paths[j], max_pixels=max_pixels, draft=draft)


class ImageDataset(Dataset):
    """Samples `indices` of `source`, decoded to RGB (or read from the decoded-image cache) and transformed to uint8
    CHW tensors. With `raw`, JPEG files come as their bytes (1-D uint8), to be decoded on the device, and other
    images as uint8 CHW tensors of their own size; the transform is then applied on the device.

    `failed` (one flag per sample of `source`, in shared memory so that every DataLoader worker sees it) marks the
    files that failed to load since the integrity scan; each is reported once, in `skipped_csv`, and skipped."""

    def __init__(self, source: Source, indices: np.ndarray, transform, draft: int | None = None,
                 max_pixels: int = 100_000_000, cache: ImageCache | None = None, raw: bool = False,
                 failed: torch.Tensor | None = None, skipped_csv: Path | None = None):
        self.source, self.indices, self.transform = source, indices, transform
        self.draft, self.max_pixels, self.cache, self.raw = draft, max_pixels, cache, raw
        self.failed = failed if failed is not None else torch.zeros(len(source), dtype=torch.bool)
        self.skipped_csv = skipped_csv

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        j = self.indices[i]
        image = self.cache.image(j) if self.cache is not None else None
        return image if image is not None else load_image(self.source, j, self.max_pixels, self.draft)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # A file the integrity scan passed can still fail later (replaced or deleted during training): the
        # epoch goes on with a neighbouring image in its place, and the file is reported once and skipped after.
        failures = 0
        for step in range(len(self)):
            k = (i + step) % len(self)
            j = int(self.indices[k])
            if self.failed[j]:
                continue
            try:
                if self.raw:
                    return self.read(k), self.source.target(j)
                return self.transform(self.load(k)), self.source.target(j)
            except Exception as e:
                self._record_failure(j, e)
                failures += 1
                if failures == 10:
                    break
        raise DataError(f"{failures} images in a row around {self.source.paths[self.indices[i]]} could not be "
                        f"loaded{f' (see {self.skipped_csv})' if self.skipped_csv else ''}")

    def _record_failure(self, j: int, error: Exception) -> None:
        """Mark sample j failed for every worker; say so once, and add it to skipped.csv."""
        if self.failed[j]:
            return
        self.failed[j] = True
        from finetune.data.integrity import failure_reason

        path = self.source.paths[j]
        reason = failure_reason(error, path if self.source.images is None else None)
        where = ""
        if self.skipped_csv is not None:
            try:
                with open(self.skipped_csv, "a", newline="") as f:  # one short append: whole rows across workers
                    csv.writer(f, lineterminator="\n").writerow([path, f"failed while training: {reason}"])
                where = f"; listed in {self.skipped_csv}"
            except OSError:
                pass
        log.warning("Could not load %s (%s): another image takes its place, and it is skipped from now on%s",
                    path, reason, where)

    def read(self, i: int) -> torch.Tensor:
        """A JPEG's bytes as they are in its file; any other image decoded here, untransformed."""
        path = self.source.paths[self.indices[i]]
        with open(path, "rb") as f:
            data = f.read()
        if data[:3] == b"\xff\xd8\xff":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return torch.from_numpy(np.asarray(self.load(i), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def collate_raw(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """JPEG bytes and images of different sizes cannot be stacked: a list of them, and the labels."""
    labels = [label for _, label in batch]
    if isinstance(labels[0], int):
        return [item for item, _ in batch], torch.tensor(labels, dtype=torch.long)
    return [item for item, _ in batch], torch.as_tensor(np.stack(labels), dtype=torch.float32)


def decode_on_device(items: list[torch.Tensor], transform, device: torch.device) -> torch.Tensor:
    """Decode the JPEG bytes among `items` in one batch on `device` (nvJPEG on a GPU), move the already decoded
    ones there, apply `transform` to each on the device, and stack them: a uint8 batch (N, 3, H, W)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, item in enumerate(items) if item.ndim == 1]
    images: list[torch.Tensor | None] = [None if item.ndim == 1 else item.to(device, non_blocking=True)
                                         for item in items]
    if jpegs:
        try:
            decoded = decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device,
                                  apply_exif_orientation=True)
        except RuntimeError:  # one bad file fails the whole batch: decode them one by one
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device,
                                               apply_exif_orientation=True))
                except RuntimeError as e:
                    log.warning("A JPEG of this batch could not be decoded (%s); another image takes its place", e)
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    good = [image for image in images if image is not None]
    if not good:
        raise DataError("no image of this batch could be decoded")
    return torch.stack([transform(image if image is not None else good[i % len(good)])
                        for i, image in enumerate(images)])


class EpochShuffle(RandomSampler):
    """A random order that is a function of (seed, epoch) alone, like DistributedSampler's: a resumed run sees the
    same order in each epoch as an uninterrupted one, and so does a frozen phase trained on cached features.
    Lightning calls set_epoch before every epoch (and under DDP puts a DistributedSampler in its place)."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return super().__iter__()


def init_worker(worker_id: int) -> None:
    """Each loader worker: Ctrl-C, which a terminal sends to every process of the command, is the main process's to
    handle (a worker that died of it first made the run end on "DataLoader worker exited unexpectedly" instead of the
    one-line message); seeded as Lightning seeds the workers it adds its own init to (seed_everything(workers=True)),
    which it no longer does for a loader that has one."""
    import os

    from finetune.workers import ignore_interrupts

    ignore_interrupts()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
