"""Readers of the named layouts our users download: scikit-learn's digits, Kaggle's Dogs vs. Cats and dog breeds,
Stanford Dogs, CIFAR-10 (python version) and the Oxford-IIIT Pet. One class per image."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np

from finetune.data.samples import (
    DataError,
    Reader,
    Source,
    is_image_file,
    one_label_per_id,
    require_dir,
)

log = logging.getLogger("finetune.data.readers")


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


def read_dog_breeds(root: str | None, duplicate_ids: str = "refuse") -> Source:
    """Kaggle dog-breed-identification: ROOT/labels.csv (id,breed) and ROOT/train/<id>.jpg; ROOT/test/ unlabelled.

    labels.csv may come from Excel (a byte-order mark, spaces after the commas). Rows of it whose image is missing
    are passed over (skipped.csv); an id given two breeds is refused, or its first row kept (duplicate_ids=first).
    """

    base = require_dir(root, "dog_breeds")
    labels_csv = base / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(f"dataset.root={root}: expected {labels_csv} (id,breed) and {base}/train/<id>.jpg")
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.reader(f, skipinitialspace=True)
        header = [h.strip() for h in next(reader, [])]
        if not {"id", "breed"} <= set(header):
            raise DataError(f"{labels_csv} must have the columns id,breed (it has {','.join(header)})")
        i, b = header.index("id"), header.index("breed")
        rows, passed_over = [], []
        for line, row in enumerate(reader, start=2):
            row = [x.strip() for x in row]
            if not any(row):
                continue
            if len(row) <= max(i, b) or not row[i] or not row[b]:
                passed_over.append((f"{labels_csv}:{line}", "row without an id or a breed"))
            else:
                rows.append((row[i], row[b], f"{labels_csv}:{line}"))
    rows = one_label_per_id(rows, labels_csv, duplicate_ids, passed_over)
    classes = sorted({breed for _, breed in rows})
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for image_id, breed in rows:
        path = base / "train" / f"{image_id}.jpg"
        if path.is_file():
            paths.append(str(path))
            labels.append(index[breed])
        else:
            passed_over.append((str(path), "missing: named in labels.csv"))
    return Source(classes, paths, np.array(labels, dtype=np.int64), passed_over=passed_over)


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


def read_oxford_pets(root: str | None, target: str = "breed", duplicate_ids: str = "refuse") -> Source:
    """Oxford-IIIT Pet in torchvision's layout: ROOT/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}
    (or ROOT is that folder). target=breed: the breeds present, named as torchvision names them (37 in the full set);
    target=species: Cat, Dog. trainval.txt is the training split (divided into train and val), test.txt the test
    split. Annotated images missing from images/ are passed over (skipped.csv)."""
    base = require_dir(root, "oxford_pets")
    pets = base / "oxford-iiit-pet" if (base / "oxford-iiit-pet").is_dir() else base
    annotations, images = pets / "annotations", pets / "images"
    if not ((annotations / "trainval.txt").is_file() and (annotations / "test.txt").is_file() and images.is_dir()):
        raise DataError(f"dataset.root={root}: expected {images}/ and {annotations}/trainval.txt, test.txt "
                        "(torchvision's OxfordIIITPet layout; dataset.download=true fetches it)")
    rows, passed_over, parsed = [], [], {}
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        for line, text in enumerate((annotations / file).read_text().splitlines(), start=1):
            if not text.strip() or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) < 3 or not (fields[1].isdigit() and fields[2] in ("1", "2")):
                passed_over.append((f"{annotations / file}:{line}", "not an annotation line (ID CLASS SPECIES ...)"))
                continue
            label = f"class {int(fields[1])} in {file}"
            rows.append((fields[0], label, f"{annotations / file}:{line}"))
            parsed[fields[0], label] = (int(fields[1]), int(fields[2]), split)
    # One label per image: an image in both trainval.txt and test.txt would sit in train and test at once.
    kept = one_label_per_id(rows, annotations, duplicate_ids, passed_over)
    present = []
    for image_id, label in kept:
        path = images / f"{image_id}.jpg"
        if path.is_file():
            present.append((image_id, *parsed[image_id, label]))
        else:
            passed_over.append((str(path), "missing: named in the annotations"))
    if target == "species":
        classes = ["Cat", "Dog"]
        labels = [species - 1 for _, _, species, _ in present]
    else:  # dense over the breeds that have images: a subset of the 37 breeds is a dataset of its own
        names = {class_id: " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
                 for image_id, class_id, _, _ in present}
        order = sorted(names)
        classes = [names[k] for k in order]
        index = {k: i for i, k in enumerate(order)}
        labels = [index[class_id] for _, class_id, _, _ in present]
    return Source(classes, [str(images / f"{r[0]}.jpg") for r in present], np.array(labels, dtype=np.int64),
                  splits=[r[3] for r in present], passed_over=passed_over)


READERS = {
    "digits": Reader(read_digits),
    "dogs_vs_cats": Reader(read_dogs_vs_cats),
    "dog_breeds": Reader(read_dog_breeds, label_file=True),
    "stanford_dogs": Reader(read_stanford_dogs),
    "cifar10": Reader(read_cifar10),
    "oxford_pets": Reader(read_oxford_pets, targets=("breed", "species"), label_file=True),
}
