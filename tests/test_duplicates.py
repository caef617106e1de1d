"""Duplicates and leakage: exact and near copies found, kept on one side of the split, reported; K-fold splits."""

import json
import logging
import os
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from support import FAST, compose, read_csv, run_script
from support.fabricate import make_cifar10, make_image_folder, plant_copy

from finetune.checks import validate
from finetune.data import duplicates as dups
from finetune.data.datamodule import ImageDataModule
from finetune.data.readers import read_source
from finetune.data.splits import read_split, stratified_split
from finetune.data.transforms import Preprocessing
from finetune.errors import ConfigError
from finetune.sweep import write_summary

PRE = Preprocessing(image_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)
CLASSES = {"red": "red", "green": "green", "blue": "blue"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three classes of 24 photo-like images (160x120) and planted copies: the same bytes, re-encoded at JPEG quality
    60, resized to 3/4, cropped by 2 pixels, and the second probe's copy; two copies put in another class's folder
    (label conflicts); one image with two copies. Returns the root and {group's paths: (kind, conflict)}."""
    root = make_image_folder(tmp_path_factory.mktemp("planted"), CLASSES, 24, size=(160, 120), scenes=True)
    plants = [("red/0000", "red/exact", "exact"), ("red/0001", "red/quality", "quality"),
              ("red/0002", "red/resized", "resized"), ("red/0003", "red/cropped", "cropped"),
              ("red/0004", "red/probe", "probe"),
              ("green/0000", "blue/from_green_exact", "exact"), ("green/0001", "blue/from_green_quality", "quality"),
              ("blue/0000", "blue/exact", "exact"), ("blue/0000", "blue/resized", "resized")]
    groups = defaultdict(set)
    for original, copy, kind in plants:
        groups[str(root / f"{original}.jpg")] |= {str(root / f"{original}.jpg"),
                                                  str(plant_copy(root / f"{original}.jpg", root / f"{copy}.jpg", kind))}
    expected = {}
    for original, members in groups.items():
        kinds = {kind for o, _, kind in plants if str(root / f"{o}.jpg") == original}
        conflict = len({os.path.basename(os.path.dirname(p)) for p in members}) > 1
        expected[frozenset(members)] = ("exact" if kinds == {"exact"} else "near", conflict)
    return root, expected


def datamodule(run_dir, root, *overrides, seed=0, dataset="image_folder"):
    cfg = compose(run_dir, *FAST, f"dataset={dataset}", f"dataset.root={root}", "dataset.val_fraction=0.2",
                  "dataset.test_fraction=0.2", *overrides)
    validate(cfg)
    data = ImageDataModule(cfg.dataset, cfg.augment, PRE, seed, run_dir)
    data.setup()
    return data


def groups_of(rows):
    found = defaultdict(list)
    for row in rows:
        found[row["group"]].append(row)
    return found


def test_planted_copies_and_conflicts_are_found_and_each_group_stays_in_one_split(tmp_path, planted, caplog):
    root, expected = planted
    with caplog.at_level(logging.INFO):
        data = datamodule(tmp_path / "a", root)
    rows = read_csv(tmp_path / "a" / "duplicates.csv")
    found = {frozenset(r["path"] for r in g): (g[0]["kind"], g[0]["conflict"] == "yes")
             for g in groups_of(rows).values()}
    assert found == expected  # every planted group, and nothing else
    assert "8 duplicate groups (2 exact, 6 near) holding 17 images; 2 label conflicts; 0 official-test leaks" \
        in caplog.text
    assert "groups of duplicates carry different labels" in caplog.text
    split = {path: s for path, _, s in read_split(tmp_path / "a" / "split.csv")}
    for group in groups_of(rows).values():
        assert len({split[r["path"]] for r in group}) == 1  # no val or test image has a copy in train
        assert {r["split"] for r in group} == {split[group[0]["path"]]}
        assert int(group[0]["distance"]) == 0 and all(0 <= int(r["distance"]) <= 12 for r in group)
    # the per-class fractions stay close to 0.2 / 0.2 / 0.6
    counts = data.class_counts()
    for k in range(3):
        n = sum(counts[s][k] for s in ("train", "val", "test"))
        assert abs(counts["val"][k] - 0.2 * n) <= 2 and abs(counts["test"][k] - 0.2 * n) <= 2
    datamodule(tmp_path / "b", root)  # same seed, same split (and the hashes now come from the cache)
    assert read_split(tmp_path / "a" / "split.csv") == read_split(tmp_path / "b" / "split.csv")


def test_drop_keeps_one_image_per_group_and_lists_the_others_in_skipped_csv(tmp_path, planted):
    root, expected = planted
    datamodule(tmp_path, root, "dataset.dedup=drop")
    kept = {path for path, _, _ in read_split(tmp_path / "split.csv")}
    skipped = {row["path"]: row["reason"] for row in read_csv(tmp_path / "skipped.csv")}
    for group in expected:
        assert len(group & kept) == 1
        for path in group - kept:
            assert skipped[path].startswith("duplicate of ") and skipped[path].endswith("(dataset.dedup=drop)")
    assert len(read_source("image_folder", str(root))) - len(kept) == 17 - 8
    assert {r["split"] for r in read_csv(tmp_path / "duplicates.csv") if r["path"] not in kept} == {"dropped"}


def test_keep_reports_the_groups_and_splits_as_if_there_were_none(tmp_path, planted, caplog):
    root, expected = planted
    with caplog.at_level(logging.WARNING):
        datamodule(tmp_path, root, "dataset.dedup=keep")
    rows = read_csv(tmp_path / "duplicates.csv")
    assert len(groups_of(rows)) == len(expected)
    source = read_source("image_folder", str(root))
    plain = stratified_split(source.labels, 0.2, 0.2, seed=0)
    assert [s for _, _, s in read_split(tmp_path / "split.csv")] == plain.tolist()
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["group"]].add(r["split"])
    straddling = sum(len(s) > 1 for s in splits_of.values())
    assert straddling > 0  # with these planted copies: so the warning says how many, and what it means
    assert f"dataset.dedup=keep: {straddling} groups of duplicates straddle splits" in caplog.text
    assert "val/acc and test/acc are optimistic" in caplog.text


def test_a_dataset_without_duplicates_reports_none_and_keeps_its_split(tmp_path, shapes, caplog):
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path, shapes)
    assert read_csv(tmp_path / "duplicates.csv") == []
    assert "0 duplicate groups (0 exact, 0 near) holding 0 images; 0 label conflicts" in caplog.text
    source = read_source("image_folder", str(shapes))
    assert [s for _, _, s in read_split(tmp_path / "split.csv")] == \
        stratified_split(source.labels, 0.2, 0.2, seed=0).tolist()


