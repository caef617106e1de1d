"""Datasets as real downloads and real folders leave them: links and loops, FIFOs, Excel's label files, duplicate ids,
subsets of Oxford-IIIT Pet, an unlabelled test/ folder beside the classes, files that break during training, a
dataset moved since training. Each image is read once, under its own class, or reported."""

import csv
import os
import shutil
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from support import FAST, compose, skipped
from support.fabricate import make_dog_breeds, make_image_folder, make_oxford_pets

from finetune.data.datamodule import ImageDataModule
from finetune.data.readers import DataError, read_source
from finetune.data.transforms import Preprocessing
from finetune.evaluate import evaluation_set

PRE = Preprocessing(image_size=32, crop_pct=1.0, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)


@contextmanager
def within(seconds):
    """A hang (a walk that loops, a FIFO opened for reading) fails the test instead of stopping the suite."""
    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def datamodule(tmp_path, *overrides):
    cfg = compose(tmp_path / "run", *FAST, *overrides)
    data = ImageDataModule(cfg.dataset, cfg.augment, PRE, cfg.seed, tmp_path / "run")
    data.setup()
    return data


def test_links_loops_and_fifos_in_an_image_folder_read_each_real_file_once_under_its_own_class(tmp_path):
    root = make_image_folder(tmp_path / "alpacas", {"alpaca": "red", "not alpaca": "blue"}, per_class=30)
    os.symlink("..", root / "alpaca" / "loop")  # the whole dataset again, below alpaca/
    os.symlink("../alpaca", root / "not alpaca" / "loop")  # a second loop: the two together hung the walk
    os.symlink("../not alpaca/0001.jpg", root / "alpaca" / "link.jpg")  # a file of the other class
    os.link(root / "alpaca" / "0002.jpg", root / "alpaca" / "hard.jpg")  # the same file under two names
    os.mkfifo(root / "alpaca" / "pipe.jpg")  # opening it for reading would wait for a writer for ever
    os.symlink("../missing.jpg", root / "alpaca" / "broken.jpg")
    outside = make_image_folder(tmp_path / "more", {"alpaca": "red"}, per_class=4) / "alpaca"
    os.symlink(outside, root / "alpaca" / "more")  # a folder outside the dataset: its images are this class's
    os.symlink(root / "alpaca" / "more", root / "alpaca" / "more again")  # and the same folder once more
    with within(60):
        source = read_source("image_folder", str(root))
    counts = dict(zip(source.classes, np.bincount(source.labels).tolist()))
    assert counts == {"alpaca": 34, "not alpaca": 30}
    for path, label in zip(source.paths, source.labels):
        real = os.path.realpath(path)
        expected = "alpaca" if real.startswith(str(outside)) else os.path.basename(os.path.dirname(real))
        assert source.classes[label] == expected, path
    assert len({os.path.realpath(p) for p in source.paths}) == len(source) == 64
    reasons = dict(source.passed_over)
    assert "not a regular file" in reasons[str(root / "alpaca" / "pipe.jpg")]
    assert "taken there" in reasons[str(root / "alpaca" / "link.jpg")]
    assert "the same file as" in reasons[str(root / "alpaca" / "hard.jpg")]
    assert "broken link" in reasons[str(root / "alpaca" / "broken.jpg")]
    assert "not followed" in reasons[str(root / "alpaca" / "loop")]
    assert "not followed" in reasons[str(root / "alpaca" / "more again")]


def test_a_fifo_named_like_an_image_in_any_dataset_is_skipped_by_the_scan_unopened(tmp_path):
    from finetune.data.integrity import scan

    root = make_image_folder(tmp_path / "d", {"a": "red"}, per_class=2)
    os.mkfifo(root / "a" / "pipe.jpg")
    with within(60):
        result = scan([str(root / "a" / "0000.jpg"), str(root / "a" / "pipe.jpg")], root, 10**8)
    assert result.bad == [(str(root / "a" / "pipe.jpg"), "not a regular file (a FIFO, device or socket): not opened")]


def test_an_unlabelled_test_folder_beside_the_classes_is_no_class(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"cat": "red", "dog": "blue"}, per_class=8)
    make_image_folder(tmp_path / "unlabelled", {"x": "green"}, per_class=5)
    shutil.move(tmp_path / "unlabelled" / "x", root / "test")  # Kaggle's unlabelled test images, no classes
    source = read_source("image_folder", str(root))
    assert source.classes == ["cat", "dog"] and len(source) == 16
    assert "test/ is named like a split and holds no class folders" in caplog.text
    assert dict(source.passed_over)[str(root / "test")].startswith("unlabelled folder")


