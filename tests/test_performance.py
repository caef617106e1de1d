"""The fast paths: the decoded-image cache, the frozen phase on cached features, torch.compile, the seeded
shuffle. Each must give what the plain path gives; how much faster they are is scripts/benchmark.py's business."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from support import FAST, compose, given
from support.fabricate import make_image_folder
from support.recipes import assert_above_chance, assert_agree, assert_at_most
from support.recorders import BatchKinds

from finetune.data.cache import open_or_build, resize_short_side
from finetune.data.datamodule import ImageDataModule
from finetune.data.dataset import EpochShuffle
from finetune.data.images import open_rgb
from finetune.data.transforms import Preprocessing
from finetune.models.module import load_module
from finetune.training import run

PRE = Preprocessing(image_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three classes of JPEGs of several sizes and aspect ratios, as photos come."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i, (name, colour) in enumerate({"red": "red", "green": "green", "blue": "blue"}.items()):
        make_image_folder(root, {name: colour}, per_class=12, seed=i,
                          size=(int(rng.integers(60, 140)), int(rng.integers(50, 120))))
    return root


def datamodule(tmp_path, root, **dataset):
    cfg = compose(tmp_path, "dataset=image_folder", f"dataset.root={root}", *FAST,
                  *[f"dataset.{k}={v}" for k, v in dataset.items()]).dataset
    data = ImageDataModule(cfg, compose(tmp_path).augment, PRE, seed=0, run_dir=tmp_path)
    data.setup("fit")
    return data


def test_the_image_cache_gives_what_decoding_gives_and_is_found_again(tmp_path, photos):
    plain = datamodule(tmp_path / "plain", photos)
    cached = datamodule(tmp_path / "cached", photos, cache=True, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("*.u8"))
    assert len(files) == 1 and cached.cache is not None and len(cached.cache) == len(plain.source)
    # evaluation reads the cache exactly as it would decode the file: the cache is at the evaluation resize
    for split in ("val", "test"):
        a, b = plain.dataset(split), cached.dataset(split)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    # every cached image is the file decoded (at reduced size) and resized to the short side (36 px for 32 / 0.875):
    # exactly what decoding it now gives, and within resize rounding of a full-size decode resized with PIL
    for j in range(len(plain.source)):
        image = np.asarray(cached.cache.image(j))
        assert min(image.shape[:2]) == 36
        path = plain.source.paths[j]
        assert np.array_equal(image, np.asarray(resize_short_side(open_rgb(path, draft=36), 36, "bicubic")))
        full = np.asarray(Image.open(path).convert("RGB").resize(image.shape[1::-1], Image.BICUBIC))
        assert np.abs(image.astype(int) - full.astype(int)).mean() < 6  # noise textures: the worst case
    # training crops come from the cache too
    assert cached.dataset("train")[0][0].shape == (3, 32, 32)

    stat = files[0].stat()
    again = datamodule(tmp_path / "again", photos, cache=True, cache_dir=tmp_path / "cache")
    assert again.cache.pixels_path == files[0] and files[0].stat().st_mtime_ns == stat.st_mtime_ns  # reused
    # a DataLoader worker gets the index, not the pixels: it maps the file itself
    dataset = pickle.loads(pickle.dumps(cached.dataset("train")))
    assert dataset.cache._map is None and len(pickle.dumps(cached.dataset("train"))) < stat.st_size
    assert np.array_equal(np.asarray(dataset.cache.image(0)), np.asarray(cached.cache.image(0)))


def test_a_changed_file_makes_a_new_cache_and_a_broken_one_is_read_from_its_file(tmp_path):
    root = make_image_folder(tmp_path / "data", {"red": "red", "blue": "blue"}, per_class=6)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    first = open_or_build(paths, tmp_path / "cache", "set", 36, "bilinear", 10**8)
    Image.new("RGB", (50, 70), (1, 2, 3)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a new modification time
    second = open_or_build(paths, tmp_path / "cache", "set", 36, "bilinear", 10**8)
    assert second.pixels_path != first.pixels_path
    assert np.abs(np.asarray(second.image(0))[0, 0].astype(int) - [1, 2, 3]).max() <= 3  # JPEG rounding
    open(paths[1], "wb").close()  # emptied after the integrity scan
    os.utime(paths[1], ns=(2, 2))
    third = open_or_build(paths, tmp_path / "cache", "set", 36, "bilinear", 10**8)
    assert third.image(1) is None and third.image(2) is not None
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_training_from_the_cache_is_training_from_the_files_and_the_cache_sits_next_to_the_data(tmp_path):
    """Without random crops the images a run sees from the cache are the ones it would decode: same run, bit for bit."""
    root = make_image_folder(tmp_path / "data", {"red": "red", "green": "green", "blue": "blue"}, per_class=20)
    results = []
    for cache in ("false", "true"):
        results.append(run(compose(tmp_path / cache, "dataset=image_folder", f"dataset.root={root}", *FAST,
                                   "dataset.num_workers=2", f"dataset.cache={cache}", "augment=none",
                                   "schedule.epochs=2", "schedule.freeze_epochs=1", "logger=none",
                                   "calibrate=false"), overrides=[]))
    assert results[0]["test/loss"] == results[1]["test/loss"] and results[0]["test/acc"] == results[1]["test/acc"]
    assert len(list((root / ".finetune-cache").glob("image_folder-36px-*.u8"))) == 1
    a = torch.load(tmp_path / "false" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "true" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def frozen_run(tmp_path, shapes, name, *extra):
    cfg = compose(tmp_path / name, "dataset=image_folder", f"dataset.root={shapes}", *FAST, "augment=none",
                  "head.dropout=0", "schedule.epochs=3", "schedule.freeze_epochs=2", "schedule.lr=3e-3",
                  "logger=none", "dataset.val_fraction=0.2", "dataset.test_fraction=0.2",
                  "callbacks.extra=[{_target_: support.recorders.BatchKinds}]", *extra)
    metrics = run(cfg, overrides=given(cfg))
    state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return metrics, state, BatchKinds.instances[-1]


@pytest.mark.learning
def test_the_frozen_phase_on_cached_features_trains_as_the_frozen_phase_on_images(tmp_path, shapes):
    plain, plain_state, plain_kinds = frozen_run(tmp_path, shapes, "plain")
    cached, cached_state, kinds = frozen_run(tmp_path, shapes, "cached", "schedule.cache_features=true")
    # two frozen epochs on features (2-D), then images again for the unfrozen epoch, in training and validation
    steps = len(plain_kinds.train) // 3
    assert kinds.train == [(0, 2)] * steps + [(1, 2)] * steps + [(2, 4)] * steps
    assert {e: d for e, d in kinds.val} == {0: 2, 1: 2, 2: 4}
    assert all(d == 4 for _, d in plain_kinds.train)
    # same seed, same batches, same steps: the same model to within float rounding. The features are computed once
    # instead of in every step, so the rounding may differ: the largest weight difference was 0 natively and up to
    # 3.0e-3 with one thread, over 4 arithmetics x 3 seeds (benchmarks/arithmetics.py). A real difference moves
    # them more: the same run with a 10% higher rate, by 2.6e-2; with another shuffle, by 2.8.
    largest = max(float((value - cached_state[key]).abs().max()) for key, value in plain_state.items()
                  if value.is_floating_point())
    assert_at_most("largest weight difference, cached features against images", largest, 1e-2)
    for key, images in (("val/acc_best", "val_images"), ("test/acc", "test_images")):
        assert_agree(cached[key], plain[key], images=plain[images], what=key)
    assert cached["global_step"] == plain["global_step"]


VIEWS_MARGIN = 3  # test images above chance (8 of 24). Measured over 4 arithmetics x 3 seeds
# (benchmarks/arithmetics.py): +6 to +14, median +12


@pytest.mark.learning
def test_augmented_feature_views_take_turns(tmp_path, shapes):
    metrics, _, kinds = frozen_run(tmp_path, shapes, "views", "schedule.cache_features=true",
                                   "schedule.cache_views=2", "augment=light")
    assert {e for e, d in kinds.train if d == 2} == {0, 1}
    assert metrics["epochs"] == 3
    assert_above_chance(metrics, margin=VIEWS_MARGIN, classes=3)  # chance: 8 of 24


def test_feature_caching_with_mixup_is_refused(tmp_path, shapes):
    from finetune.checks import validate
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="MixUp and CutMix"):
        validate(compose(tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *FAST,
                         "schedule.cache_features=true", "augment.mixup=0.2"))


def test_the_shuffle_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffle(range(50), seed=1), EpochShuffle(range(50), seed=1)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert second == list(b) and first != second and sorted(first) == list(range(50))
    b.set_epoch(0)
    assert list(b) == first


@pytest.mark.slow
def test_compiled_training_writes_plain_checkpoints(tmp_path, shapes):
    # one phase of a small ResNet: compiling MobileNetV2's graphs for two phases took 2.5 minutes here, for the same
    # proof (the checkpoint's keys)
    run(compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "trainer.compile=true",
                "backbone.name=resnet10t", "schedule.epochs=1", "schedule.freeze_epochs=0", "logger=none"),
        overrides=[])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    model = load_module(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 3)


def test_decoding_on_the_device_gives_what_the_workers_give(tmp_path, photos):
    """dataset.decode=device: workers send JPEG bytes; the device (here the CPU, as the same code runs on a GPU)
    decodes, resizes and crops them. Two decoders and two resizers agree to within rounding."""
    workers = datamodule(tmp_path / "workers", photos)
    device = datamodule(tmp_path / "device", photos, decode="device")
    assert device.decode_on_device
    for split in ("val", "test"):
        loader = device._loader(split)
        items, labels = next(iter(loader))
        assert isinstance(items, list) and all(item.ndim == 1 for item in items)  # bytes, not pixels
        images, labels = device.decode((items, labels), train=False, device=torch.device("cpu"))
        expected = torch.stack([workers.dataset(split)[i][0] for i in range(len(labels))])
        assert images.dtype == torch.uint8 and images.shape == expected.shape
        assert (images.float() - expected.float()).abs().mean() < 4
    train, _ = device.decode(next(iter(device._loader("train"))), train=True, device=torch.device("cpu"))
    assert train.shape == (16, 3, 32, 32) and train.dtype == torch.uint8


def test_a_jpeg_that_does_not_decode_on_the_device_is_replaced_and_other_formats_pass_through(tmp_path):
    from finetune.data.dataset import decode_on_device
    from finetune.data.transforms import eval_transform

    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 50), (200, 30, 30)).save(good)
    data = good.read_bytes()
    items = [torch.frombuffer(bytearray(data), dtype=torch.uint8),
             torch.frombuffer(bytearray(data[:40]), dtype=torch.uint8),  # truncated in the header
             torch.full((3, 20, 30), 77, dtype=torch.uint8)]  # a PNG, decoded by the worker
    images = decode_on_device(items, eval_transform(PRE, tensors=True), torch.device("cpu"))
    assert images.shape == (3, 3, 32, 32)
    assert torch.equal(images[1], images[0]) or torch.equal(images[1], images[2])  # another image of the batch
    assert int(images[2].float().mean().round()) == 77 and int(images[0][0].float().mean().round()) > 190


def test_training_with_device_decoding_runs_on_decoded_batches(tmp_path, shapes):
    metrics, _, kinds = frozen_run(tmp_path, shapes, "device", "dataset.decode=device", "schedule.epochs=2",
                                   "schedule.freeze_epochs=1")
    assert all(d == 4 for _, d in kinds.train + kinds.val) and metrics["epochs"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_decoding_matches_the_cpu(tmp_path, photos):
    device = datamodule(tmp_path / "device", photos, decode="device")
    batch = next(iter(device._loader("val")))
    on_gpu, _ = device.decode(batch, train=False, device=torch.device("cuda"))
    on_cpu, _ = device.decode(batch, train=False, device=torch.device("cpu"))
    assert on_gpu.is_cuda and (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < 2