@pytest.mark.parametrize("dedup", ["group", "drop"])
def test_official_test_leaks_are_reported_and_the_test_split_is_not_moved(tmp_path, dedup, caplog):
    root = tmp_path / "data"
    make_image_folder(root / "train", CLASSES, 12, size=(160, 120), scenes=True)
    make_image_folder(root / "test", CLASSES, 4, seed=1, size=(160, 120), scenes=True)
    leak = plant_copy(root / "test" / "red" / "0000.jpg", root / "train" / "red" / "leak.jpg", "quality")
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path / "run", root, f"dataset.dedup={dedup}")
    test = {path for path, _, s in read_split(tmp_path / "run" / "split.csv") if s == "test"}
    assert test == {str(p) for p in (root / "test").rglob("*.jpg")}  # kept as given
    rows = {r["path"]: r["split"] for r in read_csv(tmp_path / "run" / "duplicates.csv")}
    if dedup == "group":
        assert rows == {str(root / "test" / "red" / "0000.jpg"): "test", str(leak): "train"}
        assert "1 duplicate groups (0 exact, 1 near) holding 2 images; 0 label conflicts; 1 official-test leaks" \
            in caplog.text
    else:  # the training copy goes; the test image stays
        assert rows == {str(root / "test" / "red" / "0000.jpg"): "test", str(leak): "dropped"}


