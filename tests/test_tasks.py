"""task=multilabel and task=regression: read from a label table (CSV) and from a saved Hugging Face dataset, trained
through scripts/train.py, and evaluate, predict and the ONNX export agreeing with the run's own test figures."""

import csv
import json

import numpy as np
import pytest
import torch
from support import FAST, run_script
from support.fabricate import make_multilabel_table, make_regression_table
from support.recipes import TASKS, assert_above, assert_below, most_agree

from finetune.data.readers import DataError, read_source
from finetune.data.splits import stratified_split

BASE = [a for a in TASKS if not a.startswith(("logger=", "schedule.epochs="))]  # a later key=value wins
# Measured over 4 arithmetics x 3 seeds (benchmarks/arithmetics.py), each above its own run's baseline:
MAP_MARGIN = 0.3  # test mAP above the label frequency (about 0.47): +0.39 to +0.52, median +0.43
F1_MARGIN = 0.05  # test F1 above that of calling every label present, 2f / (1 + f) (about 0.64): micro +0.12 to
# +0.26, macro +0.12 to +0.26
MAE_FRACTION = 0.5  # test MAE at most this share of predicting the training mean's: 0.23 to 0.38, median 0.32
R2_MARGIN = 0.7  # test R^2 above predicting the mean (0): 0.82 to 0.94, median 0.89
AP_MARGIN = 0.1  # each label's test AP above its frequency: +0.18 (green) to +0.57, median +0.34 to +0.53
# TensorBoard with the dashboards: a precision-recall curve per label, predicted against true
DASHBOARDS = [*BASE, "logger=tensorboard", "callbacks.dashboards.enabled=true", "callbacks.dashboards.graph=false"]


def trained_on_a_table(tmp_path_factory, name, make, *args):
    """A run of scripts/train.py on a fabricated table (`make`: the dataset's folder), and what it printed."""
    root = make(tmp_path_factory.mktemp(name), 360)
    cwd = tmp_path_factory.mktemp(f"{name}-cwd")
    result = run_script("train", "dataset=table", f"dataset.root={root}", *args, *TASKS, "hydra.run.dir=run", cwd=cwd)
    assert result.returncode == 0, result.output[-3000:]
    return root, cwd / "run", result.output


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    return trained_on_a_table(tmp_path_factory, "multilabel", make_multilabel_table, "dataset.table=labels.csv",
                              "task=multilabel")


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    return trained_on_a_table(tmp_path_factory, "regression", make_regression_table, "dataset.table=sizes.csv",
                              "dataset.target_column=radius")


@pytest.mark.learning
def test_multilabel_from_a_csv_learns_well_above_the_label_frequencies(multilabel_run):
    root, run_dir, output = multilabel_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    frequency = metrics["test/label_frequency"]
    assert 0.3 < frequency < 0.6
    # mAP of a model that knows nothing is about the label frequency; this one sees the colours
    assert_above("test/map", metrics["test/map"], frequency, MAP_MARGIN)
    every_label = 2 * frequency / (1 + frequency)  # the F1 of calling every label present on every image
    assert_above("test/f1_micro", metrics["test/f1_micro"], every_label, F1_MARGIN)
    assert_above("test/f1_macro", metrics["test/f1_macro"], every_label, F1_MARGIN)
    assert set(metrics["test/per_label"]) == {"blue", "green", "red"}
    for label, row in metrics["test/per_label"].items():
        assert_above(f"test AP of {label}", row["ap"], row["images"] / metrics["test_images"], AP_MARGIN)
    assert "val/map_best" in metrics and "val/acc_best" not in metrics and "test/acc" not in metrics
    # the thresholds fitted on the validation split are in the checkpoint, for predict and the export
    hp = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["task"] == "multilabel" and len(hp["thresholds"]) == 3 and all(0 < t < 1 for t in hp["thresholds"])
    assert [round(t, 4) for t in hp["thresholds"]] == list(metrics["val/thresholds"].values())
    # split.csv: every image once, its labels as the table gives them (joined by |)
    with open(run_dir / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "labels.csv", newline="") as f:
        table = {str(root / row["path"]): "|".join(sorted(row["labels"].split())) for row in csv.DictReader(f)}
    assert {row["path"]: row["label"] for row in rows} == table
    # iterative stratification: each label in each split in about the split's share
    for label in ("red", "green", "blue"):
        counts = {s: sum(1 for r in rows if r["split"] == s and label in r["label"].split("|")) for s in
                  ("train", "val", "test")}
        total = sum(counts.values())
        assert abs(counts["test"] - 0.1 * total) <= 2 and abs(counts["val"] - 0.1 * total) <= 2, (label, counts)
    assert "Dataset table: 360 images, 3 labels" in output
    card = (run_dir / "model_card.md").read_text()
    sizes = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test")}
    assert "360 images after the integrity scan" in card and "A multi-label image classifier" in card
    assert f"| {'all':<5} | {sizes['train']} | {sizes['val']} | {sizes['test']} |" in card
    assert "Thresholds fitted per label on" in output and "Test (best checkpoint): test/map" in output
    assert "task=multilabel: the best checkpoint is the epoch of the highest val/map" in output


