"""One reader per on-disk layout: each turns a dataset folder into labelled samples and class names."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.samples import (  # noqa: F401 (re-exported: the readers' types)
    IMAGE_EXTENSIONS,
    LABEL_COLUMNS,
    SPLIT_FOLDERS,
    DataError,
    Source,
    class_order,
    is_image_file,
    is_number,
    is_whole,
    label_name,
    labelled,
    warn_classes_missing_from_train,
    written,
)
from finetune.tasks import MULTICLASS, MULTILABEL, TASKS, Task, of_target_column, task_of

log = logging.getLogger(__name__)



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


def read_dog_breeds(root: str | None, duplicate_ids: str = "refuse") -> Source:
    """Kaggle dog-breed-identification: ROOT/labels.csv (id,breed) and ROOT/train/<id>.jpg; ROOT/test/ unlabelled.

    labels.csv may come from Excel (a byte-order mark, spaces after the commas). Rows of it whose image is missing
    are passed over (skipped.csv); an id given two breeds is refused, or its first row kept (duplicate_ids=first).
    """
    import csv

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


DUPLICATE_IDS = ("refuse", "first")  # dataset.duplicate_ids: what an id listed twice with two labels does


def one_label_per_id(rows: list[tuple[str, str, str]], file: Path, duplicate_ids: str,
                     passed_over: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(id, label) once per id, from (id, label, FILE:LINE) rows of label files. Repeats with the same label are
    passed over; an id with two labels is a DataError naming them, or keeps its first row (duplicate_ids=first)."""
    first: dict[str, tuple[str, str]] = {}
    conflicts: dict[str, list[str]] = {}
    for image_id, label, line in rows:
        if image_id not in first:
            first[image_id] = (label, line)
            continue
        kept, kept_line = first[image_id]
        if label == kept:
            passed_over.append((line, f"id {image_id} again, as at {kept_line}"))
        else:
            conflicts.setdefault(image_id, [kept]).append(label)
            passed_over.append((line, f"id {image_id} as {label!r}, but {kept!r} at {kept_line} "
                                      "(the first kept: dataset.duplicate_ids=first)"))
    if conflicts:
        examples = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(conflicts.items())[:3])
        if duplicate_ids != "first":
            raise DataError(f"{file} gives {len(conflicts)} ids more than one label ({examples}): the same image "
                            "would be trained and tested under two classes. Fix the file, or keep each id's first "
                            "row with dataset.duplicate_ids=first")
        log.warning("%s gives %d ids more than one label (%s): each keeps its first (dataset.duplicate_ids=first)",
                    file, len(conflicts), examples)
    repeats = len(rows) - len(first)
    if repeats > len(conflicts):
        log.warning("%s lists %d ids more than once; each is taken once (the rows are in skipped.csv)", file, repeats)
    return [(image_id, label) for image_id, (label, _) in first.items()]


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


# dataset=table: the columns found by name where dataset.path_column / label_column / split_column are not given
PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "image", "image_path", "img")
SPLIT_COLUMNS = ("split",)


