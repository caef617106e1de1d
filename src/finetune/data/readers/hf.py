"""dataset=hf: a Hugging Face `datasets` dataset as a Source. A folder saved with `save_to_disk` is loaded with
`load_from_disk`, any other folder as an `imagefolder`, anything else as a Hub name (from the local cache with
HF_HUB_OFFLINE=1; otherwise the Hub must answer within seconds, or the run stops in one line). Images that the
dataset holds as files are read where they lie; images it holds as bytes are written once, unchanged, to a folder
of files (ROOT/.finetune-hf, or beside a saved dataset, or ~/.cache/finetune/hf), so that everything else (the
integrity scan, duplicate checks, the image cache, evaluate) reads them as it reads any dataset. Labels: a ClassLabel,
a whole number or a name per image (multiclass), a list of them (multilabel), or a number to regress; the dataset's
own train/validation/test splits are kept."""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np

from finetune.data.samples import (
    LABEL_COLUMNS,
    SPLIT_FOLDERS,
    DataError,
    Reader,
    Source,
    labelled,
)
from finetune.tasks import MULTICLASS, MULTILABEL, REGRESSION, TASKS, Task, of_target_column

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "images", "picture", "photo")
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
COMPLETE = ".complete"  # written last into a folder of extracted images: the folder is whole


def read_hf(root: str | None, path: str | None = None, image_column: str | None = None,
            label_column: str | None = None, target_column: str | None = None, task: Task | None = None) -> Source:
    """The dataset at `path` (a folder, or a Hub name), its images from `image_column` and labels from
    `label_column` (found from the features where not given) or targets from `target_column`; a DataError naming what
    is wrong. The task follows the label column's type unless `task` is given: a ClassLabel, names or whole numbers
    are multiclass, a list of them multilabel, floats (or target_column) regression."""
    from finetune.errors import require_extra

    if not path:
        raise DataError("dataset=hf needs dataset.path: a folder saved with save_to_disk, an image folder, or a "
                        "Hugging Face Hub dataset name")
    require_extra("hf", f"dataset.path={path}", ("datasets",))
    splits = _load(path)
    first = next(iter(splits.values()))
    image_col = _image_column(first, image_column, path)
    if target_column is not None:
        task = of_target_column(task, target_column)
        label_col = _label_column(first, target_column, image_col, path, key="target_column")
    else:
        label_col = _label_column(first, label_column, image_col, path, task=task)
    inferred, names, holds = _kind(first, label_col, path, task)
    if task is None and holds:
        log.info("task=%s (inferred): column %r of dataset.path=%s holds %s", inferred, label_col, path, holds)
    task = task or inferred
    folder = _images_folder(root, path)
    paths, values, split_names, passed_over = [], [], [], []
    official = len(splits) > 1 or next(iter(splits)) not in ("train",)
    for split_name, data in splits.items():
        split = SPLIT_FOLDERS.get(split_name.lower())
        where = f"{path}[{split_name}]"
        if split is None or label_col not in data.column_names:
            why = ("a split that is none of train, validation, test" if split is None else
                   f"a split without the label column {label_col!r} (unlabelled)")
            log.warning("dataset.path=%s: %s is %s: left out", path, split_name, why)
            passed_over.append((where, why))
            continue
        files = _image_files(data, image_col, folder / _fingerprint(data) / split_name, where, passed_over)
        for i, (file, label) in enumerate(zip(files, data[label_col])):
            if file is None:
                continue
            value, why = task.read_cell(label, label_col, f"{where} row {i}", names=names)
            if why is not None:
                passed_over.append((file, why))
                continue
            paths.append(file)
            values.append(value)
            split_names.append(split)
    if official and "train" not in split_names:
        raise DataError(f"dataset.path={path}: none of its splits ({', '.join(splits)}) is a labelled train split: "
                        "nothing to learn from")
    source = labelled(task, paths, values, split_names if official else None, passed_over, label_col, path)
    if task.one_class_per_image and names is not None:  # a ClassLabel's classes in its own order, images or not
        index = {name: i for i, name in enumerate(names)}
        source.labels = np.array([index[source.classes[y]] for y in source.labels], dtype=np.int64)
        source.classes = list(names)
    return source


