"""dataset=hf: a Hugging Face dataset saved with save_to_disk (images held as bytes), an image folder read by
`imagefolder`, a Hub name without a network, and labels of kinds not read yet: each as a user runs it."""

import csv
import json

import pytest
from support import FAST, closed_port, run_script
from support.recipes import FROM_SCRATCH, assert_above_chance, assert_agree

from finetune.data.readers import DataError, read_source

pytest.importorskip("datasets")  # the hf extra: the dev group installs it

MARGIN = 5  # test images above chance (8 of 24) for FROM_SCRATCH. Measured over 4 arithmetics x 3 seeds
# (benchmarks/arithmetics.py): +9 to +15, median +13.5


def saved_dataset(shapes, folder):
    """`shapes` as a DatasetDict (train: 32 images per class, test: 8) holding each image's bytes, saved to
    `folder` with save_to_disk; {split: [(bytes, class name)]}."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    classes = sorted(p.name for p in shapes.iterdir() if p.is_dir())
    rows = {"train": [], "test": []}
    for name in classes:
        for i, image in enumerate(sorted((shapes / name).glob("*.jpg"))):
            rows["train" if i < 32 else "test"].append((image.read_bytes(), name))
    features = Features({"image": Image(), "label": ClassLabel(names=classes)})
    DatasetDict({split: Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in r],
                                           "label": [classes.index(n) for _, n in r]}, features=features)
                 for split, r in rows.items()}).save_to_disk(str(folder))
    return rows


@pytest.mark.learning
def test_train_script_learns_from_a_saved_dataset_keeps_its_splits_and_evaluate_agrees(tmp_path, shapes):
    rows = saved_dataset(shapes, tmp_path / "saved")
    result = run_script("train", "dataset=hf", f"dataset.path={tmp_path / 'saved'}", *FROM_SCRATCH, cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    split = list(csv.DictReader(open(run_dir / "split.csv")))
    tested = [r for r in split if r["split"] == "test"]
    assert sorted((open(r["path"], "rb").read(), r["label"]) for r in tested) == sorted(rows["test"])  # kept as given
    assert all(r["path"].startswith(str(tmp_path / "saved" / ".finetune-hf")) for r in split)  # the bytes, as files
    assert len([r for r in split if r["split"] != "test"]) == len(rows["train"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 24
    assert_above_chance(metrics, margin=MARGIN, classes=3)  # learnt from the labels as read
    result = run_script("evaluate", f"ckpt={run_dir}", "num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    evaluated = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert evaluated["images"] == 24
    assert_agree(evaluated["accuracy"], metrics["test/acc"], images=24)


def test_an_image_folder_is_read_where_its_files_lie(tmp_path, shapes, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    source = read_source("hf", None, path=str(shapes))
    expected = read_source("image_folder", str(shapes))
    assert source.classes == expected.classes and source.splits is None
    assert sorted(zip(source.paths, [source.classes[k] for k in source.labels])) == \
        sorted(zip(expected.paths, [expected.classes[k] for k in expected.labels]))  # no copies: the files


def test_a_hub_name_without_a_network_is_one_line_and_label_types_say_the_task(tmp_path, shapes, monkeypatch):
    import datasets

    result = run_script("train", "dataset=hf", "dataset.path=someone/beans", *FAST, cwd=tmp_path)  # HF_HUB_OFFLINE=1
    assert result.returncode == 2, result.output[-2000:]
    assert "dataset.path=someone/beans: no such folder, and as a Hub dataset it is not in the local cache (offline: " \
           "HF_HUB_OFFLINE is set)" in result.output.strip().splitlines()[-1] and "Traceback" not in result.output
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online, but the Hub does not answer
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(DataError, match=r"dataset.path=someone/beans: no such folder, and as a Hub dataset it cannot "
                                        r"be downloaded \(127.0.0.1 is unreachable.*HF_HUB_OFFLINE=1"):
        read_source("hf", None, path="someone/beans")

    from datasets import Dataset, Image, Sequence, Value

    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted((shapes / "red").glob("*.jpg"))[:4]]
    several = Sequence(Value("string"))
    Dataset.from_dict({"image": images, "target": [["a", "b"], ["a"], ["b"], []]},
                      features=datasets_features(Image(), several)).save_to_disk(str(tmp_path / "multi"))
    multi = read_source("hf", None, path=str(tmp_path / "multi"))  # lists of labels: multilabel
    assert multi.task.name == "multilabel" and multi.classes == ["a", "b"] and len(multi) == 3
    assert multi.targets.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert multi.passed_over[-1][1] == "no label in column 'target'"
    with pytest.raises(DataError, match="column 'target' holds several labels per image, and task=multiclass: give "
                                        "task=multilabel"):
        read_source("hf", None, path=str(tmp_path / "multi"), task="multiclass")
    Dataset.from_dict({"image": images, "target": [1.0, 0.5, 2.0, 1.0]},
                      features=datasets_features(Image(), Value("float64"))).save_to_disk(str(tmp_path / "fraction"))
    fraction = read_source("hf", None, path=str(tmp_path / "fraction"))  # fractional numbers: regression
    assert fraction.task.name == "regression" and fraction.targets.tolist() == [1.0, 0.5, 2.0, 1.0]
    with pytest.raises(DataError, match=r"\[train\] row 1: label 0.5 in column 'target' is not a whole number"):
        read_source("hf", None, path=str(tmp_path / "fraction"), task="multiclass")
    result = run_script("train", "dataset=hf", *FAST, cwd=tmp_path)
    assert result.returncode == 2 and "dataset=hf needs dataset.path=NAME_OR_DIR" in result.output


def datasets_features(image, target):
    from datasets import Features

    return Features({"image": image, "target": target})


def test_unlabelled_rows_and_splits_are_left_out_and_labels_are_read_as_the_table_reads_them(tmp_path, shapes):
    """-1 is a ClassLabel's "no label" (it indexed the last class); a test split without the label column is
    unlabelled (it stopped the run); names are stripped and numbers written plainly, as dataset=table reads them."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted((shapes / "red").glob("*.jpg"))[:6]]
    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog"])})
    DatasetDict({"train": Dataset.from_dict({"image": images, "label": [0, 1, -1, 0, 1, 0]}, features=features),
                 "test": Dataset.from_dict({"image": images[:2]}, features=Features({"image": Image()}))}
                ).save_to_disk(str(tmp_path / "a"))
    source = read_source("hf", None, path=str(tmp_path / "a"))
    assert source.classes == ["cat", "dog"] and [source.classes[k] for k in source.labels] == ["cat", "dog", "cat",
                                                                                              "dog", "cat"]
    assert any(reason == "no label in column 'label'" for _, reason in source.passed_over)
    assert (f"{tmp_path / 'a'}[test]", "a split without the label column 'label' (unlabelled)") in source.passed_over
    Dataset.from_dict({"image": images, "label": [" 01", "1", "2", "2 ", "10", "1"]},
                      features=Features({"image": Image(), "label": Value("string")})).save_to_disk(str(tmp_path / "b"))
    source = read_source("hf", None, path=str(tmp_path / "b"))
    assert source.classes == ["1", "2", "10"] and list(source.labels) == [0, 0, 1, 1, 2, 0]
