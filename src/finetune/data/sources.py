"""One reader per on-disk layout: each turns a dataset folder into labelled samples and class names."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import FinetuneError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(FinetuneError):
    """A dataset that cannot be read as configured."""


@dataclass
class Source:
    """Labelled samples of one dataset.

    `paths` names each sample: a file, or `NAME#INDEX` for datasets that ship decoded pixels in `images`.
    `splits` holds the dataset's official split per sample ('train', 'val', 'test'), where it has one.
    """

    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def require_dir(root: str | None, dataset: str) -> Path:
    """The dataset folder, or a DataError saying what is wrong with it."""
    if root is None:
        raise DataError(f"dataset.root is required for dataset={dataset}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset.root={root}: no such directory")
    if not any(path.iterdir()):
        raise DataError(f"dataset.root={root} is empty")
    return path


def read_digits(root: str | None) -> Source:
    """scikit-learn's bundled 8x8 digits, as grey RGB images scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    paths = [f"digits#{i}" for i in range(len(images))]
    return Source([str(c) for c in range(10)], paths, digits.target.astype(np.int64), images=images)


_DOGS_VS_CATS = re.compile(r"^(cat|dog)\.\d+\.(jpe?g|png)$", re.IGNORECASE)


def read_dogs_vs_cats(root: str | None) -> Source:
    """Kaggle Dogs vs. Cats: ROOT/train/{cat,dog}.N.jpg; ROOT/test1 (unlabelled) is not read."""
    base = require_dir(root, "dogs_vs_cats")
    train = base / "train"
    if not train.is_dir():
        if (base / "train.zip").is_file():
            raise DataError(f"{base}/train.zip is not extracted: unzip -q {base}/train.zip -d {base}")
        if any(_DOGS_VS_CATS.match(p.name) for p in base.iterdir()):
            train = base  # ROOT is the train folder itself
        else:
            raise DataError(f"dataset.root={root}: expected {base}/train/cat.0.jpg ... (Kaggle's Dogs vs. Cats layout)")
    paths, labels = [], []
    for entry in sorted(os.scandir(train), key=lambda e: e.name):
        match = _DOGS_VS_CATS.match(entry.name)
        if match and entry.is_file():
            paths.append(entry.path)
            labels.append(0 if match.group(1).lower() == "cat" else 1)
    if not paths:
        raise DataError(f"{train} holds no cat.N.jpg / dog.N.jpg files")
    return Source(["cat", "dog"], paths, np.array(labels, dtype=np.int64))


def read_image_folder(root: str | None) -> Source:
    """ROOT/<class>/**/<image>: one folder per class, named for it; files in nested folders count too."""
    base = require_dir(root, "image_folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"dataset.root={root} has no class folders: expected ROOT/<class name>/<image>")
    found: dict[str, list[str]] = {}
    for name in classes:
        files = []
        for folder, dirs, names in os.walk(base / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(folder, n) for n in sorted(names) if is_image_file(n)]
        if files:
            found[name] = files
        else:
            log.warning("dataset.root=%s: class folder %r holds no images and is left out", root, name)
    paths = [p for files in found.values() for p in files]
    labels = [label for label, files in enumerate(found.values()) for _ in files]
    return Source(list(found), paths, np.array(labels, dtype=np.int64))


READERS: dict[str, Callable[[str | None], Source]] = {
    "digits": read_digits,
    "dogs_vs_cats": read_dogs_vs_cats,
    "image_folder": read_image_folder,
}


def read_source(name: str, root: str | None) -> Source:
    """Read dataset `name` from `root`; a DataError if it has fewer than two classes with images."""
    if name not in READERS:
        from finetune.config import suggest

        known = ", ".join(READERS)
        raise DataError(f"dataset.name={name} has no reader; known: {known}.{suggest(name, list(READERS))}")
    source = READERS[name](root)
    counts = np.bincount(source.labels, minlength=len(source.classes))
    present = [c for c, n in zip(source.classes, counts) if n > 0]
    if len(present) < 2:
        found = f"only class {present[0]!r}" if present else "no labelled images"
        raise DataError(f"dataset.root={root}: found {found}; a classifier needs at least two classes")
    return source