def _load(path: str) -> dict:
    """{split name: Dataset} of the dataset at `path`."""
    import datasets

    folder = Path(path).expanduser()
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
        elif folder.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))
        else:
            from finetune.models.backbone import hub_unavailable

            why = None if datasets.config.HF_HUB_OFFLINE else hub_unavailable()
            if why:
                raise DataError(f"dataset.path={path}: no such folder, and as a Hub dataset it cannot be downloaded "
                                f"({why}): run with HF_HUB_OFFLINE=1 to use the local cache, or give the folder of "
                                "a dataset saved with save_to_disk")
            try:
                loaded = datasets.load_dataset(path)
            except Exception:
                if not datasets.config.HF_HUB_OFFLINE:
                    raise
                raise DataError(f"dataset.path={path}: no such folder, and as a Hub dataset it is not in the local "
                                "cache (offline: HF_HUB_OFFLINE is set): run once with the network to cache it, or "
                                "give the folder of a dataset saved with save_to_disk") from None
    except DataError:
        raise
    except Exception as e:  # datasets' own errors: not found, not cached offline, not a dataset folder
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset.path={path}: cannot be loaded as a Hugging Face dataset ({text[:300]})") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _image_column(data, given: str | None, path: str) -> str:
    from datasets import Image

    columns = ", ".join(data.column_names)
    if given:
        if given not in data.column_names:
            raise DataError(f"dataset.path={path}: no column {given!r} (dataset.image_column); its columns: {columns}")
        return given
    found = [c for c, f in data.features.items() if isinstance(f, Image)] or \
        [c for c in data.column_names if c.lower() in IMAGE_COLUMNS]
    if len(found) != 1:
        what = f"several could be it ({', '.join(found)})" if found else "none holds images"
        raise DataError(f"dataset.path={path}: which column is dataset.image_column? {what}; its columns: {columns}")
    return found[0]


def _label_column(data, given: str | None, image_col: str, path: str, key: str = "label_column",
                  task: Task | None = None) -> str:
    """The column of labels: as given, else the ClassLabel one (a list of ClassLabels first for task=multilabel, last
    otherwise), else one named like a label column, else the only column beside the images."""
    from datasets import ClassLabel

    columns = ", ".join(data.column_names)
    if given:
        if given not in data.column_names:
            raise DataError(f"dataset.path={path}: no column {given!r} (dataset.{key}); its columns: {columns}")
        return given
    single = [c for c, f in data.features.items() if isinstance(f, ClassLabel)]
    lists = [c for c, f in data.features.items() if isinstance(getattr(f, "feature", None), ClassLabel)]
    found = (lists or single if task == MULTILABEL else single or lists) or \
        [c for c in data.column_names if c.lower() in (*LABEL_COLUMNS, "labels")]
    rest = [c for c in data.column_names if c != image_col]
    if not found and len(rest) == 1:
        found = rest
    if len(found) != 1:
        what = f"several could be it ({', '.join(found)})" if found else "none is named for it"
        raise DataError(f"dataset.path={path}: which column is dataset.label_column? {what}; its columns: {columns}")
    return found[0]


