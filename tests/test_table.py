"""dataset=table: image paths and labels from a CSV or Parquet table, its split column kept, bad rows skipped and
listed, bad tables one line naming the file, the row and the column."""

import csv
import json

import pytest
from support import FAST, run_script
from support.recipes import FROM_SCRATCH, assert_above_chance, assert_agree

from finetune.data.readers import DataError, read_source

MARGIN = 5  # test images above chance (8 of 24) for FROM_SCRATCH. Measured over 4 arithmetics x 3 seeds
# (benchmarks/arithmetics.py): +8 to +16, median +13


def table_rows(shapes):
    """(path relative to the root, label, split) for every image of `shapes`: 24 train, 8 val, 8 test per class."""
    rows = []
    for folder in sorted(p for p in shapes.iterdir() if p.is_dir()):
        for i, image in enumerate(sorted(folder.glob("*.jpg"))):
            split = "train" if i < 24 else "val" if i < 32 else "test"
            rows.append((str(image.relative_to(shapes)), folder.name, split))
    return rows


def write_csv(path, header, rows, bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write(", ".join(header) + "\n")  # spaces after the commas, as spreadsheets write them
        for row in rows:
            f.write(", ".join(row) + "\n")
    return path


@pytest.mark.learning
def test_train_script_learns_from_a_csv_table_keeps_its_split_and_lists_the_bad_rows(tmp_path, shapes):
    rows = table_rows(shapes)
    bad = [("red/no-such-file.jpg", "red", "train"), ("green/0000.jpg", "", "train")]
    table = write_csv(tmp_path / "labels.csv", ["image", "label", "split"], rows + bad + [rows[0]], bom=True)
    result = run_script("train", "dataset=table", f"dataset.root={shapes}", f"dataset.table={table}", *FROM_SCRATCH,
                        cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    split = {r["path"]: (r["label"], r["split"]) for r in csv.DictReader(open(run_dir / "split.csv"))}
    assert split == {str(shapes / p): (label, s) for p, label, s in rows}  # the table's labels and splits, as given
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(run_dir / "skipped.csv"))}
    assert skipped[str(shapes / "red" / "no-such-file.jpg")] == f"missing: named in {table}"
    assert skipped[f"{table}:{len(rows) + 3}"] == "no label in column 'label'"
    assert skipped[f"{table}:{len(rows) + 4}"].startswith(f"id {shapes / rows[0][0]} again")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 24
    assert_above_chance(metrics, margin=MARGIN, classes=3)  # learnt from the labels as read
    result = run_script("evaluate", f"ckpt={run_dir}", "num_workers=0", cwd=tmp_path)  # reads the table again
    assert result.returncode == 0, result.output[-3000:]
    evaluated = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert evaluated["images"] == 24
    assert_agree(evaluated["accuracy"], metrics["test/acc"], images=24)


