"""schedule.cache_features: in the epochs in which the schedule keeps the whole backbone frozen (and in eval mode),
its features depend on the image alone, so they are computed once and the head trains on them."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class FeatureBatch(NamedTuple):
    """A batch of the frozen backbone's pooled features (N, C) and their labels: input for the head alone."""

    features: torch.Tensor
    labels: torch.Tensor


def collate_features(items: list[tuple[torch.Tensor, torch.Tensor]]) -> FeatureBatch:
    return FeatureBatch(torch.stack([f for f, _ in items]), torch.stack([y for _, y in items]))


class LazyFeatures(Dataset):
    """(feature, label) pairs whose features are computed at the first access, not when the loader is made: Lightning
    makes an epoch's training loader before its on_train_epoch_start, where a new phase may restore other weights."""

    def __init__(self, compute, labels: torch.Tensor):
        self.compute, self.labels = compute, labels
        self.features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features is None:
            self.features = self.compute()
        return self.features[i], self.labels[i]


class FrozenFeatures(L.Callback):
    """Feature loaders for the epochs in which the schedule freezes the whole backbone; None for the others.

    The image DataModule asks `loader(split)` before making an image loader. Features are computed with the model's
    own backbone, in eval mode, as the frozen epoch would compute them anyway: of the un-augmented images (K=0), or
    of K augmented views, epoch e using view e mod K. They are kept while the backbone stays frozen and dropped as
    soon as it trains or a new phase starts. As a callback it has Lightning ask for new loaders exactly at the
    epochs where the kind of batch changes (or a new view is due), and not otherwise, so image workers live on.
    With an EMA of the weights, validation uses images once the backbone has trained: the averaged backbone that
    validation sees is then not the frozen one the features came from.
    """

    def __init__(self, data, views: int = 0, ema: bool = False):
        self.data, self.views, self.ema = data, views, ema
        self._features: dict[tuple[str, int], LazyFeatures] = {}
        self.extraction_seconds = 0.0  # spent computing features
        self._reload = 0
        self._built: dict[str, bool] = {}  # per split: whether its current loader is of features

    def _active(self, trainer: L.Trainer, epoch: int, split: str = "train") -> bool:
        schedule = trainer.lightning_module.schedule
        if not schedule.backbone_frozen(epoch) or schedule.phase_at(epoch) is None:
            return False
        return split == "train" or not (self.ema and schedule.backbone_trained_before(epoch))

    def loader(self, split: str) -> DataLoader | None:
        trainer = self.data.trainer
        if trainer is None or split not in ("train", "val"):
            return None
        epoch = trainer.current_epoch
        self._built[split] = self._active(trainer, epoch, split)
        if not self._built[split]:
            return None
        train = split == "train"
        views = self.views if train else 0
        view = epoch % views if views else 0
        labels = self.data.source.target_tensor(self.data.indices(split))
        key = (split, view)
        if key not in self._features:
            self._features[key] = LazyFeatures(lambda: self._extract(trainer, split, augmented=views > 0), labels)
        return DataLoader(
            self._features[key],
            batch_size=self.data.cfg.batch_size,
            sampler=self.data.sampler(self.data.source.labels[self.data.indices(split)], train),
            drop_last=train and len(labels) > self.data.cfg.batch_size,  # the steps per epoch that images give
            pin_memory=self.data.pin(),
            collate_fn=collate_features,
        )

    @torch.no_grad()
    def _extract(self, trainer: L.Trainer, split: str, augmented: bool) -> torch.Tensor:
        """The backbone's pooled features of every image of `split`, in order, in eval mode, float32 on the host."""
        model = trainer.lightning_module
        dataset = self.data.dataset(split, train_transforms=augmented)
        loader = self.data.plain_loader(dataset)
        backbone = model.backbone
        mode = backbone.training
        backbone.eval()
        chunks = []
        start = time.perf_counter()
        what = f"{'augmented ' if augmented else ''}features of {len(dataset):,} {split} images"
        log.info("Backbone frozen: computing the %s once, for the epochs that train the head alone", what)
        from tqdm import tqdm

        shown = trainer.progress_bar_callback is not None and trainer.is_global_zero
        batches = tqdm(loader, total=len(loader), desc=f"Caching {split} features", unit="batch", leave=False,
                       disable=not shown, dynamic_ncols=True)
        try:
            with trainer.precision_plugin.forward_context():
                for batch in batches:
                    images, _ = self.data.decode(batch, augmented, model.device)
                    chunks.append(backbone(model.normalize(images.to(model.device, non_blocking=True))).float().cpu())
        finally:
            backbone.train(mode)
        seconds = time.perf_counter() - start
        self.extraction_seconds += seconds
        log.info("Backbone frozen: the %s cached (%.0f s)", what, seconds)
        return torch.cat(chunks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reload = trainer.reload_dataloaders_every_n_epochs  # the user's own setting, where features are not
        # Lightning may have made the first training loader before a resumed run's epoch was restored (to count the
        # steps of the learning-rate schedule): have it made again for the epoch the run is really at.
        trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning asks for new loaders at the next epoch only while a split's loader is not of the kind the next
        # epoch needs (kept on until it is made again: validation may not run every epoch), a new view is due, or a
        # new phase starts (restore_best may load other weights). It has no other per-epoch switch for this, and
        # reloading every epoch would restart the image workers under DDP.
        schedule, epoch = pl_module.schedule, trainer.current_epoch
        new_phase = schedule.phase_at(epoch + 1) != schedule.phase_at(epoch)
        if new_phase or not schedule.backbone_frozen(epoch + 1):
            self._features.clear()  # the backbone may change from now on: these features would be out of date
        stale = any(self._built.get(split) != self._active(trainer, epoch + 1, split) for split in ("train", "val"))
        again = self._active(trainer, epoch + 1) and (self.views > 0 or new_phase)
        trainer.reload_dataloaders_every_n_epochs = 1 if stale or again else self._reload
