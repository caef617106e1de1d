"""Dataset readers on their real layouts, splits, decoding of odd images, and transforms."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from support import compose
from support.fabricate import make_image_folder, write_png_header_only

from finetune.data.datamodule import ImageDataModule
from finetune.data.images import ImageTooLarge, open_rgb
from finetune.data.readers import DataError, read_source
from finetune.data.splits import read_split, stratified_split
from finetune.data.transforms import Preprocessing, eval_transform, train_transform

PRE = Preprocessing(image_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)


def test_dogs_vs_cats_reads_train_and_ignores_unlabelled_test1(dogs_vs_cats):
    source = read_source("dogs_vs_cats", str(dogs_vs_cats))
    assert source.classes == ["cat", "dog"]
    assert np.bincount(source.labels).tolist() == [40, 40]
    assert all("/train/" in p for p in source.paths)
    cats = [p for p, y in zip(source.paths, source.labels) if y == 0]
    assert all(p.split("/")[-1].startswith("cat.") for p in cats)


def test_dogs_vs_cats_accepts_the_train_folder_itself_and_explains_an_unextracted_zip(dogs_vs_cats, tmp_path):
    assert len(read_source("dogs_vs_cats", str(dogs_vs_cats / "train"))) == 80
    (tmp_path / "train.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="train.zip is not extracted: unzip"):
        read_source("dogs_vs_cats", str(tmp_path))


def test_image_folder_names_classes_after_folders_with_spaces_and_nesting(tmp_path):
    root = make_image_folder(tmp_path, {"alpaca": "red", "not alpaca": "blue"}, per_class=3)
    nested = root / "alpaca" / "more"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "x.png")
    (root / "alpaca" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "alpaca" / ".hidden.jpg").write_bytes(b"")
    (root / "empty class").mkdir()
    source = read_source("image_folder", str(root))
    assert source.classes == ["alpaca", "not alpaca"]
    assert np.bincount(source.labels).tolist() == [4, 3]
    assert not any(p.endswith(("Thumbs.db", ".hidden.jpg")) for p in source.paths)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: None, "no such directory"),
    (lambda root: root.mkdir(), "is empty"),
    (lambda root: make_image_folder(root, {"only": "red"}, per_class=2), "found only class 'only'"),
    (lambda root: (root / "a").mkdir(parents=True) or (root / "b").mkdir(), "has no class folders|no labelled images"),
])
def test_unusable_dataset_roots_fail_clearly(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        read_source("image_folder", str(root))


def test_digits_are_bundled():
    source = read_source("digits", None)
    assert len(source) == 1797 and source.classes == [str(i) for i in range(10)]
    assert source.images.shape == (1797, 8, 8, 3) and source.images.dtype == np.uint8
    assert source.images.max() == 255


def test_split_is_stratified_seeded_and_covers_every_class():
    labels = np.repeat(np.arange(4), [50, 30, 20, 5])
    a = stratified_split(labels, 0.2, 0.2, seed=1)
    assert (a == stratified_split(labels, 0.2, 0.2, seed=1)).all()
    assert (a != stratified_split(labels, 0.2, 0.2, seed=2)).any()
    for label, n in enumerate([50, 30, 20, 5]):
        mine = a[labels == label]
        assert (mine == "test").sum() == max(1, round(n * 0.2))
        assert (mine == "val").sum() >= 1 and (mine == "train").sum() >= 1
    assert abs((a == "val").mean() - 0.2) < 0.03


def test_official_split_is_kept_and_only_its_training_part_divided():
    labels = np.repeat(np.arange(2), 20)
    official = (["train"] * 15 + ["test"] * 5) * 2
    splits = stratified_split(labels, 0.2, 0.3, seed=0, official=official)
    assert (splits[np.array(official) == "test"] == "test").all()
    assert ((splits == "test") == (np.array(official) == "test")).all()
    assert (splits == "val").sum() == 6  # 20% of each class's 15 training images


def test_datamodule_writes_split_csv_and_reuses_it(tmp_path, shapes):
    cfg = compose(tmp_path, "dataset=image_folder", f"dataset.root={shapes}", "dataset.val_fraction=0.25")
    dm = ImageDataModule(cfg.dataset, cfg.augment, PRE, seed=3, run_dir=tmp_path / "a")
    dm.setup()
    rows = list(csv.reader(open(tmp_path / "a" / "split.csv")))
    assert rows[0] == ["path", "label", "split"]
    assert len(rows) - 1 == 120
    assert {r[1] for r in rows[1:]} == {"red", "green", "not red or green"}
    assert {r[2] for r in rows[1:]} == {"train", "val", "test"}
    text = (tmp_path / "a" / "split.csv").read_bytes().decode()
    assert "\r" not in text and text.count(",test\n") == sum(r[2] == "test" for r in rows)  # LF, for grep
    assert dm.class_counts()["val"] == [10, 10, 10]

    again = ImageDataModule(cfg.dataset, cfg.augment, PRE, seed=99, run_dir=tmp_path / "b",
                            split_file=tmp_path / "a" / "split.csv")
    again.setup()
    assert read_split(tmp_path / "b" / "split.csv") == read_split(tmp_path / "a" / "split.csv")


def test_split_file_that_no_longer_matches_the_data_is_refused(tmp_path, shapes):
    cfg = compose(tmp_path, "dataset=image_folder", f"dataset.root={shapes}")
    split = tmp_path / "split.csv"
    split.write_text(f"path,label,split\n{shapes}/red/gone.jpg,red,train\n")
    dm = ImageDataModule(cfg.dataset, cfg.augment, PRE, seed=0, run_dir=tmp_path / "r", split_file=split)
    with pytest.raises(DataError, match="not in the dataset any more"):
        dm.setup()


def test_batches_are_uint8_at_the_model_input_size(tmp_path, shapes):
    cfg = compose(tmp_path, "dataset=image_folder", f"dataset.root={shapes}", "dataset.batch_size=8",
                  "dataset.num_workers=0")
    dm = ImageDataModule(cfg.dataset, cfg.augment, PRE, seed=0, run_dir=tmp_path)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert labels.dtype == torch.int64
    val = dm.dataset("val")
    assert torch.equal(val[0][0], val[0][0])  # evaluation is deterministic


def test_eval_transform_resizes_then_centre_crops():
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 40))  # a red strip at the left edge, cut off by the centre crop
    out = eval_transform(PRE)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[0].max() < 60 and out[2].min() > 200


def test_train_transform_is_random_and_classic_preset_keeps_the_whole_image(tmp_path):
    cfg = compose(tmp_path, "augment=classic")
    t = train_transform(PRE, cfg.augment)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    outs = [t(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def _save_rgb_halves(path, fmt="JPEG", **kwargs):
    """40x20: left half red, right half blue."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    image.save(path, fmt, **kwargs)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    _save_rgb_halves(tmp_path / "rotated.jpg", exif=exif)
    image = open_rgb(str(tmp_path / "rotated.jpg"))
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[37, 10]
    assert top[0] > 200 and top[2] < 60  # red on top, where the left half went
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16", "1"])
def test_any_mode_loads_as_rgb(tmp_path, mode):
    base = Image.new("RGB", (16, 12), (200, 30, 30))
    if mode == "I;16":
        image = Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16))
    elif mode == "P":
        image = base.convert("P")
        image.info["transparency"] = 0
    else:
        image = base.convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("CMYK", "L") else "x.png")
    image.save(path)
    out = open_rgb(str(path))
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode == "I;16":
        assert abs(int(np.asarray(out)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_png_bytes_under_a_jpg_name_load(tmp_path):
    _save_rgb_halves(tmp_path / "really-a-png.jpg", fmt="PNG")
    assert open_rgb(str(tmp_path / "really-a-png.jpg")).size == (40, 20)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    write_png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        open_rgb(str(tmp_path / "bomb.png"))
    _save_rgb_halves(tmp_path / "small.jpg")
    with pytest.raises(ImageTooLarge, match="40x20 pixels"):
        open_rgb(str(tmp_path / "small.jpg"), max_pixels=500)


def test_jpeg_draft_decodes_no_smaller_than_asked(tmp_path):
    Image.new("RGB", (800, 600), (10, 200, 10)).save(tmp_path / "big.jpg")
    image = open_rgb(str(tmp_path / "big.jpg"), draft=140)
    assert min(image.size) >= 140 and image.size[0] < 800