def read_table(root: str | None, table: str | None = None, path_column: str | None = None,
               label_column: str | None = None, split_column: str | None = None, label_sep: str | None = None,
               target_column: str | None = None, duplicate_ids: str = "refuse", task: Task | None = None) -> Source:
    """A label table: a CSV or Parquet file (dataset.table, relative to ROOT or absolute) with a column of image paths
    (relative to ROOT, or absolute), a column of labels and, optionally, a split column (train/val/test, kept as
    given). Columns are found by name (PATH_COLUMNS, LABEL_COLUMNS, `split`), or the path column as the one whose cells
    all name image files, unless named in dataset.path_column, label_column and split_column.

    The task (finetune.tasks) follows the table unless `task` is given: a label cell holding several labels separated
    by `label_sep` (when given; or a list in a Parquet cell) makes it multilabel, a `target_column` of numbers
    regression; with task=multilabel a space separates labels unless `label_sep` says otherwise. Rows without a path
    or a label, rows with a target that is not a number, and rows whose file is missing are passed over
    (skipped.csv); a file named twice with two labels is refused, or its first row kept (duplicate_ids=first). A bad
    table (a missing column, an unknown split value, a label column mixing numbers and names) is one DataError naming
    the file, the row and the column."""
    base = require_dir(root, "table")
    if not table:
        raise DataError("dataset=table needs dataset.table: a CSV or Parquet file of image paths and labels "
                        f"(relative to dataset.root={root}, or absolute)")
    file = base / Path(table).expanduser()
    if not file.is_file():
        raise DataError(f"dataset.table={table}: no such file ({file})")
    header, rows = _table_rows(file)
    path_col = _column(file, header, path_column, "path_column", PATH_COLUMNS, rows,
                       lambda v: isinstance(v, str) and is_image_file(os.path.basename(v.strip())))
    split_col = _column(file, header, split_column, "split_column", SPLIT_COLUMNS, rows, None, required=False)
    task = None if task is None else task_of(task)
    if target_column is not None:
        task = of_target_column(task, target_column)
        label_col = _column(file, header, target_column, "target_column", (), rows, None)
    else:
        rest = [h for h in header if h not in (path_col, split_col)]
        label_col = _column(file, header, label_column, "label_column", LABEL_COLUMNS, rows, None,
                            only=rest[0] if len(rest) == 1 else None)
    sep = label_sep if label_sep else " "
    if task is None:
        # Several labels in a cell make the task multilabel: a list (Parquet), or cells split at dataset.label_sep
        # when it is given. Without it, a space is read as part of a class name ("Great Dane"), as always: give
        # task=multilabel (a space separates) or dataset.label_sep.
        several = next(((where, row[label_col]) for where, row in rows if isinstance(row.get(label_col), (list, tuple))
                        or (label_sep and isinstance(row.get(label_col), str)
                            and len(_names(row[label_col], sep)) > 1)), None)
        task = MULTILABEL if several else MULTICLASS
        if several:
            log.info("task=%s (inferred): %s holds several labels in column %r (%r)", task, several[0], label_col,
                     several[1])
    passed_over: list[tuple[str, str]] = []
    found, split_of, numbers, names = [], {}, None, None
    for where, row in rows:
        cell = row.get(path_col)
        if cell is None or not str(cell).strip():
            passed_over.append((where, f"no image path in column {path_col!r}"))
            continue
        value, why = task.read_cell(row.get(label_col), label_col, where, sep=sep)
        if why is not None:
            passed_over.append((where, why))
            continue
        for part in task.parts(value):
            if is_number(part):
                numbers = numbers or (where, part)
            else:
                names = names or (where, part)
        if numbers and names:
            raise DataError(f"{file}: column {label_col!r} mixes numbers ({numbers[0]}: {numbers[1]!r}) and names "
                            f"({names[0]}: {names[1]!r}): one kind of label per column")
        path = os.path.abspath(os.path.join(base.absolute(), os.path.expanduser(str(cell).strip())))
        key = os.path.realpath(path)  # one file however it is spelt (./a.jpg, an absolute path, a link)
        if split_col is not None:
            split = str(row.get(split_col) or "").strip().lower()
            if split not in SPLIT_FOLDERS:
                raise DataError(f"{where}: split {row.get(split_col)!r} in column {split_col!r} is not one of train, "
                                "val, test (or training, valid, validation, testing)")
            first = split_of.setdefault(key, (SPLIT_FOLDERS[split], where))
            if first[0] != SPLIT_FOLDERS[split]:
                raise DataError(f"{where}: {cell} is in split {SPLIT_FOLDERS[split]!r} (column {split_col!r}), but in "
                                f"{first[0]!r} at {first[1]}: one split per image")
        found.append((key, value, where, path))
    spelt, text = {}, {}
    for key, value, _, path in found:
        spelt.setdefault(key, path)
        text[written(value)] = value
    pairs = one_label_per_id([(key, written(value), where) for key, value, where, _ in found], file, duplicate_ids,
                             passed_over)
    kept = []
    for key, value in pairs:
        path = spelt[key]
        if not os.path.isfile(path):
            passed_over.append((path, f"missing: named in {file}"))
        elif not is_image_file(os.path.basename(path)):
            passed_over.append((path, f"not an image file by its name: named in {file}"))
        else:
            kept.append((key, path, text[value]))
    splits = [split_of[key][0] for key, _, _ in kept] if split_col is not None else None
    return labelled(task, [path for _, path, _ in kept], [value for _, _, value in kept], splits, passed_over,
                         label_col, root)


