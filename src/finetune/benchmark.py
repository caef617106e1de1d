"""scripts/benchmark.py: finetune's speed against plain PyTorch, side by side in one process (a developer tool,
outside the library).

Every figure is a ratio of two measurements taken here, now, on the same machine, with the same model, batch,
precision and workers, alternating the two sides and keeping each side's best, so that the machine's drift
cancels out. The dataset is fabricated by the script: JPEGs of about 400x350 pixels, a photo's size.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)



def fabricate_jpegs(root: Path, images: int, classes: int = 4, seed: int = 0) -> Path:
    """ROOT/class_<k>/<n>.jpg: `images` photos of about 400x350 (sizes vary), coloured shapes on textured noise."""
    if root.is_dir() and len(list(root.rglob("*.jpg"))) == images:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for n in range(images):
        k = n % classes
        w, h = int(rng.integers(360, 440)), int(rng.integers(310, 390))
        noise = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in np.roll([230, 60, 40], k))
        for _ in range(3):
            r = int(rng.integers(30, 90))
            cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{n:05d}.jpg", quality=90)
    return root


class Clock:
    """Wall time with the device drained first, so that asynchronous CUDA work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class StepTimer(L.Callback):
    """Times optimizer steps `skip` onwards, and the part of each step spent waiting for the next batch."""

    def __init__(self, clock: Clock, skip: int):
        self.clock, self.skip = clock, skip
        self.start = self.end = None
        self.steps = 0
        self.wait = 0.0
        self._last_end: float | None = None
        self.epoch_times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = self.clock()
        self._last_end = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_times.append(self.clock() - self._epoch_start)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = self.clock()
        if trainer.global_step == self.skip:
            self.start = now
        if self.start is not None and self._last_end is not None:
            self.wait += now - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_end = self.clock()
        if self.start is not None:
            self.steps += 1
            self.end = self._last_end


def _config(device: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import finetune.config  # noqa: F401  (the schema conf/train.yaml builds on)
    from finetune.presets import CONF

    overrides = overrides + [f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
                             "callbacks.progress_bar=false", "+trainer.enable_model_summary=false",
                             "backbone.pretrained=false"]
    if GlobalHydra.instance().is_initialized():  # inside scripts/benchmark.py: the same conf/ folder
        return compose("train", overrides=overrides)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def _quiet():
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _model_and_data(cfg: DictConfig, run_dir: Path):
    """The validated config, the ImageModule and the set-up ImageDataModule a run of `cfg` would train."""
    from finetune.checks import validate
    from finetune.data.transforms import resolve_preprocessing
    from finetune.models.backbone import create_backbone
    from finetune.training import build_data, build_model

    cfg = validate(cfg)
    backbone = create_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.weights, cfg.head.pool)
    pre = resolve_preprocessing(backbone, cfg.dataset.image_size, cfg.dataset.crop_pct)
    data = build_data(cfg, pre, run_dir)
    data.setup("fit")
    return cfg, build_model(cfg, backbone, data, pre), data


def timed_fit(cfg: DictConfig, model, run_dir: Path, clock: Clock, skip: int, one_epoch: bool = False,
              **fit_kwargs) -> StepTimer:
    """trainer.fit as a run does it (finetune's trainer, its event file open before training), timed."""
    from finetune.callbacks.dashboards import log_hparams
    from finetune.trainer import build_trainer

    data = fit_kwargs.get("datamodule")
    trainer = build_trainer(cfg, run_dir, data if hasattr(data, "features") else None)
    timer = StepTimer(clock, skip=skip)
    trainer.callbacks.append(timer)
    if one_epoch:
        trainer.fit_loop.max_epochs = 1
    log_hparams(trainer, cfg, cfg.dataset.image_size)
    trainer.fit(model, **fit_kwargs)
    return timer


