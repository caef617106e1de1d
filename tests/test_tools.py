"""evaluate, predict, export, the TensorBoard dashboards, and refusing checkpoints that would run code."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from support import CONF, FAST, ROOT, compose, given, read_csv, run_script
from support.fabricate import add_broken
from support.recipes import assert_agree, most_agree

from finetune.errors import FinetuneError, UnsafeCheckpoint
from finetune.training import run as train


def tool_cfg(name: str, **values):
    """The composed conf/NAME.yaml with `values` set, as the script would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose(name, overrides=[f"{k}={v}" for k, v in values.items() if not isinstance(v, dict)])
    for key, value in values.items():
        if isinstance(value, dict):
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, colours_run):
    """support.recipes.COLOURS (with the dashboards every third epoch): its run directory and metrics."""
    run = colours_run(tmp_path_factory.mktemp("trained"))
    return run.run_dir, run.metrics


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and min(Image.open(path).size) > 100


@pytest.fixture(scope="module")
def evaluated(trained):
    from finetune.evaluate import run

    run_dir, _ = trained
    metrics = run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", num_workers=0))
    return run_dir / "eval", metrics


def test_evaluate_writes_every_file_and_each_parses(evaluated):
    out, metrics = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "expected_calibration_error"):
        assert 0 <= saved[key] and (saved[key] <= 1 or key == "log_loss")
    assert "top5_accuracy" not in saved  # three classes
    report = (out / "classification_report.txt").read_text()
    assert "precision" in report and "not red or green" in report
    rows = read_csv(out / "classification_report.csv")
    assert [r["class"] for r in rows] == ["green", "not red or green", "red", "macro avg", "weighted avg"]
    for name in ("confusion_matrix.png", "curves.png", "reliability.png"):
        assert is_png(out / name), name
    assert saved["temperature"] > 0 and saved["ece_after"] == saved["expected_calibration_error"]
    assert saved["nll_after"] == pytest.approx(saved["log_loss"], abs=1e-6)
    assert (out / "top_losses.png").exists() == (saved["accuracy"] < 1)


def test_evaluate_accuracy_is_the_runs_test_accuracy_and_agrees_with_its_own_predictions(trained, evaluated):
    run_dir, train_metrics = trained
    out, metrics = evaluated
    predictions = read_csv(out / "predictions.csv")
    assert metrics["accuracy"] == pytest.approx(np.mean([int(r["correct"]) for r in predictions]))
    assert metrics["images"] == train_metrics["test_images"]  # same checkpoint and split, batched another way:
    assert_agree(metrics["accuracy"], train_metrics["test/acc"], images=metrics["images"])  # one image may tip
    test_rows = [r for r in read_csv(run_dir / "split.csv") if r["split"] == "test"]
    assert sorted(r["path"] for r in predictions) == sorted(r["path"] for r in test_rows)
    by_class = {r["class"]: r for r in read_csv(out / "classification_report.csv")}
    for name in ("green", "red"):
        mine = [r for r in predictions if r["label"] == name]
        assert float(by_class[name]["recall"]) == pytest.approx(np.mean([r["predicted"] == name for r in mine]))


def test_confusion_matrix_sums_to_the_test_set(trained, evaluated):
    run_dir, _ = trained
    out, metrics = evaluated
    rows = list(csv.reader(open(out / "confusion_matrix.csv")))
    assert rows[0] == ["true \\ predicted", "green", "not red or green", "red"]
    matrix = np.array([[int(x) for x in row[1:]] for row in rows[1:]])
    tests = sum(r["split"] == "test" for r in read_csv(run_dir / "split.csv"))
    assert matrix.sum() == tests == metrics["images"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])


def test_evaluate_never_overwrites_and_takes_other_labelled_sets(trained, evaluated, shapes):
    from finetune.evaluate import run

    run_dir, _ = trained
    again = run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", num_workers=0, tta=True))
    assert (run_dir / "eval-2" / "metrics.json").is_file() and again["tta"] is True
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["tta"] is False
    other = run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", num_workers=0,
                         out=run_dir.parent / "other",
                         dataset={"name": "image_folder", "root": str(shapes), "target": None}))
    assert other["images"] == 120
    # as README writes it on the command line: a dataset group and its root, composed by Hydra from the overrides
    again = run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", num_workers=0,
                         out=run_dir.parent / "other-2", dataset="image_folder", **{"dataset.root": str(shapes)}))
    assert again["images"] == 120 and again["accuracy"] == other["accuracy"]
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset=image_folder: give its folder with dataset.root=DIR"):
        run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", out=run_dir.parent / "other-3",
                     dataset="image_folder"))

    with pytest.raises(ConfigError, match="already holds an evaluation"):
        run(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", out=run_dir.parent / "other"))


def test_metrics_by_hand():
    from finetune.evaluate import compute_metrics

    probs = np.array([[0.9, 0.1, 0, 0, 0, 0, 0], [0.2, 0.5, 0.3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.4, 0.6],
                      [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0]], dtype=np.float32)
    labels = np.array([0, 2, 6, 6])
    m = compute_metrics(probs, labels, 7)
    assert m["accuracy"] == 0.5
    assert m["top5_accuracy"] == 0.75  # the last row's true class is ranked 7th
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.3, 0.6, 1e-15])), rel=1e-3)  # clipped, finite
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)  # recall of classes 0, 2 and 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shapes):
    """The shapes images plus a broken file of each kind, in one folder tree."""
    folder = tmp_path_factory.mktemp("inputs") / "photos"
    shutil.copytree(shapes, folder)
    broken = add_broken(folder / "broken")
    return folder, broken


