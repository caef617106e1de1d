"""Temperature scaling: fitted on held-out logits it lowers NLL and ECE of an over-confident model; a run stores it
where evaluate, predict and export read it."""

import json

import numpy as np
import pytest
import torch

from finetune.calibration import ece, fit_temperature, nll, rescale


def overconfident(n, k=4, seed=0):
    """Logits 4x too large: the labels are drawn from softmax(z), so softmax(z) is calibrated and softmax(4z),
    what this model says, is over-confident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * 4, labels


def test_a_temperature_fitted_on_validation_logits_lowers_nll_and_ece_on_held_out_ones():
    val_logits, val_labels = overconfident(600, seed=1)
    test_logits, test_labels = overconfident(600, seed=2)
    t = fit_temperature(val_logits, val_labels)
    assert 3 < t < 5  # the logits were made 4x too large
    labels = test_labels.numpy()
    before, after = test_logits.softmax(1).numpy(), (test_logits / t).softmax(1).numpy()
    assert nll(after, labels) < nll(before, labels) * 0.8
    assert ece(after, labels) < ece(before, labels) / 2
    assert (after.argmax(1) == before.argmax(1)).all()  # no prediction changes
    assert np.allclose(rescale(before, t), after, atol=1e-5)  # from probabilities at T = 1 alone


def test_a_validation_split_without_errors_leaves_the_temperature_at_1():
    """Every validation image right: the NLL only falls as T goes to 0, so a fit would make every probability
    one-hot (what a fine-tuned model on an easy 60-image val split gives); T stays 1 instead."""
    logits, labels = overconfident(200, seed=3)
    right = logits.argmax(1)
    assert fit_temperature(logits, right) == 1.0
    assert fit_temperature(logits, labels) != 1.0  # with errors it is fitted
    one_hot = nll(np.array([[1.0, 0.0]]), np.array([0]))
    assert one_hot == 0.0 and str(one_hot) == "0.0"  # not -0.0 in metrics.json


def test_a_run_calibrates_and_predict_evaluate_and_export_use_its_temperature(tmp_path, shapes):
    from conftest import FAST, compose, given

    from finetune.export import load_exported
    from finetune.export import run as export
    from finetune.inference import probabilities
    from finetune.models.classifier import load_classifier
    from finetune.train import run

    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "logger=none",
                  "schedule.epochs=2", "schedule.freeze_epochs=1", "dataset.val_fraction=0.3",
                  "dataset.limit_per_class=20")
    metrics = run(cfg, overrides=given(cfg))
    t = metrics["val/temperature"]
    assert t > 0 and t != 1.0 and json.loads((tmp_path / "run" / "metrics.json").read_text())["val/temperature"] == t
    assert metrics["test/nll_after"] <= metrics["test/nll_before"] + 1e-6
    model = load_classifier(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert model.temperature == pytest.approx(t)
    from finetune.data.sources import read_source

    source = read_source("image_folder", str(shapes))
    indices = np.arange(0, len(source), 10)
    calibrated, _ = probabilities(model, source, indices)
    raw, _ = probabilities(model, source, indices, temperature=1.0)
    assert np.allclose(calibrated, rescale(raw, t), atol=1e-5)  # as the temperature says
    out = tmp_path / "model.onnx"
    from test_tools import tool_cfg

    export(tool_cfg("export", ckpt=tmp_path / "run", format="onnx", out=out))
    assert json.loads(out.with_suffix(".json").read_text())["temperature"] == pytest.approx(t)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = (model(images) / t).softmax(1).numpy()
    assert np.abs(load_exported(out, "onnx")(images.numpy()) - expected).max() < 1e-4