def test_in_memory_images_are_hashed_and_a_cifar_test_image_copied_into_training_is_a_leak(tmp_path, caplog):
    import pickle

    root = make_cifar10(tmp_path / "cifar", per_batch=30)
    folder = root / "cifar-10-batches-py"
    test_batch = pickle.loads((folder / "test_batch").read_bytes())
    train_batch = pickle.loads((folder / "data_batch_2").read_bytes())
    train_batch[b"data"][3] = test_batch[b"data"][7]  # the same pixels, under its own label or another
    (folder / "data_batch_2").write_bytes(pickle.dumps(train_batch))
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path / "run", root, dataset="cifar10")
    rows = read_csv(tmp_path / "run" / "duplicates.csv")
    assert [(r["path"], r["kind"]) for r in rows] == [(f"{folder}/data_batch_2#3", "exact"),
                                                       (f"{folder}/test_batch#7", "exact")]
    assert rows[0]["split"] in ("train", "val") and rows[1]["split"] == "test"
    assert "1 duplicate groups (1 exact, 0 near) holding 2 images" in caplog.text
    assert "1 official-test leaks" in caplog.text
    split = read_split(tmp_path / "run" / "split.csv")
    assert [p for p, _, s in split if s == "test"] == [f"{folder}/test_batch#{i}" for i in range(30)]  # not moved


def test_hashes_are_cached_so_a_second_run_only_stats_the_files(tmp_path, monkeypatch):
    from finetune.data.integrity import scan

    root = make_image_folder(tmp_path / "data", CLASSES, 4)
    source = read_source("image_folder", str(root))
    first = dups.image_hashes(source, root, 10**8)
    assert (root / dups.HASH_CACHE_NAME).is_file()
    hashed = []
    monkeypatch.setattr(dups, "hash_file",
                        lambda path, max_pixels: hashed.append(path) or (["0" * 16] * 2 + ["0" * 64] * 2, "changed"))
    again = dups.image_hashes(source, root, 10**8)
    assert hashed == [] and (again.coarse == first.coarse).all() and (again.fine == first.fine).all()
    assert again.digests == first.digests
    os.utime(source.paths[0], ns=(1, 1))  # a changed file is hashed again, and only it
    dups.image_hashes(source, root, 10**8)
    assert hashed == [source.paths[0]]
    hashed.clear()  # a dataset moved with its caches keeps them (the paths in them are relative to the dataset)
    assert scan(source.paths, root, 10**8).checked == len(source)
    root.rename(tmp_path / "moved")
    moved = read_source("image_folder", str(tmp_path / "moved"))
    assert dups.image_hashes(moved, tmp_path / "moved", 10**8).digests[1:] == again.digests[1:] and hashed == []
    assert scan(moved.paths, tmp_path / "moved", 10**8).cached == len(moved)


def test_crops_resizes_and_re_encodes_are_found_and_distinct_images_on_noise_are_not_grouped(tmp_path, caplog):
    """Issue 22 item 11: the probe's copy of a noisy 241x377 image (10 bits from it under one pHash) and a 5% crop
    are grouped with their originals; 600 distinct shapes on pixel noise, some of which one pHash at 8 bits grouped,
    are not."""
    from support.fabricate import shape_image

    rng = np.random.default_rng(3)
    root = make_image_folder(tmp_path / "data", {"red": "red", "blue": "blue"}, 300, size=(48, 40))
    planted = []
    for k in range(4):
        original = root / "red" / f"noisy{k}.jpg"
        shape_image(rng, (215, 45, 40), (241, 377)).save(original, quality=92)
        probe = plant_copy(original, root / "blue" / f"noisy{k}_probe.jpg", "probe")
        crop = root / "red" / f"noisy{k}_crop5.jpg"
        with Image.open(original) as image:
            w, h = image.size
            image.crop((12, 19, w - 12, h - 19)).save(crop, quality=90)
        planted.append({str(original), str(probe), str(crop)})
    with caplog.at_level(logging.INFO):
        datamodule(tmp_path / "run", root, "dataset.dedup=keep")
    found = [{r["path"] for r in g} for g in groups_of(read_csv(tmp_path / "run" / "duplicates.csv")).values()]
    assert sorted(map(sorted, found)) == sorted(map(sorted, planted))
    source = read_source("image_folder", str(root))
    hashes = dups.image_hashes(source, root, 10**8)
    distinct = [j for j, p in enumerate(source.paths) if "noisy" not in p]
    assert len(dups.near_pairs(hashes.coarse[distinct, 0], 8)) >= 2  # what the single pHash grouped