def test_a_split_folder_with_classes_beside_class_folders_is_refused_saying_how_to_lay_it_out(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": "red", "dog": "blue"}, per_class=4)
    make_image_folder(root / "test", {"cat": "red", "dog": "blue"}, per_class=2)
    with pytest.raises(DataError, match=r"mixes class folders .* put the class folders in .*/train/"):
        read_source("image_folder", str(root))


def test_a_class_only_in_the_test_folder_is_warned_about_before_training(tmp_path, caplog):
    make_image_folder(tmp_path / "d" / "train", {"cat": "red", "dog": "blue"}, per_class=6)
    make_image_folder(tmp_path / "d" / "test", {"cat": "red", "dog": "blue", "fox": "green"}, per_class=2)
    data = datamodule(tmp_path, "dataset=image_folder", f"dataset.root={tmp_path / 'd'}")
    assert data.classes == ["cat", "dog", "fox"]
    assert "class 'fox' has no training images (only 2 in test/)" in caplog.text


def test_labels_csv_from_excel_with_a_bom_and_spaces_after_the_commas_reads_clean_class_names(tmp_path):
    root = make_dog_breeds(tmp_path / "breeds", {"beagle": "red", "pug": "blue"}, per_breed=4, missing=0)
    rows = list(csv.reader(open(root / "labels.csv")))
    text = "\n".join(", ".join(row) for row in rows) + "\n\n"  # "id, breed" and a blank line at the end
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    source = read_source("dog_breeds", str(root))
    assert source.classes == ["beagle", "pug"] and len(source) == 8


def test_labels_csv_giving_one_id_two_breeds_is_refused_naming_it_or_keeps_the_first(tmp_path):
    root = make_dog_breeds(tmp_path / "breeds", {"beagle": "red", "pug": "blue"}, per_breed=4, missing=0)
    rows = list(csv.DictReader(open(root / "labels.csv")))
    twice = next(r["id"] for r in rows if r["breed"] == "beagle")
    with open(root / "labels.csv", "a") as f:
        f.write(f"{twice},pug\n{rows[-1]['id']},{rows[-1]['breed']}\n")  # a conflict, and a harmless repeat
    with pytest.raises(DataError, match=rf"gives 1 ids more than one label \({twice}: beagle, pug\).*"
                                        "dataset.duplicate_ids=first"):
        read_source("dog_breeds", str(root))
    source = read_source("dog_breeds", str(root), duplicate_ids="first")
    assert len(source) == 8 and len(set(source.paths)) == 8
    label = source.labels[source.paths.index(str(root / "train" / f"{twice}.jpg"))]
    assert source.classes[label] == "beagle"
    reasons = [reason for _, reason in source.passed_over]
    assert sum("but 'beagle'" in r for r in reasons) == 1
    assert sum(" again, as at " in r and "labels.csv:" in r for r in reasons) == 1


def test_duplicate_ids_is_checked_with_the_other_keys(tmp_path):
    from finetune.checks import validate
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset.duplicate_ids must be one of refuse, first"):
        validate(compose(tmp_path / "run", "dataset.duplicate_ids=last"))


def test_an_oxford_pets_subset_gets_dense_labels_and_its_missing_images_are_reported(tmp_path):
    breeds = {"Abyssinian": (1, "red"), "american_bulldog": (2, "blue"), "Bengal": (1, "yellow"),
              "beagle": (2, "green"), "Birman": (1, "red"), "boxer": (2, "blue")}
    root = make_oxford_pets(tmp_path / "pets", breeds, per_breed=6)
    annotations = root / "oxford-iiit-pet" / "annotations"
    images = root / "oxford-iiit-pet" / "images"
    for file in ("trainval.txt", "test.txt"):  # keep the breeds with class ids 1, 2 and 6
        lines = (annotations / file).read_text().splitlines()
        (annotations / file).write_text("\n".join(x for x in lines if x.split()[1] in ("1", "2", "6")) + "\n")
    (images / "boxer_1.jpg").unlink()
    (images / "boxer_2.jpg").unlink()
    Image.open(images / "Abyssinian_1.jpg").save(images / "Abyssinian_1.gif")
    os.replace(images / "Abyssinian_1.gif", images / "Abyssinian_1.jpg")  # a GIF under a .jpg name
    Image.open(images / "Abyssinian_2.jpg").save(images / "Abyssinian_2.png")
    os.replace(images / "Abyssinian_2.png", images / "Abyssinian_2.jpg")
    (images / "Abyssinian_3.mat").write_bytes(b"MATLAB 5.0")  # as in the real images.tar.gz
    data = datamodule(tmp_path, "dataset=oxford_pets", f"dataset.root={root}")
    assert data.classes == ["Abyssinian", "American Bulldog", "Boxer"]
    assert np.bincount(data.source.labels).tolist() == [6, 6, 4]
    missing = [p for p, r in skipped(tmp_path / "run").items() if r == "missing: named in the annotations"]
    assert sorted(os.path.basename(p) for p in missing) == ["boxer_1.jpg", "boxer_2.jpg"]
    species = read_source("oxford_pets", str(root), "species")
    assert species.classes == ["Cat", "Dog"] and np.bincount(species.labels).tolist() == [6, 10]


def test_a_file_that_fails_while_training_is_reported_once_in_skipped_csv_and_skipped_after(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"a": "red", "b": "blue"}, per_class=8)
    data = datamodule(tmp_path, "dataset=image_folder", f"dataset.root={root}")
    train = data.dataset("train")
    victim = data.source.paths[train.indices[0]]
    original = open(victim, "rb").read()
    open(victim, "wb").close()  # emptied after the integrity scan
    for _ in range(3):  # three epochs
        images = [train[i][0] for i in range(len(train))]
    assert all(image.shape == (3, 32, 32) for image in images)
    assert caplog.text.count(f"Could not load {victim}") == 1
    rows = [(p, r) for p, r in skipped(tmp_path / "run").items() if p == victim]
    assert rows == [(victim, "failed while training: empty file")]
    val = data.dataset("val")  # the other splits' datasets share what failed
    assert val.failed is train.failed and bool(train.failed[data.indices("train")[0]])
    # resumed (the run's own split.csv, its folder) once the file reads again (a network disk that came back): the
    # scan rewrites skipped.csv and keeps what training found
    open(victim, "wb").write(original)
    data = datamodule(tmp_path, "dataset=image_folder", f"dataset.root={root}",
                      f"dataset.split_file={tmp_path / 'run' / 'split.csv'}")
    assert (victim, "failed while training: empty file") in skipped(tmp_path / "run").items()


