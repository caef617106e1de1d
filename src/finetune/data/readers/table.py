"""dataset=table: a CSV or Parquet file of image paths and labels, of any task: one class, several labels or a
number per image."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from pathlib import Path

from finetune.data.samples import (
    LABEL_COLUMNS,
    SPLIT_FOLDERS,
    DataError,
    Reader,
    Source,
    is_image_file,
    is_number,
    label_name,
    labelled,
    one_label_per_id,
    require_dir,
    written,
)
from finetune.tasks import MULTICLASS, MULTILABEL, TASKS, Task, of_target_column, task_of

log = logging.getLogger("finetune.data.readers")


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


def _check_table(d, ok: Callable[[bool, str], None]) -> None:
    ok(bool(d.get("table")), "dataset=table needs dataset.table=FILE: a CSV or Parquet file of image paths and "
                             "labels (relative to dataset.root, or absolute)")
    table = Path(d.root or ".").expanduser() / Path(d.table).expanduser()
    ok(table.is_file(), f"dataset.table={d.table}: no such file ({table})")


READERS = {
    "table": Reader(read_table, tasks=tuple(TASKS.values()), label_file=True, check=_check_table,
                    own_keys=("table", "path_column", "label_column", "split_column", "label_sep", "target_column")),
}