def _names(cell: str, sep: str) -> list[str]:
    """The labels of one cell: split at `sep`, each stripped, empty parts left out."""
    return [label_name(part) for part in cell.split(sep) if part.strip()]


def _table_rows(file: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """The header and the rows of a CSV (a byte-order mark, spaces after commas allowed) or Parquet file, each row
    with where it is (FILE:LINE, or FILE row N)."""
    import csv

    if file.suffix.lower() in (".parquet", ".pq"):
        from finetune.errors import require_extra

        require_extra("parquet", f"dataset.table={file.name}", ("pyarrow",))
        import pyarrow.parquet as pq

        try:
            data = pq.read_table(file)
        except Exception as e:
            raise DataError(f"dataset.table={file}: not a readable Parquet file ({e})") from None
        return list(data.column_names), [(f"{file} row {i}", row) for i, row in enumerate(data.to_pylist(), start=1)]
    with open(file, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
        try:
            reader = csv.reader(f, skipinitialspace=True)
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for cells in reader:
                cells = [c.strip() for c in cells]
                if not any(cells):
                    continue
                if any(cells[len(header):]):
                    raise DataError(f"{file}:{reader.line_num}: {len(cells)} cells under a header of {len(header)} "
                                    "columns: a comma inside a cell must be quoted (\"Great Dane, large\")")
                rows.append((f"{file}:{reader.line_num}", dict(zip(header, cells))))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"dataset.table={file}: not a CSV file ({e}); a CSV or Parquet table is read") from None
    named = [h for h in header if h]  # a column without a name (pandas' index, a spreadsheet's empty ones) is not read
    if len(set(named)) != len(named):
        raise DataError(f"{file}: its header ({','.join(header)}) names a column twice")
    return named, [(where, {k: v for k, v in row.items() if k}) for where, row in rows]


def _column(file: Path, header: list[str], given: str | None, key: str, names: tuple[str, ...],
            rows: list[tuple[str, dict]], holds=None, required: bool = True, only: str | None = None) -> str | None:
    """The column for dataset.KEY: as given (it must exist), else the one named like `names`, else the only one
    whose cells all satisfy `holds`, else `only`; a DataError when none or several could be it and it is required."""
    columns = ", ".join(header)
    if given:
        if given not in header:
            raise DataError(f"{file}: no column {given!r} (dataset.{key}); its columns: {columns}")
        return given
    named = [h for h in header if h.lower() in names]
    if len(named) == 1:
        return named[0]
    if holds is not None and not named:
        named = [h for h in header if rows and all(holds(row.get(h)) for _, row in rows if row.get(h))]
        if len(named) == 1:
            return named[0]
    if not named and only is not None:
        return only
    if not required and not named:
        return None
    what = f"several could be it ({', '.join(named)})" if named else "none is named for it"
    raise DataError(f"{file}: which column is dataset.{key}? {what}; its columns: {columns}. Set "
                    f"dataset.{key}=NAME")


def _read_hf(root: str | None, **keys) -> Source:
    from finetune.data.hf import read_hf  # datasets, an optional extra, only when asked for

    return read_hf(root, **keys)


def _check_table(d, ok: Callable[[bool, str], None]) -> None:
    ok(bool(d.get("table")), "dataset=table needs dataset.table=FILE: a CSV or Parquet file of image paths and "
                             "labels (relative to dataset.root, or absolute)")
    table = Path(d.root or ".").expanduser() / Path(d.table).expanduser()
    ok(table.is_file(), f"dataset.table={d.table}: no such file ({table})")


def _check_hf(d, ok: Callable[[bool, str], None]) -> None:
    ok(bool(d.get("path")), "dataset=hf needs dataset.path=NAME_OR_DIR: a folder saved with save_to_disk, an "
                            "image folder, or a Hugging Face Hub dataset name")
    from finetune.errors import require_extra

    require_extra("hf", f"dataset.path={d.path}", ("datasets",))


@dataclass(frozen=True)
class Reader:
    """A dataset reader (dataset.name): what reads it, the tasks it reads labels of, the dataset keys of its own,
    the values of dataset.target it takes (the first is the default), whether it reads a label file (and so takes
    dataset.duplicate_ids), and the check of its own keys that the pre-flight check runs."""

    read: Callable[..., Source]
    tasks: tuple[Task, ...] = (MULTICLASS,)
    own_keys: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    label_file: bool = False
    check: Callable[..., None] | None = None


READERS: dict[str, Reader] = {
    "digits": Reader(read_digits),
    "dogs_vs_cats": Reader(read_dogs_vs_cats),
    "pet_images": Reader(read_pet_images),
    "dog_breeds": Reader(read_dog_breeds, label_file=True),
    "stanford_dogs": Reader(read_stanford_dogs),
    "cifar10": Reader(read_cifar10),
    "oxford_pets": Reader(read_oxford_pets, targets=("breed", "species"), label_file=True),
    "image_folder": Reader(read_image_folder),
    "table": Reader(read_table, tasks=tuple(TASKS.values()), label_file=True, check=_check_table,
                    own_keys=("table", "path_column", "label_column", "split_column", "label_sep", "target_column")),
    "hf": Reader(_read_hf, tasks=tuple(TASKS.values()), check=_check_hf,
                 own_keys=("path", "image_column", "label_column", "target_column")),
}


def reader_tasks(name: str) -> tuple[str, ...]:
    """The names of the tasks dataset=`name` reads labels of (every task, for a name that is no reader's: the config
    check says so on its own)."""
    reader = READERS.get(name)
    return tuple(t.name for t in (reader.tasks if reader else TASKS.values()))


def read_dataset(d, task: str | Task | None = None) -> Source:
    """read_source with the keys of a `dataset` config; `task` (task=) as given, or None: as the data says."""
    reader = READERS.get(d.name)
    return read_source(d.name, d.root, d.get("target"), duplicate_ids=d.get("duplicate_ids") or "refuse", task=task,
                       **{key: d.get(key) for key in (reader.own_keys if reader else ())})


def read_source(name: str, root: str | None, target: str | None = None, duplicate_ids: str = "refuse",
                task: str | Task | None = None, **own: str | None) -> Source:
    """Read dataset `name` from `root`, labels of `task` (given, or None: as the data says); a DataError if it has fewer
    than two classes with images (labels in use; values of the target)."""
    if name not in READERS:
        from finetune.errors import suggest

        known = ", ".join(READERS)
        raise DataError(f"dataset.name={name} has no reader; known: {known}.{suggest(name, list(READERS))}")
    reader = READERS[name]
    if target is not None and target not in reader.targets:
        options = f"one of {', '.join(reader.targets)}" if reader.targets else "not used (leave it null)"
        raise DataError(f"dataset.target={target}: for dataset={name} it is {options}")
    task = None if task is None else task_of(task)
    if task is not None and task not in reader.tasks:
        raise DataError(f"task={task}: dataset={name} reads one class per image; {task} labels are read from "
                        f"dataset=table or dataset=hf")
    options = {"target": target} if target is not None else {}
    if reader.label_file:
        options["duplicate_ids"] = duplicate_ids
    if len(reader.tasks) > 1:
        options["task"] = task
    source = reader.read(root, **options, **own)
    source.task.check_read(source, f"dataset.root={root}" if name != "hf" else f"dataset.path={own.get('path')}")
    return source