def test_multilabel_evaluate_predict_and_onnx_agree_with_the_run(multilabel_run, tmp_path):
    root, run_dir, _ = multilabel_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = run_script("evaluate", f"ckpt={run_dir}", f"out={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluation["images"] == metrics["test_images"]
    # two code paths over one checkpoint: they agree within what one decision (one label of one image) can move
    one = 1 / min(row["images"] for row in metrics["test/per_label"].values())
    for key in ("map", "f1_macro", "f1_micro"):
        assert evaluation[key] == pytest.approx(metrics[f"test/{key}"], abs=one), key
    for name in ("per_label.csv", "predictions.csv", "pr_curves.png", "curves.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        evaluated = {row["path"]: row["predicted"] for row in csv.DictReader(f)}

    test_images = sorted(evaluated)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in test_images:
        (inputs / path.split("/")[-1]).symlink_to(path)
    result = run_script("predict", f"ckpt={run_dir}", f"inputs={inputs}", "format=json",
                        f"out={tmp_path / 'p.json'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    predicted = {row["path"].split("/")[-1]: "|".join(sorted(x["label"] for x in row["labels"]))
                 for row in json.loads((tmp_path / "p.json").read_text())}
    most_agree(predicted, {path.split("/")[-1]: "|".join(sorted(filter(None, labels.split("|"))))
                           for path, labels in evaluated.items()})

    result = run_script("export", f"ckpt={run_dir}", "format=onnx", f"out={tmp_path / 'm.onnx'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["task"] == "multilabel" and sidecar["inside_the_model"]["sigmoid"]
    assert sidecar["evaluation"]["metric"] == "mAP"
    assert sidecar["evaluation"]["models"]["onnx float32"]["accuracy"] == pytest.approx(evaluation["map"], abs=one)
    assert sidecar["evaluation"]["models"]["onnx float32"]["top1_changed"] <= 1
    result = run_script("predict", f"model={tmp_path / 'm.onnx'}", f"inputs={inputs}", "format=json",
                        f"out={tmp_path / 'o.json'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    onnx = {row["path"].split("/")[-1]: "|".join(sorted(x["label"] for x in row["labels"]))
            for row in json.loads((tmp_path / "o.json").read_text())}
    most_agree(onnx, predicted)


@pytest.mark.learning
def test_regression_from_a_csv_learns_the_size_and_every_tool_agrees(regression_run, tmp_path):
    root, run_dir, output = regression_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "regression" and "val/mae_best" in metrics
    assert "task=regression, inferred from the data" in output and "a target to regress" in output
    assert "task=regression: the best checkpoint is the epoch of the lowest val/mae" in output
    with open(root / "sizes.csv", newline="") as f:
        radius = {str(root / row["path"]): float(row["radius"]) for row in csv.DictReader(f)}
    with open(run_dir / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test = np.array([radius[r["path"]] for r in rows if r["split"] == "test"])
    of_the_mean = np.abs(test - np.mean([radius[r["path"]] for r in rows if r["split"] == "train"])).mean()
    assert_below("test/mae", metrics["test/mae"], of_the_mean, MAE_FRACTION)
    assert_above("test/r2", metrics["test/r2"], 0, R2_MARGIN)  # predicting the mean: R^2 0
    # quantile-stratified split: each split spans the range of the target
    for split in ("val", "test"):
        values = [radius[r["path"]] for r in rows if r["split"] == split]
        assert min(values) < 6 and max(values) > 15, (split, min(values), max(values))

    result = run_script("evaluate", f"ckpt={run_dir}", f"out={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluation["mae"] == pytest.approx(metrics["test/mae"], rel=1e-4)
    assert evaluation["rmse"] == pytest.approx(metrics["test/rmse"], rel=1e-4)
    assert evaluation["r2"] == pytest.approx(metrics["test/r2"], abs=1e-4)
    assert (tmp_path / "eval" / "predicted_vs_true.png").stat().st_size > 0
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        evaluated = {row["path"]: float(row["predicted"]) for row in csv.DictReader(f)}

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in evaluated:
        (inputs / path.split("/")[-1]).symlink_to(path)
    result = run_script("predict", f"ckpt={run_dir}", f"inputs={inputs}", f"out={tmp_path / 'p.csv'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    with open(tmp_path / "p.csv", newline="") as f:
        predicted = {row["path"].split("/")[-1]: float(row["radius"]) for row in csv.DictReader(f)}
    assert predicted == pytest.approx({p.split("/")[-1]: v for p, v in evaluated.items()}, rel=1e-4)

    result = run_script("export", f"ckpt={run_dir}", "format=onnx", f"out={tmp_path / 'm.onnx'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["task"] == "regression" and sidecar["output"] == {
        "name": "values", "dtype": "float32", "shape": ["batch", 1], "target": "radius"}
    assert sidecar["evaluation"]["models"]["onnx float32"]["accuracy"] == pytest.approx(evaluation["mae"], rel=1e-3)
    result = run_script("predict", f"model={tmp_path / 'm.onnx'}", f"inputs={inputs}", f"out={tmp_path / 'o.csv'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    with open(tmp_path / "o.csv", newline="") as f:
        onnx = {row["path"].split("/")[-1]: float(row["radius"]) for row in csv.DictReader(f)}
    assert onnx == pytest.approx(predicted, abs=1e-3)
    card = (run_dir / "model_card.md").read_text()
    assert "An image regressor of `radius`" in card and "| test/mae |" in card


@pytest.mark.slow  # two runs with the dashboards and the learning-rate finder: 10 s of the default suite's 5 minutes
def test_a_saved_hugging_face_dataset_of_label_lists_and_of_numbers(tmp_path):
    """Lists of ClassLabels make a multi-label run, a float column a regression, each with its own splits."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value

    root = make_multilabel_table(tmp_path / "ml", 200)
    names = ["blue", "green", "red"]
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    features = Features({"image": Image(), "labels": Sequence(ClassLabel(names=names))})

    def part(chosen):
        return Dataset.from_dict({"image": [str(root / r["path"]) for r in chosen],
                                  "labels": [[names.index(n) for n in r["labels"].split()] for r in chosen]},
                                 features=features)

    DatasetDict({"train": part(rows[:160]), "validation": part(rows[160:180]), "test": part(rows[180:])}) \
        .save_to_disk(str(tmp_path / "hf-ml"))
    result = run_script("train", "dataset=hf", f"dataset.path={tmp_path / 'hf-ml'}", *DASHBOARDS, "schedule.epochs=2",
                        "hydra.run.dir=ml-run", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    assert "task=multilabel (inferred): column 'labels'" in result.output
    metrics = json.loads((tmp_path / "ml-run" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["test_images"] == 20 and metrics["val_images"] == 20
    # every image with its own labels, in its own split (learning from them: test_multilabel_from_a_csv_...)
    given = {"|".join(sorted(r["labels"].split())): [] for r in rows}
    for split, chosen in (("train", rows[:160]), ("val", rows[160:180]), ("test", rows[180:])):
        for r in chosen:
            given["|".join(sorted(r["labels"].split()))].append(split)
    with open(tmp_path / "ml-run" / "split.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 200
    assert {k: sorted(v) for k, v in given.items()} == \
        {k: sorted(r["split"] for r in written if r["label"] == k) for k in given}
    tags = tensorboard_tags(tmp_path / "ml-run")
    assert {"val_pr_curve/blue", "val_pr_curve/green", "val_pr_curve/red"} <= set(tags["tensors"])
    assert {"val/map", "val/map_best", "test/map", "val/loss"} <= set(tags["scalars"])

    root = make_regression_table(tmp_path / "rg", 120)
    with open(root / "sizes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    Dataset.from_dict({"image": [str(root / r["path"]) for r in rows], "radius": [float(r["radius"]) for r in rows]},
                      features=Features({"image": Image(), "radius": Value("float32")})) \
        .save_to_disk(str(tmp_path / "hf-rg"))
    assert read_source("hf", None, path=str(tmp_path / "hf-rg")).task.name == "regression"
    result = run_script("train", "dataset=hf", f"dataset.path={tmp_path / 'hf-rg'}", *DASHBOARDS, "schedule.epochs=2",
                        "head.loss=huber", "tune.lr_find=true", "tune.steps=20", "schedule.freeze_epochs=1",
                        "hydra.run.dir=rg-run", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    metrics = json.loads((tmp_path / "rg-run" / "metrics.json").read_text())
    assert metrics["task"] == "regression" and metrics["test/mae"] > 0 and metrics["test_images"] == 12
    with open(tmp_path / "rg-run" / "split.csv", newline="") as f:  # every image's own number
        assert sorted(round(float(r["label"]), 2) for r in csv.DictReader(f)) == \
            sorted(float(r["radius"]) for r in rows)
    # after the learning-rate finder too, phases are followed by val/mae (lowest best)
    assert [p["phase"] for p in metrics["phases"]] == [1, 2] and "val/mae_best" in metrics["phases"][0]
    assert "(lower is better: " in result.output
    hp = torch.load(tmp_path / "rg-run" / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["head_config"]["loss"] == "huber" and hp["target_stats"]["std"] > 1
    tags = tensorboard_tags(tmp_path / "rg-run")
    assert "val/predicted_vs_true" in tags["images"] and {"val/mae", "val/r2", "test/rmse"} <= set(tags["scalars"])


def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


def test_tables_of_several_labels_and_of_targets_are_read_and_bad_rows_listed(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")  # files are checked later (the integrity scan); the table names them
    for name in ("b.jpg", "c.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "tags.csv").write_text("path,tags\na.jpg,cat;dog\nb.jpg,dog\nc.jpg, cat ; sofa \nd.jpg,\n")
    source = read_source("table", str(tmp_path), table="tags.csv", label_sep=";")  # label_sep given: inferred
    assert source.task.name == "multilabel" and source.classes == ["cat", "dog", "sofa"]
    assert source.targets.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert source.passed_over == [(f"{tmp_path / 'tags.csv'}:5", "no label in column 'tags'")]
    (tmp_path / "spaces.csv").write_text("path,label\na.jpg,great dane\nb.jpg,pug\n")
    assert read_source("table", str(tmp_path), table="spaces.csv").classes == ["great dane", "pug"]  # as always
    assert read_source("table", str(tmp_path), table="spaces.csv", task="multilabel").classes == \
        ["dane", "great", "pug"]  # task=multilabel: a space separates

    (tmp_path / "sizes.csv").write_text("path,size\na.jpg,1.5\nb.jpg,big\nc.jpg,-2e1\nd.jpg,\n")
    source = read_source("table", str(tmp_path), table="sizes.csv", target_column="size")
    assert source.task.name == "regression" and source.classes == ["size"] and source.targets.tolist() == [1.5, -20.0]
    assert source.passed_over == [(f"{tmp_path / 'sizes.csv'}:3", "target 'big' in column 'size' is not a number"),
                                  (f"{tmp_path / 'sizes.csv'}:5", "no target in column 'size'")]
    with pytest.raises(DataError, match=r"sizes.csv: no column 'weight' \(dataset.target_column\)"):
        read_source("table", str(tmp_path), table="sizes.csv", target_column="weight")
    (tmp_path / "mixed.csv").write_text("path,tags\na.jpg,1 cat\nb.jpg,2\n")
    with pytest.raises(DataError, match=r"mixed.csv: column 'tags' mixes numbers .*:2: '1'\) and names .*'cat'"):
        read_source("table", str(tmp_path), table="mixed.csv", task="multilabel")
    (tmp_path / "twice.csv").write_text("path,tags\na.jpg,cat dog\na.jpg,cat\n")
    with pytest.raises(DataError, match="twice.csv"):
        read_source("table", str(tmp_path), table="twice.csv", task="multilabel")
    with pytest.raises(DataError, match="task=multilabel: dataset=image_folder reads one class per image"):
        read_source("image_folder", str(tmp_path), task="multilabel")


def test_iterative_stratification_brings_rare_labels_to_every_split_and_keeps_groups_whole():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 6)) < np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])).astype(np.float32)
    groups = np.arange(400)
    groups[1::7] = groups[0::7][:len(groups[1::7])]  # pairs of duplicates
    splits = stratified_split(np.zeros(400, dtype=np.int64), 0.15, 0.15, 42, groups=groups, multilabel=targets)
    assert np.array_equal(splits, stratified_split(np.zeros(400, dtype=np.int64), 0.15, 0.15, 42, groups=groups,
                                                   multilabel=targets))  # seeded
    for k in range(6):
        total = targets[:, k].sum()
        for split, share in (("val", 0.15), ("test", 0.15), ("train", 0.7)):
            n = targets[splits == split, k].sum()
            assert n >= 1 and abs(n - share * total) <= max(2, 0.1 * total), (k, split, n, total)
    for g in np.unique(groups):
        assert len(set(splits[groups == g])) == 1
    assert abs((splits == "test").sum() - 60) <= 6
    folds = [stratified_split(np.zeros(400, dtype=np.int64), 0.15, 0.15, 42, folds=4, fold=f, multilabel=targets)
             for f in range(4)]
    plain = stratified_split(np.zeros(400, dtype=np.int64), 0.15, 0.15, 42, multilabel=targets)
    assert all(np.array_equal(f == "test", plain == "test") for f in folds)  # the same test split for every fold
    assert np.array_equal(sum((f == "val").astype(int) for f in folds), (folds[0] != "test").astype(int))


@pytest.mark.parametrize("args, message", [
    (["task=ranking"], "task=ranking is not a task; known: multiclass, multilabel, regression"),
    (["task=multilabel"], "task=multilabel: dataset=image_folder reads one class per image; multilabel labels are "
                          "read from dataset=table or dataset=hf"),
    (["dataset=table", "dataset.table=t.csv", "task=multilabel", "augment.mixup=0.2"],
     "augment.mixup=0.2 mixes labels of one class per image: it is for task=multiclass, and this run is "
     "task=multilabel"),
    (["dataset=table", "dataset.table=t.csv", "dataset.target_column=size", "task=regression", "head.loss=bce"],
     "head.loss=bce is not for task=regression: it trains with mse or huber"),
    (["head.loss=huber"], "head.loss=huber is not for task=multiclass"),
])
def test_task_keys_that_cannot_work_are_one_line_before_any_work(tmp_path, args, message):
    (tmp_path / "t.csv").write_text("path,label\n")  # named, not read: the check comes first
    result = run_script("train", "dataset=image_folder", f"dataset.root={tmp_path}", *FAST, *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.output.strip().splitlines()[-1], result.output[-2000:]
    assert "Traceback" not in result.output


@pytest.mark.slow  # a sweep of three folds: 6 s of the default suite's 5 minutes
def test_a_k_fold_sweep_of_a_regression_orders_and_averages_by_the_lowest_mae(tmp_path):
    root = make_regression_table(tmp_path / "rg", 90)
    result = run_script("train", "-m", "dataset=table", f"dataset.root={root}", "dataset.table=sizes.csv",
                        "dataset.target_column=radius", *TASKS, "schedule.epochs=1", "dataset.folds=3",
                        "dataset.fold=0,1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["regression"] * 3 and all(r["status"] == "completed" for r in rows)
    best = [float(r["val_best"]) for r in rows]
    assert best == sorted(best)  # the lowest val/mae_best first
    assert all(float(r["test_mae"]) > 0 and r["test_rmse"] and r["test_r2"] for r in rows)
    assert not any(r["val_acc_best"] or r["test_acc"] for r in rows)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| job | overrides | val/mae_best | test/mae | epochs |" in summary
    assert "| overrides | folds | val/mae_best | test/mae |" in summary
    with open(tmp_path / "sweep" / "folds.csv", newline="") as f:
        folds = list(csv.DictReader(f))
    assert len(folds) == 1 and folds[0]["folds"] == "3"
    assert list(folds[0]) == ["overrides", "folds", "val_mae_best_mean", "val_mae_best_std", "test_mae_mean",
                              "test_mae_std"]
    assert float(folds[0]["val_mae_best_mean"]) == pytest.approx(np.mean(best), rel=1e-6)
    assert f"val/mae_best {best[0]:.4f}" in result.output


def test_a_regression_whose_validation_and_test_splits_hold_one_image_each_trains(tmp_path):
    """R^2 needs two images: with one, it is left out (it stopped the run), and MAE still picks the checkpoint."""
    root = make_regression_table(tmp_path / "rg", 12)
    result = run_script("train", "dataset=table", f"dataset.root={root}", "dataset.table=sizes.csv",
                        "dataset.target_column=radius", *TASKS, "schedule.epochs=2", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_images"] == 1 and metrics["val_images"] == 1 and "test/r2" not in metrics
    assert metrics["test/mae"] > 0 and metrics["val/mae_best"] > 0


def test_map_counts_only_labels_with_positives_in_training_as_in_evaluate():
    from finetune.models.metrics import LabelMeanAP
    from finetune.scores import multilabel_scores

    rng = np.random.default_rng(0)
    targets = (rng.random((50, 3)) < 0.4).astype(np.float32)
    targets[:, 2] = 0  # a label without positives in this split
    probs = np.clip(targets * 0.5 + rng.random((50, 3)) * 0.6, 0, 1).astype(np.float32)
    metric = LabelMeanAP(3)
    metric.update(torch.from_numpy(probs[:20]), torch.from_numpy(targets[:20]).long())
    metric.update(torch.from_numpy(probs[20:]), torch.from_numpy(targets[20:]).long())
    expected = multilabel_scores(probs, targets, [0.5] * 3, ["a", "b", "c"])["map"]
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-5)
    assert multilabel_scores(probs, targets, [0.5] * 3, ["a", "b", "c"])["per_label"]["c"]["ap"] is None


def test_the_gain_of_a_phase_by_mae_says_lower_is_better():
    from finetune.schedule import Schedule

    config = {"epochs": 4, "phases": [{"train": "head", "epochs": 2}, {"train": "all", "epochs": 2}]}
    schedule = Schedule(config, blocks=4, monitor="val/mae", mode="min")
    for epoch, mae in enumerate([3.0, 2.0, 2.5, 1.5]):
        schedule.observe(epoch, mae)
    rows = schedule.gains()
    assert rows[0]["val/mae_best"] == 2.0 and rows[1]["val/mae_best"] == 1.5 and rows[1]["gain"] == -0.5
    assert schedule.describe_gains()[1].endswith("-0.5000 against the best of the phases before (lower is better: "
                                                 "better)")


def test_a_sweep_summary_takes_its_task_from_a_completed_job_not_a_failed_one(tmp_path):
    from finetune.sweep import write_summary

    jobs = [{"job": 0, "status": "failed", "error": "E", "task": None},
            {"job": 1, "status": "completed", "task": "regression", "val_best": 5.0, "test_mae": 5.5},
            {"job": 2, "status": "completed", "task": "regression", "val_best": 2.0, "test_mae": 2.5}]
    for job in jobs:
        (tmp_path / str(job["job"])).mkdir()
        (tmp_path / str(job["job"]) / "job.json").write_text(json.dumps(
            {"overrides": "", "val_acc_best": None, "test_acc": None, "epochs": 1, "wall_time_s": 1, "error": "",
             **job}))
    rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == [2, 1, 0]
    assert "| job | overrides | val/mae_best | test/mae |" in (tmp_path / "summary.md").read_text()


def test_a_hugging_face_dataset_with_a_class_and_a_list_of_tags_reads_the_one_the_task_needs(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image, Sequence

    root = make_multilabel_table(tmp_path / "ml", 6)
    images = [str(p) for p in sorted((root / "images").glob("*.jpg"))]
    Dataset.from_dict({"image": images, "label": [0, 1, 0, 1, 0, 1], "tags": [[0], [1], [0, 1], [1], [0], [0, 1]]},
                      features=Features({"image": Image(), "label": ClassLabel(names=["cat", "dog"]),
                                         "tags": Sequence(ClassLabel(names=["indoor", "outdoor"]))})) \
        .save_to_disk(str(tmp_path / "both"))
    assert read_source("hf", None, path=str(tmp_path / "both")).classes == ["cat", "dog"]
    tagged = read_source("hf", None, path=str(tmp_path / "both"), task="multilabel")
    assert tagged.classes == ["indoor", "outdoor"] and tagged.targets[2].tolist() == [1, 1]


@pytest.mark.slow  # an export and two predictions: 10 s of the default suite's 5 minutes
def test_a_regression_export_of_large_targets_keeps_them_in_float32_and_in_fp16(regression_run, tmp_path):
    """A target in the hundreds of thousands: parity is judged on its scale, and fp16 keeps x * std + mean in
    float32 (float16 ends at 65504)."""
    import shutil

    root, run_dir, _ = regression_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = torch.load(copy / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["target_stats"] = {"mean": 250000.0, "std": 80000.0}
    torch.save(checkpoint, copy / "checkpoints" / "best.ckpt")
    inputs = f"inputs={root / 'images' / '00*.jpg'}"
    result = run_script("predict", f"ckpt={copy}", inputs, f"out={tmp_path / 'ckpt.csv'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    out = tmp_path / "m.onnx"
    result = run_script("export", f"ckpt={copy}", "format=onnx", "quantize=fp16", f"out={out}", "measure=false",
                        cwd=tmp_path)  # the float32 graph's parity is checked on the way, on the target's scale
    assert result.returncode == 0, result.output[-3000:]
    result = run_script("predict", f"model={out}", inputs, f"out={tmp_path / 'fp16.csv'}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    outputs = {}
    for name in ("ckpt", "fp16"):
        with open(tmp_path / f"{name}.csv", newline="") as f:
            outputs[name] = np.array([float(row["radius"]) for row in csv.DictReader(f)])
    assert outputs["ckpt"].min() > 65504  # beyond float16
    assert np.abs(outputs["fp16"] - outputs["ckpt"]).max() < 0.01 * outputs["ckpt"].std() + 1


def test_evaluating_on_a_dataset_the_model_does_not_know_names_its_classes_or_labels_and_maps_the_rest():
    from finetune.data.samples import Source
    from finetune.tasks import task_of

    multiclass, multilabel = task_of("multiclass"), task_of("multilabel")
    with pytest.raises(DataError, match=r"dataset=x has classes the model does not know: zebra \(the model's: cat, "
                                        r"dog\)"):
        multiclass.align(Source(["cat", "zebra"], ["a", "b"], np.array([0, 1])), ["cat", "dog"], "x")
    tagged = Source(["cat", "zebra"], ["a", "b"], np.array([0, 1]), task=multilabel, targets=np.eye(2, dtype="f4"))
    with pytest.raises(DataError, match="dataset=x has labels the model does not know: zebra"):
        multilabel.align(tagged, ["cat", "dog"], "x")
    known = multiclass.align(Source(["dog"], ["a"], np.array([0])), ["cat", "dog"], "x")
    assert known.classes == ["cat", "dog"] and known.labels.tolist() == [1]  # the model's class indices
    dogs = Source(["dog"], ["a"], np.array([0]), task=multilabel, targets=np.ones((1, 1), dtype="f4"))
    assert multilabel.align(dogs, ["cat", "dog"], "x").targets.tolist() == [[0.0, 1.0]]