@pytest.mark.parametrize("threshold", [0, 3, 8, 12])
def test_near_pairs_are_exactly_the_brute_force_pairs(threshold):
    rng = np.random.default_rng(threshold)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 3000, dtype=np.uint64)
    for i in rng.choice(3000, 300, replace=False):  # planted near pairs: 0 to threshold + 2 bits flipped
        bits = rng.choice(64, int(rng.integers(0, threshold + 3)), replace=False)
        hashes[int(rng.integers(3000))] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    i, j = np.triu_indices(len(hashes), 1)
    close = np.bitwise_count(hashes[i] ^ hashes[j]) <= threshold
    brute = set(zip(i[close].tolist(), j[close].tolist()))
    found = dups.near_pairs(hashes, threshold)
    assert {tuple(p) for p in found.tolist()} == brute and len(found) == len(brute)
    assert len(brute) >= 50


def random_groups(n, rng):
    """Group ids for n samples: groups of 1 to 4 consecutive samples."""
    sizes = rng.integers(1, 5, n)
    return np.repeat(np.arange(n), sizes)[:n]


def test_group_aware_split_keeps_groups_whole_and_classes_in_proportion():
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, 4, 2000))
    groups = random_groups(2000, rng)
    a = stratified_split(labels, 0.15, 0.2, seed=3, groups=groups)
    assert (a == stratified_split(labels, 0.15, 0.2, seed=3, groups=groups)).all()
    assert (a != stratified_split(labels, 0.15, 0.2, seed=4, groups=groups)).any()
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1
    for label in range(4):
        mine = a[labels == label]
        assert abs((mine == "test").mean() - 0.2) < 0.01 and abs((mine == "val").mean() - 0.15) < 0.01


def test_k_folds_cover_the_pool_once_keep_classes_stratified_and_groups_whole():
    rng = np.random.default_rng(1)
    labels = np.sort(rng.integers(0, 3, 600))
    groups = random_groups(600, rng)
    plain = stratified_split(labels, 0.1, 0.2, seed=7, groups=groups)
    splits = [stratified_split(labels, 0.1, 0.2, seed=7, groups=groups, folds=5, fold=f) for f in range(5)]
    for s in splits:
        assert ((s == "test") == (plain == "test")).all()  # the same test split in every fold, and as without folds
        for g in np.unique(groups):
            assert len(set(s[groups == g])) == 1
    as_val = sum((s == "val").astype(int) for s in splits)
    assert (as_val[plain != "test"] == 1).all() and (as_val[plain == "test"] == 0).all()
    for label in range(3):
        per_fold = [((s == "val") & (labels == label)).sum() for s in splits]
        assert max(per_fold) - min(per_fold) <= 4  # at most one group's size apart


def test_many_small_classes_fill_every_fold_and_a_class_of_copies_keeps_a_training_image():
    labels = np.repeat(np.arange(100), 4)  # 100 classes of 4 images: fewer images than folds after the test split
    splits = [stratified_split(labels, 0.2, 0.1, seed=0, folds=5, fold=f) for f in range(5)]
    sizes = [int((s == "val").sum()) for s in splits]
    assert min(sizes) > 0 and max(sizes) - min(sizes) <= 1
    for seed in range(30):  # a 3-image class, two of them near copies; a 4-image class of two pairs
        for labels, groups in ((np.zeros(3, int), np.array([0, 0, 1])), (np.zeros(4, int), np.array([0, 0, 1, 1]))):
            assert (stratified_split(labels, 0.2, 0.2, seed=seed, groups=groups) == "train").any()