def test_evaluate_reads_a_moved_dataset_from_its_new_folder(tmp_path, shapes):
    from omegaconf import OmegaConf

    from finetune.data.splits import write_split

    old = tmp_path / "old" / "shapes"
    shutil.copytree(shapes, old)
    source = read_source("image_folder", str(old))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = np.array(["train", "val", "test"] * (len(source) // 3) + ["train"] * (len(source) % 3))
    write_split(run_dir / "split.csv", source.paths, [source.classes[y] for y in source.labels], splits)
    OmegaConf.save({"dataset": {"name": "image_folder", "root": str(old)}}, run_dir / "config.yaml")
    new = tmp_path / "new" / "shapes"
    shutil.move(old, new)
    cfg = OmegaConf.create({"ckpt": str(run_dir / "best.ckpt"), "split": "test", "max_pixels": 10**8,
                            "num_workers": 0, "root": None})
    with pytest.raises(DataError, match="not in .* any more: if the dataset moved, give its new folder with root=DIR"):
        evaluation_set(cfg, source.classes, run_dir, tmp_path)
    cfg.root = str(new)
    moved, indices, _ = evaluation_set(cfg, source.classes, run_dir, tmp_path)
    assert len(indices) == (splits == "test").sum()
    assert all(p.startswith(str(new) + "/") and os.path.isfile(p) for p in moved.paths)


def test_a_file_linked_into_two_split_folders_is_taken_once(tmp_path):
    make_image_folder(tmp_path / "d" / "train", {"cat": "red", "dog": "blue"}, per_class=6)
    make_image_folder(tmp_path / "d" / "test", {"cat": "red", "dog": "blue"}, per_class=2, seed=5)
    os.link(tmp_path / "d" / "train" / "cat" / "0000.jpg", tmp_path / "d" / "test" / "cat" / "copy.jpg")
    os.symlink(tmp_path / "d" / "train" / "dog" / "0001.jpg", tmp_path / "d" / "test" / "dog" / "link.jpg")
    source = read_source("image_folder", str(tmp_path / "d"))
    assert len(source) == 16 and len({os.stat(p).st_ino for p in source.paths}) == 16  # no image in two splits
    reasons = [reason for _, reason in source.passed_over]
    assert sum("the same file as" in r for r in reasons) == 2
