"""Datasets: readers of on-disk layouts, integrity and duplicate checks, splits, caches, transforms, the DataModule.

`check` is the dataset's part of the pre-flight check (finetune.checks): light, it reads no image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import ConfigError

# dataset.balance: how an imbalanced training split is evened out (the loss's class weights, or the sampler).
BALANCE = ("none", "weights", "sampler")
# dataset.decode: who decodes the JPEGs: the loader's workers (cpu), or the GPU (device; workers read bytes).
DECODE = ("cpu", "device")


def check(d: Any) -> None:
    """The `dataset` config `d`: its reader, a root that exists, and the values types cannot say; one line each."""
    from finetune.data.duplicates import DEDUP, MAX_THRESHOLD
    from finetune.data.readers import DUPLICATE_IDS, READERS
    from finetune.errors import suggest

    def ok(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    ok(d.name in READERS, f"dataset.name={d.name} has no reader; known: {', '.join(READERS)}."
                          f"{suggest(d.name, list(READERS))}")
    reader = READERS[d.name]
    if d.get("target") is not None:
        options = f"one of {', '.join(reader.targets)}" if reader.targets else "not used (leave it null)"
        ok(d.target in reader.targets, f"dataset.target={d.target}: for dataset={d.name} it is {options}")
    if d.root is not None and not d.download:
        ok(Path(d.root).expanduser().is_dir(), f"dataset.root={d.root}: no such directory")
    for key in sorted({key for r in READERS.values() for key in r.own_keys} - set(reader.own_keys)):
        readers = " or ".join(f"dataset={name}" for name, r in READERS.items() if key in r.own_keys)
        ok(d.get(key) is None, f"dataset.{key} is for {readers}; dataset={d.name} does not read it (leave it null)")
    if reader.check is not None:
        reader.check(d, ok)
    ok(d.batch_size > 0, f"dataset.batch_size must be > 0 (got {d.batch_size})")
    ok(d.num_workers >= 0, f"dataset.num_workers must be >= 0 (got {d.num_workers})")
    ok(d.image_size is None or d.image_size >= 8, f"dataset.image_size must be >= 8 (got {d.image_size})")
    ok(d.crop_pct is None or 0 < d.crop_pct <= 1, f"dataset.crop_pct must be in (0, 1] (got {d.crop_pct})")
    for key in ("val_fraction", "test_fraction"):
        ok(0 <= d[key] < 1, f"dataset.{key} must be in [0, 1) (got {d[key]})")
    ok(d.val_fraction + d.test_fraction < 1, "dataset.val_fraction + dataset.test_fraction must be < 1")
    ok(d.balance in BALANCE, f"dataset.balance must be one of {', '.join(BALANCE)} (got {d.balance})")
    ok(0 <= d.max_bad_fraction <= 1, f"dataset.max_bad_fraction must be in [0, 1] (got {d.max_bad_fraction})")
    ok(d.max_pixels > 0, f"dataset.max_pixels must be > 0 (got {d.max_pixels})")
    ok(d.limit_per_class is None or d.limit_per_class >= 1,
       f"dataset.limit_per_class must be >= 1 or null (got {d.limit_per_class})")
    ok(d.split_file is None or Path(d.split_file).is_file(), f"dataset.split_file={d.split_file}: no such file")
    ok(not d.download or d.root is not None, "dataset.download=true needs dataset.root: where to put it")
    ok(d.cache_size is None or d.cache_size >= 8, f"dataset.cache_size must be >= 8 or null (got {d.cache_size})")
    ok(d.decode in DECODE, f"dataset.decode must be one of {', '.join(DECODE)} (got {d.decode})")
    ok(d.duplicate_ids in DUPLICATE_IDS,
       f"dataset.duplicate_ids must be one of {', '.join(DUPLICATE_IDS)} (got {d.duplicate_ids})")
    ok(d.dedup in DEDUP, f"dataset.dedup must be one of {', '.join(DEDUP)} (got {d.dedup})")
    ok(0 <= d.dedup_threshold <= MAX_THRESHOLD,
       f"dataset.dedup_threshold must be in 0..{MAX_THRESHOLD} bits (got {d.dedup_threshold})")
    ok(d.folds is None or d.folds >= 2, f"dataset.folds must be >= 2 or null (got {d.folds})")
    ok(d.folds is not None or d.fold == 0, f"dataset.fold={d.fold} needs dataset.folds=K, the number of folds")
    ok(d.folds is None or 0 <= d.fold < d.folds,
       f"dataset.fold must be in 0..{(d.folds or 0) - 1} for dataset.folds={d.folds} (got {d.fold})")
    ok(d.folds is None or d.split_file is None,
       "dataset.folds and dataset.split_file: a split file already fixes the split; choose one")
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else None
    ok(cache_dir is None or not cache_dir.exists() or cache_dir.is_dir(),
       f"dataset.cache_dir={d.cache_dir} is a file, not a folder: give a folder for the decoded-image cache")
    ok(not (d.cache and d.decode == "device"), "dataset.cache=true holds images already decoded, and "
       "dataset.decode=device decodes JPEG files on the GPU: choose one")