def test_kfold_summary_gives_mean_and_std_per_setting(tmp_path):
    metrics = {}
    for job, (lr, fold) in enumerate((lr, f) for lr in ("1e-3", "3e-4") for f in range(3)):
        (tmp_path / str(job)).mkdir()
        val, test = 0.6 + 0.05 * job, 0.5 + 0.03 * job * job
        metrics.setdefault(lr, []).append((val, test))
        record = {"job": job, "overrides": f"dataset.folds=3 dataset.fold={fold} schedule.lr={lr}",
                  "val_acc_best": val, "test_acc": test, "epochs": 1, "wall_time_s": 1.0, "status": "completed",
                  "error": "", "fold": fold, "setting": f"dataset.folds=3 schedule.lr={lr}"}
        (tmp_path / str(job) / "job.json").write_text(json.dumps(record))
    write_summary(tmp_path)
    rows = {r["overrides"]: r for r in read_csv(tmp_path / "folds.csv")}
    assert set(rows) == {"dataset.folds=3 schedule.lr=1e-3", "dataset.folds=3 schedule.lr=3e-4"}
    for lr, values in metrics.items():
        row, val, test = rows[f"dataset.folds=3 schedule.lr={lr}"], *zip(*values)
        assert int(row["folds"]) == 3
        assert float(row["val_acc_best_mean"]) == pytest.approx(np.mean(val))
        assert float(row["val_acc_best_std"]) == pytest.approx(np.std(val, ddof=1))
        assert float(row["test_acc_std"]) == pytest.approx(np.std(test, ddof=1))
    assert "mean ± standard deviation" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.dedup=remove"], "dataset.dedup must be one of keep, group, drop (got remove)"),
    (["dataset.dedup_threshold=40"], "dataset.dedup_threshold must be in 0..16 bits (got 40)"),
    (["dataset.folds=1"], "dataset.folds must be >= 2 or null (got 1)"),
    (["dataset.folds=3", "dataset.fold=3"], "dataset.fold must be in 0..2 for dataset.folds=3 (got 3)"),
    (["dataset.fold=1"], "dataset.fold=1 needs dataset.folds=K, the number of folds"),
])
def test_bad_dedup_and_fold_values_are_one_clear_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        validate(compose(tmp_path, *overrides))


