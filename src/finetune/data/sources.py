"""One reader per on-disk layout: each turns a dataset folder into labelled samples and class names."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
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
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files the reader did not take

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


SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def read_image_folder(root: str | None) -> Source:
    """ROOT/<class>/**/<image>: one folder per class, named for it; files in nested folders count too.

    When ROOT holds only split folders (train/, val/ or valid/, test/), each with the class folders inside,
    those splits are the dataset's official ones.
    """
    base = require_dir(root, "image_folder")
    folders = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if folders and all(d.name.lower() in SPLIT_FOLDERS for d in folders):
        passed_over: list[tuple[str, str]] = []
        parts = [(_class_folders(d, str(d), passed_over), SPLIT_FOLDERS[d.name.lower()]) for d in sorted(folders)]
        classes = sorted({c for found, _ in parts for c in found})
        paths, labels, splits = [], [], []
        for found, split in parts:
            for name, files in found.items():
                paths += files
                labels += [classes.index(name)] * len(files)
                splits += [split] * len(files)
        return Source(classes, paths, np.array(labels, dtype=np.int64), splits=splits, passed_over=passed_over)
    passed_over = []
    found = _class_folders(base, root, passed_over)
    paths = [p for files in found.values() for p in files]
    labels = [label for label, files in enumerate(found.values()) for _ in files]
    return Source(list(found), paths, np.array(labels, dtype=np.int64), passed_over=passed_over)


def _class_folders(base: Path, root: str | None, passed_over: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{class name: image files below base/<class name>} for every class folder that holds images.

    Other files there (Thumbs.db, notes) are added to `passed_over`; hidden files (.DS_Store) are not.
    """
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"dataset.root={root} has no class folders: expected ROOT/<class name>/<image>")
    found: dict[str, list[str]] = {}
    for name in classes:
        files = []
        for folder, dirs, names in os.walk(base / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if is_image_file(n):
                    files.append(os.path.join(folder, n))
                elif not n.startswith("."):
                    passed_over.append((os.path.join(folder, n), "not an image file (by its name)"))
        if files:
            found[name] = files
        else:
            log.warning("dataset.root=%s: class folder %r holds no images and is left out", root, name)
    return found


def read_pet_images(root: str | None) -> Source:
    """Microsoft's PetImages (kagglecatsanddogs_5340.zip): ROOT/PetImages/{Cat,Dog}/N.jpg, or ROOT = PetImages.

    The download holds Thumbs.db files and broken JPEGs; the integrity scan finds and skips the latter.
    """
    base = require_dir(root, "pet_images")
    pets = base / "PetImages" if (base / "PetImages").is_dir() else base
    if not ((pets / "Cat").is_dir() and (pets / "Dog").is_dir()):
        zips = sorted(base.glob("kagglecatsanddogs*.zip"))
        if zips:
            raise DataError(f"{zips[0]} is not extracted: unzip -q {zips[0]} -d {base} (or dataset.download=true)")
        raise DataError(f"dataset.root={root}: expected {base}/PetImages/Cat/ and {base}/PetImages/Dog/")
    return read_image_folder(str(pets))


def read_dog_breeds(root: str | None) -> Source:
    """Kaggle dog-breed-identification: ROOT/labels.csv (id,breed) and ROOT/train/<id>.jpg; ROOT/test/ unlabelled.

    Rows of labels.csv whose image is missing are left out with a warning.
    """
    import csv

    base = require_dir(root, "dog_breeds")
    labels_csv = base / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(f"dataset.root={root}: expected {labels_csv} (id,breed) and {base}/train/<id>.jpg")
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "breed"} <= set(reader.fieldnames or []):
            raise DataError(f"{labels_csv} must have the columns id,breed (it has {reader.fieldnames})")
        rows = [(row["id"], row["breed"]) for row in reader]
    classes = sorted({breed for _, breed in rows})
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, missing = [], [], []
    for image_id, breed in rows:
        path = base / "train" / f"{image_id}.jpg"
        if path.is_file():
            paths.append(str(path))
            labels.append(index[breed])
        else:
            missing.append(str(path))
    return Source(classes, paths, np.array(labels, dtype=np.int64),
                  passed_over=[(path, "missing: named in labels.csv") for path in missing])


def read_stanford_dogs(root: str | None) -> Source:
    """Stanford Dogs: ROOT/Images/n02085620-Chihuahua/n02085620_10074.jpg, the breed being the folder name after
    its first dash. With train_list.mat and test_list.mat (lists.tar, in ROOT/lists/ or ROOT/), their split is used.
    """
    base = require_dir(root, "stanford_dogs")
    images = base / "Images"
    if not images.is_dir():
        raise DataError(f"dataset.root={root}: expected {images}/n02085620-Chihuahua/n02085620_10074.jpg ...")
    folders = sorted(d for d in images.iterdir() if d.is_dir() and "-" in d.name)
    if not folders:
        raise DataError(f"{images} holds no breed folders named like n02085620-Chihuahua")
    classes = sorted({d.name.split("-", 1)[1] for d in folders})
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for folder in folders:
        files = sorted(f for f in os.listdir(folder) if is_image_file(f))
        paths += [str(folder / f) for f in files]
        labels += [index[folder.name.split("-", 1)[1]]] * len(files)
    splits = None
    lists = next((d for d in (base / "lists", base) if (d / "train_list.mat").is_file()
                  and (d / "test_list.mat").is_file()), None)
    if lists is not None:
        official = {**{f: "train" for f in _mat_file_list(lists / "train_list.mat")},
                    **{f: "test" for f in _mat_file_list(lists / "test_list.mat")}}
        relative = [str(Path(p).relative_to(images)).replace(os.sep, "/") for p in paths]
        keep = [i for i, r in enumerate(relative) if r in official]
        if len(keep) < len(paths):
            log.warning("%d images are in neither train_list.mat nor test_list.mat and are left out",
                        len(paths) - len(keep))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        splits = [official[relative[i]] for i in keep]
    return Source(classes, paths, np.array(labels, dtype=np.int64), splits=splits)


