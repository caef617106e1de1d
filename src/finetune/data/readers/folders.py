"""Readers of class folders: a folder per class (image_folder, with official split folders where the dataset has
them), and Microsoft's PetImages, which is one."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np

from finetune.data.samples import (
    SPLIT_FOLDERS,
    DataError,
    Reader,
    Source,
    is_image_file,
    require_dir,
    warn_classes_missing_from_train,
)

log = logging.getLogger("finetune.data.readers")


def read_image_folder(root: str | None) -> Source:
    """ROOT/<class>/**/<image>: one folder per class, named for it; files in nested folders count too.

    When ROOT holds only split folders (train/, val/ or valid/, test/), each with the class folders inside,
    those splits are the dataset's official ones. A split-named folder beside class folders (an unlabelled test/)
    is no class: it is left out, and said so.

    Every real file is taken once, under the class of the folder it really lies in: links to folders inside the
    dataset (loops among them) are not followed, a link to a file is read where the file lies, and a FIFO or
    device named like an image is passed over unopened.
    """
    base = require_dir(root, "image_folder")
    folders = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    passed_over: list[tuple[str, str]] = []
    split_named = [d for d in folders if d.name.lower() in SPLIT_FOLDERS]
    if folders and len(split_named) == len(folders):
        seen: dict[tuple[int, int], str] = {}  # across the splits too: a file linked into two splits is taken once
        parts = [(_class_folders(d, str(d), passed_over, seen=seen), SPLIT_FOLDERS[d.name.lower()])
                 for d in sorted(folders)]
        classes = sorted({c for found, _ in parts for c in found})
        paths, labels, splits = [], [], []
        for found, split in parts:
            for name, files in found.items():
                paths += files
                labels += [classes.index(name)] * len(files)
                splits += [split] * len(files)
        warn_classes_missing_from_train(classes, labels, splits, root)
        return Source(classes, paths, np.array(labels, dtype=np.int64), splits=splits, passed_over=passed_over)
    for folder in split_named:  # beside class folders: an unlabelled set, or a misplaced split
        inside = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if inside:
            others = ", ".join(sorted(d.name for d in folders if d not in split_named)[:3])
            raise DataError(f"dataset.root={root} mixes class folders ({others}, ...) with a split folder "
                            f"{folder.name}/ holding folders ({', '.join(inside[:3])}): put the class folders in "
                            f"{base}/train/ so that {folder.name}/ is the official split, or move {folder.name}/ out")
        log.warning("dataset.root=%s: %s/ is named like a split and holds no class folders: taken as unlabelled "
                    "images and left out (classify them with scripts/predict.py)", root, folder.name)
        passed_over.append((str(folder), "unlabelled folder named like a split: not a class, left out"))
    found = _class_folders(base, root, passed_over, exclude={d.name for d in split_named})
    paths = [p for files in found.values() for p in files]
    labels = [label for label, files in enumerate(found.values()) for _ in files]
    return Source(list(found), paths, np.array(labels, dtype=np.int64), passed_over=passed_over)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_folders(base: Path, root: str | None, passed_over: list[tuple[str, str]],
                   exclude: set[str] = frozenset(), seen: dict | None = None) -> dict[str, list[str]]:
    """{class name: image files below base/<class name>} for every class folder that holds images.

    Other files there (Thumbs.db, notes) are added to `passed_over`; hidden files (.DS_Store) are not. Each real
    file is taken once (by device and inode), under the class whose real folder holds it; links to folders inside
    `base` are not followed (they would read its images again, or loop), links to folders outside are, once each.
    """
    real_base = os.path.realpath(base)
    classes = []
    for d in sorted(base.iterdir(), key=lambda d: d.name):
        if not d.is_dir() or d.name.startswith(".") or d.name in exclude:
            continue
        target = os.path.realpath(d)
        if d.is_symlink() and (_inside(target, real_base) or _inside(real_base, target)):
            passed_over.append((str(d), f"link to {target}, inside the dataset: not a class folder"))
            continue
        classes.append(d.name)
    if not classes:
        raise DataError(f"dataset.root={root} has no class folders: expected ROOT/<class name>/<image>")
    real_class = {os.path.realpath(base / name): name for name in classes}
    seen = {} if seen is None else seen  # (device, inode) -> where the file was taken
    visited: set[str] = set()  # real folders walked
    found: dict[str, list[str]] = {name: [] for name in classes}
    for name in classes:
        for folder, dirs, names in os.walk(base / name, followlinks=True):
            visited.add(os.path.realpath(folder))
            keep = []
            for d in sorted(dirs):
                path = os.path.join(folder, d)
                if d.startswith("."):
                    continue
                if os.path.islink(path):
                    target = os.path.realpath(path)
                    if _inside(target, real_base) or target in visited or _inside(os.path.realpath(folder), target):
                        passed_over.append((path, f"link to {target}, a folder read elsewhere or a loop: not followed"))
                        continue
                    visited.add(target)  # claimed now: another link to it in this folder is not followed either
                keep.append(d)
            dirs[:] = keep
            for n in sorted(names):
                path = os.path.join(folder, n)
                if n.startswith("."):
                    continue
                if not is_image_file(n):
                    passed_over.append((path, "not an image file (by its name)"))
                    continue
                owner = _take_file(path, name, seen, real_class, passed_over)
                if owner is not None:
                    found[owner].append(path)
    for name in classes:
        if not found[name]:
            log.warning("dataset.root=%s: class folder %r holds no images and is left out", root, name)
    return {name: files for name, files in found.items() if files}


def _class_holding(real: str, real_class: dict[str, str]) -> str | None:
    """The class whose real folder holds the real path `real`, if any: a look-up per parent folder."""
    folder = os.path.dirname(real)
    while folder not in real_class:
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return real_class[folder]


def _take_file(path: str, found_in: str, seen: dict[tuple[int, int], str], real_class: dict[str, str],
               passed_over: list[tuple[str, str]]) -> str | None:
    """The class `path` (found below class folder `found_in`) belongs to: the class whose real folder holds the real
    file, else `found_in`. None when it is passed over: not a regular file, unreadable, a link to a file inside a
    class folder (taken there), or a file already taken under another name (a hard link)."""
    try:
        st = os.stat(path)
    except OSError as e:
        passed_over.append((path, f"unreadable: {e.strerror}" + (" (a broken link)" if os.path.islink(path) else "")))
        return None
    if not stat.S_ISREG(st.st_mode):
        passed_over.append((path, "not a regular file (a FIFO, device or socket): not opened"))
        return None
    real = os.path.realpath(path)
    owner = _class_holding(real, real_class)
    if os.path.islink(path) and owner is not None:
        passed_over.append((path, f"link to {real}: taken there, as class {owner!r}"))
        return None
    key = (st.st_dev, st.st_ino)
    if key in seen:
        passed_over.append((path, f"the same file as {seen[key]}"))
        return None
    seen[key] = path
    return owner if owner is not None else found_in


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


READERS = {
    "pet_images": Reader(read_pet_images),
    "image_folder": Reader(read_image_folder),
}