class InMemoryData(L.LightningDataModule):
    """Pre-made uint8 batches as a DataModule: what both sides of framework_vs_plain train on."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=True,
                          drop_last=True)

    def val_dataloader(self):
        n = 2 * self.batch_size
        return DataLoader(TensorDataset(self.images[:n], self.labels[:n]), batch_size=self.batch_size)


def framework_vs_plain(cfg: DictConfig, device: torch.device, clock: Clock, steps: int, repeats: int,
                       work: Path) -> dict:
    """Images/s of finetune's Trainer + ImageModule (its callbacks, metrics, logging) against a plain loop: the same
    timm model, optimizer, schedule, precision and uint8 batches, already in memory, on the device."""
    from finetune.trainer import resolve_precision

    batch = cfg.dataset.batch_size
    size = cfg.dataset.image_size
    n = batch * (steps + 5)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    precision = resolve_precision(cfg.trainer)
    results = {"framework": [], "plain": []}
    for r in range(repeats):
        for side in ("plain", "framework"):
            run_dir = work / f"fw-{side}-{r}"
            cfg_r, model, _ = _model_and_data(cfg, run_dir)
            if side == "framework":
                timer = timed_fit(cfg_r, model, run_dir, clock, skip=5, one_epoch=True,
                                  datamodule=InMemoryData(images, labels, batch))
                results[side].append(timer.steps * batch / (timer.end - timer.start))
            else:
                results[side].append(plain_loop(model, images, labels, batch, precision, device, clock, skip=5))
            del model
    best = {k: max(v) for k, v in results.items()}
    return {"framework_images_per_s": best["framework"], "plain_images_per_s": best["plain"],
            "framework_vs_plain": best["framework"] / best["plain"]}


def plain_loop(model, images, labels, batch: int, precision: str, device: torch.device, clock: Clock,
               skip: int) -> float:
    """The loop users write by hand: normalise, forward, loss, backward, optimizer step, lr schedule step; with the
    run's own parameter groups and rates (one epoch of the schedule)."""
    model = model.to(device).train()
    optimizer, scheduler = model.schedule.optimizer(model.backbone, model.head, len(images) // batch)
    criterion = nn.CrossEntropyLoss()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True)
    start = None
    done = 0
    for step, (x, y) in enumerate(loader):
        if step == skip:
            start = clock()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model.classify(model.normalize(x)), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if start is not None:
            done += 1
    return done * batch / (clock() - start)


def loader_throughput(loader, batches: int, skip: int = 2) -> float:
    """Images/s of a DataLoader over `batches` batches, after `skip` batches of warm-up (workers starting)."""
    count, start = 0, None
    for i, (x, _) in enumerate(loader):
        if i == skip:
            start = time.perf_counter()
        elif i > skip:
            count += len(x)
        if i >= skip + batches:
            break
    return count / (time.perf_counter() - start)