def test_predict_top1_agrees_with_evaluate(trained, evaluated, shapes, tmp_path):
    from finetune.predict import run

    run_dir, _ = trained
    result = run(tool_cfg("predict", ckpt=run_dir / "checkpoints" / "best.ckpt", inputs=shapes, top_k=2,
                          out=tmp_path / "p.csv", num_workers=0))
    assert result == {"classified": 120, "failed": 0, "out": str(tmp_path / "p.csv")}
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 240 and {r["rank"] for r in rows} == {"1", "2"}
    top1 = {r["path"]: r["class"] for r in rows if r["rank"] == "1"}
    evaluated_top1 = {row["path"]: row["predicted"] for row in read_csv(evaluated[0] / "predictions.csv")}
    most_agree({path: top1[path] for path in evaluated_top1}, evaluated_top1)


def test_predict_reports_each_broken_file_and_classifies_the_rest(trained, inputs, tmp_path):
    from finetune.predict import run

    folder, broken = inputs
    result = run(tool_cfg("predict", ckpt=trained[0] / "checkpoints" / "best.ckpt", inputs=folder,
                          out=tmp_path / "p.csv", num_workers=0))
    assert result["classified"] == 120 and result["failed"] == len(broken)
    paths = {r["path"] for r in read_csv(tmp_path / "p.csv")}
    assert len(paths) == 120 and not paths & {str(p) for p in broken}


def test_predict_formats(trained, inputs, tmp_path):
    from finetune.predict import run

    run_dir, _ = trained
    one = next((inputs[0] / "red").glob("*.jpg"))
    run(tool_cfg("predict", ckpt=run_dir / "checkpoints" / "best.ckpt", inputs=one, format="json",
                 out=tmp_path / "p.json", num_workers=0))
    data = json.loads((tmp_path / "p.json").read_text())
    assert data[0]["path"] == str(one) and len(data[0]["predictions"]) == 3
    assert sum(p["probability"] for p in data[0]["predictions"]) == pytest.approx(1, abs=1e-5)
    run(tool_cfg("predict", ckpt=run_dir / "checkpoints" / "best.ckpt", inputs=f"{inputs[0]}/red/*.jpg",
                 format="kaggle", out=tmp_path / "breeds.csv", num_workers=0))
    rows = list(csv.reader(open(tmp_path / "breeds.csv")))
    assert rows[0] == ["id", "green", "not red or green", "red"] and len(rows) == 41
    assert all(sum(float(x) for x in row[1:]) == pytest.approx(1, abs=1e-4) for row in rows[1:])