def _mat_file_list(path: Path) -> list[str]:
    """The file_list of a Stanford Dogs .mat split file: paths relative to Images/."""
    from scipy.io import loadmat

    return [str(np.asarray(x).ravel()[0]) for x in loadmat(path)["file_list"].ravel()]


def read_cifar10(root: str | None) -> Source:
    """CIFAR-10 in torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    (or ROOT is that folder). The official test batch is the test split."""
    import pickle

    base = require_dir(root, "cifar10")
    batches = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    absent = [n for n in names + ["batches.meta"] if not (batches / n).is_file()]
    if absent:
        raise DataError(f"dataset.root={root}: {batches} lacks {', '.join(absent)} (torchvision's "
                        "cifar-10-batches-py layout; dataset.download=true fetches it)")
    with open(batches / "batches.meta", "rb") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in pickle.load(f, encoding="bytes")[b"label_names"]]
    images, labels, paths, splits = [], [], [], []
    for name in names:
        with open(batches / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images.append(data)
        labels += list(batch[b"labels"])
        paths += [f"{batches / name}#{i}" for i in range(len(data))]
        splits += ["test" if name == "test_batch" else "train"] * len(data)
    return Source(classes, paths, np.array(labels, dtype=np.int64), images=np.concatenate(images), splits=splits)


def read_oxford_pets(root: str | None, target: str = "breed") -> Source:
    """Oxford-IIIT Pet in torchvision's layout: ROOT/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}
    (or ROOT is that folder). target=breed: 37 classes named as torchvision names them; target=species: Cat, Dog.
    trainval.txt is the training split (divided into train and val), test.txt the test split."""
    base = require_dir(root, "oxford_pets")
    pets = base / "oxford-iiit-pet" if (base / "oxford-iiit-pet").is_dir() else base
    annotations, images = pets / "annotations", pets / "images"
    if not ((annotations / "trainval.txt").is_file() and (annotations / "test.txt").is_file() and images.is_dir()):
        raise DataError(f"dataset.root={root}: expected {images}/ and {annotations}/trainval.txt, test.txt "
                        "(torchvision's OxfordIIITPet layout; dataset.download=true fetches it)")
    rows = []
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in (annotations / file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                image_id, class_id, species, _ = line.split()
                rows.append((image_id, int(class_id), int(species), split))
    if target == "species":
        classes = ["Cat", "Dog"]
        label_of = {r[0]: r[2] - 1 for r in rows}
    else:
        names = {r[1]: " ".join(part.title() for part in r[0].rsplit("_", 1)[0].split("_")) for r in rows}
        classes = [names[k] for k in sorted(names)]
        label_of = {r[0]: r[1] - 1 for r in rows}
    rows = [r for r in rows if (images / f"{r[0]}.jpg").is_file()]
    return Source(classes, [str(images / f"{r[0]}.jpg") for r in rows],
                  np.array([label_of[r[0]] for r in rows], dtype=np.int64), splits=[r[3] for r in rows])


READERS: dict[str, Callable[..., Source]] = {
    "digits": read_digits,
    "dogs_vs_cats": read_dogs_vs_cats,
    "pet_images": read_pet_images,
    "dog_breeds": read_dog_breeds,
    "stanford_dogs": read_stanford_dogs,
    "cifar10": read_cifar10,
    "oxford_pets": read_oxford_pets,
    "image_folder": read_image_folder,
}


# Readers that take dataset.target, and the values they take; the first is the default.
TARGETS = {"oxford_pets": ("breed", "species")}


def read_source(name: str, root: str | None, target: str | None = None) -> Source:
    """Read dataset `name` from `root`; a DataError if it has fewer than two classes with images."""
    if name not in READERS:
        from finetune.config import suggest

        known = ", ".join(READERS)
        raise DataError(f"dataset.name={name} has no reader; known: {known}.{suggest(name, list(READERS))}")
    if target is not None and target not in TARGETS.get(name, ()):
        options = f"one of {', '.join(TARGETS[name])}" if name in TARGETS else "not used (leave it null)"
        raise DataError(f"dataset.target={target}: for dataset={name} it is {options}")
    source = READERS[name](root, target) if target is not None else READERS[name](root)
    counts = np.bincount(source.labels, minlength=len(source.classes))
    present = [c for c, n in zip(source.classes, counts) if n > 0]
    if len(present) < 2:
        found = f"only class {present[0]!r}" if present else "no labelled images"
        raise DataError(f"dataset.root={root}: found {found}; a classifier needs at least two classes")
    return source