def test_a_parquet_table_with_class_numbers_and_named_columns(tmp_path, shapes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = table_rows(shapes)
    names = sorted({label for _, label, _ in rows})
    pq.write_table(pa.table({"id": list(range(len(rows))), "file": [str(shapes / p) for p, _, _ in rows],
                             "y": [names.index(label) for _, label, _ in rows]}), tmp_path / "t.parquet")
    source = read_source("table", str(shapes), table=str(tmp_path / "t.parquet"), label_column="y")
    assert source.classes == ["0", "1", "2"] and source.splits is None  # no split column: the run splits it
    assert [source.classes[k] for k in source.labels] == [str(names.index(label)) for _, label, _ in rows]
    with pytest.raises(DataError, match=r"which column is dataset.label_column\? none is named for it; its columns: "
                                        r"id, file, y. Set dataset.label_column=NAME"):
        read_source("table", str(shapes), table=str(tmp_path / "t.parquet"))


@pytest.mark.parametrize("case, message", [
    ("missing column", "labels.csv: no column 'klass' (dataset.label_column); its columns: image, label, split"),
    ("unknown split", "labels.csv:3: split 'dev' in column 'split' is not one of train, val, test"),
    ("two labels", "labels.csv gives 1 ids more than one label"),
    ("mixed types", "labels.csv: column 'label' mixes numbers (/"),
    ("fraction", "labels.csv:2: label 0.5 in column 'label' is not a whole number"),
])
def test_a_bad_table_is_one_line_naming_the_file_row_and_column(tmp_path, shapes, case, message):
    every = table_rows(shapes)
    rows = [list(r) for r in every[:3] + every[40:43]]  # two classes
    extra = []
    if case == "unknown split":
        rows[1][2] = "dev"
    elif case == "two labels":
        extra = [[rows[0][0], rows[3][1], "train"]]
    elif case == "mixed types":
        rows[3][1] = "7"
    elif case == "fraction":
        for row in rows:
            row[1] = "0.5"
    write_csv(tmp_path / "labels.csv", ["image", "label", "split"], [*rows, *extra])
    overrides = ["dataset.label_column=klass"] if case == "missing column" else []
    result = run_script("train", "dataset=table", f"dataset.root={shapes}", "dataset.table=" +
                        str(tmp_path / "labels.csv"), *FAST, *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.output[-2000:]
    assert message in result.output.strip().splitlines()[-1] and "Traceback" not in result.output  # its last line


def test_table_keys_are_checked_before_any_work(tmp_path, shapes):
    result = run_script("train", "dataset=table", f"dataset.root={shapes}", cwd=tmp_path)
    assert result.returncode == 2 and "dataset=table needs dataset.table=FILE" in result.output
    result = run_script("train", "dataset=table", f"dataset.root={shapes}", "dataset.table=nope.csv", cwd=tmp_path)
    assert result.returncode == 2 and f"dataset.table=nope.csv: no such file ({shapes / 'nope.csv'})" in result.output
    result = run_script("train", "dataset=image_folder", f"dataset.root={shapes}", "dataset.table=x.csv",
                        cwd=tmp_path)
    assert result.returncode == 2 and "dataset.table is for dataset=table" in result.output


def test_one_file_however_spelt_a_class_without_images_and_what_spreadsheets_write(tmp_path, shapes, monkeypatch):
    """Found by an adversarial read: with a relative root the same file under two spellings was two samples; a
    class whose only file is missing stayed a class; pandas' index column was refused; a file in two splits kept its
    first silently; an unquoted comma cut the label short silently."""
    rows = table_rows(shapes)
    monkeypatch.chdir(shapes.parent)
    relative = shapes.name
    first = rows[0][0]
    write_csv(tmp_path / "t.csv", ["", "path", "label"],  # pandas' to_csv: an unnamed index column first
              [[str(i), p, label] for i, (p, label, _) in enumerate(rows)] +
              [["900", str(shapes / first), "red"], ["901", "ghost/none.jpg", "ghost"]])
    with pytest.raises(DataError, match=r"gives 1 ids more than one label"):  # ./x and /abs/x are one file
        read_source("table", relative, table=str(tmp_path / "t.csv"))
    write_csv(tmp_path / "t.csv", ["", "path", "label"], [[str(i), p, label] for i, (p, label, _) in enumerate(rows)]
              + [["901", "ghost/none.jpg", "ghost"]])
    source = read_source("table", relative, table=str(tmp_path / "t.csv"))
    assert "ghost" not in source.classes and len(source) == len(rows)  # no class without images
    write_csv(tmp_path / "s.csv", ["path", "label", "split"], [*rows, ("./" + first, rows[0][1], "test")])
    with pytest.raises(DataError, match=r"s.csv:122: \./.* is in split 'test' \(column 'split'\), but in 'train' at "
                                        r".*s.csv:2: one split per image"):
        read_source("table", relative, table=str(tmp_path / "s.csv"))
    (tmp_path / "c.csv").write_text("path,label\n" + f"{first},Great Dane, large\n")
    with pytest.raises(DataError, match=r"c.csv:2: 3 cells under a header of 2 columns: a comma inside a cell must be "
                                        "quoted"):
        read_source("table", relative, table=str(tmp_path / "c.csv"))