def baseline_loader(root: Path, size: int, batch: int, workers: int, interpolation: str) -> DataLoader:
    """The loader of the tutorials: torchvision ImageFolder, PIL, RandomResizedCrop, flip, ToTensor, Normalize; with
    the model's resampling filter, as ours uses (bicubic for MobileNetV2), so that only the pipelines differ."""
    from torchvision import datasets, transforms

    mode = transforms.InterpolationMode.BICUBIC if interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    transform = transforms.Compose([transforms.RandomResizedCrop(size, interpolation=mode),
                                    transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0)


def loader_vs_baseline(cfg: DictConfig, root: Path, work: Path, repeats: int) -> dict:
    """Images/s of finetune's training loader (from the JPEGs, and from the decoded-image cache) against the
    baseline loader, with the same batch size and workers; each over one pass of the images."""
    batch, workers, size = cfg.dataset.batch_size, cfg.dataset.num_workers, cfg.dataset.image_size
    start = time.perf_counter()
    _, _, cached = _model_and_data(OmegaConf.merge(cfg, {"dataset": {"cache": True}}), work / "loader-cached")
    cache_build_s = time.perf_counter() - start
    _, _, plain = _model_and_data(cfg, work / "loader-plain")
    n = len(plain.indices("train")) // batch - 3
    loaders = {"baseline": baseline_loader(root, size, batch, workers, plain.preprocessing.interpolation),
               "ours": plain.train_dataloader(),
               "ours_cached": cached.train_dataloader()}
    results = {k: [] for k in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            results[name].append(loader_throughput(loader, n))
    best = {k: max(v) for k, v in results.items()}
    return {"baseline_loader_images_per_s": best["baseline"], "loader_images_per_s": best["ours"],
            "cached_loader_images_per_s": best["ours_cached"], "loader_vs_baseline": best["ours"] / best["baseline"],
            "loader_vs_baseline_cached": best["ours_cached"] / best["baseline"], "cache_build_s": cache_build_s,
            "cache_mb": cached.cache.nbytes / 1e6}


def frozen_epochs(cfg: DictConfig, clock: Clock, work: Path, name: str, cache_features: bool, epochs: int = 2):
    """Per-epoch wall times (training and validation) of `epochs` frozen epochs, images read from the cache."""
    cfg = OmegaConf.merge(cfg, {"schedule": {"epochs": epochs, "freeze_epochs": epochs,
                                             "cache_features": cache_features}, "dataset": {"cache": True}})
    cfg, model, data = _model_and_data(cfg, work / name)
    timer = timed_fit(cfg, model, work / name, clock, skip=0, datamodule=data)
    return timer.epoch_times, data.features.extraction_seconds if data.features is not None else 0.0


def frozen_epoch_speedup(cfg: DictConfig, clock: Clock, work: Path) -> dict:
    """A frozen epoch on images against one on cached features; and the one-off cost of computing them (training
    and validation images), which the loaders do before the first frozen epoch starts."""
    plain, _ = frozen_epochs(cfg, clock, work, "frozen-plain", False)
    cached, extraction = frozen_epochs(cfg, clock, work, "frozen-cached", True)
    return {"frozen_epoch_s": min(plain), "frozen_epoch_cached_s": min(cached),
            "feature_extraction_s": extraction, "frozen_epoch_speedup": min(plain) / min(cached)}


def cuda_figures(cfg: DictConfig, clock: Clock, work: Path, steps: int) -> dict:
    """On CUDA: images/s end to end from the JPEGs and from the cache, against the synthetic ceiling (the same
    training on batches already on the GPU); peak memory; the share of step time spent waiting for data."""
    figures = {}
    variants = (("jpeg", {"cache": False}), ("jpeg_nvjpeg", {"cache": False, "decode": "device"}),
                ("cache", {"cache": True}))
    for name, dataset in variants:
        c = OmegaConf.merge(cfg, {"dataset": dataset, "schedule": {"freeze_epochs": 0, "epochs": 1}})
        c, model, data = _model_and_data(c, work / f"cuda-{name}")
        torch.cuda.reset_peak_memory_stats()
        timer = timed_fit(c, model, work / f"cuda-{name}", clock, skip=5, datamodule=data)
        elapsed = timer.end - timer.start
        figures[f"end_to_end_{name}_images_per_s"] = timer.steps * c.dataset.batch_size / elapsed
        figures[f"data_wait_fraction_{name}"] = timer.wait / elapsed
        figures["peak_gpu_memory_gb"] = max(figures.get("peak_gpu_memory_gb", 0),
                                            torch.cuda.max_memory_allocated() / 2**30)
    batch, size = cfg.dataset.batch_size, cfg.dataset.image_size
    c = OmegaConf.merge(cfg, {"schedule": {"freeze_epochs": 0}})
    c, model, _ = _model_and_data(c, work / "cuda-synthetic")
    images = torch.randint(0, 256, (batch * (steps + 5), 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 4, (len(images),))
    timer = timed_fit(c, model, work / "cuda-synthetic", clock, skip=5, one_epoch=True,
                      train_dataloaders=DataLoader(_OnDevice(images.cuda(), labels.cuda(), batch), batch_size=None),
                      val_dataloaders=[])
    figures["synthetic_images_per_s"] = timer.steps * batch / (timer.end - timer.start)
    for name, _ in variants:
        figures[f"end_to_end_{name}_vs_synthetic"] = \
            figures[f"end_to_end_{name}_images_per_s"] / figures["synthetic_images_per_s"]
    return figures


class _OnDevice(torch.utils.data.Dataset):
    """Whole batches, already on the GPU: the input pipeline costs nothing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int):
        self.images, self.labels, self.batch = images, labels, batch

    def __len__(self):
        return len(self.images) // self.batch

    def __getitem__(self, i):
        part = slice(i * self.batch, (i + 1) * self.batch)
        return self.images[part], self.labels[part]


def machine(device: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cpu}"
    return cpu


def run(cfg: DictConfig) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from finetune.errors import ConfigError

        raise ConfigError("device=cuda: no CUDA device is available here (device=cpu measures the CPU figures)")
    on_gpu = device.type == "cuda"
    size = cfg.image_size or (224 if on_gpu else 64)
    batch = cfg.batch_size or (256 if on_gpu else 32)
    workers = cfg.workers if cfg.workers is not None else min(16, os.cpu_count() or 1)
    images = cfg.images or (8192 if on_gpu else 640)
    precision = cfg.precision or ("bf16-mixed" if on_gpu else "32-true")
    _quiet()
    work = Path(tempfile.mkdtemp(prefix="finetune-benchmark-"))
    root = fabricate_jpegs(Path(cfg.data_dir).expanduser() if cfg.data_dir else work / "jpegs", images)
    log.info("Benchmark on %s: %s at %d px, batch %d, %s, %d workers, %d JPEGs in %s", machine(device),
             cfg.backbone, size, batch, precision, workers, images, root)
    base = _config(cfg.device, [
        "dataset=image_folder", f"dataset.root={root}", f"dataset.image_size={size}", f"dataset.batch_size={batch}",
        f"dataset.num_workers={workers}", f"dataset.cache_dir={work / 'cache'}", "dataset.val_fraction=0.1",
        "dataset.test_fraction=0.0", f"backbone.name={cfg.backbone}", f"trainer.precision={precision}",
        "logger=tensorboard", "callbacks.dashboards.enabled=false", "trainer.log_every_n_steps=50",
        "schedule.freeze_epochs=0", "schedule.epochs=1", f"trainer.compile={cfg.compile}", f"run_dir={work}",
    ])
    clock = Clock(device)
    results = {"machine": machine(device), "device": cfg.device, "backbone": cfg.backbone, "image_size": size,
               "batch_size": batch, "precision": precision, "workers": workers, "images": images,
               "torch": torch.__version__, "lightning": L.__version__}
    try:
        log.info("1/3 framework_vs_plain ...")
        results.update(framework_vs_plain(base, device, clock, cfg.steps, cfg.repeats, work))
        log.info("2/3 loader_vs_baseline ...")
        results.update(loader_vs_baseline(base, root, work, cfg.repeats))
        log.info("3/3 frozen_epoch_speedup ...")
        results.update(frozen_epoch_speedup(base, clock, work))
        if on_gpu:
            log.info("CUDA: end to end, synthetic ceiling, data wait ...")
            results.update(cuda_figures(base, clock, work, cfg.steps))
        else:
            results["cuda"] = "unmeasured: no CUDA device (run with device=cuda on a GPU)"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Written: {out}")
    return results


def table(results: dict) -> str:
    lines = [f"finetune benchmark: {results['machine']}, {results['backbone']} {results['image_size']} px, batch "
             f"{results['batch_size']}, {results['precision']}, {results['workers']} workers", ""]
    width = max(len(k) for k in results)
    for key, value in results.items():
        if key in ("machine",):
            continue
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)