def test_train_script_reports_duplicates_and_drops_them(tmp_path, planted):
    root, expected = planted
    result = run_script("train", "dataset=image_folder", f"dataset.root={root}", *FAST, "schedule.epochs=1",
                        "schedule.freeze_epochs=0", "dataset.dedup=drop", "calibrate=false", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Duplicates: 8 duplicate groups (2 exact, 6 near) holding 17 images; 2 label conflicts; 0 official-test " \
           "leaks; 9 dropped (skipped.csv)" in output
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    assert len(groups_of(read_csv(run_dir / "duplicates.csv"))) == 8
    assert sum(r["reason"].startswith("duplicate of") for r in read_csv(run_dir / "skipped.csv")) == 9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("dataset/duplicate_groups")
    assert (grid.height, grid.width) == (6 * 96, 4 * 96)  # the first six of the eight groups, a row each


@pytest.mark.slow  # three training jobs: about 100 s on 2 cores
def test_k_fold_sweep_validates_on_each_fold_once_and_summarises_the_folds(tmp_path, shapes):
    result = run_script("train", "-m", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "schedule.epochs=1",
                        "schedule.freeze_epochs=0", "logger=none", "calibrate=false", "dataset.folds=3",
                        "dataset.fold=range(3)", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    splits = [read_split(sweep / str(job) / "split.csv") for job in range(3)]
    tests = [{p for p, _, s in rows if s == "test"} for rows in splits]
    assert tests[0] == tests[1] == tests[2] and tests[0]
    vals = [{p for p, _, s in rows if s == "val"} for rows in splits]
    pool = {p for p, _, _ in splits[0]} - tests[0]
    assert sorted(p for v in vals for p in v) == sorted(pool)  # every training-pool image validates exactly once
    metrics = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in range(3)]
    (row,) = read_csv(sweep / "folds.csv")
    assert int(row["folds"]) == 3 and "dataset.folds=3" in row["overrides"] and "dataset.fold=" not in row["overrides"]
    for key, column in (("val/acc_best", "val_acc_best"), ("test/acc", "test_acc")):
        values = [m[key] for m in metrics]
        assert float(row[f"{column}_mean"]) == pytest.approx(np.mean(values))
        assert float(row[f"{column}_std"]) == pytest.approx(np.std(values, ddof=1))
    assert "Over the folds (mean ± standard deviation" in (sweep / "summary.md").read_text()


def test_k_fold_without_a_test_split_reports_no_test_figures_and_says_so(tmp_path, shapes):
    """dataset.test_fraction=0: each fold's validation images chose its checkpoint, so no fold has a test/acc (it
    was the validation fold's), and the summary says there is no test split instead of 'tested on the same one'."""
    result = run_script("train", "-m", "dataset=image_folder", f"dataset.root={shapes}", *FAST,
                        "dataset.limit_per_class=12", "dataset.test_fraction=0", "schedule.epochs=1",
                        "schedule.freeze_epochs=0", "logger=none", "dataset.folds=2", "dataset.fold=range(2)",
                        cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    assert "This run has no test split (dataset.test_fraction=0), so it reports no test figures" in result.output
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    for job in range(2):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["test_images"] == 0 and not any(k.startswith("test/") for k in metrics), metrics
        assert metrics["val/acc_best"] is not None and "val/temperature" in metrics
        assert "no test split, so no test figures" in (sweep / str(job) / "model_card.md").read_text()
    (row,) = read_csv(sweep / "folds.csv")
    assert row["test_acc_mean"] == "" and row["val_acc_best_mean"] != ""
    text = (sweep / "summary.md").read_text()
    assert "no test split (dataset.test_fraction=0), so no test figures" in text and "same test split" not in text
    assert "no test split): " in result.output  # the best job's line


def test_a_class_of_near_copies_left_without_val_and_test_images_is_refused_naming_it(tmp_path):
    """40 slight variants of one photo as one class beside 30 distinct images of another: grouped, the whole class
    would go to train, and val and test would measure the other class alone. One line names it and the keys."""
    root = make_image_folder(tmp_path / "data", {"cat": "blue"}, per_class=30, scenes=True)
    original = make_image_folder(tmp_path / "one", {"dog": "red"}, per_class=1, scenes=True) / "dog" / "0000.jpg"
    kinds = ("exact", "quality", "resized", "cropped")
    for i in range(40):
        plant_copy(original, root / "dog" / f"variant{i:02d}.jpg", kinds[i % 4])
    result = run_script("train", "dataset=image_folder", f"dataset.root={root}", *FAST, "logger=none",
                        "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "class 'dog' has no val images: its 40 images are" in result.output
    assert "dataset.dedup=keep splits copies like any images" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_more_folds_than_a_class_has_images_is_refused_naming_the_most_that_work(tmp_path, shapes):
    result = run_script("train", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "logger=none",
                        "dataset.folds=1000", "dataset.fold=3", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.output
    assert "dataset.folds=1000: fold 3 has no validation images of" in result.output
    assert "the smallest class has 36 images outside the test split, so at most dataset.folds=36" in result.output


def test_duplicates_benchmark_measures_both_rules_side_by_side(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "duplicates.py"
    spec = importlib.util.spec_from_file_location("benchmark_duplicates", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["distinct=60", "originals=4", f"out={tmp_path}"])
    result = json.loads((tmp_path / "duplicates.json").read_text())
    for kind in ("noise 241x377", "scene 241x377"):
        assert set(result["recall"][kind]) == {"finetune", "pHash<=8"}
        assert result["recall"][kind]["finetune"]["probe"] == 1.0 and result["recall"][kind]["finetune"]["half"] == 1.0
    assert "| shapes on noise 48x40 (60) | finetune |" in (tmp_path / "duplicates.md").read_text()
    assert "Recall" in capsys.readouterr().out