def test_kaggle_dogs_vs_cats_submission(tmp_path, dogs_vs_cats):
    from finetune.predict import run

    cfg = compose(tmp_path / "run", "dataset=dogs_vs_cats", f"dataset.root={dogs_vs_cats}", *FAST,
                  "schedule.epochs=1", "logger=none")
    train(cfg, overrides=given(cfg))
    run(tool_cfg("predict", ckpt=tmp_path / "run" / "checkpoints" / "best.ckpt", inputs=dogs_vs_cats / "test1",
                 format="kaggle", out=tmp_path / "submission.csv", num_workers=0))
    rows = list(csv.reader(open(tmp_path / "submission.csv")))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]  # numeric order, as Kaggle's sample
    assert all(0 <= float(r[1]) <= 1 for r in rows[1:])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """`trained`'s best checkpoint exported once as ONNX and as TorchScript, unmeasured (measure=false: the tests
    below check parity; test_export_measures_a_sample_of_eval_images measures): {format: (path, run's result)}."""
    from finetune.checkpoints import AtomicCheckpointIO
    from finetune.export import run
    from finetune.models.module import load_checkpoint

    folder = tmp_path_factory.mktemp("exported")
    # a copy of the run whose best.ckpt holds a temperature, as calibration stores one (24 validation images are
    # too few to fit one: test_calibration fits one in a run of its own and exports it)
    run_dir = folder / "run"
    shutil.copytree(trained[0], run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "temperature": 1.7}
    AtomicCheckpointIO().save_checkpoint(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    paths = {"onnx": folder / "model.onnx", "torchscript": folder / "scripted.pt"}  # each its own sidecar
    return {fmt: (path, run(tool_cfg("export", ckpt=run_dir, format=fmt, out=path, measure=False)))
            for fmt, path in paths.items()}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_describes_itself(trained, exported, fmt):
    from finetune.export import load_exported
    from finetune.models.module import load_module

    run_dir, _ = trained
    out, result = exported[fmt]
    assert result["max_abs_difference"] < 1e-4 and result["megabytes"] > 1
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["output"]["classes"] == ["green", "not red or green", "red"]
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and sidecar["input"]["dtype"] == "uint8"
    model = load_module(out.parent / "run" / "checkpoints" / "best.ckpt")  # the exported copy, T=1.7
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)  # another batch size: the batch is dynamic
    with torch.no_grad():  # calibrated, as predict's: softmax(logits / T)
        expected = (model(images) / model.temperature).softmax(1).numpy()
    assert sidecar["temperature"] == model.temperature != 1.0
    assert sidecar["evaluation"]["measured"] is False and sidecar["evaluation"]["images"] == 0  # measure=false
    actual = load_exported(out, fmt)(images.numpy())
    assert np.abs(actual - expected).max() < 1e-4