def _kind(data, label_col: str, path: str, task: Task | None) -> tuple[Task, list[str] | None, str | None]:
    """The task the label column's type says (a list of labels: multilabel; floats: regression; else multiclass), its
    ClassLabel's names (or None: names or numbers written in the rows) and what the column holds where that made the
    task another than one class per image; a DataError for a column of another kind, or one that cannot hold `task`'s
    labels."""
    from datasets import ClassLabel, Value

    feature = data.features[label_col]
    inner = getattr(feature, "feature", None)  # Sequence / List of labels
    if inner is not None and not isinstance(feature, (Value, ClassLabel)):
        if task not in (None, MULTILABEL):
            raise DataError(f"dataset.path={path}: column {label_col!r} holds several labels per image, and "
                            f"task={task}: give task=multilabel (or leave task out)")
        if isinstance(inner, ClassLabel):
            return MULTILABEL, list(inner.names), "lists of labels"
        if isinstance(inner, Value) and inner.dtype.startswith(("int", "uint", "string", "large_string")):
            return MULTILABEL, None, "lists of labels"
        raise DataError(f"dataset.path={path}: column {label_col!r} holds lists of {inner}: a list of class names or "
                        "numbers per image is read")
    if isinstance(feature, ClassLabel):
        if task == REGRESSION:
            raise DataError(f"dataset.path={path}: column {label_col!r} holds classes (a ClassLabel), and "
                            "task=regression: name a column of numbers with dataset.target_column")
        return task or MULTICLASS, list(feature.names), None
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint", "float", "string", "large_string",
                                                               "bool")):
        fractional = feature.dtype.startswith("float") and _fractional(data[label_col])
        return task or (REGRESSION if fractional else MULTICLASS), None, "fractional numbers" if fractional else None
    raise DataError(f"dataset.path={path}: column {label_col!r} holds {feature}: class names or numbers, lists of them "
                    "(multilabel) or numbers to regress are read")


def _fractional(values) -> bool:
    return any(isinstance(v, float) and math.isfinite(v) and v != int(v) for v in values)


def _fingerprint(data) -> str:
    return str(getattr(data, "_fingerprint", "") or "unknown")[:32]


def _images_folder(root: str | None, path: str) -> Path:
    """Where images held as bytes are written: ROOT/.finetune-hf, beside a saved dataset, or the user's cache."""
    if root:
        return Path(root).expanduser() / ".finetune-hf"
    folder = Path(path).expanduser()
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder / ".finetune-hf"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune" / "hf"


def _image_files(data, image_col: str, folder: Path, where: str, passed_over: list) -> list[str | None]:
    """A file per row: where the dataset's image lies, or the file its bytes were written to (once: a folder marked
    complete is reused); None, and a row in `passed_over`, for a row without an image."""
    from datasets import Image

    feature = data.features[image_col]
    if not isinstance(feature, Image) and getattr(feature, "dtype", None) not in ("string", "large_string", "binary",
                                                                                   "large_binary"):
        raise DataError(f"{where}: column {image_col!r} holds {type(feature).__name__} values, not one image per row "
                        "(an Image feature, a file path, or encoded bytes)")
    cells = data.cast_column(image_col, Image(decode=False))[image_col]
    complete = (folder / COMPLETE).is_file()
    files: list[str | None] = []
    written = 0
    for i, cell in enumerate(cells):
        source = (cell or {}).get("path")
        data_bytes = (cell or {}).get("bytes")
        if not data_bytes and source and os.path.isfile(source):
            files.append(os.path.abspath(source))
            continue
        if not data_bytes:
            files.append(None)
            passed_over.append((f"{where} row {i}", f"missing: {source}" if source else "no image in the row"))
            continue
        file = folder / f"{i:08d}{_extension(data_bytes)}"
        if not complete or not file.is_file():  # a file removed since is written again
            folder.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data_bytes)
            tmp.replace(file)
            written += 1
        files.append(str(file))
    if written:
        (folder / COMPLETE).write_text("")
        log.info("%s: %s images written once as files to %s", where, f"{written:,}", folder)
    return files


def _extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their header (not decoded); '.png' when unknown."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return FORMATS.get(image.format or "", ".png")
    except (UnidentifiedImageError, OSError):
        return ".png"  # the integrity scan reports it as not an image


def _check_hf(d, ok) -> None:
    ok(bool(d.get("path")), "dataset=hf needs dataset.path=NAME_OR_DIR: a folder saved with save_to_disk, an "
                            "image folder, or a Hugging Face Hub dataset name")
    from finetune.errors import require_extra

    require_extra("hf", f"dataset.path={d.path}", ("datasets",))


READERS = {
    "hf": Reader(read_hf, tasks=tuple(TASKS.values()), check=_check_hf,
                 own_keys=("path", "image_column", "label_column", "target_column")),
}