def test_export_measures_a_sample_of_eval_images_and_refuses_a_bad_cap(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "sample.pt"
    result = run_script("export", f"ckpt={run_dir}", "format=torchscript", "eval_images=5", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    evaluation = json.loads(out.with_suffix(".json").read_text())["evaluation"]
    assert evaluation["split"] == "test" and evaluation["images"] == 5
    assert "CPU latency" in (out.parent / "sample.model_card.md").read_text()
    result = run_script("export", f"ckpt={run_dir}", "format=torchscript", "eval_images=0", cwd=tmp_path)
    assert result.returncode == 2 and "eval_images must be a number of images >= 1" in result.output


def test_export_refuses_to_hand_over_a_model_that_does_not_match(trained, tmp_path, monkeypatch):
    from finetune import export

    monkeypatch.setattr(export, "load_exported", lambda path, fmt: lambda images: np.zeros((len(images), 3)))
    with pytest.raises(FinetuneError, match="does not match PyTorch"):  # any format: TorchScript exports fastest
        export.run(tool_cfg("export", ckpt=trained[0] / "checkpoints" / "best.ckpt", format="torchscript",
                            out=tmp_path / "m.pt"))
    assert not list(tmp_path.iterdir())  # nothing handed over


def test_default_export_path_is_in_the_run_and_never_overwritten(trained):
    from finetune.export import output_path

    ckpt = trained[0] / "checkpoints" / "best.ckpt"
    first = output_path(None, ckpt, "onnx")
    first.write_bytes(b"x")
    assert first == trained[0] / "export" / "best.onnx"
    assert output_path(None, ckpt, "onnx") == trained[0] / "export" / "best-2.onnx"


class WritesAFile:
    """A pickle payload: loading it with plain torch.load would run `touch`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(trained, tmp_path):
    from finetune.evaluate import run as evaluate
    from finetune.export import run as export
    from finetune.predict import run as predict

    run_dir, _ = trained
    marker = tmp_path / "pwned"
    evil_run = tmp_path / "evil"
    shutil.copytree(run_dir, evil_run, ignore=shutil.ignore_patterns("eval*", "export"))
    good = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    good["hyper_parameters"]["payload"] = WritesAFile(marker)
    for name in ("best.ckpt", "last.ckpt"):
        torch.save(good, evil_run / "checkpoints" / name)
    ckpt = evil_run / "checkpoints" / "best.ckpt"
    attempts = [
        lambda: evaluate(tool_cfg("evaluate", ckpt=ckpt, num_workers=0)),
        lambda: predict(tool_cfg("predict", ckpt=ckpt, inputs=run_dir / "split.csv")),
        lambda: export(tool_cfg("export", ckpt=ckpt, out=tmp_path / "m.onnx")),
        lambda: train(compose(tmp_path / "x", f"resume={evil_run}", "schedule.epochs=9"),
                      overrides=["schedule.epochs=9"]),
    ]
    for attempt in attempts:
        with pytest.raises(UnsafeCheckpoint, match="holds more than weights and plain data, and was not loaded"):
            attempt()
        assert not marker.exists()


def test_dashboards_write_their_images_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"train/augmented_images", "val/predictions", "val/confusion_matrix", "val/per_class"} <= images
    assert len(events.Images("val/confusion_matrix")) == 2  # epochs 3 and 6 of 6: at most every 3rd, bounded
    assert events.Tags()["graph"]
    assert "val_per_class/recall/red" in events.Tags()["scalars"]
    assert any(tag.startswith("val_pr_curve/") for tag in events.Tags()["tensors"])


def test_predict_from_an_onnx_export_loads_neither_torch_nor_lightning(exported, shapes, tmp_path):
    """A process of its own (what it imports is the point): predict.py model=X.onnx, then the modules it holds."""
    script_path = ROOT / "scripts" / "predict.py"
    photo = next((shapes / "red").iterdir())
    code = (f"import runpy, sys; sys.argv = [{str(script_path)!r}, 'model={exported['onnx'][0]}', 'inputs={photo}'];\n"
            f"try:\n    runpy.run_path({str(script_path)!r}, run_name='__main__')\nfinally:\n"
            "    print('LOADED', sorted(m for m in ('torch', 'lightning', 'timm', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{photo}: red " in result.stdout
    assert "LOADED []" in result.stdout


def test_predict_script_exits_2_when_some_inputs_are_broken_and_keeps_the_rest(trained, inputs, tmp_path):
    run_dir, _ = trained
    result = run_script("predict", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", f"inputs={inputs[0]}",
                    "num_workers=0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    rows = read_csv(tmp_path / "predictions.csv")
    assert len({r["path"] for r in rows}) == 120
    for path, reason in inputs[1].items():
        assert f"{path}: not classified ({reason}" in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()  # the tools make no Hydra folders


def test_every_run_has_a_model_card_and_export_copies_it_with_its_own_facts(trained, exported):
    import yaml

    run_dir, metrics = trained
    text = (run_dir / "model_card.md").read_text()
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "timm" and meta["datasets"] == ["image_folder"] and "base_model" not in meta
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == pytest.approx(metrics["test/acc"], abs=1e-4)
    assert f"{metrics['test_images']} images" in result["metrics"][0]["name"]
    rows = read_csv(run_dir / "split.csv")
    for name in ("green", "not red or green", "red"):  # the split table is split.csv's
        counts = [sum(r["label"] == name and r["split"] == s for r in rows) for s in ("train", "val", "test")]
        assert f"| {name:<16} | {counts[0]} | {counts[1]} | {counts[2]} |" in body
    assert "`mobilenetv2_100` (timm architecture `mobilenetv2_100`), random initialisation" in body
    assert f"| test/acc | {metrics['test/acc']:.4f} |" in body
    low, high = metrics["test/acc_ci95"]
    assert f"| test/acc, 95% interval (Wilson) | {low:.4f} to {high:.4f} |" in body
    assert "It knows only these 3 classes" in body and "32x32 pixels" in body
    out, result = exported["onnx"]
    card = out.with_name("model.model_card.md").read_text()
    assert result["model_card"] == str(out.with_name("model.model_card.md")) and card.startswith(text)
    assert "## Export" in card and "| format | onnx |" in card and "parity with PyTorch" in card
    assert "CPU latency" not in card  # measure=false: nothing measured is claimed


def test_runs_and_evaluate_give_95_percent_intervals_for_accuracy_and_each_class(trained, evaluated):
    from finetune.stats import accuracy_interval, wilson

    run_dir, metrics = trained
    assert metrics["test/acc_ci95"] == accuracy_interval(metrics["test/acc"], metrics["test_images"])
    low, high = metrics["test/acc_ci95"]
    assert low < metrics["test/acc"] < high and high - low > 0.1  # 24 test images: a wide interval
    assert json.loads((run_dir / "metrics.json").read_text())["val/acc_best_ci95"] == \
        accuracy_interval(metrics["val/acc_best"], metrics["val_images"])
    folder, evaluated_metrics = evaluated
    rows = read_csv(folder / "predictions.csv")
    per_class = evaluated_metrics["recall_per_class"]
    assert sum(c["images"] for c in per_class.values()) == len(rows)
    for name, c in per_class.items():
        mine = [r for r in rows if r["label"] == name]
        right = sum(r["predicted"] == name for r in mine)
        assert c["images"] == len(mine) and c["recall"] == round(right / len(mine), 4)
        assert c["ci95"] == [round(x, 4) for x in wilson(right, len(mine))]
    assert json.loads((folder / "metrics.json").read_text())["accuracy_ci95"] == evaluated_metrics["accuracy_ci95"]
